"""Coalescing of concurrent calls into pipelines over a bounded number of connections.

Thousands of tasks can share one store: calls are queued and sent together in batches,
pipelined several deep on at most ``lanes`` held connections, and each caller gets its
own replies. A call that finds a connection idle is sent at once as a plain command, so
it costs what the raw client costs. Only ``lanes`` connections are ever in use, so no
call fails because a pool ran out.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    ConnectionError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from kvstore.redis.wire import Command, flatten, pack_commands

T = TypeVar("T")

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

    def deadline(self) -> float:
        """When an attempt that begins now must be over."""
        return asyncio.get_running_loop().time() + self._timeout

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


@dataclass(eq=False, slots=True)
class _Batch:
    units: list[_Pending]
    size: int
    deadline: float | None  # when the server's replies must all have come


class _Lane:
    """A pooled connection the pipeliner holds, with the batches sent on it whose replies
    are still to be read, in the order they were sent."""

    __slots__ = ("connection", "in_flight", "lock", "reader", "size", "units")

    def __init__(self) -> None:
        self.connection: Any = None
        self.in_flight: deque[_Batch] = deque()
        # Units and bytes in flight, or taken by a writer that has not sent them yet.
        self.units = 0
        self.size = 0
        self.lock = asyncio.Lock()  # one writer at a time, so replies come in sent order
        self.reader: asyncio.Task[None] | None = None


class Pipeliner:
    """Sends units of commands for many concurrent callers.

    ``run(unit)`` returns one reply per command of the unit; a command the server
    refused comes back as its ``ResponseError`` value, so it fails no neighbour. A
    failure of the connection or of the deadline (``timeout`` seconds from the moment a
    unit is sent) is retried with capped, jittered exponential backoff for up to
    ``retry_budget`` seconds after the call began, then raises ``translate(exc)``.

    A call that finds a connection idle is sent at once, by its own task. Others are
    queued and sent together, in batches of up to ``max_units`` units and ``max_bytes``
    bytes: by the call that fills a batch, or, at the latest, once the event loop has run
    every task that was ready. Each of the ``lanes`` connections carries up to sixteen
    batches or twice ``max_bytes`` at a time and has one reader that hands the replies
    out in order, so the server works on the first batches while the client is still
    building the next ones.

    Units may be sent again (after a transient failure), so every unit must be idempotent.
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
        self._translate = translate
        self._deadlines = None if timeout is None else _Deadlines(timeout)
        # Commands go straight onto pooled connections, except on a cluster client, which
        # routes them itself and carries one batch per lane at a time.
        self._pool: Any = None if isinstance(client, RedisCluster) else client.connection_pool
        self._room = (
            (max_units, max_bytes) if self._pool is None else (16 * max_units, 2 * max_bytes)
        )
        self._lanes = [_Lane() for _ in range(lanes)]
        self._retry_budget = retry_budget
        self._backoff_base, self._backoff_cap = backoff
        self._failures = 0
        self._resume_at = 0.0  # after a transient failure, nothing is sent before this
        self._max_units = max_units
        self._max_bytes = max_bytes
        self._queue: deque[_Pending] = deque()
        self._flush_planned = False
        self._writing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._discards: set[asyncio.Task[None]] = set()
        self._closed = False

    async def run(self, commands: Sequence[Command], size: int = 0) -> list[Any]:
        """The replies to ``commands``; ``size`` is about how many bytes they carry."""
        if self._closed:
            raise self._translate(ConnectionError("the store is closed"))
        loop = asyncio.get_running_loop()
        pending = _Pending(commands, loop.create_future(), size, loop.time() + self._retry_budget)
        queue = self._queue
        queue.append(pending)
        try:
            lane = None
            if (len(queue) == 1 or len(queue) >= self._max_units) and not self._paused():
                # Alone on an idle connection, or the last of a full batch: send now, in
                # this task, so the server starts before the other ready tasks have run.
                lane = self._free_lane(idle=len(queue) == 1)
            if lane is not None:
                await self._write(lane, self._take_batch())
            else:
                self._plan_flush()
            return await pending.future
        except asyncio.CancelledError:
            pending.future.cancel()
            raise

    # Sending.

    def _paused(self) -> bool:
        return self._resume_at > asyncio.get_running_loop().time()

    def _free_lane(self, *, idle: bool) -> _Lane | None:
        units, size = self._room
        best = None
        for lane in self._lanes:
            if lane.lock.locked():
                continue
            if lane.units == 0:
                return lane
            if idle or lane.units >= units or lane.size >= size:
                continue
            if best is None or lane.units < best.units:
                best = lane
        return best

    def _plan_flush(self) -> None:
        if not self._flush_planned:
            self._flush_planned = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_planned = False
        if self._closed or self._writing or not self._queue:
            return
        if self._paused():
            return  # the failure that paused sending planned a flush for its end
        self._writing = True
        self._spawn(self._write_queued())

    async def _write_queued(self) -> None:
        try:
            while self._queue and not self._paused():
                lane = self._free_lane(idle=False)
                if lane is None:
                    return  # each lane's reader, or writer, plans a flush when done
                await self._write(lane, self._take_batch())
        finally:
            self._writing = False

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

    async def _write(self, lane: _Lane, units: list[_Pending]) -> None:
        if not units:
            return
        batch = _Batch(
            units,
            sum(p.size for p in units),
            None if self._deadlines is None else self._deadlines.deadline(),
        )
        lane.units += len(units)  # before any wait, so no one else counts on this room
        lane.size += batch.size
        sent = False
        try:
            async with lane.lock:
                if self._pool is None:
                    replies = await self._within(self._send_cluster(units), batch.deadline)
                else:
                    if lane.connection is None:
                        lane.connection = await self._within(
                            self._pool.get_connection(), batch.deadline
                        )
                    connection = lane.connection
                    lane.in_flight.append(batch)
                    sent = True  # from here on the lane answers for the batch
                    data = pack_commands([c for p in units for c in p.commands])
                    await self._within(
                        connection.send_packed_command(data, check_health=False), batch.deadline
                    )
                    if lane.reader is None and lane.connection is connection:
                        lane.reader = self._spawn(self._read(lane, connection))
                    return
        except asyncio.CancelledError:
            # The caller that was writing was cancelled: the others go again, at once. A
            # write cut short leaves its connection in an unknown state, so what was in
            # flight on it goes again too.
            if sent:
                self._lane_failed(lane, None)
            else:
                self._release(lane, batch)
                self._requeue(units)
            raise
        except Exception as exc:
            if sent:
                self._lane_failed(lane, exc)
            else:
                self._release(lane, batch)
                self._failed(units, exc)
            return
        finally:
            if self._queue:
                self._plan_flush()  # whoever queued while this lane was busy
        # A cluster client: the replies are in.
        self._release(lane, batch)
        self._delivered(units, replies)

    @staticmethod
    def _release(lane: _Lane, batch: _Batch) -> None:
        lane.units -= len(batch.units)
        lane.size -= batch.size

    async def _within(self, attempt: Awaitable[T], deadline: float | None) -> T:
        if self._deadlines is None:
            return await attempt
        return await self._deadlines.run(attempt, deadline)

    async def _send_cluster(self, units: list[_Pending]) -> list[Any]:
        # redis-py routes each command to the node of its slot.
        client = self._client
        await client.initialize()  # at once when it is: the slot table is needed here
        commands = [c for p in units for c in p.commands]
        if len(commands) == 1:
            args, route = _routed(client, commands[0])
            try:
                return [await client.execute_command(*args, **route)]
            except ResponseError as exc:
                return [exc]
        pipe = client.pipeline(transaction=False)
        for command in commands:
            args, route = _routed(client, command)
            pipe.execute_command(*args, **route)
        return list(await pipe.execute(raise_on_error=False))

    # Receiving.

    async def _read(self, lane: _Lane, connection: Any) -> None:
        try:
            while lane.in_flight and lane.connection is connection:
                batch = lane.in_flight[0]
                count = sum(len(p.commands) for p in batch.units)
                replies = await self._within(_read_replies(connection, count), batch.deadline)
                lane.in_flight.popleft()
                self._release(lane, batch)
                self._delivered(batch.units, replies)
                if self._queue:
                    self._plan_flush()  # the room this batch leaves may be waited for
        except Exception as exc:
            if lane.connection is connection:
                self._lane_failed(lane, exc)
        finally:
            if lane.reader is asyncio.current_task():
                lane.reader = None

    def _delivered(self, units: list[_Pending], replies: list[Any]) -> None:
        self._failures = 0
        start = 0
        for p in units:
            end = start + len(p.commands)
            if not p.future.done():
                p.future.set_result(replies[start:end])
            start = end

    # Failing.

    def _lane_failed(self, lane: _Lane, exc: BaseException | None) -> None:
        """Drop the lane's connection; what was in flight on it is retried or failed
        as ``exc`` allows (``None``: sent again at once, for no fault of the server)."""
        connection, lane.connection = lane.connection, None
        batches = list(lane.in_flight)
        lane.in_flight.clear()
        for batch in batches:
            self._release(lane, batch)
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

    async def _discard(self, connection: Any) -> None:
        # A connection left between a request and its replies must not be reused.
        await connection.disconnect(nowait=True)
        await self._pool.release(connection)

    def _requeue(self, units: list[_Pending]) -> None:
        self._queue.extendleft(reversed([p for p in units if not p.future.done()]))
        self._plan_flush()

    def _failed(self, units: list[_Pending], exc: BaseException) -> None:
        waiting = [p for p in units if not p.future.done()]
        if not waiting:
            return
        loop = asyncio.get_running_loop()
        delay = self._retry_delay(exc, max(p.retry_until for p in waiting))
        now = loop.time()
        retry = [p for p in waiting if delay is not None and now < p.retry_until]
        for p in waiting:
            if p not in retry:
                p.future.set_exception(self._translate(exc))
        if delay is not None and retry:
            self._queue.extendleft(reversed(retry))
            self._resume_at = max(self._resume_at, now + delay)
            loop.call_later(delay, self._plan_flush)

    def _retry_delay(self, exc: BaseException, retry_until: float) -> float | None:
        """How long to back off before trying again, or ``None`` to give up."""
        now = asyncio.get_running_loop().time()
        transient = isinstance(exc, TRANSIENT) and not isinstance(exc, AuthenticationError)
        if self._closed or not transient or now >= retry_until:
            return None
        self._failures += 1
        delay = min(self._backoff_cap, self._backoff_base * 2 ** (self._failures - 1))
        jittered: float = delay * random.uniform(0.5, 1.0)
        return min(jittered, retry_until - now)

    def _spawn(
        self, work: Coroutine[Any, Any, None], into: set[asyncio.Task[None]] | None = None
    ) -> asyncio.Task[None]:
        """A task for ``work``, kept in ``into`` (by default ``_tasks``) while it runs."""
        tasks = self._tasks if into is None else into
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    async def aclose(self) -> None:
        """Fail whatever still waits, and give the connections back to the pool."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._discards, return_exceptions=True)
        closed = ConnectionError("the store was closed")
        waiting = list(self._queue)
        self._queue.clear()
        for lane in self._lanes:
            waiting.extend(p for b in lane.in_flight for p in b.units)
            connection, lane.connection = lane.connection, None
            if connection is not None:
                if lane.in_flight:
                    await connection.disconnect(nowait=True)
                await self._pool.release(connection)
            lane.in_flight.clear()
            lane.units = lane.size = 0
        for p in waiting:
            if not p.future.done():
                p.future.set_exception(self._translate(closed))


def _routed(client: Any, command: Command) -> tuple[Command, dict[str, Any]]:
    """``command`` as a cluster client's method takes it, with the node an ``FCALL`` goes to.

    redis-py finds the keys of an ``FCALL`` by asking a node (``COMMAND GETKEYS``), a
    round trip per call; its first key names the node, and MOVED is still followed."""
    args = flatten(command)
    if args[0] == "FCALL" and int(args[2]) > 0:
        try:
            return args, {"target_nodes": client.get_node_from_key(args[3])}
        except SlotNotCoveredError:
            pass  # the slot table is being renewed: redis-py finds the node itself
    return args, {}


async def _read_replies(connection: Any, count: int) -> list[Any]:
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await connection.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies
