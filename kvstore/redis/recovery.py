"""What the pipeliner does with units when something fails: the retry policy applied.

A connection that breaks or stalls fails what it carried; each unit then goes again
after its backoff while its budget lasts (``kvstore.redis.retry``), or fails with the
store's error; a unit sent alone that the server keeps dropping is refused; a unit past
its hard end fails wherever it waits. ``Recovery`` holds these for ``Pipeliner``, which
schedules and sends (``kvstore.redis.pipeline``): the two share the queues and lanes,
and this half never sends anything itself.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from kvstore.redis.failures import describe
from kvstore.redis.lanes import Batch, Lane, Pending
from kvstore.redis.retry import Budget, is_transient
from kvstore.redis.transports import PooledTransport, Transport

_log = logging.getLogger("kvstore.redis.pipeline")

# A unit sent alone (``run(..., alone=True)``) whose connection the server drops this
# many times is given up: the server refuses it, not the network.
DROPS_BEFORE_REFUSAL = 2


class Recovery(ABC):
    """The failing half of ``Pipeliner``: retries, requeues, refusals and expiry."""

    _transport: Transport
    _translate: Callable[[BaseException], Exception]
    _budget: Budget
    _lanes: list[Lane]
    _queue: deque[Pending]
    _alone: deque[Pending]
    _large: deque[Pending]
    _sending: set[Batch]
    _discards: set[asyncio.Task[None]]
    _closed: bool
    _resume_at: float
    _expired: int
    _expiry_said_at: float
    observer: Any
    last_failure: str | None

    @abstractmethod
    def _plan_flush(self) -> None: ...

    @abstractmethod
    def _spawn(
        self, work: Coroutine[Any, Any, None], into: set[asyncio.Task[None]] | None = None
    ) -> asyncio.Task[None]: ...

    @staticmethod
    def _release(lane: Lane, batch: Batch) -> None:
        lane.units -= len(batch.units)
        lane.size -= batch.size
        if batch.alone:
            lane.alone = False

    def _lane_failed(self, lane: Lane, exc: BaseException | None) -> None:
        """Drop the lane's connection; what was in flight on it is retried or failed
        as ``exc`` allows (``None``: sent again at once, for no fault of the server)."""
        connection, lane.connection = lane.connection, None
        batches = list(lane.in_flight)
        lane.in_flight.clear()
        for batch in batches:
            self._release(lane, batch)
            if batch.alone and dropped(exc):
                self._count_drop(batch.units[0])
        reader, lane.reader = lane.reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if connection is not None:
            # Not one of _tasks: closing the store must not stop it halfway.
            self._spawn(self._discard(connection), self._discards)
        units = [p for b in batches for p in b.units]
        if exc is None:
            self._requeue(units)
        else:
            self._failed(units, exc)
        if self._alone or self._large:
            self._plan_flush()

    def _count_drop(self, pending: Pending) -> None:
        """The server dropped the connection that carried ``pending`` alone."""
        pending.drops += 1
        if pending.drops >= DROPS_BEFORE_REFUSAL:
            self._refused(pending, f"it dropped the connection {pending.drops} times")

    def _refused(self, pending: Pending, how: str) -> None:
        """The server refused ``pending``, sent alone, as it refuses an argument over its
        ``proto-max-bulk-len``."""
        if not pending.future.done():
            pending.future.set_exception(
                self._translate(
                    ConnectionError(
                        f"the server refused a unit with a {pending.size}-byte argument "
                        f"({how}): its proto-max-bulk-len is likely smaller"
                    )
                )
            )

    async def _discard(self, connection: Any) -> None:
        # A connection left between a request and its replies must not be reused.
        assert isinstance(self._transport, PooledTransport)
        await self._transport.discard(connection)

    def _requeue(self, units: list[Pending]) -> None:
        self._put_back([p for p in units if not p.future.done()])
        self._plan_flush()

    def _put_back(self, units: list[Pending]) -> None:
        """Queue ``units`` again, each where it waits, ahead of what is queued there."""
        self._alone.extendleft(reversed([p for p in units if p.alone]))
        self._large.extendleft(reversed([p for p in units if p.large_reply and not p.alone]))
        self._queue.extendleft(reversed([p for p in units if not (p.alone or p.large_reply)]))

    def _failed(self, units: list[Pending], exc: BaseException) -> None:
        if not self._closed:
            self.last_failure = describe(exc)
        waiting = [p for p in units if not p.future.done()]
        if not waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        delay = None
        if not self._closed:
            # Each unit counts its own failures: a unit that just came is not made to
            # wait as long as one that kept failing.
            for p in waiting:
                p.failures += 1
            failures = max(p.failures for p in waiting)
            delay = self._budget.delay(exc, failures, max(p.retry_until for p in waiting), now)
        retry = [p for p in waiting if delay is not None and now < p.retry_until]
        for p in waiting:
            if p not in retry:
                p.future.set_exception(self._translate(exc))
        if delay is not None and retry:
            self._requeue_later(retry, now + delay)
            self._note_retry(retry, exc, delay)
        if len(retry) < len(waiting) and is_transient(exc) and not self._closed:
            _log.warning(
                "%d call(s) gave up, their retry budget spent: %s",
                len(waiting) - len(retry),
                self._translate(exc),
            )

    def _note_retry(self, units: list[Pending], exc: BaseException, delay: float) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%d call(s) retried in %.3f s: %s", len(units), delay, self._translate(exc))
        if self.observer is not None:
            self.observer.retried([p.call for p in units], exc)

    def _requeue_later(self, units: list[Pending], resume_at: float) -> None:
        self._put_back(units)
        self._resume_at = max(self._resume_at, resume_at)
        loop = asyncio.get_running_loop()
        loop.call_at(self._resume_at, self._plan_flush)

    def _expire_due(self, now: float) -> bool:
        """Fail every unit past its hard end, wherever it waits: a queue (a backoff
        included), a batch being written, a connection's flight. Returns whether any
        unit still waits."""
        waiting = False
        batches = [*self._sending, *(b for lane in self._lanes for b in lane.in_flight)]
        for units in (self._queue, self._alone, self._large, *(b.units for b in batches)):
            for p in units:
                if not p.future.done():
                    if p.hard_end <= now:
                        self._expire(p.future)
                    else:
                        waiting = True
        return waiting

    def _expire(self, future: asyncio.Future[list[Any]]) -> None:
        """A unit reached its hard end unsettled: fail its ``future``, wherever the unit
        waits (a queue, a backoff, a connection); a reply that comes later is dropped."""
        budget = self._budget
        assert budget.timeout is not None  # no hard end without a timeout
        spent = budget.retry_budget + budget.timeout
        exc = TimeoutError(f"no reply within {spent:g} s, retries included")
        self.last_failure = describe(exc)
        error = self._translate(exc)
        # Thousands may expire together behind a stall: one line a second at most.
        self._expired += 1
        now = asyncio.get_running_loop().time()
        if now >= self._expiry_said_at + 1.0:
            _log.warning(
                "%d call(s) gave up at their hard end, retry budget spent: %s",
                self._expired,
                error,
            )
            self._expired = 0
            self._expiry_said_at = now
        future.set_exception(error)


def dropped(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the connection broke (rather than stalled)."""
    return isinstance(exc, (ConnectionError, OSError)) and not isinstance(
        exc, builtins.TimeoutError
    )


def is_protocol_error(reply: Any) -> bool:
    """Whether ``reply`` is the server's refusal of what it could not parse."""
    return isinstance(reply, ResponseError) and str(reply).startswith("Protocol error")
