"""The scheduler: cron with a time zone, a missed daily run that runs once at start-up,
job requests on CDP_JOBS and runs settled by the jobs' done events."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from ops.natsd import NatsServer
from services.scheduler.errors import ScheduleError
from services.scheduler.schedules import (
    SEGMENTATION_SCHEDULE,
    check,
    last_due,
    missed,
    next_due,
)
from services.scheduler.service import SchedulerService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import (
    ApplyMany,
    ApplyManyResult,
    ConfigObject,
    ExportResult,
    ExportRun,
    JobInfo,
    JobList,
    JobRun,
    ListRequest,
)
from tests.helpers import eventually, settings_for


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_next_due_honours_the_time_zone_across_daylight_saving() -> None:
    # 02:00 in Paris is 01:00 UTC in winter and 00:00 UTC in summer.
    assert next_due("0 2 * * *", "Europe/Paris", ts("2026-01-10T12:00:00+00:00")) == ts(
        "2026-01-11T01:00:00+00:00"
    )
    assert next_due("0 2 * * *", "Europe/Paris", ts("2026-07-10T12:00:00+00:00")) == ts(
        "2026-07-11T00:00:00+00:00"
    )
    assert last_due("0 2 * * *", "UTC", ts("2026-07-10T02:00:00+00:00")) == ts(
        "2026-07-10T02:00:00+00:00"
    )


def test_a_missed_run_is_found_once() -> None:
    now = ts("2026-07-10T12:00:00+00:00")
    ran = ts("2026-07-08T02:00:00+00:00")
    assert missed("0 2 * * *", "UTC", ran, now) == ts("2026-07-10T02:00:00+00:00")
    assert missed("0 2 * * *", "UTC", ts("2026-07-10T02:00:00+00:00"), now) is None
    assert missed("0 2 * * *", "UTC", None, now) is None


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ScheduleError):
        check("every day", "UTC")
    with pytest.raises(ScheduleError):
        check("0 2 * * *", "Mars/Olympus")


def statuses(path: Path, schedule: str = SEGMENTATION_SCHEDULE) -> list[str]:
    with sqlite3.connect(path / "scheduler.db") as db:
        return [
            r[0]
            for r in db.execute(
                "SELECT status FROM schedule_runs WHERE schedule = ? ORDER BY due", (schedule,)
            )
        ]


async def restart_missing_days(
    svc: SchedulerService, url: str, data: Path, days: int
) -> SchedulerService:
    """Stop the scheduler, age its runs by `days` (as if it had been down that long), start
    it again: each schedule's last occurrence was missed."""
    await svc.stop()
    with sqlite3.connect(data / "scheduler.db") as db:
        db.execute("UPDATE schedule_runs SET due = due - ? * 86400", (days,))
    again = SchedulerService(settings_for("scheduler", url, data))
    await again.start()
    return again


