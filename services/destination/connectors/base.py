"""The one interface every destination connector implements, and what they share.

A connector is built once per destination from its connection `settings` (url, list id, ...)
and its resolved `secrets` (by name). The service hands it batches of at most
`max_per_request` activations of ONE segment; `send` delivers them with one request (or a
few: adds and removals go to different endpoints) and either returns (2xx) or raises
`DeliveryError`: retryable for timeouts, connection errors, 429 and 5xx (with `retry_after`
when the server said so), not retryable for other 4xx.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Protocol

import aiohttp
import msgspec
import phonenumbers

from services.destination.errors import DestinationError
from services.destination.guard import (
    ALLOW_PRIVATE_SETTING,
    UnsafeDestination,
    check_resolved,
    check_url,
)
from services.destination.model import Activation, DeliveryError, SegmentMeta
from services.destination.retry import retryable_status

ADD_STATUSES = frozenset({"realized", "existing"})
"""Statuses that put a profile in the audience; `exited` takes it out."""
REMOVE_STATUS = "exited"

DEFAULT_MAX_PER_REQUEST = 500
DEFAULT_TIMEOUT = 30.0
"""Seconds one request may take, connection included."""

json_encoder = msgspec.json.Encoder()


class ConnectorSettingsError(DestinationError):
    """A destination's settings or secrets cannot make a working connector."""

    code = "connector_settings"


class Connector(Protocol):
    kind: ClassVar[str]
    max_per_request: int
    """How many activations one `send` may carry."""

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None: ...

    def addressable(self, a: Activation) -> bool:
        """Whether `a` carries an identity this destination can use; others are skipped
        (`send` leaves them out, the service counts them as skipped)."""
        ...

    async def send(
        self, session: aiohttp.ClientSession, segment: SegmentMeta, items: Sequence[Activation]
    ) -> None:
        """Deliver `items` (all of `segment`); return on success, raise DeliveryError."""
        ...

    async def sync_segment(
        self, session: aiohttp.ClientSession, segment: SegmentMeta
    ) -> str | None:
        """Tell the destination about the segment itself; the remote id, or None when the
        destination has no such notion."""
        ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP-date."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for key, val in headers.items():
        if key.lower() == lower:
            return val
    return None


def http_error(status: int, headers: Mapping[str, str], body_text: str) -> DeliveryError:
    """The DeliveryError for a non-2xx answer: 408, 429 and 5xx are retryable (honouring
    Retry-After), any other status is not."""
    retryable = retryable_status(status)
    retry_after = parse_retry_after(_header(headers, "Retry-After")) if retryable else None
    detail = " ".join(body_text.split())[:200]
    message = f"HTTP {status}" + (f": {detail}" if detail else "")
    return DeliveryError(message, retryable=retryable, status=status, retry_after=retry_after)


def latest_per_profile(items: Sequence[Activation]) -> list[Activation]:
    """One activation per profile: its latest (by `at`, then by position), in first-seen
    order, so a list never ends in a state the profile has already left."""
    latest: dict[str, Activation] = {}
    for a in items:
        seen = latest.get(a.profile_id)
        if seen is None or a.at >= seen.at:
            latest[a.profile_id] = a
    return list(latest.values())


def split_by_status(
    items: Sequence[Activation],
) -> tuple[list[Activation], list[Activation]]:
    """(adds, removals) of the latest activation per profile: realized/existing versus
    exited; unknown statuses are dropped."""
    last = latest_per_profile(items)
    adds = [a for a in last if a.status in ADD_STATUSES]
    removals = [a for a in last if a.status == REMOVE_STATUS]
    return adds, removals


def require(settings: Mapping[str, Any], name: str, kind: str) -> str:
    value = settings.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ConnectorSettingsError(f"{kind}: setting {name!r} is required")
    return value.strip()


REGION_SETTING = "default_region"
"""Region of phone numbers written without a country code. The destination service puts its
own (`CDP_PHONE_REGION`) in every connector's settings unless the destination's connection
names one."""


