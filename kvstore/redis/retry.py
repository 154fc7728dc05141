"""The retry policy, in one place: what is worth trying again, how long to wait between
tries, and how long a call may go on trying.

- ``is_transient(exc)``: a failure after which the same commands may well succeed.
- ``Backoff``: capped exponential delays with jitter, restarted after a success.
- ``Budget``: the arithmetic of ``retry_budget`` and ``timeout``. A call retries until
  ``retry_budget`` seconds after it was made; its last attempt may take ``timeout``
  more, so no call outlives ``retry_budget + timeout``, its *hard end*.
- ``no_client_retries()``: redis-py's own retries are off, so the budget alone decides;
  ``no_silent_reconnect()``, the same for a subscription.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    ConnectionError,
    TimeoutError,
    TryAgainError,
)

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


class Backoff:
    """Delays between tries: ``first``, doubling up to ``cap``; each jittered down to as
    little as half (``jitter=True``), so clients that failed together do not come back
    together. ``reset()`` after a success starts again from ``first``."""

    __slots__ = ("_cap", "_failures", "_first", "_jitter")

    def __init__(self, first: float = 0.05, cap: float = 2.0, *, jitter: bool = True) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap, not {first!r} and {cap!r}")
        self._first = first
        self._cap = cap
        self._jitter = jitter
        self._failures = 0

    def next(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        delay: float = min(self._cap, self._first * 2**self._failures)
        if delay < self._cap:  # the exponent stops at the cap, so it never overflows
            self._failures += 1
        return delay * random.uniform(0.5, 1.0) if self._jitter else delay

    def reset(self) -> None:
        self._failures = 0


@dataclass(frozen=True, slots=True)
class Budget:
    """How long a call may keep trying: ``retry_budget`` seconds of retries, each attempt
    bounded by ``timeout`` (``None``: unbounded, and so is the call)."""

    retry_budget: float
    timeout: float | None

    def retry_until(self, made: float) -> float:
        """After this, a call made at ``made`` is not tried again."""
        return made + self.retry_budget

    def hard_end(self, made: float) -> float:
        """When a call made at ``made`` has failed, wherever it waits."""
        if self.timeout is None:
            return math.inf
        return made + self.retry_budget + self.timeout

    def delay(
        self, exc: BaseException, backoff: Backoff, retry_until: float, now: float
    ) -> float | None:
        """How long to wait before trying again after ``exc``, or ``None`` to give up:
        ``exc`` is not transient, or the budget is spent. Never past ``retry_until``."""
        if now >= retry_until or not is_transient(exc):
            return None
        return min(backoff.next(), retry_until - now)


def no_client_retries() -> Retry:
    """A redis-py ``Retry`` that never retries: the store's ``Budget`` alone decides."""
    return Retry(NoBackoff(), 0)


def no_silent_reconnect() -> Retry:
    """A redis-py ``Retry`` for a subscription: every error is raised at once, so redis-py
    never reconnects and resubscribes behind its owner's back, losing the messages of
    the gap."""
    return Retry(NoBackoff(), 0, supported_errors=())
