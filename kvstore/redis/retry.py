"""The retry policy, in one place: what is worth trying again, how long to wait between
tries, and how long a call may go on trying.

- ``is_transient(exc)``: a failure after which the same commands may well succeed.
- ``backoff_delay(failures)``: the one curve of delays, capped, exponential and
  jittered, a function of how many tries failed in a row (no state to share or reset);
  ``Backoff`` counts the failures of a loop that runs for ever over it.
- ``Budget``: the arithmetic of ``retry_budget`` and ``timeout``. A call retries until
  ``retry_budget`` seconds after it was made; its last attempt may take ``timeout``
  more, so no call outlives ``retry_budget + timeout``, its *hard end*.
- ``call_with_retry(attempt, budget, translate)``: the one retry loop, for work that is
  not a pipelined unit (loading the library); the pipeliner applies the same
  ``Budget.delay`` to the units it queues again, and the route cache waits out the same
  curve between sessions.
- ``no_client_retries()``: redis-py's own retries are off, so the budget alone decides;
  ``no_silent_reconnect()``, the same for a subscription.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    ConnectionError,
    TimeoutError,
    TryAgainError,
)

T = TypeVar("T")

# Failures after which the same commands may well succeed: the connection broke or
# stalled, the server is loading or failing over, a cluster slot is moving.
TRANSIENT = (
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether trying the same commands again may succeed.

    A refused password is a ``ConnectionError`` too, but trying it again cannot help.
    """
    return isinstance(exc, TRANSIENT) and not isinstance(exc, AuthenticationError)


@dataclass(frozen=True, slots=True)
class Curve:
    """Delays between tries: ``first`` after one failure, doubling up to ``cap``; each
    jittered down to as little as half (``jitter=True``), so clients that failed
    together do not come back together."""

    first: float = 0.02
    cap: float = 1.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError(f"backoff needs 0 < first <= cap, not {self.first!r} and {self.cap!r}")

    def delay(self, failures: int) -> float:
        """The delay before the next try, after ``failures`` failures in a row (1 or more)."""
        # The exponent is bounded, so it never overflows however long a loop fails.
        doublings = min(max(failures, 1) - 1, _MOST_DOUBLINGS)
        delay: float = min(self.cap, self.first * 2.0**doublings)
        return delay * random.uniform(0.5, 1.0) if self.jitter else delay


# Past this many doublings every curve has long reached its cap.
_MOST_DOUBLINGS = 64
# The one curve every retry of the package follows unless a test asks for another.
DEFAULT_CURVE = Curve()


def backoff_delay(failures: int, curve: Curve = DEFAULT_CURVE) -> float:
    """The delay before the next try after ``failures`` failures in a row."""
    return curve.delay(failures)


class Backoff:
    """The failures in a row of a loop that runs for ever (the route cache's sessions),
    over a ``Curve``: ``next()`` counts one more and says how long to wait; ``reset()``
    after a success starts again from ``first``."""

    __slots__ = ("_curve", "_failures")

    def __init__(self, first: float = 0.02, cap: float = 1.0, *, jitter: bool = True) -> None:
        self._curve = Curve(first, cap, jitter)
        self._failures = 0

    def next(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        self._failures = min(self._failures + 1, _MOST_DOUBLINGS + 1)
        return self._curve.delay(self._failures)

    def reset(self) -> None:
        self._failures = 0


@dataclass(frozen=True, slots=True)
class Budget:
    """How long a call may keep trying: ``retry_budget`` seconds of retries, each attempt
    bounded by ``timeout`` (``None``: unbounded, and so is the call), waiting out
    ``curve`` between tries; it has failed ``retry_budget + timeout`` after it was made,
    or ``hard_bound`` seconds after, if given."""

    retry_budget: float
    timeout: float | None
    curve: Curve = field(default=DEFAULT_CURVE)
    hard_bound: float | None = None

    def retry_until(self, made: float) -> float:
        """After this, a call made at ``made`` is not tried again."""
        return made + self.retry_budget

    def hard_end(self, made: float) -> float:
        """When a call made at ``made`` has failed, wherever it waits."""
        if self.hard_bound is not None:
            return made + self.hard_bound
        if self.timeout is None:
            return math.inf
        return made + self.retry_budget + self.timeout

    def delay(
        self, exc: BaseException, failures: int, retry_until: float, now: float
    ) -> float | None:
        """How long to wait before trying again after ``exc``, the ``failures``-th
        failure in a row, or ``None`` to give up: ``exc`` is not transient, or the
        budget is spent. Never past ``retry_until``."""
        if now >= retry_until or not is_transient(exc):
            return None
        return min(self.curve.delay(failures), retry_until - now)


async def call_with_retry(
    attempt: Callable[[], Awaitable[T]],
    budget: Budget,
    translate: Callable[[BaseException], Exception],
) -> T:
    """What ``attempt()`` returns, tried again after each transient failure while
    ``budget`` allows, each try bounded by its ``timeout``; any other failure, or the
    last, raises ``translate(exc)``. A cancellation of the caller is never retried."""
    loop = asyncio.get_running_loop()
    retry_until = budget.retry_until(loop.time())
    failures = 0
    while True:
        try:
            if budget.timeout is None:
                return await attempt()
            return await asyncio.wait_for(attempt(), budget.timeout)
        except Exception as exc:
            failures += 1
            delay = budget.delay(exc, failures, retry_until, loop.time())
            if delay is None:
                error = translate(exc)
                # The cause the translation kept (none where it redacted a secret).
                raise error from error.__cause__
        await asyncio.sleep(delay)


def no_client_retries() -> Retry:
    """A redis-py ``Retry`` that never retries: the store's ``Budget`` alone decides."""
    return Retry(NoBackoff(), 0)


def no_silent_reconnect() -> Retry:
    """A redis-py ``Retry`` for a subscription: every error is raised at once, so redis-py
    never reconnects and resubscribes behind its owner's back, losing the messages of
    the gap."""
    return Retry(NoBackoff(), 0, supported_errors=())
