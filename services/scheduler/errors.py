"""The scheduler's root exception."""

from __future__ import annotations

from shared.errors import CdpError


class ScheduleError(CdpError):
    """A schedule that cannot run: not a cron expression, an unknown time zone, a job or
    destination it cannot name."""

    code = "invalid_schedule"
