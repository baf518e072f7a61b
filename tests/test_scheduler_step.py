"""The scheduler's steps at the handler level, with a real SQLite and no NATS: a schedule
that is due, a schedule that begins, and the done events that settle runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import msgspec
import pytest

from services.scheduler.handlers import JobEvents, Timers
from services.scheduler.schedules import job_request, outcome
from services.scheduler.store import MIGRATIONS, Run, SchedulerStore
from shared import subjects
from shared.admin import ExportResult, ExportRun, JobInfo, JobRun
from shared.resources import Schedule
from shared.runtime.actor import Outgoing
from shared.runtime.harness import StepHarness

DAILY = Schedule(name="daily", job="segmentation", cron="0 2 * * *")
NIGHTLY = Schedule(name="nightly", job="export", cron="30 3 * * *", destination="crm-file")


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class Scheduler:
    def __init__(self, h: StepHarness) -> None:
        self.h = h
        self.store = SchedulerStore(h.db)
        self.published: list[Outgoing] = []
        self.in_outbox_when_published: list[str] = []
        self.timers = Timers(self.store, self.publish)
        self.events = JobEvents(self.store)

    async def publish(self, out: list[Outgoing]) -> None:
        rows = await self.h.db.execute_fetchall("SELECT msg_id FROM rt_outbox ORDER BY rowid")
        self.in_outbox_when_published += [str(r[0]) for r in rows]
        self.published += out

    async def settle(self, *events: tuple[str, bytes]) -> None:
        deliveries = [self.h.delivery(subject, data) for subject, data in events]
        out = await self.h.run(self.events.on_job_events, deliveries, "scheduler")
        assert (out.handled, out.failed, out.messages) == (len(events), 0, [])


@asynccontextmanager
async def scheduler() -> AsyncIterator[Scheduler]:
    async with StepHarness.open(MIGRATIONS) as h:
        s = Scheduler(h)
        try:
            yield s
        finally:
            await s.timers.end_all()


def done(job_id: str, status: str = "succeeded", error: str | None = None) -> tuple[str, bytes]:
    info = JobInfo(
        job_id=job_id, kind="segmentation", trigger="", status=status, started_at=0.0, error=error
    )
    return subjects.SEGMENTATION_JOB_DONE, msgspec.json.encode(info)


@pytest.mark.asyncio
async def test_a_due_schedule_commits_its_run_and_its_request_before_publishing_it() -> None:
    async with scheduler() as s:
        due = ts("2026-07-10T02:00:00+00:00")
        await s.timers.fire(DAILY, due, "schedule", now=due + 0.5)
        job_id = f"daily-{int(due)}"
        assert s.in_outbox_when_published == [f"scheduler:{job_id}"]
        assert s.published == [
            Outgoing(
                f"scheduler:{job_id}",
                subjects.SEGMENTATION_JOB_RUN,
                msgspec.json.encode(JobRun(trigger="schedule", job_id=job_id)),
            )
        ]
        assert await s.store.runs("daily") == [
            Run(
                schedule="daily",
                due=due,
                started_at=due + 0.5,
                job_id=job_id,
                status="requested",
            )
        ]


@pytest.mark.asyncio
async def test_an_export_schedule_asks_its_destination_for_an_export_with_the_job_id() -> None:
    due = ts("2026-07-10T01:30:00+00:00")
    request = job_request(NIGHTLY, due, "missed")
    assert request.subject == subjects.export_run("crm-file")
    assert msgspec.json.decode(request.payload, type=ExportRun) == ExportRun(
        "crm-file", "missed", job_id=f"nightly-{int(due)}"
    )
    assert request.msg_id == f"scheduler:nightly-{int(due)}"


@pytest.mark.asyncio
async def test_the_same_occurrence_fired_twice_is_one_run_and_one_request_id() -> None:
    async with scheduler() as s:
        due = ts("2026-07-10T02:00:00+00:00")
        await s.timers.fire(DAILY, due, "schedule", now=due)
        await s.timers.fire(DAILY, due, "schedule", now=due + 1)
        assert {o.msg_id for o in s.published} == {f"scheduler:daily-{int(due)}"}
        assert len(await s.store.runs("daily")) == 1


@pytest.mark.asyncio
async def test_a_new_schedule_is_registered_and_a_known_one_runs_its_missed_occurrence_once() -> (
    None
):
    async with scheduler() as s:
        now = ts("2026-07-10T12:00:00+00:00")
        await s.timers.begin(DAILY, now=now - 3 * 86400)
        await s.timers.end("daily")
        assert [r.status for r in await s.store.runs("daily")] == ["registered"]
        assert s.published == []
        await s.timers.begin(DAILY, now=now)
        await s.timers.end("daily")
        await s.timers.begin(DAILY, now=now + 60)
        due = ts("2026-07-10T02:00:00+00:00")
        runs = await s.store.runs("daily")
        assert [(r.status, r.due, r.job_id) for r in runs] == [
            ("registered", now - 3 * 86400, None),
            ("requested", due, f"daily-{int(due)}"),
        ]
        assert [msgspec.json.decode(o.payload, type=JobRun).trigger for o in s.published] == [
            "missed"
        ]


@pytest.mark.asyncio
async def test_a_done_event_settles_the_run_of_its_job_and_only_that_run() -> None:
    async with scheduler() as s:
        first, second = ts("2026-07-09T02:00:00+00:00"), ts("2026-07-10T02:00:00+00:00")
        await s.timers.fire(DAILY, first, "schedule", now=first)
        await s.timers.fire(DAILY, second, "schedule", now=second)
        await s.settle(done(f"daily-{int(second)}", "failed", "profile store unreadable"))
        runs = await s.store.runs("daily")
        assert [(r.status, r.detail) for r in runs] == [
            ("requested", None),
            ("failed", "profile store unreadable"),
        ]
        assert runs[1].finished_at is not None


@pytest.mark.asyncio
async def test_a_settled_run_stays_as_it_ended() -> None:
    async with scheduler() as s:
        due = ts("2026-07-10T02:00:00+00:00")
        await s.timers.fire(DAILY, due, "schedule", now=due)
        await s.settle(done(f"daily-{int(due)}"))
        await s.settle(done(f"daily-{int(due)}", "failed", "late duplicate"))
        assert [(r.status, r.detail) for r in await s.store.runs("daily")] == [("succeeded", None)]


@pytest.mark.asyncio
async def test_events_that_are_not_a_finished_job_of_a_run_settle_nothing() -> None:
    async with scheduler() as s:
        due = ts("2026-07-10T02:00:00+00:00")
        job_id = f"daily-{int(due)}"
        await s.timers.fire(DAILY, due, "schedule", now=due)
        await s.settle(
            (subjects.SEGMENTATION_JOB_DONE, b"not json"),
            (subjects.SEGMENTATION_JOB_DONE, b"{}"),
            done(job_id, "running"),
            done("someone-else"),
        )
        assert [r.status for r in await s.store.runs("daily")] == ["requested"]


def export_done(destination: str, job_id: str | None, status: str = "succeeded") -> bytes:
    result = ExportResult(
        destination=destination,
        trigger="schedule",
        status=status,
        started_at=0.0,
        finished_at=1.0,
        mode="full",
        files=[],
        rows=0,
        job_id=job_id,
    )
    return msgspec.json.encode(result)


def test_an_export_outcome_counts_only_on_its_own_destinations_subject_and_with_a_job_id() -> None:
    assert outcome(subjects.export_done("crm-file"), export_done("crm-file", "j1")) is not None
    assert outcome(subjects.export_done("other"), export_done("crm-file", "j1")) is None
    assert outcome(subjects.export_done("crm-file"), export_done("crm-file", None)) is None
    assert outcome(subjects.export_run("crm-file"), export_done("crm-file", "j1")) is None