def phone_region(settings: Mapping[str, Any], kind: str) -> str:
    """The region connectors that send phone numbers read national numbers in."""
    value = settings.get(REGION_SETTING)
    region = value.strip().upper() if isinstance(value, str) else ""
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ConnectorSettingsError(
            f"{kind}: setting {REGION_SETTING!r} must be a region code with a known numbering "
            "plan, e.g. US, GB, FR"
        )
    return region


def require_secret(secrets: Mapping[str, str], name: str, kind: str) -> str:
    value = secrets.get(name)
    if not value:
        raise ConnectorSettingsError(f"{kind}: secret {name!r} is required")
    return value


def positive_int(settings: Mapping[str, Any], name: str, default: int, kind: str) -> int:
    value = settings.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConnectorSettingsError(f"{kind}: setting {name!r} must be a positive integer")
    return value


def positive_float(settings: Mapping[str, Any], name: str, default: float, kind: str) -> float:
    value = settings.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConnectorSettingsError(f"{kind}: setting {name!r} must be a positive number")
    return float(value)


class HttpConnector:
    """What the HTTP connectors share: the base url, limits, timeout, bearer token and one
    request with its failure classification. Subclasses set `kind` and implement `send`."""

    kind: ClassVar[str] = "http"
    token_secret: ClassVar[str | None] = None
    """Name of the secret sent as a bearer token (required when set)."""

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        self.url = require(settings, "url", self.kind).rstrip("/")
        self.allow_private = settings.get(ALLOW_PRIVATE_SETTING) is True
        check_url(self.url, self.allow_private)  # http(s) only; refused literal addresses
        self.max_per_request = positive_int(
            settings, "max_per_request", DEFAULT_MAX_PER_REQUEST, self.kind
        )
        self.timeout = aiohttp.ClientTimeout(
            total=positive_float(settings, "timeout", DEFAULT_TIMEOUT, self.kind)
        )
        self._token = (
            require_secret(secrets, self.token_secret, self.kind) if self.token_secret else None
        )

    def addressable(self, a: Activation) -> bool:
        return True

    async def sync_segment(
        self, session: aiohttp.ClientSession, segment: SegmentMeta
    ) -> str | None:
        return None

    def headers(self, body: bytes) -> dict[str, str]:
        """Headers of one request carrying `body` (the bearer token when there is one)."""
        out = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token is not None:
            out["Authorization"] = f"Bearer {self._token}"
        return out

    async def post(self, session: aiohttp.ClientSession, path: str, payload: Any) -> bytes:
        """POST `payload` as JSON to the base url + `path`; the response body on 2xx."""
        body = json_encoder.encode(payload)
        return await self.request(session, "POST", self.url + path, body)

    async def request(
        self, session: aiohttp.ClientSession, method: str, url: str, body: bytes
    ) -> bytes:
        try:  # checked again now: the host may resolve elsewhere than when it was applied
            await check_resolved(url, self.allow_private)
        except UnsafeDestination as e:
            raise DeliveryError(f"{self.kind}: {e.message}", retryable=False) from None
        try:
            async with session.request(
                method, url, data=body, headers=self.headers(body), timeout=self.timeout
            ) as resp:
                status = resp.status
                headers = resp.headers
                answer = await resp.read()
        except aiohttp.InvalidURL as e:
            raise DeliveryError(f"{self.kind}: invalid url", retryable=False) from e
        except TimeoutError as e:
            raise DeliveryError(f"{self.kind}: request timed out", retryable=True) from e
        except aiohttp.ClientError as e:
            raise DeliveryError(f"{self.kind}: {type(e).__name__}: {e}", retryable=True) from e
        if 200 <= status <= 299:
            return answer
        err = http_error(status, headers, answer.decode("utf-8", "replace"))
        err.message = f"{self.kind}: {err.message}"
        err.args = (err.message,)
        raise err
