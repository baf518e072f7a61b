"""The scheduler actor's steps: a schedule that is due, and the done events of jobs.

When a schedule is due its run is recorded as `requested` and its job request put in the
outbox, in one transaction; the request is then published on `CDP_JOBS`
(`cdp.jobs.segmentation.run`, or `cdp.jobs.export.<destination>.run`) with the message
id `scheduler:<job id>`, so a request published again runs once. The service that runs
the job reports its end on `CDP_JOBS` with the same job id (`cdp.jobs.segmentation.done`,
`cdp.jobs.export.<destination>.done`), and `on_job_events` settles the run: succeeded
or failed. A run missed while the platform was down runs once when its schedule begins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from services.scheduler.schedules import (
    DONE_SUBJECTS,
    job_request,
    missed,
    next_due,
    outcome,
)
from services.scheduler.store import Run, SchedulerStore
from shared.db import Tx
from shared.resources import Schedule
from shared.runtime import Step
from shared.runtime.actor import Outgoing
from shared.runtime.tasks import cancel

JOBS_CONSUMER = "scheduler"
"""The durable consumer of the jobs' done events."""
JOBS_SUBJECTS = DONE_SUBJECTS

Publish = Callable[[list[Outgoing]], Awaitable[object]]
"""Publishes committed outbox messages (the runtime's `publish_outbox`)."""


class JobEvents:
    """The step over the done events of jobs: settle the runs that asked for them."""

    def __init__(self, store: SchedulerStore) -> None:
        self.store = store
        self.log = structlog.get_logger(service="scheduler")

    async def on_job_events(self, step: Step) -> None:
        now = time.time()
        for d in step.deliveries:
            done = outcome(d.subject, d.data)
            if done is None:
                self.log.warning(
                    "ignored a job event that is not a finished job", subject=d.subject
                )
                continue
            self.store.settle(step.tx, done.job_id, done.status, done.detail, now)


class Timers:
    """One task per schedule in force, each sleeping until the schedule is due and then
    firing it: its run recorded and its job request committed to the outbox together,
    then published."""

    def __init__(self, store: SchedulerStore, publish: Publish) -> None:
        self.store = store
        self.publish = publish
        self.log = structlog.get_logger(service="scheduler")
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def begin(self, schedule: Schedule, now: float | None = None) -> None:
        """Run a missed occurrence once (a schedule seen before), then follow it."""
        now = time.time() if now is None else now
        last = await self.store.last_due(schedule.name)
        if last is None:  # new: it starts now, nothing was missed
            tx = Tx()
            self.store.record_run(
                tx,
                Run(
                    schedule=schedule.name,
                    due=now,
                    started_at=now,
                    job_id=None,
                    status="registered",
                    detail=f"{schedule.cron} ({schedule.timezone})",
                ),
            )
            await self.store.commit(tx)
            last = now
        else:
            due = missed(schedule.cron, schedule.timezone, last, now)
            if due is not None:
                self.log.info("running a missed schedule", schedule=schedule.name)
                await self.fire(schedule, due, "missed", now)
                last = due
        self._tasks[schedule.name] = asyncio.create_task(
            self._loop(schedule, last), name=f"schedule:{schedule.name}"
        )

    async def _loop(self, schedule: Schedule, last: float) -> None:
        while True:
            # Never the same occurrence twice, even if the sleep ends a little early.
            due = next_due(schedule.cron, schedule.timezone, max(time.time(), last))
            await asyncio.sleep(max(0.0, due - time.time()))
            await self.fire(schedule, due, "schedule")
            last = due

    async def fire(
        self, schedule: Schedule, due: float, trigger: str, now: float | None = None
    ) -> Outgoing:
        """Record the run and commit its job request; then publish it. Returns it."""
        now = time.time() if now is None else now
        request = job_request(schedule, due, trigger)
        out = Outgoing(request.msg_id, request.subject, request.payload)
        tx = Tx()
        self.store.record_run(
            tx,
            Run(
                schedule=schedule.name,
                due=due,
                started_at=now,
                job_id=request.job_id,
                status="requested",
            ),
        )
        self.store.send(tx, [out], now)
        await self.store.commit(tx)
        await self.publish([out])
        self.log.info("scheduled job requested", schedule=schedule.name, job_id=request.job_id)
        return out

    async def end(self, name: str) -> None:
        """Stop following the schedule `name` (if it was followed)."""
        await cancel(self._tasks.pop(name, None))

    async def end_all(self) -> None:
        for name in list(self._tasks):
            await self.end(name)
