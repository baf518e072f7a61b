"""The segmentation service's admin API, for people and the CLI: segments (apply, get,
list, estimate) and batch segmentation jobs (run, list).

An applied segment is stored and published on `cdp.config.segment.<name>` in one
transaction (outbox): other services learn segments from the config stream. A segment may
name a merge policy only if profile published it there (the `segmentation-policies`
consumer keeps their names). `job.run` asks for a job on the jobs stream, as the scheduler
does, and answers once the job has started.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable

import msgspec
import structlog
from nats.js import JetStreamContext

from services.segmentation import jobs
from services.segmentation.catalog import KIND, Catalog, CompiledSegment, compile_segment, published
from services.segmentation.evaluate import ProfileFacts, evaluate
from services.segmentation.language import method as choose_method
from services.segmentation.store import HOURS, HourlyChanges, MemberCounts, SegmentationStore
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    Conflict,
    EstimateRequest,
    EstimateResult,
    GetRequest,
    GetResult,
    Invalid,
    JobInfo,
    JobList,
    JobRun,
    NotFound,
    PublishedSegment,
    SegmentInfo,
    SegmentList,
    decode_object,
)
from shared.db import Tx
from shared.resources import PLURALS, Segment, to_builtins
from shared.runtime.actor import Outgoing, publish_outbox

POLICIES_CONSUMER = "segmentation-policies"
CATCH_UP_S = 5.0
"""How long an apply naming an unknown merge policy waits for the policies consumer to
apply what the config stream holds (a policy applied a moment ago)."""
JOB_START_S = 30.0
"""How long `job.run` waits for the job it asked for to start."""
_encoder = msgspec.json.Encoder()


def segment_message(seg: PublishedSegment, at: float) -> Outgoing:
    """A segment's message on the config stream (its id: the same version, once)."""
    return Outgoing(
        f"config:{KIND}:{seg.name}:{at}", subjects.config(KIND, seg.name), _encoder.encode(seg)
    )


