"""The scheduler: runs batch jobs on their cron schedules.

Schedules are configuration (`cdp apply`, kind schedule): the daily segmentation job and
file destinations' exports, each a cron expression in a time zone. Without a configured
segmentation schedule, `CDP_SEGMENTATION_SCHEDULE` (default `0 2 * * *`) in
`CDP_SCHEDULE_TZ` (default UTC) applies. A run missed while the platform was down runs
once at start-up. Exports set to run "after segmentation" start when a segmentation job
ends. The services refuse a second instance of a job that is running, so two instances
of the same job never run at once. Every run is recorded (`schedule_runs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import nats.errors
from nats.aio.subscription import Subscription

from services.scheduler.schedules import ScheduleError, check, missed, next_due
from services.scheduler.store import INSERT_JOB_EVENT, INSERT_RUN, MIGRATIONS
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    DestinationList,
    ExportResult,
    ExportRun,
    GetRequest,
    GetResult,
    JobInfo,
    JobRun,
    ListRequest,
    apply_result,
    decode_object,
)
from shared.db import Tx, apply
from shared.resources import NAME_RE, PLURALS, Schedule, to_builtins
from shared.runtime import ConsumerSpec, Service, Step

SEGMENTATION_SCHEDULE = "segmentation-daily"
KIND = "schedule"
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Schedule)


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
        self.schedules: dict[str, Schedule] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._exports: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "scheduler",
                subjects.STREAM_JOBS,
                self.handle_job_events,
                description="job requests and status events",
            ),
        )

    def active(self) -> dict[str, Schedule]:
        """The schedules in force: configured ones, and the default daily job if no
        configured schedule runs segmentation."""
        out = dict(self.schedules)
        if not any(s.job == "segmentation" for s in out.values()):
            out[self.default.name] = self.default
        return out

    async def on_start(self) -> None:
        for (spec,) in await self.db.execute_fetchall("SELECT spec FROM schedules"):
            schedule = _decoder.decode(spec)
            self.schedules[schedule.name] = schedule
        self._subs = await admin.serve_all(
            self.nc,
            [
                (subjects.admin("scheduler", "apply"), ApplyMany, self.apply),
                (subjects.admin("scheduler", "get"), GetRequest, self.get),
            ],
        )
        for schedule in self.active().values():
            await self._begin(schedule)

    async def on_stop(self) -> None:
        await admin.unsubscribe_all(self._subs)
        tasks = [*self._tasks.values(), *self._exports]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _begin(self, schedule: Schedule) -> None:
        """Run a missed occurrence once, then follow the schedule."""
        rows = await self.db.execute_fetchall(
            "SELECT max(due) FROM schedule_runs WHERE schedule = ?", (schedule.name,)
        )
        last = next(iter(rows))[0]
        now = time.time()
        if last is None:  # new: it starts now, nothing was missed
            await self._record(
                schedule.name, now, None, "registered", f"{schedule.cron} ({schedule.timezone})"
            )
        else:
            due = missed(schedule.cron, schedule.timezone, float(last), now)
            if due is not None:
                self.log.info("running a missed schedule", schedule=schedule.name)
                await self._fire(schedule, due, "missed")
        self._tasks[schedule.name] = asyncio.create_task(
            self._loop(schedule), name=f"schedule:{schedule.name}"
        )

    async def _stop_task(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, schedule: Schedule) -> None:
        while True:
            due = next_due(schedule.cron, schedule.timezone, time.time())
            await asyncio.sleep(max(0.0, due - time.time()))
            await self._fire(schedule, due, "schedule")

    async def _fire(self, schedule: Schedule, due: float, trigger: str) -> None:
        try:
            if schedule.job == "segmentation":
                job = await admin.request(
                    self.nc,
                    subjects.admin("segmentation", "job.run"),
                    JobRun(trigger=trigger),
                    JobInfo,
                )
                job_id: str | None = job.job_id
            else:
                assert schedule.destination is not None
                result = await admin.request(
                    self.nc,
                    subjects.admin("destination", "export.run"),
                    ExportRun(schedule.destination, trigger),
                    ExportResult,
                    timeout=600,
                )
                job_id = f"export:{schedule.destination}:{int(result.started_at)}"
        except AdminFailure as exc:
            await self._record(schedule.name, due, None, "skipped", exc.message)
            return
        except (nats.errors.Error, TimeoutError) as exc:
            await self._record(schedule.name, due, None, "failed", f"unreachable: {exc!r}")
            return
        await self._record(schedule.name, due, job_id, "started", None)
        self.log.info("scheduled job started", schedule=schedule.name, job_id=job_id)

    async def _record(
        self, schedule: str, due: float, job_id: str | None, status: str, detail: str | None
    ) -> None:
        tx = Tx()
        tx.add(INSERT_RUN, (schedule, due, time.time(), job_id, status, detail))
        await apply(self.db, tx)

    # -- configuration -----------------------------------------------------------------------
    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        planned = []
        for obj in request.objects:
            schedule = decode_object(obj, KIND, "scheduler", Schedule)
            self._check(schedule)
            planned.append(
                (
                    schedule,
                    apply_result(KIND, schedule.name, self.schedules.get(schedule.name), schedule),
                )
            )
        if request.dry_run:
            return ApplyManyResult([r for _, r in planned])
        for schedule, result in planned:
            if result.action == "unchanged":
                continue
            tx = Tx()
            tx.add(
                "INSERT INTO schedules (name, spec) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                "SET spec = excluded.spec",
                (schedule.name, _encoder.encode(schedule)),
            )
            await apply(self.db, tx)
            before = set(self.active())
            self.schedules[schedule.name] = schedule
            for gone in before - set(self.active()):  # e.g. the default daily job, replaced
                await self._stop_task(gone)
            await self._stop_task(schedule.name)
            await self._begin(schedule)
        return ApplyManyResult([r for _, r in planned])

    def _check(self, schedule: Schedule) -> None:
        def fail(field: str, message: str) -> AdminFailure:
            return AdminFailure("invalid", message, kind=KIND, name=schedule.name, field=field)

        if not NAME_RE.match(schedule.name):
            raise fail(
                "name", "must start with a lower-case letter and hold only a-z, 0-9, '_', '-'"
            )
        try:
            check(schedule.cron, schedule.timezone)
        except ScheduleError as exc:
            raise fail("cron" if "cron" in str(exc) else "timezone", str(exc)) from None
        if schedule.job == "export" and not schedule.destination:
            raise fail("destination", "an export schedule names its file destination")
        if schedule.job == "segmentation" and schedule.destination:
            raise fail("destination", "only export schedules name a destination")

    async def get(self, request: GetRequest) -> GetResult:
        kind = PLURALS.get(request.kind, request.kind)
        if kind != KIND:
            raise AdminFailure("unknown_kind", f"the scheduler does not own {kind!r}")
        active = self.active()
        if request.name is not None:
            if request.name not in active:
                raise AdminFailure("not_found", f"no schedule named {request.name!r}", kind=KIND)
            return GetResult(KIND, [to_builtins(active[request.name])])
        return GetResult(KIND, [to_builtins(active[n]) for n in sorted(active)])

    # -- after segmentation -------------------------------------------------------------------
    async def handle_job_events(self, batch: Step) -> None:
        batch.tx.add_many(INSERT_JOB_EVENT, ((d.seq, d.subject, d.data) for d in batch.deliveries))
        done = [
            d
            for d in batch.deliveries
            if d.subject == subjects.SEGMENTATION_JOB_DONE
            and admin.finished_segmentation_job(d.data) is not None
        ]
        if len(done) < sum(d.subject == subjects.SEGMENTATION_JOB_DONE for d in batch.deliveries):
            self.log.warning("ignored a segmentation-done message that is not a finished job")
        if done:
            batch.after_commit(self._start_exports)

    def _start_exports(self) -> None:
        task = asyncio.create_task(self._exports_after_segmentation(), name="exports")
        self._exports.add(task)
        task.add_done_callback(self._exports.discard)

    async def _exports_after_segmentation(self) -> None:
        """Every file destination exporting "after segmentation" runs its export now."""
        try:
            listed = await admin.request(
                self.nc, subjects.admin("destination", "list"), ListRequest(), DestinationList
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
