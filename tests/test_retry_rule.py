"""What becomes of a delivery attempt (services.destination.retry.decide), without a network:
sent, retried after a backoff, or dead-lettered, by error kind, attempts and age."""

from __future__ import annotations

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.destination.connectors.base import http_error
from services.destination.model import DeliveryError
from services.destination.retry import (
    BACKOFF_MAX_S,
    DeadLetter,
    Retry,
    Sent,
    backoff,
    decide,
    retryable_status,
)

MAX_AGE = 3600.0
MAX_ATTEMPTS = 10


def ceiling(low: float, high: float) -> float:
    return high


def rule(error: BaseException | None, attempts: int = 1, age: float = 0.0) -> object:
    return decide(error, attempts, age, max_age=MAX_AGE, max_attempts=MAX_ATTEMPTS, uniform=ceiling)


def test_an_attempt_without_error_is_sent() -> None:
    assert rule(None) == Sent()


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 599])
def test_a_status_that_may_heal_is_retried(status: int) -> None:
    outcome = rule(http_error(status, {}, ""))
    assert isinstance(outcome, Retry)
    assert outcome.attempts == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
def test_a_refusal_is_dead_lettered_at_once(status: int) -> None:
    assert rule(http_error(status, {}, "no")) == DeadLetter(attempts=1, error=f"HTTP {status}: no")


def test_the_status_rule_is_the_one_the_connectors_use() -> None:
    assert [s for s in range(100, 600) if retryable_status(s)] == [
        408,
        429,
        *range(500, 600),
    ]


def test_a_timeout_or_lost_connection_is_retried() -> None:
    assert isinstance(rule(DeliveryError("timed out", retryable=True)), Retry)
    assert isinstance(rule(aiohttp.ClientConnectionError("reset")), Retry)


def test_an_unexpected_exception_is_retried_with_its_type_in_the_error() -> None:
    outcome = rule(RuntimeError("bug"))
    assert isinstance(outcome, Retry)
    assert outcome.error == "RuntimeError: bug"


def test_an_unsafe_address_is_dead_lettered() -> None:
    assert isinstance(rule(DeliveryError("private address", retryable=False)), DeadLetter)


def test_retry_after_is_honoured_even_above_the_backoff() -> None:
    error = DeliveryError("HTTP 429", retryable=True, status=429, retry_after=120.0)
    outcome = rule(error, attempts=1)
    assert isinstance(outcome, Retry)
    assert outcome.delay == 120.0


def test_the_backoff_doubles_up_to_its_ceiling() -> None:
    delays = [backoff(n, uniform=ceiling) for n in range(1, 12)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert delays[-1] == BACKOFF_MAX_S


def test_the_backoff_jitter_stays_between_half_and_the_whole_ceiling() -> None:
    assert backoff(4, uniform=lambda low, high: low) == 4.0


def test_an_error_past_the_maximum_age_is_dead_lettered() -> None:
    assert isinstance(rule(http_error(503, {}, ""), age=MAX_AGE + 1), DeadLetter)


def test_an_error_at_the_maximum_attempts_is_dead_lettered() -> None:
    assert isinstance(rule(http_error(503, {}, ""), attempts=MAX_ATTEMPTS), DeadLetter)


errors = st.one_of(
    st.builds(http_error, st.integers(400, 599), st.just({}), st.text(max_size=5)),
    st.builds(
        DeliveryError,
        st.text(max_size=5),
        retryable=st.booleans(),
        retry_after=st.none() | st.floats(0, 10_000),
    ),
    st.builds(TimeoutError),
)


@given(errors, st.floats(0, 24 * 3600.0))
def test_no_failure_is_retried_forever(error: BaseException, start_age: float) -> None:
    """Whatever fails, however long each wait, the attempts end in a dead letter by the
    maximum attempts."""
    attempts, age = 1, start_age
    while True:
        outcome = decide(error, attempts, age, max_age=MAX_AGE, max_attempts=MAX_ATTEMPTS)
        if isinstance(outcome, DeadLetter):
            break
        assert isinstance(outcome, Retry)
        assert outcome.delay > 0
        attempts, age = attempts + 1, age + outcome.delay
    assert attempts <= MAX_ATTEMPTS


@given(errors, st.integers(1, 1000), st.floats(0, 48 * 3600.0))
def test_past_the_maximum_age_or_attempts_every_failure_is_dead_lettered(
    error: BaseException, attempts: int, age: float
) -> None:
    outcome = decide(error, attempts, age, max_age=MAX_AGE, max_attempts=MAX_ATTEMPTS)
    if age > MAX_AGE or attempts >= MAX_ATTEMPTS:
        assert isinstance(outcome, DeadLetter)
    assert not isinstance(outcome, Sent)
