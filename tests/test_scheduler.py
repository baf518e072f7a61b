"""The scheduler: cron with a time zone, and a missed daily run that runs once at start-up."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ops.natsd import NatsServer
from services.scheduler.schedules import ScheduleError, check, last_due, missed, next_due
from services.scheduler.service import SEGMENTATION_SCHEDULE, SchedulerService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import JobInfo, JobList, ListRequest
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


@pytest.mark.asyncio
async def test_a_daily_run_missed_while_down_runs_once_at_start(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    seg = SegmentationService(settings_for("segmentation", nats_server.url, tmp_path))
    await seg.start()
    try:
        first = SchedulerService(settings_for("scheduler", nats_server.url, tmp_path))
        await first.start()
        await first.stop()
        with sqlite3.connect(tmp_path / "scheduler.db") as db:  # as if down for three days
            db.execute("UPDATE schedule_runs SET due = due - 3 * 86400")
        second = SchedulerService(settings_for("scheduler", nats_server.url, tmp_path))
        await second.start()
        try:

            async def ran() -> bool:
                jobs = await admin.request(
                    nc, subjects.admin("segmentation", "jobs"), ListRequest(), JobList
                )
                return [j.trigger for j in jobs.jobs] == ["missed"]

            await eventually(ran)
            with sqlite3.connect(tmp_path / "scheduler.db") as db:
                statuses = [
                    r[0]
                    for r in db.execute(
                        "SELECT status FROM schedule_runs WHERE schedule = ? ORDER BY due",
                        (SEGMENTATION_SCHEDULE,),
                    )
                ]
            assert statuses == ["registered", "started"]
        finally:
            await second.stop()
    finally:
        await seg.stop()


@pytest.mark.asyncio
async def test_exports_follow_only_a_decoded_finished_job_never_the_subject_alone(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Before, any message on cdp.jobs.segmentation.done (any payload) made the scheduler
    run every export "after segmentation"."""
    asked: list[str] = []

    async def on_list(msg: Msg) -> None:
        asked.append(msg.subject)

    await nc.subscribe(subjects.admin("destination", "list"), cb=on_list)
    svc = SchedulerService(settings_for("scheduler", nats_server.url, tmp_path))
    await svc.start()
    js = nc.jetstream()
    try:
        for junk in (b"{}", b"not json", b'{"kind":"segmentation","status":"failed"}'):
            ack = await js.publish(subjects.SEGMENTATION_JOB_DONE, junk)

            async def stored(seq: int = ack.seq) -> bool:
                rows = await svc.db.execute_fetchall(
                    "SELECT 1 FROM job_events WHERE seq = ?", (seq,)
                )
                return bool(list(rows))

            await eventually(stored)
        done = JobInfo(
            job_id="j1",
            kind="segmentation",
            trigger="",
            status="succeeded",
            started_at=0.0,
            finished_at=1.0,
        )
        await js.publish(subjects.SEGMENTATION_JOB_DONE, msgspec.json.encode(done))
        await eventually(lambda: _at_least(asked, 1))
        await nc.flush()
        assert asked == [subjects.admin("destination", "list")], asked
    finally:
        await svc.stop()


async def _at_least(items: list[str], n: int) -> bool:
    return len(items) >= n
