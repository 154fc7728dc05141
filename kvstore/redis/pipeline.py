"""Coalescing of concurrent calls into pipelines over a bounded number of connections.

Thousands of tasks can share one store: calls are queued and sent together in batches,
pipelined several deep on at most ``lanes`` held connections, and each caller gets its
own replies. A call that finds a connection idle is sent at once as a plain command, so
it costs what the raw client costs. Only ``lanes`` connections are ever in use, so no
call fails because a pool ran out. When to retry, and for how long, is
``kvstore.redis.retry``'s decision.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError, ResponseError, SlotNotCoveredError, TimeoutError

from kvstore.redis.replies import read_replies
from kvstore.redis.retry import Backoff, Budget, is_transient
from kvstore.redis.streamed import read_streamed
from kvstore.redis.wire import SLICE, Command, flatten, pack_commands, pack_parts

T = TypeVar("T")

_log = logging.getLogger(__name__)

# How much one held connection carries at a time: batches of ``max_units`` units, and
# bytes as a multiple of ``max_bytes``. Several batches deep, the server works on the
# first while the client builds the next; the bounds keep what a broken connection
# sends again, and what waits in its buffers, to a few batches.
BATCHES_PER_CONNECTION = 16
BYTES_PER_CONNECTION = 2  # times max_bytes

# A unit sent alone (``run(..., alone=True)``) whose connection the server drops this
# many times is given up: the server refuses it, not the network.
DROPS_BEFORE_REFUSAL = 2


class _Pending:
    """A unit of commands waiting for its replies."""

    # Slots: thousands may be in flight, and every garbage collection walks them.
    __slots__ = (
        "alone",
        "call",
        "commands",
        "drops",
        "future",
        "hard_end",
        "large_reply",
        "retry_until",
        "size",
        "streamed",
    )

    def __init__(
        self,
        commands: Sequence[Command],
        future: asyncio.Future[list[Any]],
        size: int,
        retry_until: float,
        hard_end: float,
        alone: bool = False,
        large_reply: bool = False,
        streamed: bool = False,
    ) -> None:
        self.commands = commands
        self.future = future
        self.size = size
        self.retry_until = retry_until  # not tried again after this
        self.hard_end = hard_end  # failed at this, wherever it waits
        self.alone = alone
        self.large_reply = large_reply
        self.streamed = streamed
        self.drops = 0  # how often the server dropped the connection carrying it alone
        self.call: Any = None  # the observed call it belongs to (telemetry), if any


class _Deadlines:
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


@dataclass(eq=False, slots=True)
class _Batch:
    units: list[_Pending]
    size: int
    deadline: float | None  # when the server's replies must all have come
    alone: bool  # one unit, with nothing else on its connection until it is answered


class _Lane:
    """A pooled connection the pipeliner holds, with the batches sent on it whose replies
    are still to be read, in the order they were sent."""

    __slots__ = ("alone", "connection", "in_flight", "lock", "reader", "size", "units")

    def __init__(self) -> None:
        self.connection: Any = None
        self.in_flight: deque[_Batch] = deque()
        # Units and bytes in flight, or taken by a writer that has not sent them yet.
        self.units = 0
        self.size = 0
        self.lock = asyncio.Lock()  # one writer at a time, so replies come in sent order
        self.reader: asyncio.Task[None] | None = None
        self.alone = False  # carries a unit sent alone: nothing else may join it


class Pipeliner:
    """Sends units of commands for many concurrent callers.

    Awaited, ``run(unit)`` gives one reply per command of the unit; a command the server
    refused comes back as its ``ResponseError`` value, so it fails no neighbour. A
    failure of the connection or of the deadline (``timeout`` seconds from the moment a
    unit is sent) is retried with capped, jittered exponential backoff for up to
    ``retry_budget`` seconds after the call began, then raises ``translate(exc)``. Every
    call ends within about ``retry_budget + timeout`` of when it was made, however many
    are in flight or queued before it: past that it raises ``translate(TimeoutError)``
    wherever it waits. A caller's cancellation always ends its call with
    ``CancelledError``.

    A call that finds a connection idle is sent at once, by its own task. Others are
    queued and sent together, in batches of up to ``max_units`` units and ``max_bytes``
    bytes: by the call that fills a batch, or, at the latest, once the event loop has run
    every task that was ready. Each of the ``lanes`` connections carries up to
    ``BATCHES_PER_CONNECTION`` batches or ``BYTES_PER_CONNECTION * max_bytes`` at a time
    and has one reader that hands the replies out in order, so the server works on the
    first batches while the client is still building the next ones.

    A unit run with ``alone=True`` waits for the first lane to be idle and is then sent
    on it with nothing else in flight, and nothing is sent behind it until it is
    answered: if the server drops the connection because of it, no other call was on
    that connection. Dropped ``DROPS_BEFORE_REFUSAL`` times, it raises.

    A unit run with ``large_reply=True`` (a listing's archives) goes on the last lane,
    pipelined behind the other such units, each a batch of its own: large replies come
    one after another on one connection, each handed out as soon as it is read, rather
    than interleaved on several, where each would hold a connection's buffers at once.

    The replies of a unit run with ``streamed=True`` (one that may bring an archive) are
    read by ``kvstore.redis.streamed``: a large archive in slices, the loop running
    between them, where the connection allows it.

    A batch whose ``size`` is ``SLICE`` (1 MiB) or more is sent in parts
    (``kvstore.redis.wire.pack_parts``): its large arguments in slices of ``SLICE`` bytes,
    never copied whole, with the event loop running between parts, so a large archive
    holds the loop for one slice at a time. If the connection is dropped meanwhile, the
    rest is not sent (never on a new connection); the batch goes again whole.

    The first lane connected brings the others along, in the background, so a burst soon
    after the first call finds every lane ready; unless the pool (its ``max_connections``)
    would then lack room for the ``spare_connections`` its client needs for itself.

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
        spare_connections: int = 0,
    ) -> None:
        self._client = client
        self._translate = translate
        self._budget = Budget(retry_budget, timeout)
        self._deadlines = None if timeout is None else _Deadlines(timeout, self._expire_due)
        # Commands go straight onto pooled connections, except on a cluster client, which
        # routes them itself and carries one batch per lane at a time.
        self._pool: Any = None if isinstance(client, RedisCluster) else client.connection_pool
        self._room = (
            (max_units, max_bytes)
            if self._pool is None
            else (BATCHES_PER_CONNECTION * max_units, BYTES_PER_CONNECTION * max_bytes)
        )
        self._lanes = [_Lane() for _ in range(lanes)]
        # The lanes are connected together unless that would leave the pool without the
        # ``spare_connections`` its client needs for itself (a route cache's): then each
        # is connected as a batch needs it.
        limit = getattr(self._pool, "max_connections", None)
        self._connect_together = self._pool is not None and (
            not isinstance(limit, int) or limit >= lanes + spare_connections
        )
        self._backoff = Backoff(*backoff)
        self._resume_at = 0.0  # after a transient failure, nothing is sent before this
        self._max_units = max_units
        self._max_bytes = max_bytes
        self._queue: deque[_Pending] = deque()
        self._alone: deque[_Pending] = deque()  # units to send alone, on the first lane
        self._large: deque[_Pending] = deque()  # units with large replies, for the last lane
        self._sending: set[_Batch] = set()  # taken from a queue, not yet in a lane's flight
        self._flush_planned = False
        self._writing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._discards: set[asyncio.Task[None]] = set()
        self._closed = False
        # Telemetry's hooks (kvstore.redis.telemetry.Observer), when it is on.
        self.observer: Any = None
        # What the store's health() reports: whether a reply has come, and the last
        # failure (its class and text, unredacted) since the last reply, if any.
        self.reached = False
        self.last_failure: str | None = None
        # Calls expired since the last warning said so, and when it did.
        self._expired = 0
        self._expiry_said_at = -math.inf

    def run(
        self,
        commands: Sequence[Command],
        size: int = 0,
        *,
        alone: bool = False,
        large_reply: bool = False,
        streamed: bool = False,
    ) -> Awaitable[list[Any]]:
        """What to await for the replies to ``commands``; ``size`` is about how many
        bytes they carry; ``alone``: send them with nothing else on their connection;
        ``large_reply``: their replies are large, and follow the other such units on one
        connection; ``streamed``: their replies may hold large archives, read in slices.

        The awaitable is the unit's future itself while the unit waits its turn, so
        thousands of calls in flight hold no coroutine of the pipeliner's; or a
        coroutine that sends the unit first, when it is to go at once. Cancelling what
        awaits it cancels the unit."""
        if self._closed:
            raise self._translate(ConnectionError("the store is closed"))
        loop = asyncio.get_running_loop()
        made = loop.time()
        budget = self._budget
        pending = _Pending(
            commands,
            loop.create_future(),
            size,
            budget.retry_until(made),
            budget.hard_end(made),
            alone,
            large_reply,
            streamed,
        )
        if self._deadlines is not None:
            self._deadlines.arm(loop)
        if self.observer is not None:
            pending.call = self.observer.current()
        if alone or large_reply:
            (self._alone if alone else self._large).append(pending)
            self._plan_flush()
            return pending.future
        if self._goes_now(1) is not None:
            return self._send_now(pending)
        self._queue.append(pending)
        self._plan_flush()
        return pending.future

    def _goes_now(self, coming: int) -> _Lane | None:
        """The lane for the queue's batch if, with ``coming`` more units in it, it is to
        go at once, in the caller's task, so the server starts before the other ready
        tasks run: a unit alone on an idle connection, or the last of a full batch."""
        queue = self._queue
        while queue and queue[0].future.done():  # cancelled, or expired, while queued
            queue.popleft()
        queued = len(queue) + coming
        if (queued == 1 or queued >= self._max_units) and not self._paused():
            return self._free_lane(idle=queued == 1)
        return None

    async def _send_now(self, pending: _Pending) -> list[Any]:
        # Queued only now that it is awaited, and asked again: what else ran meanwhile
        # may have changed the answer.
        self._queue.append(pending)
        try:
            lane = self._goes_now(0)
            if lane is None:
                self._plan_flush()
            else:
                await self._write(lane, self._take_batch(), alone=False)
            return await pending.future
        except asyncio.CancelledError:
            pending.future.cancel()
            raise

    # Sending.

    def _paused(self) -> bool:
        return self._resume_at > asyncio.get_running_loop().time()

    def _free_lane(self, *, idle: bool) -> _Lane | None:
        """The lane for a batch: an idle one, else (unless ``idle``) the least loaded
        with room. The first lane is kept for the units waiting to be sent alone."""
        units, size = self._room
        best = None
        for i, lane in enumerate(self._lanes):
            if lane.lock.locked() or lane.alone or (i == 0 and self._alone):
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
        if self._closed or self._writing or not self._waiting():
            return
        if self._paused():
            return  # the failure that paused sending planned a flush for its end
        self._writing = True
        self._spawn(self._write_queued())

    async def _write_queued(self) -> None:
        try:
            while self._alone and not self._paused():
                first = self._lanes[0]
                if first.lock.locked() or first.units or first.alone:
                    break  # its reader, or writer, plans a flush when done
                unit = self._alone.popleft()
                if not unit.future.done():
                    await self._write(first, [unit], alone=True)
            while self._large and not self._paused():
                last = self._lanes[-1]
                if (
                    last.lock.locked()
                    or last.alone
                    or (last is self._lanes[0] and self._alone)
                    or last.units >= self._room[0]
                ):
                    break  # its reader, or writer, plans a flush when done
                unit = self._large.popleft()
                if not unit.future.done():
                    await self._write(last, [unit], alone=False)
            while self._queue and not self._paused():
                lane = self._free_lane(idle=False)
                if lane is None:
                    return  # each lane's reader, or writer, plans a flush when done
                await self._write(lane, self._take_batch(), alone=False)
        finally:
            self._writing = False

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and len(batch) < self._max_units:
            pending = self._queue[0]
            if pending.future.done():  # its caller was cancelled, or it expired
                self._queue.popleft()
                continue
            if batch and size + pending.size > self._max_bytes:
                break
            batch.append(self._queue.popleft())
            size += pending.size
        return batch

    async def _write(self, lane: _Lane, units: list[_Pending], *, alone: bool) -> None:
        """Send ``units`` as one batch on ``lane``. Every outcome is handed to the units
        (replies, a retry, or their error); only the writer's own cancellation raises."""
        if not units:
            return
        if self.observer is not None:
            self.observer.batch(len(units))
        batch = _Batch(
            units,
            sum(p.size for p in units),
            None if self._deadlines is None else self._deadlines.deadline(),
            alone,
        )
        lane.units += len(units)  # before any wait, so no one else counts on this room
        lane.size += batch.size
        if alone:
            lane.alone = True  # until its replies are read (_release)
        self._sending.add(batch)  # where the sweep finds its units until it is sent
        try:
            async with lane.lock:
                if self._pool is None:
                    await self._write_cluster(lane, batch)
                else:
                    await self._write_pipelined(lane, batch)
        finally:
            self._sending.discard(batch)
            if self._waiting():
                self._plan_flush()  # whoever queued while this lane was busy

    async def _write_pipelined(self, lane: _Lane, batch: _Batch) -> None:
        """Send ``batch`` on the lane's connection; its reader hands out the replies."""
        units = batch.units
        sent = False
        try:
            if lane.connection is None:
                if self._connect_together:
                    self._connect_other_lanes()  # alongside this one
                lane.connection = await self._within(self._pool.get_connection(), batch.deadline)
            connection = lane.connection
            lane.in_flight.append(batch)
            sent = True  # from here on the lane answers for the batch
            commands = [c for p in units for c in p.commands]
            # Large arguments go in slices, the loop running between them.
            parts = pack_parts(commands) if batch.size >= SLICE else None
            if parts is None or len(parts) == 1:
                data = pack_commands(commands) if parts is None else bytes(parts[0])
                sending = connection.send_packed_command(data, check_health=False)
            else:
                sending = _send_in_slices(connection, parts, lambda: lane.connection is connection)
            await self._within(sending, batch.deadline)
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
        else:
            if lane.reader is None and lane.connection is connection:
                lane.reader = self._spawn(self._read(lane, connection))

    def _connect_other_lanes(self) -> None:
        """Connect, in the background, each lane that has no connection and is not in
        use: a burst soon after the first call then finds every lane ready. A lane
        connected only when a burst needs it is connected by a task that waits behind
        the burst's own tasks, and the whole burst goes on the lanes already connected.
        Not done where the pool lacks room for ``spare_connections`` beside the lanes."""
        for lane in self._lanes:
            if lane.connection is None and not lane.lock.locked():
                self._spawn(self._connect(lane))

    async def _connect(self, lane: _Lane) -> None:
        async with lane.lock:
            if lane.connection is not None or self._closed:
                return
            try:
                lane.connection = await self._within(self._pool.get_connection(), None)
            except Exception as exc:
                # Not a call's failure: the lane connects again when a batch needs it,
                # and a failure then is that batch's.
                _log.debug("connecting an idle lane failed: %s", _describe(exc))
                return
        if self._waiting():
            self._plan_flush()

    async def _write_cluster(self, lane: _Lane, batch: _Batch) -> None:
        """Send ``batch`` through the cluster client, which routes each command."""
        units = batch.units
        try:
            replies = await self._within(self._send_cluster(units), batch.deadline)
        except asyncio.CancelledError:
            self._release(lane, batch)
            self._requeue(units)
            raise
        except Exception as exc:
            self._release(lane, batch)
            if batch.alone and _dropped(exc):
                self._count_drop(units[0])
            self._failed(units, exc)
        else:
            self._release(lane, batch)
            self._delivered(units, replies)

    @staticmethod
    def _release(lane: _Lane, batch: _Batch) -> None:
        lane.units -= len(batch.units)
        lane.size -= batch.size
        if batch.alone:
            lane.alone = False

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
                replies = await self._within(_read_batch(connection, batch), batch.deadline)
                lane.in_flight.popleft()
                self._release(lane, batch)
                refusal = next((r for r in replies if _is_protocol_error(r)), None)
                if batch.alone and refusal is not None:
                    self._refused(batch.units[0], str(refusal))
                    # The server closes a connection on which it found a protocol error.
                    self._lane_failed(lane, None)
                    return
                self._delivered(batch.units, replies)
                if self._waiting():
                    self._plan_flush()  # the room this batch leaves may be waited for
        except Exception as exc:
            if lane.connection is connection:
                self._lane_failed(lane, exc)
        finally:
            if lane.reader is asyncio.current_task():
                lane.reader = None

    def _delivered(self, units: list[_Pending], replies: list[Any]) -> None:
        self._backoff.reset()
        self.reached = True
        self.last_failure = None
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
            if batch.alone and _dropped(exc):
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

    def _count_drop(self, pending: _Pending) -> None:
        """The server dropped the connection that carried ``pending`` alone."""
        pending.drops += 1
        if pending.drops >= DROPS_BEFORE_REFUSAL:
            self._refused(pending, f"it dropped the connection {pending.drops} times")

    def _refused(self, pending: _Pending, how: str) -> None:
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
        await connection.disconnect(nowait=True)
        await self._pool.release(connection)

    def _requeue(self, units: list[_Pending]) -> None:
        self._put_back([p for p in units if not p.future.done()])
        self._plan_flush()

    def _put_back(self, units: list[_Pending]) -> None:
        """Queue ``units`` again, each where it waits, ahead of what is queued there."""
        self._alone.extendleft(reversed([p for p in units if p.alone]))
        self._large.extendleft(reversed([p for p in units if p.large_reply and not p.alone]))
        self._queue.extendleft(reversed([p for p in units if not (p.alone or p.large_reply)]))

    def _waiting(self) -> bool:
        return bool(self._queue or self._alone or self._large)

    def _failed(self, units: list[_Pending], exc: BaseException) -> None:
        if not self._closed:
            self.last_failure = _describe(exc)
        waiting = [p for p in units if not p.future.done()]
        if not waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        delay = None
        if not self._closed:
            delay = self._budget.delay(exc, self._backoff, max(p.retry_until for p in waiting), now)
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

    def _note_retry(self, units: list[_Pending], exc: BaseException, delay: float) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%d call(s) retried in %.3f s: %s", len(units), delay, self._translate(exc))
        if self.observer is not None:
            self.observer.retried([p.call for p in units], exc)

    def _requeue_later(self, units: list[_Pending], resume_at: float) -> None:
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
        self.last_failure = _describe(exc)
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
        waiting = [*self._queue, *self._alone, *self._large]
        self._queue.clear()
        self._alone.clear()
        self._large.clear()
        for lane in self._lanes:
            waiting.extend(p for b in lane.in_flight for p in b.units)
            connection, lane.connection = lane.connection, None
            if connection is not None:
                if lane.in_flight:
                    await connection.disconnect(nowait=True)
                await self._pool.release(connection)
            lane.in_flight.clear()
            lane.units = lane.size = 0
            lane.alone = False
        for p in waiting:
            if not p.future.done():
                p.future.set_exception(self._translate(closed))
        if self._deadlines is not None:
            self._deadlines.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _dropped(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the connection broke (rather than stalled)."""
    return isinstance(exc, (ConnectionError, OSError)) and not isinstance(
        exc, builtins.TimeoutError
    )


def _is_protocol_error(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("Protocol error")


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


async def _send_in_slices(
    connection: Any, parts: list[bytes | memoryview], alive: Callable[[], bool]
) -> None:
    """Send ``parts`` (of ``pack_parts``: large arguments in slices, never copied
    whole) one at a time: between them the event loop runs and the socket drains, so a
    large archive stalls the loop for one slice at a time, not for the whole archive.

    Stops with ``ConnectionError`` as soon as the connection is no longer ``alive()``
    (its lane dropped it meanwhile): the rest of a command must never go out on a
    connection made anew, where the server would take it for a command of its own."""
    for i, part in enumerate(parts):
        if i and not (alive() and connection.is_connected):
            raise ConnectionError("the connection was lost while a large unit was sent")
        writer = _stream_writer(connection) if i and type(part) is not bytes else None
        if writer is None:
            # One part a call: a list of parts would be joined into one buffer.
            await connection.send_packed_command([part], check_health=False)
        else:
            # A slice goes to the transport as it is: redis-py would join it into a copy
            # of its own first (Python before 3.12 joins even a list of one part).
            try:
                writer.write(part)
                await writer.drain()
            except OSError as exc:
                await connection.disconnect(nowait=True)
                raise ConnectionError(f"writing a large unit failed: {exc}") from exc
        await asyncio.sleep(0)


def _stream_writer(connection: Any) -> asyncio.StreamWriter | None:
    """The ``asyncio.StreamWriter`` of a connected redis-py ``connection`` (its private
    ``_writer``), or ``None`` if it has none: its parts are then sent through
    ``send_packed_command``."""
    writer = getattr(connection, "_writer", None)
    return writer if isinstance(writer, asyncio.StreamWriter) else None


async def _read_batch(connection: Any, batch: _Batch) -> list[Any]:
    """The replies to ``batch``, those of its ``streamed`` units read in slices."""
    if not any(p.streamed for p in batch.units):
        return await read_replies(connection, sum(len(p.commands) for p in batch.units))
    replies: list[Any] = []
    for p in batch.units:
        read = read_streamed if p.streamed else read_replies
        replies.extend(await read(connection, len(p.commands)))
    return replies
