"""The retry policy: what is transient, how long to back off, how long to keep trying."""

from __future__ import annotations

import asyncio
import math

import pytest
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from kvstore.redis.retry import (
    DEFAULT_CURVE,
    Backoff,
    Budget,
    Curve,
    backoff_delay,
    call_with_retry,
    is_transient,
    no_client_retries,
)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionError("reset"),
        TimeoutError("stalled"),
        asyncio.TimeoutError(),
        OSError("unreachable"),
        BusyLoadingError("loading"),  # a ConnectionError in redis-py
        ClusterDownError("down"),
        TryAgainError("slot moving"),
    ],
)
def test_broken_stalled_or_moving_servers_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        AuthenticationError("wrong password"),  # a ConnectionError, yet never transient
        ResponseError("WRONGTYPE"),
        NoScriptError("NOSCRIPT"),
        ValueError("bad"),
    ],
)
def test_refusals_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_backoff_doubles_up_to_its_cap_and_restarts_after_reset() -> None:
    backoff = Backoff(first=0.05, cap=2.0, jitter=False)
    assert [backoff.next() for _ in range(8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    backoff.reset()
    assert backoff.next() == 0.05


def test_jittered_backoff_stays_between_half_and_the_whole_delay() -> None:
    backoff = Backoff(first=0.1, cap=1.0)
    for whole in [0.1, 0.2, 0.4, 0.8, *[1.0] * 200]:
        assert whole / 2 <= backoff.next() <= whole


def test_backoff_never_overflows_however_long_it_fails() -> None:
    backoff = Backoff(first=1e-3, cap=5.0, jitter=False)
    delays = [backoff.next() for _ in range(100_000)]
    assert delays[-1] == 5.0


@pytest.mark.parametrize(("first", "cap"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_backoff_needs_a_positive_first_delay_under_its_cap(first: float, cap: float) -> None:
    with pytest.raises(ValueError, match="first"):
        Backoff(first=first, cap=cap)


def test_budget_bounds_retries_and_calls() -> None:
    budget = Budget(retry_budget=2.0, timeout=1.0)
    assert budget.retry_until(10.0) == 12.0
    assert budget.hard_end(10.0) == 13.0  # the last try may take one timeout
    assert Budget(retry_budget=2.0, timeout=None).hard_end(10.0) == math.inf


def test_budget_delay_never_passes_the_retry_deadline() -> None:
    budget = Budget(retry_budget=5.0, timeout=1.0, curve=Curve(first=1.0, cap=1.0, jitter=False))
    assert budget.delay(ConnectionError(), 1, retry_until=10.0, now=9.0) == 1.0
    assert budget.delay(ConnectionError(), 1, retry_until=10.0, now=9.75) == 0.25
    assert budget.delay(ConnectionError(), 1, retry_until=10.0, now=10.0) is None


def test_budget_gives_up_at_once_on_what_is_not_transient() -> None:
    budget = Budget(retry_budget=5.0, timeout=1.0)
    assert budget.delay(AuthenticationError(), 1, retry_until=10.0, now=0.0) is None
    assert budget.delay(ResponseError(), 1, retry_until=10.0, now=0.0) is None


def test_the_curve_is_a_function_of_the_failures_alone() -> None:
    curve = Curve(first=0.05, cap=2.0, jitter=False)
    assert [curve.delay(n) for n in range(1, 9)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert curve.delay(3) == curve.delay(3)  # no state: the same failures, the same delay
    assert curve.delay(10**9) == 2.0
    assert 0.01 <= backoff_delay(1) <= DEFAULT_CURVE.first  # jittered down to half at most


async def test_call_with_retry_tries_again_until_the_budget_is_spent() -> None:
    budget = Budget(retry_budget=0.2, timeout=1.0, curve=Curve(first=0.01, cap=0.02))
    tries = 0

    async def flaky() -> str:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise ConnectionError("reset")
        return "done"

    assert await call_with_retry(flaky, budget, lambda exc: RuntimeError(str(exc))) == "done"
    assert tries == 3

    async def refused() -> str:
        nonlocal tries
        tries += 1
        raise ResponseError("NOPERM")

    tries = 0
    with pytest.raises(RuntimeError, match="NOPERM"):
        await call_with_retry(refused, budget, lambda exc: RuntimeError(str(exc)))
    assert tries == 1  # a refusal is not tried again

    async def down() -> str:
        raise ConnectionError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        await call_with_retry(down, budget, lambda exc: RuntimeError(str(exc)))


async def test_call_with_retry_bounds_each_attempt_by_the_timeout() -> None:
    budget = Budget(retry_budget=0.0, timeout=0.05)
    with pytest.raises(RuntimeError, match="TimeoutError"):
        await call_with_retry(
            lambda: asyncio.sleep(10), budget, lambda exc: RuntimeError(type(exc).__name__)
        )


def test_the_clients_own_retries_are_off() -> None:
    retry = no_client_retries()
    assert retry._retries == 0
