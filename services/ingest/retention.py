"""The error store's retention: rejected records are kept for `errors_max_age_days` and
within `errors_max_bytes`, newest first.

A step that rejects records adds retention to its own transaction when the store may be
past its size limit (`Retention.add`); a timer runs it otherwise, so that old records go
even when nothing is rejected. What it dropped is counted, in the store and as a metric.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from services.ingest.records import payload_keys
from services.ingest.store import Store
from shared.db import Tx
from shared.runtime.tasks import cancel

INTERVAL = 60.0
"""Seconds between two runs of the error store's retention when nothing is rejected."""
KEEP_FRACTION = 0.9
"""Past its size limit the error store drops down to this fraction of it, so that the next
writes do not each drop a few rows."""
KEYING_CHUNK = 1000


def due(size: int, max_bytes: int, now: float, last: float, interval: float = INTERVAL) -> bool:
    """Whether retention must run: the store may be past its size limit, or retention has
    not run for `interval` seconds."""
    return size > max_bytes or now - last > interval


class Retention:
    def __init__(
        self,
        store: Store,
        *,
        max_age_days: float,
        max_bytes: int,
        on_dropped: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.store = store
        self.max_age_s = max_age_days * 86400.0
        self.max_bytes = max_bytes
        self.on_dropped = on_dropped
        """Called with how many more records were dropped since last seen (a metric)."""
        self.size = 0
        """The error store's size, as of the last refresh plus what was added since (an
        upper bound: deletes are not subtracted)."""
        self.added = 0
        """Bytes added ever (to tell what a refresh may not have seen)."""
        self.dropped = 0
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None
        self._log = structlog.get_logger(service="ingest", part="retention")

    def add(self, tx: Tx, now: float, added: int) -> bool:
        """Count `added` bytes; add retention to `tx` when it is due. Returns whether it
        did (then `refresh` once `tx` committed)."""
        self.size += added
        self.added += added
        if not due(self.size, self.max_bytes, now, self._last):
            return False
        self._drop(tx, now)
        return True

    def _drop(self, tx: Tx, now: float) -> None:
        self.store.drop_old(
            tx, now - self.max_age_s, self.max_bytes * KEEP_FRACTION, self.max_bytes
        )
        self._last = now

    async def run(self) -> None:
        """Apply retention in a transaction of its own, then refresh the counts."""
        tx = Tx()
        self._drop(tx, time.time())
        await self.store.apply(tx)
        await self.refresh()

    async def refresh(self, since: int | None = None) -> None:
        """Read the store's size and dropped count. What was added after `since` (a value
        of `added`, taken once the writes before it committed; by default now) is counted
        on top, perhaps twice, so that the size stays an upper bound."""
        before = self.added if since is None else since
        stats = await self.store.error_stats()
        self.size = stats.size + self.added - before
        if stats.dropped > self.dropped:
            self.on_dropped(stats.dropped - self.dropped)
        self.dropped = stats.dropped

    def refresh_soon(self) -> None:
        """Refresh in the background, right after a step that ran retention committed."""
        task = asyncio.create_task(self.refresh(self.added), name="error-store-stats")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def start(self) -> None:
        await self.run()
        self._task = asyncio.create_task(self._loop(), name="retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                await self.run()
            except Exception as exc:  # the next run tries again
                self._log.warning("error store retention failed", error=repr(exc))


async def key_old_rows(store: Store) -> None:
    """Rejected records stored before they were keyed get their identity keys."""
    while rows := await store.unkeyed(KEYING_CHUNK):
        tx = Tx()
        store.add_keys(tx, {r.record_id: payload_keys(r.payload) for r in rows})
        await store.apply(tx)
