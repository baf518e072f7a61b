"""The batch segmentation job.

A job is asked for on `cdp.jobs.segmentation.run` (a `JobRun`, by the scheduler or by the
admin API for the CLI) and run once per job id. Starting it is one step: the job is
recorded and every profile is sent back through the actor (`Recheck`s with the job id,
on the changes stream, through the outbox: handed out exactly once). The actor then
evaluates every segment for those profiles and adds what each of its steps did to the
job (`record_progress`); the step that reaches the last profile finishes the job and
publishes its `JobInfo` on `cdp.jobs.segmentation.done`, through the outbox too.

The rechecks are small (`MESSAGE_PROFILES` profiles each), and a step of the actor
evaluates at most `STEP_PROFILES` profiles of jobs: it hands the rest of what it fetched
back to the changes stream (`defer`), so that one step's work, memory and time stay
bounded however many profiles a job has and however many messages a step fetches.
"""

from __future__ import annotations

import secrets
from collections import defaultdict

import msgspec
import structlog

from services.segmentation.store import SegmentationStore
from shared import subjects
from shared.admin import JobInfo, JobRun
from shared.messages import ChangeEnvelope, ChangeItem, Recheck, msgpack_encoder
from shared.runtime import Step

KIND = "segmentation"
PAGE = 1000
"""Profiles read and split by partition at a time."""
MESSAGE_PROFILES = 20
"""Profiles per recheck message at most: a step that fetches a batch of messages
(CDP_FETCH_BATCH, 256 by default) gets at most 5,120 profiles of a job, within its share."""
STEP_PROFILES = 6000
"""Profiles of jobs one step of the actor evaluates at most (the rest is deferred): one
step holds all their events in memory and must end well within the ack wait."""
_encoder = msgspec.json.Encoder()
_log = structlog.get_logger(service="segmentation")

Counts = dict[str, dict[str, dict[str, int]]]
"""job id -> segment -> members, realized, exited."""


def new_job_id(now: float) -> str:
    return f"seg-{int(now):08x}-{secrets.token_hex(4)}"


def _done(step: Step, info: JobInfo) -> None:
    step.emit(subjects.SEGMENTATION_JOB_DONE, _encoder.encode(info))


async def start(
    step: Step,
    store: SegmentationStore,
    request: JobRun,
    *,
    partitions: int,
    now: float,
    earlier: dict[str, JobInfo],
) -> JobInfo | None:
    """Start the job `request` asks for, in `step`; None if its job id ran already
    (stored, or in `earlier`: the jobs this step recorded before, not committed yet).

    A request for another kind of job, or made while a job runs, is recorded as failed
    (and its end published): it never runs later by surprise."""
    job_id = request.job_id or new_job_id(now)
    if job_id in earlier or await store.job(job_id) is not None:
        return None
    running = next((j.job_id for j in earlier.values() if j.status == "running"), None)
    error = None
    if request.kind != KIND:
        error = f"unknown job kind {request.kind!r}"
    elif (running := running or await store.running_job()) is not None:
        error = f"segmentation job {running} is still running"
    if error is not None:
        info = JobInfo(
            job_id=job_id,
            kind=KIND,
            trigger=request.trigger,
            status="failed",
            started_at=now,
            finished_at=now,
            error=error,
        )
        store.add_job(step.tx, info)
        _done(step, info)
        _log.warning("segmentation job refused", job_id=job_id, error=error)
        return info
    pids = await store.profile_ids()
    total = len(pids)
    info = JobInfo(
        job_id=job_id,
        kind=KIND,
        trigger=request.trigger,
        status="running" if total else "succeeded",
        started_at=now,
        finished_at=None if total else now,
        total=total,
    )
    store.add_job(step.tx, info)
    # In the order the rows are stored (rowid), not by profile id: the actor then reads and
    # writes neighbouring pages of facts and memberships, where random profile ids made
    # every step of a million profiles touch pages all over them.
    for first in range(0, total, PAGE):
        by_part: dict[int, list[str]] = defaultdict(list)
        for pid in pids[first : first + PAGE]:
            by_part[subjects.partition_of(pid, partitions)].append(pid)
        for part, group in by_part.items():
            _emit_rechecks(step, part, group, now, job_id)
    if not total:
        _done(step, info)
    _log.info("segmentation job started", job_id=job_id, profiles=total)
    return info


def _emit_rechecks(step: Step, part: int, pids: list[str], at: float, job_id: str) -> None:
    for first in range(0, len(pids), MESSAGE_PROFILES):
        group = pids[first : first + MESSAGE_PROFILES]
        body = msgpack_encoder.encode(ChangeEnvelope([Recheck(group, at, job_id)]))
        step.emit(subjects.changes(part), body)


def bounded(items: list[ChangeItem], limit: int) -> tuple[list[ChangeItem], list[Recheck]]:
    """The items of a step with at most `limit` profiles of job rechecks (the first ones,
    in order; the rest of a recheck cut short too), and the job rechecks left over."""
    kept: list[ChangeItem] = []
    left_over: list[Recheck] = []
    room = limit
    for item in items:
        if isinstance(item, Recheck) and item.job_id is not None:
            n = len(item.profile_ids)
            if n > room:
                if room:
                    kept.append(msgspec.structs.replace(item, profile_ids=item.profile_ids[:room]))
                left_over.append(msgspec.structs.replace(item, profile_ids=item.profile_ids[room:]))
                room = 0
                continue
            room -= n
        kept.append(item)
    return kept, left_over


def defer(step: Step, rechecks: list[Recheck], *, partitions: int) -> None:
    """Hand job rechecks a step will not evaluate back to the changes stream (behind
    what it holds now), through the step's outbox: each profile is checked once, later."""
    for r in rechecks:
        assert r.job_id is not None
        by_part: dict[int, list[str]] = defaultdict(list)
        for pid in r.profile_ids:
            by_part[subjects.partition_of(pid, partitions)].append(pid)
        for part, group in by_part.items():
            _emit_rechecks(step, part, group, r.at, r.job_id)


async def record_progress(
    step: Step, store: SegmentationStore, scanned: dict[str, int], counts: Counts, now: float
) -> None:
    """Add what this step of the actor did to its jobs; finish those it completes, at
    `now`: when the step's evaluation is over (not when the step began)."""
    for job_id in sorted(set(scanned) | set(counts)):
        job = await store.job(job_id)
        if job is None:
            continue
        merged = job.counts
        for seg, c in counts.get(job_id, {}).items():
            into = merged.setdefault(seg, {})
            for k, v in c.items():
                into[k] = into.get(k, 0) + v
        done = job.scanned + scanned.get(job_id, 0)
        finished = done >= job.total
        job = msgspec.structs.replace(
            job,
            scanned=done,
            counts=merged,
            status="succeeded" if finished else "running",
            finished_at=now if finished else None,
        )
        store.update_job(step.tx, job)
        if finished:
            _log.info("segmentation job finished", job_id=job_id, profiles=done)
            _done(step, job)
