"""Cron schedules with a time zone (pure: no I/O)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from croniter import croniter

from services.scheduler.errors import SchedulerError


class ScheduleError(SchedulerError):
    code = "invalid_schedule"


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