class SegmentationApi:
    def __init__(self, store: SegmentationStore, catalog: Catalog, js: JetStreamContext) -> None:
        self.store = store
        self.catalog = catalog
        self.js = js
        self.log = structlog.get_logger(service="segmentation")

    def endpoints(self) -> list[admin.Endpoint]:
        def area(op: str) -> str:
            return subjects.admin("segmentation", op)

        return [
            (area("apply"), ApplyMany, self.apply),
            (area("get"), GetRequest, self.get),
            (area("list"), admin.ListRequest, self.list_segments),
            (area("estimate"), EstimateRequest, self.estimate),
            (area("job.run"), JobRun, self.run_job),
            (area("jobs"), admin.ListRequest, self.list_jobs),
        ]

    # -- segments ---------------------------------------------------------------------------
    async def publish_all(self) -> None:
        """Every segment on the config stream (a consumer that starts afresh sees them all;
        a version published already is dropped by the stream as a duplicate)."""
        out = []
        for row in await self.store.segments():
            seg = self.catalog.get(row.name)
            if seg is not None:
                out.append(segment_message(published(seg), row.updated_at))
        await self._publish(out)

    async def _publish(self, out: list[Outgoing]) -> None:
        if out:
            await publish_outbox(self.js, self.store.db, out, self.log, lambda: False)

    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        before = {n: published(s) for n, s in self.catalog.segments.items()}
        scratch = self.catalog.scratch()
        planned = []
        policies = request.known("merge_policy")  # a dry run's, not stored yet
        for obj in request.objects:
            compiled, result = scratch.plan(decode_object(obj, KIND, "segmentation", Segment))
            policy = compiled.spec.merge_policy
            if policy and policy not in policies and not await self._policy_known(policy):
                raise Invalid(
                    f"unknown merge policy {policy!r}",
                    kind=KIND,
                    name=compiled.name,
                    field="merge_policy",
                )
            scratch.put(compiled)
            planned.append(result)
        if request.dry_run:
            return ApplyManyResult(planned)
        # Applied ones, and those whose method follows a changed dependency.
        changed = [s for n, s in scratch.segments.items() if published(s) != before.get(n)]
        if changed:
            now = time.time()
            tx = Tx()
            out = [segment_message(published(s), now) for s in changed]
            for seg in changed:
                self.store.put_segment(
                    tx,
                    seg.name,
                    spec=_encoder.encode(seg.spec),
                    ast=Catalog.ast_json(seg),
                    method=seg.method,
                    reason=seg.reason,
                    now=now,
                )
            self.store.to_outbox(tx, out, now)
            await self.store.commit(tx)
            self.catalog.adopt(scratch)
            await self._publish(out)
        return ApplyManyResult(planned)

    async def _policy_known(self, name: str) -> bool:
        """Whether profile published a merge policy `name`: known here, or once the
        policies consumer has applied what the config stream holds now."""
        if await self.store.has_policy(name):
            return True
        deadline = time.monotonic() + CATCH_UP_S
        while time.monotonic() < deadline:
            try:
                info = await self.js.consumer_info(
                    subjects.STREAM_CONFIG.name, POLICIES_CONSUMER, timeout=1
                )
            except Exception as exc:  # not created yet, or NATS away: ask again
                self.log.debug("policies consumer info failed", error=repr(exc))
            else:
                if not info.num_pending and not info.num_ack_pending:
                    break
            await asyncio.sleep(0.05)
        return await self.store.has_policy(name)

    async def get(self, request: GetRequest) -> GetResult:
        kind = PLURALS.get(request.kind, request.kind)
        if kind != KIND:
            raise AdminFailure("unknown_kind", f"the segmentation service does not own {kind!r}")
        segs = self.catalog.segments
        if request.name is not None:
            seg = segs.get(request.name)
            if seg is None:
                raise NotFound(f"no segment named {request.name!r}", kind=KIND)
            return GetResult(KIND, [to_builtins(seg.spec)])
        return GetResult(KIND, [to_builtins(segs[n].spec) for n in sorted(segs)])

    async def list_segments(self, _request: admin.ListRequest) -> SegmentList:
        counts = await self.store.member_counts()
        hourly = await self.store.hourly_changes(time.time())
        segs = self.catalog.segments
        return SegmentList(
            [_info(segs[n], counts.get(n, MemberCounts()), hourly.get(n)) for n in sorted(segs)]
        )

    async def estimate(self, request: EstimateRequest) -> EstimateResult:
        """Evaluate an expression on a random sample of profiles; nothing is created."""
        started = time.perf_counter()
        compiled = compile_segment(Segment(name="estimate", expression=request.expression))
        catalog = self.catalog

        def streaming_of(name: str) -> bool:
            seg = catalog.get(name)
            return seg is not None and seg.streaming

        method = choose_method(compiled.node, streaming_of)
        total, max_rowid = await self.store.profile_count()
        size = max(1, min(request.sample, 20_000))
        rowids: Iterable[int] | None = None
        if total > size:
            rowids = random.sample(range(1, max_rowid + 1), min(max_rowid, size))
        sample = {
            pid: ProfileFacts(attrs, [], set()) for pid, attrs in await self.store.sample(rowids)
        }
        if sample and compiled.reads.uses_events:
            for pid, event in await self.store.events(sample):
                sample[pid].events.append(event)
        if sample and compiled.reads.segments:
            for m in await self.store.memberships(sample, members_only=True):
                sample[m.profile_id].segments.add(m.segment)
        now = time.time()
        matched = sum(evaluate(compiled.node, f, now) for f in sample.values())
        estimate = round(matched / len(sample) * total) if sample else 0
        return EstimateResult(
            expression=request.expression,
            method=method,
            estimate=estimate,
            matched=matched,
            sample=len(sample),
            profiles=total,
            seconds=round(time.perf_counter() - started, 4),
        )

    # -- jobs -----------------------------------------------------------------------------------
    async def run_job(self, request: JobRun) -> JobInfo:
        """Ask for a job on the jobs stream, as the scheduler does; answer once it started."""
        if request.kind != jobs.KIND:
            raise Invalid(f"unknown job kind {request.kind!r}", field="kind")
        running = await self.store.running_job()
        if running is not None:
            raise Conflict(f"segmentation job {running} is still running")
        job_id = request.job_id or jobs.new_job_id(time.time())
        asked = msgspec.structs.replace(request, job_id=job_id)
        await self.js.publish(
            subjects.SEGMENTATION_JOB_RUN,
            _encoder.encode(asked),
            headers={"Nats-Msg-Id": f"job-run:{job_id}"},
        )
        deadline = time.monotonic() + JOB_START_S
        while (info := await self.store.job(job_id)) is None:
            if time.monotonic() > deadline:
                raise AdminFailure("timeout", f"segmentation job {job_id} did not start in time")
            await asyncio.sleep(0.02)
        if info.status == "failed" and info.error:
            raise Conflict(info.error)
        self.log.info("segmentation job asked for", job_id=job_id, profiles=info.total)
        return info

    async def list_jobs(self, request: admin.ListRequest) -> JobList:
        return JobList(await self.store.jobs(max(1, min(request.limit, 200))))


def _info(seg: CompiledSegment, counts: MemberCounts, hourly: HourlyChanges | None) -> SegmentInfo:
    if hourly is None:
        hourly = HourlyChanges([0] * HOURS, [0] * HOURS)
    return SegmentInfo(
        name=seg.name,
        description=seg.spec.description,
        expression=seg.spec.expression,
        method=seg.method,
        reason=seg.reason,
        members=counts.realized + counts.existing,
        last_evaluation=counts.last,
        json=msgspec.json.decode(Catalog.ast_json(seg)),
        realized=counts.realized,
        existing=counts.existing,
        exited=counts.exited,
        entered_24h=hourly.entered,
        exited_24h=hourly.exited,
    )
