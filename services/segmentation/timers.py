"""Time-based re-checks.

After an evaluation the actor keeps, per profile and streaming segment that reads events,
the earliest time at which the result could change with no new data (a timer). This task
sends the profiles whose timers are due back through the actor (`Recheck`, on the changes
stream of their partition) and puts those timers off by `RETRY_S` until the actor has had
time to act on them; it also tidies exits older than `EXITED_KEPT_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict

from nats.js import JetStreamContext

from services.segmentation.store import SegmentationStore
from shared import subjects
from shared.db import Tx
from shared.messages import ChangeEnvelope, Recheck, msgpack_encoder
from shared.runtime.tasks import cancel

RETRY_S = 30.0
EXITED_KEPT_S = 30 * 24 * 3600.0
DUE_PER_ROUND = 5000
IDLE_S = 60.0


class Timers:
    def __init__(self, store: SegmentationStore, js: JetStreamContext, partitions: int) -> None:
        self._store = store
        self._js = js
        self._partitions = partitions
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """A timer was set: look at the earliest again."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="segment-timers")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    async def _run(self) -> None:
        while True:
            if await self.send_due(time.time()):
                continue
            first = await self._store.first_due()
            now = time.time()
            wait = IDLE_S if first is None else max(0.0, min(IDLE_S, first - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def send_due(self, now: float) -> int:
        """Send the profiles whose timers are due through the actor; how many."""
        due = await self._store.due_profiles(now, DUE_PER_ROUND)
        if not due:
            return 0
        by_part: dict[int, list[str]] = defaultdict(list)
        for pid in due:
            by_part[subjects.partition_of(pid, self._partitions)].append(pid)
        for part, pids in by_part.items():
            body = msgpack_encoder.encode(ChangeEnvelope([Recheck(pids, now)]))
            await self._js.publish(subjects.changes(part), body)
        tx = Tx()
        self._store.postpone_timers(tx, due, now, now + RETRY_S)
        self._store.forget_exits(tx, now - EXITED_KEPT_S)
        await self._store.commit(tx)
        return len(due)
