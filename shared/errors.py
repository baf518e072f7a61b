"""The runtime's root exception. Each service defines its own root beside it."""

from __future__ import annotations


class CdpError(Exception):
    """Base of every error the platform raises on purpose."""

    code: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StartupError(CdpError):
    """A service could not become ready."""

    code = "startup_failed"

    def __init__(self, service: str, phase: str, cause: str) -> None:
        super().__init__(f"{service}: {phase}: {cause}")
        self.service = service
        self.phase = phase
        self.cause = cause
