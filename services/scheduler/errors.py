"""The scheduler service's root exception."""

from __future__ import annotations

from shared.errors import CdpError


class SchedulerError(CdpError):
    """Base of every error the scheduler service raises on purpose."""

    code = "scheduler_error"
