"""Deadlines of many attempts and calls, kept by one timer.

A store may have thousands of calls in flight; a timer each (``asyncio.timeout``) would
cost a tenth of a loopback round trip per attempt. ``Deadlines`` keeps them all with one
timer that ticks while anything waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import TimeoutError

T = TypeVar("T")


class Deadlines:
    """One timer for every deadline: attempts that outlive theirs are cancelled, and
    units that outlive their hard end are failed, wherever they wait.

    ``asyncio.timeout`` costs a timer per attempt, a tenth of a loopback round trip; here
    an attempt costs a dictionary entry, and a unit nothing: at each tick ``sweep(now)``
    fails the units past their hard end where they wait, and says whether any still
    waits. Deadlines are kept to within a quarter of ``timeout`` late. An expired
    attempt raises ``TimeoutError`` in its task, unless its task was also cancelled by
    someone else: that cancellation is then what it raises.
    """

    def __init__(self, timeout: float, sweep: Callable[[float], bool]) -> None:
        self._timeout = timeout
        self._tick = timeout / 4
        self._sweep = sweep
        self._running: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def deadline(self) -> float:
        """When an attempt that begins now must be over."""
        return asyncio.get_running_loop().time() + self._timeout

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """A unit was made: the timer ticks until none waits."""
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._check)

    async def run(self, attempt: Awaitable[T], deadline: float | None = None) -> T:
        """``attempt``, cancelled and turned into ``TimeoutError`` if not over by
        ``deadline`` (by default, ``timeout`` from now)."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._running[task] = self.deadline() if deadline is None else deadline
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._check)
        try:
            return await attempt
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            # Python 3.11 and newer; Python 3.10 counts no cancellations, so there a
            # cancel() that lands with the deadline is taken for the deadline.
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None and uncancel() > 0:
                # Someone else cancelled the task too (asyncio.timeout, a TaskGroup,
                # task.cancel()): their cancellation must arrive, not our timeout.
                raise
            raise TimeoutError(f"no reply within {self._timeout} s") from None
        finally:
            self._expired.discard(task)
            del self._running[task]

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, deadline in self._running.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        busy = self._sweep(now) or self._running
        self._timer = loop.call_later(self._tick, self._check) if busy else None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
