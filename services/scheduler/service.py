"""The scheduler's wiring: its store, its timers and job-event step, its admin API.

Schedules are configuration (`cdp apply`, kind schedule): the daily segmentation job and
file destinations' exports, each a cron expression in a time zone. Without a configured
segmentation schedule, `CDP_SEGMENTATION_SCHEDULE` (default `0 2 * * *`) in
`CDP_SCHEDULE_TZ` (default UTC) applies. The scheduler asks for jobs on `CDP_JOBS` and
learns there how they ended (see `handlers`); it calls no other service.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from services.scheduler.api import SchedulerApi
from services.scheduler.handlers import JOBS_CONSUMER, JOBS_SUBJECTS, JobEvents, Timers
from services.scheduler.schedules import SEGMENTATION_SCHEDULE, check
from services.scheduler.store import MIGRATIONS, SchedulerStore
from shared import subjects
from shared.resources import Schedule
from shared.runtime import ConsumerSpec, Service
from shared.runtime.actor import Outgoing, publish_outbox

__all__ = ["SEGMENTATION_SCHEDULE", "SchedulerService"]


class SchedulerService(Service):
    name = "scheduler"
    migrations = MIGRATIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        default = Schedule(
            name=SEGMENTATION_SCHEDULE,
            job="segmentation",
            cron=os.environ.get("CDP_SEGMENTATION_SCHEDULE", "0 2 * * *"),
            timezone=os.environ.get("CDP_SCHEDULE_TZ", "UTC"),
            description="the daily batch segmentation job (from the environment)",
        )
        check(default.cron, default.timezone)
        self.default = default
        self._events: JobEvents | None = None
        self._timers: Timers | None = None
        self._api: SchedulerApi | None = None

    def consumers(self) -> Sequence[ConsumerSpec]:
        if self._events is None:
            raise RuntimeError("scheduler: not started")
        return (
            ConsumerSpec(
                JOBS_CONSUMER,
                subjects.STREAM_JOBS,
                self._events.on_job_events,
                filter_subjects=JOBS_SUBJECTS,
                description="the done events of jobs: how the runs the scheduler asked for ended",
            ),
        )

    async def _publish(self, out: list[Outgoing]) -> bool:
        return await publish_outbox(self.js, self.db, out, self.log, lambda: self._stopping)

    async def on_start(self) -> None:
        store = SchedulerStore(self.db)
        self._events = JobEvents(store)
        self._timers = timers = Timers(store, self._publish)
        self._api = api = SchedulerApi(
            store,
            timers,
            self._publish,
            default=self.default,
            configured=await store.schedules(),
        )
        await api.start(self.nc)
        for schedule in api.active().values():
            await timers.begin(schedule)

    async def on_stop(self) -> None:
        if self._api is not None:
            await self._api.stop()
        if self._timers is not None:
            await self._timers.end_all()
