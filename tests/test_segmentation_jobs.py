"""A batch segmentation job at the handler level over many profiles: real SQLite, no NATS
(StepHarness). Each step of the actor evaluates a bounded share of a job's profiles (the
rest goes back to the stream), the job ends with every profile scanned, and its record
says when it really ended."""

from __future__ import annotations

import msgspec
import pytest

from services.segmentation import jobs
from services.segmentation.catalog import Catalog, compile_segment
from services.segmentation.handlers import Handlers
from services.segmentation.store import MIGRATIONS, SegmentationStore
from shared import subjects
from shared.admin import JobInfo, JobRun
from shared.messages import (
    ChangeEnvelope,
    ChangeItem,
    ProfileChanged,
    Recheck,
    change_batch_decoder,
    msgpack_encoder,
)
from shared.resources import Segment
from shared.runtime.harness import StepHarness

pytestmark = pytest.mark.asyncio
PARTITIONS = 4
FETCH_BATCH = 256
"""Deliveries per step, as the runtime fetches them (CDP_FETCH_BATCH's default)."""


def gold(i: int) -> ProfileChanged:
    return ProfileChanged(
        profile_id=f"p{i:05d}",
        record_ids=[f"r{i}"],
        at=1_700_000_000.0,
        attributes={"loyalty": {"tier": "gold" if i % 2 else "silver"}},
        changed=["loyalty.tier"],
    )


async def _load(h: StepHarness, handlers: Handlers, profiles: int) -> None:
    """`profiles` profiles, every other one gold, in one step."""
    items: list[ChangeItem] = [gold(i) for i in range(profiles)]
    envelope = msgpack_encoder.encode(ChangeEnvelope(items))
    await h.run(handlers.changes, [h.delivery(subjects.changes(0), envelope)])


async def _job_over(
    h: StepHarness, handlers: Handlers, profiles: int, job_id: str
) -> tuple[JobInfo, list[int], list[JobInfo]]:
    """Load `profiles` profiles, run a job over them step by step as the runtime would
    (each step fetches what the stream holds, up to FETCH_BATCH deliveries, and what a
    step publishes on the changes stream comes after it); the job's record, how many of
    its profiles each step scanned, and the ends it published."""
    store = handlers.store
    await _load(h, handlers, profiles)
    request = msgspec.json.encode(JobRun(trigger="manual", job_id=job_id))
    started = await h.run(
        handlers.job_requests, [h.delivery(subjects.SEGMENTATION_JOB_RUN, request)]
    )
    stream = [h.delivery(m.subject, m.payload) for m in started.on(subjects.CHANGES_PREFIX)]
    scanned: list[int] = []
    ends: list[JobInfo] = []
    before = 0
    while stream:
        batch, stream = stream[:FETCH_BATCH], stream[FETCH_BATCH:]
        out = await h.run(handlers.changes, batch)
        assert out.failed == 0
        stream += [h.delivery(m.subject, m.payload) for m in out.on(subjects.CHANGES_PREFIX)]
        ends += [
            msgspec.json.decode(m.payload, type=JobInfo)
            for m in out.on(subjects.SEGMENTATION_JOB_DONE)
        ]
        job = await store.job(job_id)
        assert job is not None
        scanned.append(job.scanned - before)
        before = job.scanned
        assert len(scanned) < 1000, "the job does not end"
    job = await store.job(job_id)
    assert job is not None
    return job, scanned, ends


async def test_a_job_over_many_profiles_ends_with_each_step_evaluating_a_bounded_share() -> None:
    async with StepHarness.open(MIGRATIONS) as h:
        catalog = Catalog()
        catalog.put(compile_segment(Segment(name="gold", expression='loyalty.tier = "gold"')))
        store = SegmentationStore(h.db)
        handlers = Handlers(store, catalog, partitions=PARTITIONS, job_step_profiles=50)
        job, scanned, ends = await _job_over(h, handlers, 1230, "big")
        assert (job.status, job.total, job.scanned) == ("succeeded", 1230, 1230)
        assert job.counts["gold"] == {"members": 615, "realized": 0, "exited": 0}
        assert max(scanned) == 50  # every step evaluates its share, no more
        assert [(e.job_id, e.status, e.scanned) for e in ends] == [("big", "succeeded", 1230)]
        # each profile is evaluated once: nothing left to evaluate again
        assert sum(scanned) == 1230


async def test_a_jobs_recheck_messages_are_small() -> None:
    async with StepHarness.open(MIGRATIONS) as h:
        catalog = Catalog()
        catalog.put(compile_segment(Segment(name="gold", expression='loyalty.tier = "gold"')))
        store = SegmentationStore(h.db)
        handlers = Handlers(store, catalog, partitions=PARTITIONS)
        await _load(h, handlers, 300)
        request = msgspec.json.encode(JobRun(job_id="j"))
        started = await h.run(
            handlers.job_requests, [h.delivery(subjects.SEGMENTATION_JOB_RUN, request)]
        )
        rechecks = [
            item
            for m in started.on(subjects.CHANGES_PREFIX)
            for item in change_batch_decoder.decode(m.payload).items
        ]
        assert all(isinstance(r, Recheck) for r in rechecks)
        sizes = [len(r.profile_ids) for r in rechecks if isinstance(r, Recheck)]
        assert sum(sizes) == 300 and max(sizes) <= jobs.MESSAGE_PROFILES


async def test_a_jobs_record_ends_when_its_last_step_is_over() -> None:
    async with StepHarness.open(MIGRATIONS) as h:
        catalog = Catalog()
        catalog.put(compile_segment(Segment(name="gold", expression='loyalty.tier = "gold"')))
        store = SegmentationStore(h.db)
        handlers = Handlers(store, catalog, partitions=PARTITIONS)
        job, _, _ = await _job_over(h, handlers, 40, "timed")
        assert job.status == "succeeded" and job.finished_at is not None
        # The job's last step evaluated its profiles at its clock reading (the memberships
        # it confirmed say when); the job ended after that evaluation, not when it began.
        [(evaluated,)] = await h.db.execute_fetchall(
            "SELECT max(updated_at) FROM memberships WHERE method = 'batch'"
        )
        assert job.started_at <= evaluated < job.finished_at
