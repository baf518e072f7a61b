"""What becomes of a delivery attempt (pure): sent, retried later, or dead-lettered.

As a router decides a job's state apart from the network code, the delivery worker sends
and then asks `decide`, which looks only at what went wrong, how many attempts were made
and how long the oldest item has waited:

- no error: `Sent`;
- an error that cannot heal (a 4xx other than 408 and 429, an unsafe or invalid
  address): `DeadLetter` at once;
- an error that may heal (a timeout, a lost connection, 408, 429, 5xx, any unexpected
  exception): `Retry` after an exponential backoff with jitter, never before the
  server's Retry-After, until the attempts reach `max_attempts` or the age passes
  `max_age`, then `DeadLetter`. So nothing is retried forever.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec

from services.destination.model import DeliveryError

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
MAX_AGE_S = 4 * 3600.0
MAX_ATTEMPTS = 64


class Sent(msgspec.Struct, frozen=True):
    """The items reached the destination."""


class Retry(msgspec.Struct, frozen=True):
    """Send again in `delay` seconds; `attempts` made so far."""

    delay: float
    attempts: int
    error: str


class DeadLetter(msgspec.Struct, frozen=True):
    """Give up: the items go to the dead-letter store with `error`."""

    attempts: int
    error: str


Outcome = Sent | Retry | DeadLetter


def retryable_status(status: int) -> bool:
    """Whether an HTTP answer's status may heal: 408, 429 and 5xx do, other statuses not."""
    return status in (408, 429) or 500 <= status <= 599


def backoff(
    attempts: int,
    retry_after: float | None = None,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds before the next attempt: exponential with jitter (between half the
    ceiling and the ceiling), at least Retry-After."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** min(max(0, attempts - 1), 30)))
    return max(uniform(ceiling / 2, ceiling), retry_after or 0.0)


def as_delivery_error(error: BaseException) -> DeliveryError:
    """A connector's DeliveryError as it is; anything else (a bug, an unexpected network
    failure) is retryable: the queue keeps the items until the rule gives up."""
    if isinstance(error, DeliveryError):
        return error
    return DeliveryError(f"{type(error).__name__}: {error}", retryable=True)


def decide(
    error: BaseException | None,
    attempts: int,
    age: float,
    *,
    max_age: float = MAX_AGE_S,
    max_attempts: int = MAX_ATTEMPTS,
    uniform: Callable[[float, float], float] = random.uniform,
) -> Outcome:
    """The outcome of an attempt: `attempts` made (this one included), `age` seconds
    since the oldest item of the attempt was queued."""
    if error is None:
        return Sent()
    exc = as_delivery_error(error)
    if not exc.retryable or age > max_age or attempts >= max_attempts:
        return DeadLetter(attempts=attempts, error=str(exc))
    return Retry(
        delay=backoff(attempts, exc.retry_after, uniform), attempts=attempts, error=str(exc)
    )
