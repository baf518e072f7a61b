"""The batch segmentation job.

A job is asked for on `cdp.jobs.segmentation.run` (a `JobRun`, by the scheduler or by the
admin API for the CLI) and run once per job id. Starting it is one step: the job is
recorded and every profile is sent back through the actor (`Recheck`s with the job id,
on the changes stream, through the outbox: handed out exactly once). The actor then
evaluates every segment for those profiles and adds what each of its steps did to the
job (`record_progress`); the step that reaches the last profile finishes the job and
publishes its `JobInfo` on `cdp.jobs.segmentation.done`, through the outbox too.
"""

from __future__ import annotations

import secrets
from collections import defaultdict

import msgspec
import structlog

from services.segmentation.store import SegmentationStore
from shared import subjects
from shared.admin import JobInfo, JobRun
from shared.messages import ChangeEnvelope, Recheck, msgpack_encoder
from shared.runtime import Step

KIND = "segmentation"
PAGE = 1000
"""Profiles per recheck message (before they are split by partition)."""
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
            body = msgpack_encoder.encode(ChangeEnvelope([Recheck(group, now, job_id)]))
            step.emit(subjects.changes(part), body)
    if not total:
        _done(step, info)
    _log.info("segmentation job started", job_id=job_id, profiles=total)
    return info


async def record_progress(
    step: Step, store: SegmentationStore, scanned: dict[str, int], counts: Counts, now: float
) -> None:
    """Add what this step of the actor did to its jobs; finish those it completes."""
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
