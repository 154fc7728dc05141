"""Coalescing of concurrent calls into pipelines over a bounded number of connections.

Thousands of tasks can share one store: each call joins a queue, and at most ``lanes``
of them at a time send everything queued as one pipeline and hand every caller its own
replies. A lone call is sent as a plain command, so it costs what the raw client costs.
Only ``lanes`` connections are ever in use, so no call fails because a pool ran out.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    ConnectionError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from kvstore.protocol import Command, flatten, pack_commands

# Failures after which the same commands may well succeed: the connection broke or
# stalled, the server is loading or failing over, a cluster slot is moving. A refused
# password is a connection error too, but trying it again cannot help.
TRANSIENT = (
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
)


class _Deadlines:
    """Cancels the tasks whose attempt outlives its deadline, with one timer for all.

    ``asyncio.timeout`` costs a timer per attempt, a tenth of a loopback round trip; here
    an attempt costs a dictionary entry, and the deadline is kept to within a quarter of
    ``timeout`` late. An expired attempt raises ``TimeoutError`` in its task.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._tick = timeout / 4
        self._running: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, attempt: Awaitable[list[Any]]) -> list[Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._running[task] = loop.time() + self._timeout
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._check)
        try:
            return await attempt
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            uncancel = getattr(task, "uncancel", None)  # Python 3.11 and newer
            if uncancel is not None:
                uncancel()
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
        self._timer = loop.call_later(self._tick, self._check) if self._running else None


@dataclass(eq=False, slots=True)
class _Pending:
    commands: Sequence[Command]
    future: asyncio.Future[list[Any]]
    size: int
    retry_until: float


