"""The destination service's root exception."""

from __future__ import annotations

from shared.errors import CdpError


class DestinationError(CdpError):
    """Base of every error the destination service raises on purpose."""

    code = "destination_error"
