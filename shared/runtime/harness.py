"""Run a service's actor step without NATS: the handler-level test harness.

A test opens a `StepHarness` with the service's migrations (a real SQLite, in memory
unless a path is given), hands a handler a list of deliveries, and reads what the step
committed and what it would publish. The commit is the runtime's own (`Committer`): the
handler's writes, its outbox and its offset in one transaction, a failing batch retried
message by message, a message that fails alone kept with its error. Only the transport is
left out: what the runner would publish is returned instead, in order.

    async with StepHarness.open(MIGRATIONS) as h:
        out = await h.run(handlers.on_records, [h.delivery(RECORDS, payload)])
        assert [m.subject for m in out.messages] == [...]
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite
import msgspec

from shared.db import Migration, open_db, write_lock
from shared.runtime.actor import RUNTIME_MIGRATIONS, Committer, Delivery, Handler, Outgoing


class StepOutput(msgspec.Struct):
    """What one `run` committed: the messages it would publish (outbox, in order), the
    notifications it would send, how many messages were applied and how many failed."""

    messages: list[Outgoing]
    notes: list[tuple[str, bytes]]
    handled: int
    failed: int

    def on(self, prefix: str) -> list[Outgoing]:
        """The messages whose subject starts with `prefix`."""
        return [m for m in self.messages if m.subject.startswith(prefix)]


class StepHarness:
    """One SQLite database with the runtime's and a service's tables, and a sequence."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self._seq = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls, migrations: Iterable[Migration], path: Path | str = ":memory:"
    ) -> AsyncIterator[StepHarness]:
        db = await open_db(path, (*RUNTIME_MIGRATIONS, *migrations))
        try:
            yield cls(db)
        finally:
            await db.close()

    def delivery(self, subject: str, data: bytes, msg_id: str | None = None) -> Delivery:
        """A message as the stream would deliver it next (the sequence grows by one)."""
        self._seq += 1
        return Delivery(subject, data, self._seq, msg_id)

    async def run(
        self,
        handler: Handler,
        deliveries: list[Delivery],
        consumer: str = "test",
        max_step_bytes: int | None = None,
    ) -> StepOutput:
        """Apply `deliveries` to `handler` as the runner does (in steps of at most
        `max_step_bytes` of payload when given), and commit."""
        if not deliveries:
            return StepOutput([], [], 0, 0)
        committer = Committer(consumer, handler, self.db, max_step_bytes=max_step_bytes)
        applied = await committer.handle(deliveries)
        messages = [m for out, _ in applied.rounds for m in out]
        if messages:  # as if published: the outbox is emptied
            async with write_lock(self.db):
                await self.db.executemany(
                    "DELETE FROM rt_outbox WHERE msg_id = ?", [(m.msg_id,) for m in messages]
                )
        notes = [n for _, ns in applied.rounds for n in ns]
        return StepOutput(messages, notes, applied.handled, applied.failed)

    async def failed(self) -> list[tuple[int, str, str]]:
        """The messages kept as failed: (stream sequence, subject, error)."""
        rows = await self.db.execute_fetchall(
            "SELECT stream_seq, subject, error FROM rt_failed ORDER BY id"
        )
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]
