"""The ingest actor's step: one consumer over every `cdp.ingest.<dataset>` subject.

Decide the whole batch with `rules.route` (validation against each dataset's compiled
schema), then persist its effects in order: rejected records into the error store,
accepted ones to identity (`cdp.x.records`) through the outbox, a privacy delete carried
out over the error store (its one read: the stored records the person's keys find) and
passed on, a probe passed on behind the records before it.

When several instances share the stream (`shared`), each accepted record goes to identity
in a message of its own, with the message id its record id gives it: a record applied
again by another instance (after a crash, before its ack) is then dropped by JetStream
as a repeat. Probes and deletes come as steps alone (the runner's barriers), so what
they emit depends on them only.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog

from services.ingest.records import Rejected, encoded
from services.ingest.retention import Retention
from services.ingest.rules import Forget, Forward, Ignored, Incoming, Pass, Reject, route
from services.ingest.state import IngestState
from services.ingest.store import Store
from shared import subjects
from shared.messages import RecordEnvelope, msgpack_encoder
from shared.runtime import Step
from shared.runtime.privacy import report

SERVICE = "ingest"
ERROR_STORE = "rejected_records"
"""What a privacy report counts the removed rejected records as."""


class Records:
    """The step over the ingest stream (records, privacy deletes and probes)."""

    def __init__(
        self,
        state: IngestState,
        retention: Retention,
        *,
        shared: bool = False,
        forget_elsewhere: Callable[[str, list[str], int], Awaitable[int]] | None = None,
    ) -> None:
        self.state = state
        self.retention = retention
        self.shared = shared
        self.forget_elsewhere = forget_elsewhere
        """Shared: asks the other instances to remove a person's rejected records."""
        self.log = structlog.get_logger(service=SERVICE)

    async def __call__(self, step: Step) -> None:
        now = time.time()
        state = self.state
        store = Store(step.db)
        record_id = state.record_id
        messages = [
            Incoming(d.subject, d.data, record_id(d.seq), d.msg_id) for d in step.deliveries
        ]
        effects = route(messages, state.compiled, now, state.phone_region)
        rejects: list[Rejected] = []  # kept with one executemany, before a delete needs them
        for effect in effects.steps:
            match effect:
                case Forward(records) if self.shared:
                    for record in records:
                        for data in encoded([record]):
                            step.emit(subjects.RECORDS, data, key=record.record_id)
                case Forward(records):
                    for data in encoded(records):
                        step.emit(subjects.RECORDS, data)
                case Reject(row):
                    rejects.append(row)
                case Forget():
                    self._keep(step, store, rejects)
                    rejects = []
                    await self._forget(step, store, effect, now)
                case Pass(probe):
                    envelope = RecordEnvelope([], probes=[probe])
                    step.emit(subjects.RECORDS, msgpack_encoder.encode(envelope))
                case Ignored(subject, error):
                    self.log.warning("malformed message ignored", subject=subject, error=error)
        self._keep(step, store, rejects)
        for dataset, (accepted, rejected) in effects.counts.items():
            store.count(step.tx, dataset, accepted, rejected)
        added = effects.rejected_bytes
        if added and self.retention.add(step.tx, now, added):
            step.after_commit(self.retention.refresh_soon)

    def _keep(self, step: Step, store: Store, rows: list[Rejected]) -> None:
        """Keep rejected records in the error store, and log them in one line: how many
        of each dataset and reason, and the first record id of each (the error store has
        every one)."""
        if not rows:
            return
        store.add_rejected(step.tx, rows)
        reasons: dict[str, list[str]] = {}
        for row in rows:
            key = (
                f"{row.dataset}: {row.reason} ({row.path})"
                if row.path
                else f"{row.dataset}: {row.reason}"
            )
            reasons.setdefault(key, []).append(row.record_id)
        self.log.info(
            "records rejected",
            count=len(rows),
            reasons={key: len(ids) for key, ids in reasons.items()},
            first={key: ids[0] for key, ids in reasons.items()},
        )

    async def _forget(self, step: Step, store: Store, forget: Forget, now: float) -> None:
        """Remove the person's rejected records (stored, and rejected earlier in this step,
        which are in its transaction before the delete), pass the request on, report."""
        ids = await store.rejected_ids_by_keys(forget.keys)
        elsewhere = 0
        if self.shared:
            # A step alone (a barrier): what this instance applied after it stays.
            seq = step.deliveries[-1].seq
            ids = {i for i in ids if self.state.applied_before(i, seq)}
            store.delete_rejected(step.tx, ids)
            if self.forget_elsewhere is not None:
                elsewhere = await self.forget_elsewhere(forget.request.request_id, forget.keys, seq)
        else:
            ids.update(forget.pending)
            store.delete_by_keys(step.tx, forget.keys)
        envelope = RecordEnvelope([], deletes=[forget.request])
        step.emit(subjects.RECORDS, msgpack_encoder.encode(envelope))
        report(step, SERVICE, forget.request, {ERROR_STORE: len(ids) + elsewhere}, at=now)
        self.log.info("privacy delete passed on", request_id=forget.request.request_id)
