"""The scheduler: fires the daily batch segmentation job on its cron schedule.

The schedule is `CDP_SEGMENTATION_SCHEDULE` (cron, default `0 2 * * *`) in the time zone
`CDP_SCHEDULE_TZ` (default UTC). A run missed while the platform was down runs once at
start-up. The segmentation service refuses a second job while one runs, so two instances
of the job never run at once. Each run is recorded (`schedule_runs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

import nats.errors

from services.scheduler.schedules import check, missed, next_due
from services.scheduler.store import INSERT_JOB_EVENT, INSERT_RUN, MIGRATIONS
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    BatchList,
    DestinationList,
    ExportResult,
    ExportRun,
    JobInfo,
    JobRun,
)
from shared.db import Tx, apply
from shared.runtime import Batch, ConsumerSpec, Service

SEGMENTATION_SCHEDULE = "segmentation-daily"


class SchedulerService(Service):
    name = "scheduler"
    migrations = MIGRATIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cron = os.environ.get("CDP_SEGMENTATION_SCHEDULE", "0 2 * * *")
        self.tz = os.environ.get("CDP_SCHEDULE_TZ", "UTC")
        check(self.cron, self.tz)
        self._task: asyncio.Task[None] | None = None
        self._exports: set[asyncio.Task[None]] = set()

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "scheduler",
                subjects.STREAM_JOBS,
                self.handle_job_events,
                description="job requests and status events",
            ),
        )

    async def on_start(self) -> None:
        rows = await self.db.execute_fetchall(
            "SELECT max(due) FROM schedule_runs WHERE schedule = ?", (SEGMENTATION_SCHEDULE,)
        )
        last = next(iter(rows))[0]
        now = time.time()
        if last is None:  # first start: the schedule begins now, nothing was missed
            await self._record(now, None, "registered", f"{self.cron} ({self.tz})")
        else:
            due = missed(self.cron, self.tz, float(last), now)
            if due is not None:
                self.log.info("running a missed schedule", schedule=SEGMENTATION_SCHEDULE)
                await self._fire(due, "missed")
        self._task = asyncio.create_task(self._loop(), name="schedule:segmentation")

    async def on_stop(self) -> None:
        tasks = [t for t in (self._task, *self._exports) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            due = next_due(self.cron, self.tz, time.time())
            await asyncio.sleep(max(0.0, due - time.time()))
            await self._fire(due, "schedule")

    async def _fire(self, due: float, trigger: str) -> None:
        try:
            job = await admin.request(
                self.nc, subjects.admin("segmentation", "job.run"), JobRun(trigger=trigger), JobInfo
            )
        except AdminFailure as exc:
            await self._record(due, None, "skipped", exc.message)
            return
        except (nats.errors.Error, TimeoutError) as exc:
            await self._record(due, None, "failed", f"segmentation unreachable: {exc!r}")
            return
        await self._record(due, job.job_id, "started", None)
        self.log.info("scheduled job started", job_id=job.job_id, trigger=trigger)

    async def _record(
        self, due: float, job_id: str | None, status: str, detail: str | None
    ) -> None:
        tx = Tx()
        tx.add(INSERT_RUN, (SEGMENTATION_SCHEDULE, due, time.time(), job_id, status, detail))
        await apply(self.db, tx)

    async def handle_job_events(self, batch: Batch) -> None:
        batch.tx.add_many(INSERT_JOB_EVENT, ((d.seq, d.subject, d.data) for d in batch.deliveries))
        if any(d.subject == subjects.SEGMENTATION_JOB_DONE for d in batch.deliveries):
            batch.after_commit(self._start_exports)

    def _start_exports(self) -> None:
        task = asyncio.create_task(self._exports_after_segmentation(), name="exports")
        self._exports.add(task)
        task.add_done_callback(self._exports.discard)

    async def _exports_after_segmentation(self) -> None:
        """Every file destination exporting "after segmentation" runs its export now."""
        try:
            listed = await admin.request(
                self.nc, subjects.admin("destination", "list"), BatchList(), DestinationList
            )
        except (AdminFailure, nats.errors.Error, TimeoutError) as exc:
            self.log.warning("cannot list destinations for exports", error=repr(exc))
            return
        for dest in listed.destinations:
            if dest.export_schedule != "after_segmentation":
                continue
            try:
                result = await admin.request(
                    self.nc,
                    subjects.admin("destination", "export.run"),
                    ExportRun(dest.name, "after_segmentation"),
                    ExportResult,
                    timeout=600,
                )
                self.log.info(
                    "export done", destination=dest.name, status=result.status, rows=result.rows
                )
            except (AdminFailure, nats.errors.Error, TimeoutError) as exc:
                self.log.warning("export failed", destination=dest.name, error=repr(exc))
