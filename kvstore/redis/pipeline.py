"""Coalescing of concurrent calls into pipelines over a bounded number of connections.

Thousands of tasks can share one store: calls are queued and sent together in batches,
pipelined several deep on at most ``lanes`` held connections, and each caller gets its
own replies. A call that finds a connection idle is sent at once as a plain command, so
it costs what the raw client costs. Only ``lanes`` connections are ever in use, so no
call fails because a pool ran out. The pipeliner schedules: which unit goes on which
lane, and when. How the bytes move is its transport's job (``kvstore.redis.transports``,
chosen once by ``kvstore.redis.target``), when an attempt has run out of time is
``kvstore.redis.deadlines``', and when to retry, and for how long, is
``kvstore.redis.retry``'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from redis.exceptions import ConnectionError

from kvstore.redis.deadlines import Deadlines
from kvstore.redis.failures import describe
from kvstore.redis.lanes import Batch, Lane, Pending
from kvstore.redis.recovery import DROPS_BEFORE_REFUSAL, Recovery, dropped, is_protocol_error
from kvstore.redis.retry import DEFAULT_CURVE, Budget, Curve
from kvstore.redis.transports import (
    BATCHES_PER_CONNECTION,
    ClusterTransport,
    PooledTransport,
    Transport,
)
from kvstore.redis.wire import Command

T = TypeVar("T")

_log = logging.getLogger(__name__)

__all__ = ["BATCHES_PER_CONNECTION", "DROPS_BEFORE_REFUSAL", "Pipeliner"]


class Pipeliner(Recovery):
    """Sends units of commands for many concurrent callers.

    Awaited, ``run(unit)`` gives one reply per command of the unit; a command the server
    refused comes back as its ``ResponseError`` value, so it fails no neighbour. A
    failure of the connection or of the deadline (``timeout`` seconds from the moment a
    unit is sent, or from the moment the replies before it on its connection were read,
    whichever is later) is retried with capped, jittered exponential backoff for up to
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

    A unit run with ``durable=True`` (a write that waits to be replicated or fsynced)
    is followed, with every other such unit of its batch, by one ``trailer`` command
    (``WAIT`` or ``WAITAOF``), whose reply ends each of their replies: the writes of a
    batch share one wait (a group commit), where a wait each would queue behind each
    other on the connection, an fsync apiece. The trailer is sent on the batch's
    connection once the batch is answered, not with it: a ``WAITAOF`` that the server
    reads in the same turn as the writes it waits for finds them not yet written to the
    file, and waits for the server's next timer (100 ms) rather than for an fsync
    (0.4 ms). Only a pooled transport carries a trailer: it must go on the connection
    that carried the writes.

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

    ``hard_bound``: the seconds after which a call has failed wherever it waits, if not
    ``retry_budget + timeout`` (a replica's reads are never retried, each attempt bounded
    by a short ``timeout``, yet may wait behind each other as long as the store's calls).

    Units may be sent again (after a transient failure), so every unit must be idempotent.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        lanes: int,
        timeout: float | None,
        translate: Callable[[BaseException], Exception],
        retry_budget: float = 0.0,
        backoff: Curve | None = None,
        max_units: int = 256,
        max_bytes: int = 8 << 20,
        spare_connections: int = 0,
        trailer: Command | None = None,
        hard_bound: float | None = None,
    ) -> None:
        if trailer is not None and not isinstance(transport, PooledTransport):
            raise ValueError("a trailer goes on the connection of its writes: a pooled one")
        self._transport = transport
        self._trailer = trailer
        self._translate = translate
        self._budget = Budget(
            retry_budget, timeout, DEFAULT_CURVE if backoff is None else backoff, hard_bound
        )
        self._deadlines = None if timeout is None else Deadlines(timeout, self._expire_due)
        self._room = transport.room(max_units, max_bytes)
        self._lanes = [Lane() for _ in range(lanes)]
        # The lanes are connected together unless that would leave the pool without the
        # ``spare_connections`` its client needs for itself (a route cache's): then each
        # is connected as a batch needs it.
        self._connect_together = isinstance(transport, PooledTransport) and (
            transport.has_room_for(lanes + spare_connections)
        )
        self._resume_at = 0.0  # after a transient failure, nothing is sent before this
        self._max_units = max_units
        self._max_bytes = max_bytes
        self._queue: deque[Pending] = deque()
        self._alone: deque[Pending] = deque()  # units to send alone, on the first lane
        self._large: deque[Pending] = deque()  # units with large replies, for the last lane
        self._sending: set[Batch] = set()  # taken from a queue, not yet in a lane's flight
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
        durable: bool = False,
        made: float | None = None,
    ) -> Awaitable[list[Any]]:
        """What to await for the replies to ``commands``; ``size`` is about how many
        bytes they carry; ``alone``: send them with nothing else on their connection;
        ``large_reply``: their replies are large, and follow the other such units on one
        connection; ``streamed``: their replies may hold large archives, read in slices;
        ``durable``: the batch that carries them ends with the trailer, whose reply
        follows theirs; ``made``: when the call they belong to was made (by the event
        loop's clock), if before now: its retries and hard end count from then.

        The awaitable is the unit's future itself while the unit waits its turn, so
        thousands of calls in flight hold no coroutine of the pipeliner's; or a
        coroutine that sends the unit first, when it is to go at once. Cancelling what
        awaits it cancels the unit."""
        if self._closed:
            raise self._translate(ConnectionError("the store is closed"))
        loop = asyncio.get_running_loop()
        if made is None:
            made = loop.time()
        budget = self._budget
        pending = Pending(
            commands,
            loop.create_future(),
            size,
            budget.retry_until(made),
            budget.hard_end(made),
            alone,
            large_reply,
            streamed,
            durable and self._trailer is not None,
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

    def _goes_now(self, coming: int) -> Lane | None:
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

    async def _send_now(self, pending: Pending) -> list[Any]:
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

    def _free_lane(self, *, idle: bool) -> Lane | None:
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

    def _take_batch(self) -> list[Pending]:
        batch: list[Pending] = []
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

    async def _write(self, lane: Lane, units: list[Pending], *, alone: bool) -> None:
        """Send ``units`` as one batch on ``lane``. Every outcome is handed to the units
        (replies, a retry, or their error); only the writer's own cancellation raises."""
        if not units:
            return
        if self.observer is not None:
            self.observer.batch(len(units))
        batch = Batch(
            units,
            sum(p.size for p in units),
            None if self._deadlines is None else self._deadlines.deadline(),
            alone,
            any(p.durable for p in units),
        )
        lane.units += len(units)  # before any wait, so no one else counts on this room
        lane.size += batch.size
        if alone:
            lane.alone = True  # until its replies are read (_release)
        self._sending.add(batch)  # where the sweep finds its units until it is sent
        try:
            async with lane.lock:
                transport = self._transport
                if isinstance(transport, PooledTransport):
                    await self._write_pipelined(transport, lane, batch)
                else:
                    await self._write_exchanged(transport, lane, batch)
        finally:
            self._sending.discard(batch)
            if self._waiting():
                self._plan_flush()  # whoever queued while this lane was busy

    async def _write_pipelined(self, transport: PooledTransport, lane: Lane, batch: Batch) -> None:
        """Send ``batch`` on the lane's connection; its reader hands out the replies."""
        units = batch.units
        sent = False
        try:
            if lane.connection is None:
                if self._connect_together:
                    self._connect_other_lanes()  # alongside this one
                lane.connection = await self._within(transport.connect(), batch.deadline)
            connection = lane.connection
            lane.in_flight.append(batch)
            sent = True  # from here on the lane answers for the batch
            commands = [c for p in units for c in p.commands]
            sending = transport.send(
                connection, commands, batch.size, lambda: lane.connection is connection
            )
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
                lane.reader = self._spawn(self._read(transport, lane, connection))

    def _connect_other_lanes(self) -> None:
        """Connect, in the background, each lane that has no connection and is not in
        use: a burst soon after the first call then finds every lane ready. A lane
        connected only when a burst needs it is connected by a task that waits behind
        the burst's own tasks, and the whole burst goes on the lanes already connected.
        Not done where the pool lacks room for ``spare_connections`` beside the lanes."""
        for lane in self._lanes:
            if lane.connection is None and not lane.lock.locked():
                self._spawn(self._connect(lane))

    async def _connect(self, lane: Lane) -> None:
        transport = self._transport
        assert isinstance(transport, PooledTransport), "only pooled lanes hold connections"
        async with lane.lock:
            if lane.connection is not None or self._closed:
                return
            try:
                lane.connection = await self._within(transport.connect(), None)
            except Exception as exc:
                # Not a call's failure: the lane connects again when a batch needs it,
                # and a failure then is that batch's.
                _log.debug("connecting an idle lane failed: %s", describe(exc))
                return
        if self._waiting():
            self._plan_flush()

    async def _write_exchanged(self, transport: ClusterTransport, lane: Lane, batch: Batch) -> None:
        """Send ``batch`` through a transport that routes each command and answers in one
        exchange (a cluster client): one batch per lane at a time."""
        units = batch.units
        commands = [c for p in units for c in p.commands]
        try:
            replies = await self._within(transport.exchange(commands), batch.deadline)
        except asyncio.CancelledError:
            self._release(lane, batch)
            self._requeue(units)
            raise
        except Exception as exc:
            self._release(lane, batch)
            if batch.alone and dropped(exc):
                self._count_drop(units[0])
            self._failed(units, exc)
        else:
            self._release(lane, batch)
            self._delivered(units, replies)

    async def _within(self, attempt: Awaitable[T], deadline: float | None) -> T:
        if self._deadlines is None:
            return await attempt
        return await self._deadlines.run(attempt, deadline)

    def _waiting(self) -> bool:
        return bool(self._queue or self._alone or self._large)

    # Receiving.

    async def _read(self, transport: PooledTransport, lane: Lane, connection: Any) -> None:
        try:
            while lane.in_flight and lane.connection is connection:
                batch = lane.in_flight[0]
                if batch.held is None:
                    units = [(len(p.commands), p.streamed) for p in batch.units]
                else:
                    units = [(1, False)]  # a trailer
                # Behind others on its connection, a batch's replies come after theirs:
                # its timeout runs from its sending or from the moment its replies are
                # next to read, whichever is later, so a batch is never cut short for
                # the time a large reply before it took to arrive. A stall still ends
                # the first batch, and with it every batch on the connection.
                deadline = batch.deadline
                if deadline is not None and self._deadlines is not None:
                    deadline = max(deadline, self._deadlines.deadline())
                replies = await self._within(transport.receive(connection, units), deadline)
                lane.in_flight.popleft()
                self._release(lane, batch)
                if batch.durable and not any(is_protocol_error(r) for r in replies):
                    # Its writes are applied: the wait for them goes now, on this connection.
                    self._spawn(self._send_trailer(transport, lane, connection, batch, replies))
                    if self._waiting():
                        self._plan_flush()
                    continue
                refusal = next((r for r in replies if is_protocol_error(r)), None)
                if batch.alone and refusal is not None:
                    self._refused(batch.units[0], str(refusal))
                    # The server closes a connection on which it found a protocol error.
                    self._lane_failed(lane, None)
                    return
                if batch.held is not None:
                    self._delivered(batch.units, batch.held, trailer=replies[0])
                else:
                    self._delivered(batch.units, replies)
                if self._waiting():
                    self._plan_flush()  # the room this batch leaves may be waited for
        except Exception as exc:
            if lane.connection is connection:
                self._lane_failed(lane, exc)
        finally:
            if lane.reader is asyncio.current_task():
                lane.reader = None

    async def _send_trailer(
        self,
        transport: PooledTransport,
        lane: Lane,
        connection: Any,
        batch: Batch,
        replies: list[Any],
    ) -> None:
        """Send the trailer after ``batch``, answered with ``replies``, on the lane's
        ``connection``; the lane's reader hands both out when the trailer's reply comes."""
        assert self._trailer is not None
        deadline = None if self._deadlines is None else self._deadlines.deadline()
        trailer = Batch(batch.units, 0, deadline, False, held=replies)
        async with lane.lock:
            if lane.connection is not connection:
                # The connection was lost meanwhile: its wait is lost with it, and the
                # writes go again (every unit is idempotent).
                self._requeue(batch.units)
                return
            lane.units += len(batch.units)  # as any batch in flight, until it is read
            lane.in_flight.append(trailer)
            try:
                await self._within(
                    transport.send(connection, [self._trailer], 0, lambda: True), deadline
                )
            except Exception as exc:
                if lane.connection is connection:
                    self._lane_failed(lane, exc)
                return
        if lane.reader is None and lane.connection is connection:
            lane.reader = self._spawn(self._read(transport, lane, connection))

    def _delivered(self, units: list[Pending], replies: list[Any], trailer: Any = None) -> None:
        self.reached = True
        self.last_failure = None
        start = 0
        for p in units:
            end = start + len(p.commands)
            if not p.future.done():
                own = replies[start:end]
                if p.durable:
                    own.append(trailer)
                p.future.set_result(own)
            start = end

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
            if connection is not None and isinstance(self._transport, PooledTransport):
                await self._transport.release(connection, in_flight=bool(lane.in_flight))
            lane.in_flight.clear()
            lane.units = lane.size = 0
            lane.alone = False
        for p in waiting:
            if not p.future.done():
                p.future.set_exception(self._translate(closed))
        if self._deadlines is not None:
            self._deadlines.close()
