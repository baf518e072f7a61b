"""The segmentation service's admin API: segments (apply, get, list, estimate) and batch
segmentation jobs (run, list)."""

from __future__ import annotations

import random
import secrets
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.subscription import Subscription

from services.segmentation.catalog import KIND, Catalog, compile_segment
from services.segmentation.evaluate import ProfileFacts, evaluate
from services.segmentation.language import method as choose_method
from services.segmentation.store import UPSERT_SEGMENT
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    EstimateRequest,
    EstimateResult,
    GetRequest,
    GetResult,
    JobInfo,
    JobList,
    JobRun,
    SegmentInfo,
    SegmentList,
    decode_object,
)
from shared.db import Tx, apply
from shared.messages import ChangeEnvelope, ExperienceEvent, Recheck, msgpack_encoder
from shared.resources import PLURALS, Segment, to_builtins
from shared.runtime import Step

if TYPE_CHECKING:
    from services.segmentation.service import SegmentationService

_encoder = msgspec.json.Encoder()
_any_msgpack = msgspec.msgpack.Decoder()
_counts_decoder = msgspec.json.Decoder(dict[str, dict[str, int]])
PAGE = 1000


class SegmentJobs:
    """A batch job sends every profile through the actor with its job id; the actor
    evaluates every segment and records the job's progress as it goes."""

    def __init__(self, service: SegmentationService) -> None:
        self.svc = service

    async def run(self, request: JobRun) -> JobInfo:
        if request.kind != "segmentation":
            raise AdminFailure("invalid", f"unknown job kind {request.kind!r}", field="kind")
        db = self.svc.db
        running = await db.execute_fetchall(
            "SELECT job_id FROM jobs WHERE status IN ('queued', 'running')"
        )
        if list(running):
            raise AdminFailure(
                "conflict", f"segmentation job {next(iter(running))[0]} is still running"
            )
        now = time.time()
        job_id = f"seg-{int(now):08x}-{secrets.token_hex(4)}"
        total_rows = await db.execute_fetchall("SELECT count(*) FROM facts")
        total = int(next(iter(total_rows))[0])
        status = "running" if total else "succeeded"
        tx = Tx()
        tx.add(
            "INSERT INTO jobs (job_id, trigger, status, started_at, finished_at, total, counts) "
            "VALUES (?, ?, ?, ?, ?, ?, '{}')",
            (job_id, request.trigger, status, now, None if total else now, total),
        )
        await apply(db, tx)
        last = 0
        while True:  # page through every profile, in partitions, through the actor
            # In the order the rows are stored (rowid), not by profile id: the actor then
            # reads and writes neighbouring pages of facts and memberships, where random
            # profile ids made every batch of a million profiles touch pages all over them.
            rows = list(
                await db.execute_fetchall(
                    "SELECT rowid, profile_id FROM facts WHERE rowid > ? ORDER BY rowid LIMIT ?",
                    (last, PAGE),
                )
            )
            if not rows:
                break
            pids = [str(r[1]) for r in rows]
            last = int(rows[-1][0])
            by_part: dict[int, list[str]] = defaultdict(list)
            for pid in pids:
                by_part[self.svc._part(pid)].append(pid)
            for part, group in by_part.items():
                body = msgpack_encoder.encode(ChangeEnvelope([Recheck(group, now, job_id)]))
                await self.svc.js.publish(subjects.changes(part), body)
        self.svc.log.info("segmentation job started", job_id=job_id, profiles=total)
        return JobInfo(
            job_id=job_id,
            kind="segmentation",
            trigger=request.trigger,
            status=status,
            started_at=now,
            total=total,
        )

    async def record_progress(
        self,
        batch: Step,
        scanned: dict[str, int],
        counts: dict[str, dict[str, dict[str, int]]],
        now: float,
    ) -> None:
        """Called by the actor, inside its batch: add what this batch did to its jobs."""
        for job_id in set(scanned) | set(counts):
            rows = await self.svc.db.execute_fetchall(
                "SELECT total, scanned, counts FROM jobs WHERE job_id = ?", (job_id,)
            )
            found = list(rows)
            if not found:
                continue
            total, done, raw = found[0]
            merged = _counts_decoder.decode(raw)
            for seg, c in counts.get(job_id, {}).items():
                into = merged.setdefault(seg, {})
                for k, v in c.items():
                    into[k] = into.get(k, 0) + v
            done += scanned.get(job_id, 0)
            finished = done >= total
            batch.tx.add(
                "UPDATE jobs SET scanned = ?, counts = ?, status = ?, finished_at = ? "
                "WHERE job_id = ?",
                (
                    done,
                    _encoder.encode(merged),
                    "succeeded" if finished else "running",
                    now if finished else None,
                    job_id,
                ),
            )
            if finished:
                self.svc.log.info("segmentation job finished", job_id=job_id, profiles=done)
                info = JobInfo(
                    job_id=job_id,
                    kind="segmentation",
                    trigger="",
                    status="succeeded",
                    started_at=0.0,
                    finished_at=now,
                    total=total,
                    scanned=done,
                    counts=merged,
                )
                batch.emit(subjects.SEGMENTATION_JOB_DONE, _encoder.encode(info))

    async def list(self, limit: int = 20) -> list[JobInfo]:
        rows = await self.svc.db.execute_fetchall(
            "SELECT job_id, trigger, status, started_at, finished_at, total, scanned, counts, "
            "error FROM jobs ORDER BY started_at DESC LIMIT ?",
            (limit,),
        )
        return [
            JobInfo(
                job_id=r[0],
                kind="segmentation",
                trigger=r[1],
                status=r[2],
                started_at=r[3],
                finished_at=r[4],
                total=r[5],
                scanned=r[6],
                counts=_counts_decoder.decode(r[7]),
                error=r[8],
            )
            for r in rows
        ]


