"""What the destination service hands its connectors, and how they fail (pure types)."""

from __future__ import annotations

from typing import Any

import msgspec

from services.destination.errors import DestinationError


class Activation(msgspec.Struct, kw_only=True):
    """One profile's membership change for one destination, ready to deliver."""

    profile_id: str
    segment: str
    status: str
    """realized, existing or exited"""
    at: float
    identities: dict[str, list[str]]
    """namespace -> normalised values (emails lower-cased, phones E.164); a connector that
    needs hashes hashes them itself, so raw values never leave for such destinations."""
    attributes: dict[str, Any] = {}
    """Mapped destination fields (profile attributes only; never event attributes)."""


def change_id(a: Activation) -> str:
    """The id of the membership change `a` carries (segment:profile:status:at): the same on
    every delivery of that change (a retry, a resend after a restart), different for any
    other change. Delivery is at least once; receivers de-duplicate by this id."""
    return f"{a.segment}:{a.profile_id}:{a.status}:{a.at!r}"


class SegmentMeta(msgspec.Struct, kw_only=True):
    name: str
    description: str = ""
    method: str = ""


class DeliveryError(DestinationError):
    """A delivery attempt failed. `retryable` (timeouts, 429, 5xx) or not (other 4xx);
    `retry_after` in seconds when the server said so."""

    code = "delivery_failed"

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