@pytest.mark.asyncio
async def test_a_daily_run_missed_while_down_runs_once_at_start(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    seg = SegmentationService(settings_for("segmentation", nats_server.url, tmp_path))
    await seg.start()
    try:
        first = SchedulerService(settings_for("scheduler", nats_server.url, tmp_path))
        await first.start()
        second = await restart_missing_days(first, nats_server.url, tmp_path, 3)
        try:

            async def ran() -> bool:
                jobs = await admin.request(
                    nc, subjects.admin("segmentation", "jobs"), ListRequest(), JobList
                )
                return [j.trigger for j in jobs.jobs] == ["missed"]

            await eventually(ran)

            async def settled() -> bool:
                return statuses(tmp_path) == ["registered", "succeeded"]

            await eventually(settled)
        finally:
            await second.stop()
    finally:
        await seg.stop()


async def last_on(nc: Client, subject: str) -> tuple[bytes, str] | None:
    """The last message the jobs stream holds on `subject` and its message id, if any."""
    try:
        msg = await nc.jetstream().get_last_msg(subjects.STREAM_JOBS.name, subject)
    except NotFoundError:
        return None
    return msg.data or b"", (msg.headers or {}).get("Nats-Msg-Id", "")


@pytest.mark.asyncio
async def test_a_due_segmentation_schedule_asks_on_the_jobs_stream_and_its_done_event_settles_it(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """No request/reply to segmentation: the missed daily run is a JobRun on
    cdp.jobs.segmentation.run with the occurrence's job id (and that id as the message id,
    so a request published again runs once); the run stays requested until a done event
    with its job id arrives, then it has succeeded."""
    first = SchedulerService(settings_for("scheduler", nats_server.url, tmp_path))
    await first.start()
    svc = await restart_missing_days(first, nats_server.url, tmp_path, 3)
    try:
        found: list[tuple[bytes, str]] = []

        async def requested() -> bool:
            last = await last_on(nc, subjects.SEGMENTATION_JOB_RUN)
            found[:] = [last] if last is not None else []
            return bool(found)

        await eventually(requested)
        data, msg_id = found[0]
        run = msgspec.json.decode(data, type=JobRun)
        due = last_due(svc.default.cron, svc.default.timezone, time.time())
        job_id = f"{SEGMENTATION_SCHEDULE}-{int(due)}"
        assert run == JobRun(kind="segmentation", trigger="missed", job_id=job_id)
        assert msg_id == f"scheduler:{job_id}"
        assert statuses(tmp_path) == ["registered", "requested"]

        done = JobInfo(
            job_id=job_id,
            kind="segmentation",
            trigger="missed",
            status="succeeded",
            started_at=due,
            finished_at=due + 1,
        )
        await nc.jetstream().publish(subjects.SEGMENTATION_JOB_DONE, msgspec.json.encode(done))

        async def settled() -> bool:
            return statuses(tmp_path) == ["registered", "succeeded"]

        await eventually(settled)
    finally:
        await svc.stop()


@pytest.mark.asyncio
async def test_a_due_export_schedule_asks_its_destination_and_a_failed_export_fails_the_run(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """An export schedule is published on the config stream when applied; when due, it is
    an ExportRun on cdp.jobs.export.<destination>.run; the destination's failed result on
    cdp.jobs.export.<destination>.done fails the run, with the error."""
    first = SchedulerService(settings_for("scheduler", nats_server.url, tmp_path))
    await first.start()
    spec = {
        "name": "crm-nightly",
        "job": "export",
        "destination": "crm-file",
        "cron": "30 3 * * *",
        "timezone": "Europe/Paris",
    }
    await admin.request(
        nc,
        subjects.admin("scheduler", "apply"),
        ApplyMany([ConfigObject("schedule", spec)]),
        ApplyManyResult,
    )
    js = nc.jetstream()
    published = await js.get_last_msg(
        subjects.STREAM_CONFIG.name, subjects.config("schedule", "crm-nightly")
    )
    assert msgspec.json.decode(published.data or b"") == spec
    svc = await restart_missing_days(first, nats_server.url, tmp_path, 2)
    try:
        found: list[tuple[bytes, str]] = []
        subject = subjects.export_run("crm-file")

        async def requested() -> bool:
            last = await last_on(nc, subject)
            found[:] = [last] if last is not None else []
            return bool(found)

        await eventually(requested)
        data, msg_id = found[0]
        due = last_due("30 3 * * *", "Europe/Paris", time.time())
        job_id = f"crm-nightly-{int(due)}"
        assert msgspec.json.decode(data, type=ExportRun) == ExportRun(
            "crm-file", "missed", job_id=job_id
        )
        assert msg_id == f"scheduler:{job_id}"
        assert statuses(tmp_path, "crm-nightly") == ["registered", "requested"]

        result = ExportResult(
            destination="crm-file",
            trigger="missed",
            status="failed",
            started_at=due,
            finished_at=due + 1,
            mode="full",
            files=[],
            rows=0,
            error="sftp: connection refused",
            job_id=job_id,
        )
        await js.publish(subjects.export_done("crm-file"), msgspec.json.encode(result))

        async def settled() -> bool:
            return statuses(tmp_path, "crm-nightly") == ["registered", "failed"]

        await eventually(settled)
        with sqlite3.connect(tmp_path / "scheduler.db") as db:
            detail = db.execute(
                "SELECT detail FROM schedule_runs WHERE job_id = ?", (job_id,)
            ).fetchone()
        assert detail == ("sftp: connection refused",)
    finally:
        await svc.stop()


@pytest.mark.asyncio
async def test_a_run_is_settled_only_by_a_decoded_done_event_of_its_job_never_the_subject_alone(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Before, any message on cdp.jobs.segmentation.done (any payload) made the scheduler
    run every export "after segmentation". Now a message settles a run only if it decodes
    as the end of that run's job."""
    first = SchedulerService(settings_for("scheduler", nats_server.url, tmp_path))
    await first.start()
    svc = await restart_missing_days(first, nats_server.url, tmp_path, 3)
    js = nc.jetstream()
    try:
        await eventually(lambda: _true(statuses(tmp_path) == ["registered", "requested"]))
        due = last_due(svc.default.cron, svc.default.timezone, time.time())
        job_id = f"{SEGMENTATION_SCHEDULE}-{int(due)}"
        other = JobInfo(
            job_id="someone-else",
            kind="segmentation",
            trigger="",
            status="succeeded",
            started_at=0.0,
        )
        last = 0
        for junk in (
            b"{}",
            b"not json",
            b'{"kind":"segmentation","status":"failed"}',
            msgspec.json.encode(other),
            msgspec.json.encode(msgspec.structs.replace(other, job_id=job_id, status="running")),
        ):
            last = (await js.publish(subjects.SEGMENTATION_JOB_DONE, junk)).seq

        async def drained() -> bool:
            return svc.runners[0].offset >= last

        await eventually(drained)
        assert statuses(tmp_path) == ["registered", "requested"]
        done = msgspec.structs.replace(other, job_id=job_id)
        await js.publish(subjects.SEGMENTATION_JOB_DONE, msgspec.json.encode(done))
        await eventually(lambda: _true(statuses(tmp_path) == ["registered", "succeeded"]))
    finally:
        await svc.stop()


async def _true(value: bool) -> bool:
    return value