class SegmentationAdmin:
    def __init__(self, service: SegmentationService) -> None:
        self.svc = service
        self.jobs = SegmentJobs(service)
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        nc = self.svc.nc

        def area(op: str) -> str:
            return subjects.admin("segmentation", op)

        self._subs = [
            await admin.serve(nc, area("apply"), ApplyMany, self.apply),
            await admin.serve(nc, area("get"), GetRequest, self.get),
            await admin.serve(nc, area("list"), admin.ListRequest, self.list_segments),
            await admin.serve(nc, area("estimate"), EstimateRequest, self.estimate),
            await admin.serve(nc, area("job.run"), JobRun, self.jobs.run),
            await admin.serve(nc, area("jobs"), admin.ListRequest, self.list_jobs),
        ]
        # A job interrupted while it was handing out profiles cannot finish: say so.
        tx = Tx()
        tx.add(
            "UPDATE jobs SET status = 'failed', error = 'interrupted by a restart', "
            "finished_at = ? WHERE status = 'queued'",
            (time.time(),),
        )
        await apply(self.svc.db, tx)

    async def stop(self) -> None:
        await admin.unsubscribe_all(self._subs)

    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        scratch = Catalog()
        scratch.segments = dict(self.svc.catalog.segments)
        planned = []
        policies = request.known("merge_policy")  # a dry run's, not stored yet
        for obj in request.objects:
            compiled, result = scratch.plan(decode_object(obj, KIND, "segmentation", Segment))
            if compiled.spec.merge_policy and compiled.spec.merge_policy not in policies:
                await self._check_policy(compiled.name, compiled.spec.merge_policy)
            scratch.put(compiled)
            planned.append((compiled, result))
        if not request.dry_run:
            now = time.time()
            tx = Tx()
            for compiled, result in planned:
                if result.action == "unchanged":
                    continue
                tx.add(
                    UPSERT_SEGMENT,
                    (
                        compiled.name,
                        _encoder.encode(compiled.spec),
                        Catalog.ast_json(compiled),
                        compiled.method,
                        compiled.reason,
                        now,
                        now,
                    ),
                )
            if tx:
                await apply(self.svc.db, tx)
                self.svc.catalog = scratch
        return ApplyManyResult([r for _, r in planned])

    async def _check_policy(self, segment: str, policy: str) -> None:
        """The merge policy must exist: ask the profile service, which owns them."""
        try:
            await admin.request(
                self.svc.nc,
                subjects.admin("profile", "get"),
                GetRequest("merge_policy", policy),
                GetResult,
                timeout=5,
            )
        except AdminFailure:
            raise AdminFailure(
                "invalid",
                f"unknown merge policy {policy!r}",
                kind=KIND,
                name=segment,
                field="merge_policy",
            ) from None

    async def get(self, request: GetRequest) -> GetResult:
        kind = PLURALS.get(request.kind, request.kind)
        if kind != KIND:
            raise AdminFailure("unknown_kind", f"the segmentation service does not own {kind!r}")
        segs = self.svc.catalog.segments
        if request.name is not None:
            seg = segs.get(request.name)
            if seg is None:
                raise AdminFailure("not_found", f"no segment named {request.name!r}", kind=KIND)
            return GetResult(KIND, [to_builtins(seg.spec)])
        return GetResult(KIND, [to_builtins(segs[n].spec) for n in sorted(segs)])

    async def list_segments(self, _request: Any) -> SegmentList:
        counts = {
            str(seg): (int(n), float(last) if last is not None else None)
            for seg, n, last in await self.svc.db.execute_fetchall(
                "SELECT segment, sum(status IN ('realized', 'existing')), max(updated_at) "
                "FROM memberships GROUP BY segment"
            )
        }
        out = []
        for name in sorted(self.svc.catalog.segments):
            seg = self.svc.catalog.segments[name]
            members, last = counts.get(name, (0, None))
            out.append(
                SegmentInfo(
                    name=name,
                    description=seg.spec.description,
                    expression=seg.spec.expression,
                    method=seg.method,
                    reason=seg.reason,
                    members=members,
                    last_evaluation=last,
                    json=msgspec.json.decode(Catalog.ast_json(seg)),
                )
            )
        return SegmentList(out)

    async def list_jobs(self, request: admin.ListRequest) -> JobList:
        return JobList(await self.jobs.list(max(1, min(request.limit, 200))))

    async def estimate(self, request: EstimateRequest) -> EstimateResult:
        """Evaluate an expression on a random sample of profiles; nothing is created."""
        started = time.perf_counter()
        compiled = compile_segment(Segment(name="estimate", expression=request.expression))
        catalog = self.svc.catalog

        def streaming_of(name: str) -> bool:
            seg = catalog.get(name)
            return seg is not None and seg.streaming

        method = choose_method(compiled.node, streaming_of)
        db = self.svc.db
        bounds = list(await db.execute_fetchall("SELECT count(*), max(rowid) FROM facts"))
        total, max_rowid = int(bounds[0][0]), int(bounds[0][1] or 0)
        size = max(1, min(request.sample, 20_000))
        if total <= size:
            rows = await db.execute_fetchall("SELECT profile_id, attributes FROM facts")
        else:
            rowids = random.sample(range(1, max_rowid + 1), min(max_rowid, size))
            rows = await db.execute_fetchall(
                "SELECT profile_id, attributes FROM facts WHERE rowid IN "
                "(SELECT value FROM json_each(?))",
                (_encoder.encode(rowids),),
            )
        sample = {str(pid): ProfileFacts(_any_msgpack.decode(a), [], set()) for pid, a in rows}
        if sample and compiled.reads.uses_events:
            for pid, rid, ds, et, ts, payload in await db.execute_fetchall(
                "SELECT profile_id, record_id, dataset, event_type, ts, payload FROM events "
                "WHERE profile_id IN (SELECT value FROM json_each(?)) ORDER BY ts",
                (_encoder.encode(list(sample)),),
            ):
                sample[pid].events.append(
                    ExperienceEvent(
                        record_id=rid,
                        dataset=ds,
                        event_type=et,
                        timestamp=ts,
                        payload=_any_msgpack.decode(payload),
                    )
                )
        if sample and compiled.reads.segments:
            for pid, seg in await db.execute_fetchall(
                "SELECT profile_id, segment FROM memberships WHERE status IN "
                "('realized', 'existing') AND profile_id IN (SELECT value FROM json_each(?))",
                (_encoder.encode(list(sample)),),
            ):
                sample[pid].segments.add(seg)
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