class Pipeliner:
    """Sends units of commands for many concurrent callers.

    ``run(unit)`` returns one reply per command of the unit; a command the server
    refused comes back as its ``ResponseError`` value, so it fails no neighbour. A
    failure of the connection or of the deadline (``timeout`` seconds per attempt) is
    retried with capped, jittered exponential backoff for up to ``retry_budget`` seconds
    after the call began, then raises ``translate(exc)`` for every unit still waiting.

    Units may be sent again (after a transient failure, or after a cancelled caller
    interrupted a pipeline), so every unit must be idempotent.
    """

    def __init__(
        self,
        client: Any,
        *,
        lanes: int,
        timeout: float | None,
        translate: Callable[[BaseException], Exception],
        retry_budget: float = 0.0,
        backoff: tuple[float, float] = (0.02, 1.0),
        max_units: int = 256,
        max_bytes: int = 8 << 20,
    ) -> None:
        self._client = client
        self._lanes = lanes
        self._translate = translate
        self._deadlines = None if timeout is None else _Deadlines(timeout)
        # Commands go straight onto a pooled connection, except on a cluster client.
        self._pool = None if isinstance(client, RedisCluster) else client.connection_pool
        self._retry_budget = retry_budget
        self._backoff_base, self._backoff_cap = backoff
        self._failures = 0
        self._max_units = max_units
        self._max_bytes = max_bytes
        self._queue: deque[_Pending] = deque()
        self._busy = 0
        self._drainers: set[asyncio.Task[None]] = set()

    async def run(self, commands: Sequence[Command], size: int = 0) -> list[Any]:
        """The replies to ``commands``; ``size`` is about how many bytes they carry."""
        loop = asyncio.get_running_loop()
        retry_until = loop.time() + self._retry_budget
        if not self._queue and self._busy < self._lanes:
            # Nobody is waiting and a lane is free: send at once, without queueing.
            self._busy += 1
            try:
                return await self._run_alone(commands, retry_until)
            finally:
                self._release_lane()
        pending = _Pending(commands, loop.create_future(), size, retry_until)
        self._queue.append(pending)
        try:
            if self._busy < self._lanes:
                self._busy += 1
                await self._lead(pending.future)
            return await pending.future
        except asyncio.CancelledError:
            pending.future.cancel()
            raise

    async def _run_alone(self, commands: Sequence[Command], retry_until: float) -> list[Any]:
        while True:
            error: Exception | None = None
            try:
                return await self._attempt(commands)
            except Exception as exc:
                delay = self._retry_delay(exc, retry_until)
                if delay is None:
                    error = self._translate(exc)
                else:
                    await asyncio.sleep(delay)
            if error is not None:
                raise error  # outside the handler: the raw exception is no implicit context

    async def _lead(self, until: asyncio.Future[list[Any]] | None) -> None:
        """Send batches until ``until`` is done (or the queue is empty), then free the lane.

        The caller has already taken the lane (``_busy``), so a leader that is scheduled
        but not yet running still counts against ``lanes``.
        """
        try:
            while self._queue and not (until is not None and until.done()):
                await self._flush(self._take_batch())
        finally:
            self._release_lane()

    def _release_lane(self) -> None:
        self._busy -= 1
        if self._queue and self._busy < self._lanes:
            # Whoever queued behind a departing leader must not wait for a new caller.
            self._busy += 1
            task = asyncio.get_running_loop().create_task(self._lead(None))
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and len(batch) < self._max_units:
            pending = self._queue[0]
            if pending.future.done():  # its caller was cancelled
                self._queue.popleft()
                continue
            if batch and size + pending.size > self._max_bytes:
                break
            batch.append(self._queue.popleft())
            size += pending.size
        return batch

    async def _flush(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        try:
            replies = await self._attempt([c for p in batch for c in p.commands])
        except asyncio.CancelledError:
            # The leading caller was cancelled mid-flight: the others' units go back to
            # the front of the queue, in order, to be sent again.
            self._queue.extendleft(p for p in reversed(batch) if not p.future.done())
            raise
        except Exception as exc:
            await self._fail(batch, exc)
            return
        start = 0
        for p in batch:
            end = start + len(p.commands)
            if not p.future.done():
                p.future.set_result(replies[start:end])
            start = end

    async def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        waiting = [p for p in batch if not p.future.done()]
        if not waiting:
            return
        delay = self._retry_delay(exc, max(p.retry_until for p in waiting))
        now = asyncio.get_running_loop().time()
        retry = [p for p in waiting if delay is not None and now < p.retry_until]
        for p in waiting:
            if p not in retry:
                p.future.set_exception(self._translate(exc))
        if delay is not None:
            self._queue.extendleft(reversed(retry))
            await asyncio.sleep(delay)

    def _retry_delay(self, exc: Exception, retry_until: float) -> float | None:
        """How long to back off before trying again, or ``None`` to give up."""
        now = asyncio.get_running_loop().time()
        transient = isinstance(exc, TRANSIENT) and not isinstance(exc, AuthenticationError)
        if not transient or now >= retry_until:
            return None
        self._failures += 1
        delay = min(self._backoff_cap, self._backoff_base * 2 ** (self._failures - 1))
        jittered: float = delay * random.uniform(0.5, 1.0)
        return min(jittered, retry_until - now)

    async def _attempt(self, commands: Sequence[Command]) -> list[Any]:
        send = self._send(commands)
        replies = await (send if self._deadlines is None else self._deadlines.run(send))
        self._failures = 0
        return replies

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        if self._pool is not None:
            return await self._send_on_connection(self._pool, commands)
        # A cluster client: redis-py routes each command to the node of its slot.
        if len(commands) == 1:
            try:
                return [await self._client.execute_command(*flatten(commands[0]))]
            except ResponseError as exc:
                return [exc]
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*flatten(command))
        return list(await pipe.execute(raise_on_error=False))

    @staticmethod
    async def _send_on_connection(pool: Any, commands: Sequence[Command]) -> list[Any]:
        # Packing the commands here and reading the replies off one pooled connection
        # costs half of what redis-py's pipeline does for the same bytes on the wire.
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            # A connection left between a request and its replies must not be reused.
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)

    async def aclose(self) -> None:
        for task in list(self._drainers):
            task.cancel()
        await asyncio.gather(*self._drainers, return_exceptions=True)
