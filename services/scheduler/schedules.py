"""The scheduler's rules, pure (no I/O): cron schedules with a time zone, which schedules
are in force, the job request a schedule sends when it is due, and what a job's done event
says about the run that asked for it."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

import msgspec
from croniter import croniter

from services.scheduler.errors import ScheduleError
from shared import subjects
from shared.admin import ExportResult, ExportRun, JobInfo, JobRun
from shared.resources import NAME_RE, Schedule

SEGMENTATION_SCHEDULE = "segmentation-daily"
"""The name of the daily segmentation job from the environment, in force while no
configured schedule runs segmentation."""


def _tz(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError) as exc:
        raise ScheduleError(f"unknown time zone {name!r}") from exc


def check(cron: str, tz: str) -> None:
    if not croniter.is_valid(cron):
        raise ScheduleError(f"not a cron expression: {cron!r}")
    _tz(tz)


def next_due(cron: str, tz: str, after: float) -> float:
    """The first time strictly after `after` (epoch seconds) the schedule fires."""
    start = datetime.fromtimestamp(after, _tz(tz))
    return float(croniter(cron, start).get_next(float))


def last_due(cron: str, tz: str, at: float) -> float:
    """The most recent time at or before `at` the schedule fired."""
    start = datetime.fromtimestamp(at + 1e-6, _tz(tz))
    return float(croniter(cron, start).get_prev(float))


def missed(cron: str, tz: str, last_run_due: float | None, now: float) -> float | None:
    """The due time of a run missed while the platform was down (run it once), if any."""
    if last_run_due is None:
        return None
    due = last_due(cron, tz, now)
    return due if due > last_run_due else None


# -- configuration ---------------------------------------------------------------------------
def problem(schedule: Schedule) -> tuple[str, str] | None:
    """What is wrong with a schedule: (field, message), or None."""
    if not NAME_RE.match(schedule.name):
        return "name", "must start with a lower-case letter and hold only a-z, 0-9, '_', '-'"
    try:
        check(schedule.cron, schedule.timezone)
    except ScheduleError as exc:
        return ("cron" if "cron" in str(exc) else "timezone"), str(exc)
    if schedule.job == "export" and not schedule.destination:
        return "destination", "an export schedule names its file destination"
    if schedule.job == "segmentation" and schedule.destination:
        return "destination", "only export schedules name a destination"
    return None


def active(configured: Mapping[str, Schedule], default: Schedule) -> dict[str, Schedule]:
    """The schedules in force: the configured ones, and the default daily job if no
    configured schedule runs segmentation."""
    out = dict(configured)
    if not any(s.job == "segmentation" for s in out.values()):
        out[default.name] = default
    return out


# -- jobs ------------------------------------------------------------------------------------
class JobRequest(msgspec.Struct, frozen=True):
    """A job request for `CDP_JOBS`: published with the message id `scheduler:<job_id>`,
    so a request published again (after a crash) is stored and run once."""

    job_id: str
    subject: str
    payload: bytes

    @property
    def msg_id(self) -> str:
        return f"scheduler:{self.job_id}"


_json = msgspec.json.Encoder()


def job_id(schedule: str, due: float) -> str:
    """The job a schedule runs at `due`: the same id for the same occurrence."""
    return f"{schedule}-{int(due)}"


def job_request(schedule: Schedule, due: float, trigger: str) -> JobRequest:
    """What `schedule` asks for when it is due: a segmentation job, or its destination's
    export, each with the job id of this occurrence."""
    jid = job_id(schedule.name, due)
    if schedule.job == "segmentation":
        return JobRequest(
            jid, subjects.SEGMENTATION_JOB_RUN, _json.encode(JobRun(trigger=trigger, job_id=jid))
        )
    if schedule.destination is None:
        raise ScheduleError(f"export schedule {schedule.name!r} names no destination")
    run = ExportRun(schedule.destination, trigger, job_id=jid)
    return JobRequest(jid, subjects.export_run(schedule.destination), _json.encode(run))


class Outcome(msgspec.Struct, frozen=True):
    """How the job a run asked for ended, from its done event."""

    job_id: str
    status: Literal["succeeded", "failed"]
    detail: str | None = None


_job_info = msgspec.json.Decoder(JobInfo)
_export_result = msgspec.json.Decoder(ExportResult)

DONE_SUBJECTS: tuple[str, ...] = (subjects.SEGMENTATION_JOB_DONE, subjects.export_done("*"))
"""Where jobs report that they ended: the subjects the scheduler follows on CDP_JOBS."""


def outcome(subject: str, data: bytes) -> Outcome | None:
    """The outcome a done event reports, if it is one: a decoded JobInfo of a segmentation
    job or ExportResult of an export, with a job id, that succeeded or failed. Anything else
    (a stray payload, a job still running, no job id) is None: the message says what
    happened, never its subject alone."""
    jid: str | None
    try:
        if subject == subjects.SEGMENTATION_JOB_DONE:
            info = _job_info.decode(data)
            if info.kind != "segmentation":
                return None
            jid, status, error = info.job_id, info.status, info.error
        elif subject.startswith(subjects.EXPORT_JOB_PREFIX + ".") and subject.endswith(".done"):
            result = _export_result.decode(data)
            if subject != subjects.export_done(result.destination):
                return None
            jid, status, error = result.job_id, result.status, result.error
        else:
            return None
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not jid:
        return None
    if status == "succeeded":
        return Outcome(jid, "succeeded", None)
    if status == "failed":
        return Outcome(jid, "failed", error or "failed")
    return None
