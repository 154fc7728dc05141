"""The pipeliner on its own, over an in-memory connection pool the tests steer.

``FakePool`` hands out ``FakeConnection``s that speak just enough of the protocol: they
parse what is sent, answer ``ECHO`` with its argument and ``FAIL`` with a
``ResponseError``, and can be made to stall a send or a read, or to drop mid-batch.
Real servers are in ``test_pipeline_server.py``; these pin down orderings no real server
can be made to produce on demand.
"""

from __future__ import annotations

import asyncio
import gc
from collections import deque
from typing import Any

import pytest
from redis.exceptions import ConnectionError, ResponseError

from kvstore import BackendError
from kvstore.redis.pipeline import BATCHES_PER_CONNECTION, Pipeliner
from kvstore.redis.retry import Curve
from kvstore.redis.transports import PooledTransport


def parse_commands(data: bytes) -> list[list[bytes]]:
    """The commands in ``data``, each an array of bulk strings."""
    commands = []
    at = 0
    while at < len(data):
        end = data.index(b"\r\n", at)
        assert data[at : at + 1] == b"*"
        count = int(data[at + 1 : end])
        at = end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", at)
            size = int(data[at + 1 : end])
            args.append(data[end + 2 : end + 2 + size])
            at = end + 2 + size + 2
        commands.append(args)
    return commands


class FakeConnection:
    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self.replies: deque[Any] = deque()
        self.ready = asyncio.Condition()
        self.sends: list[tuple[list[list[bytes]], int]] = []
        self.replies_read = 0
        self.dead = False

    async def send_packed_command(self, data: bytes, check_health: bool = True) -> None:
        if self.dead:
            raise ConnectionError("connection closed")
        await self.pool.send_gate.wait()
        commands = parse_commands(data)
        # What was sent, with how many replies were still unread on this connection.
        self.sends.append((commands, len(self.replies)))
        for command in commands:
            self.pool.executed.append(command)
            if command[0] == b"ECHO":
                self.replies.append(command[1])
            elif command[0] == b"FAIL":
                self.replies.append(ResponseError("refused"))
            else:
                self.replies.append(ResponseError(f"unknown command {command[0]!r}"))
        async with self.ready:
            self.ready.notify_all()

    async def read_response(self) -> Any:
        await self.pool.read_gate.wait()
        if self.dead:
            raise ConnectionError("connection closed")
        if self.pool.drop_after is not None and self.pool.drop_after <= 0:
            self.pool.drop_after = None
            self.dead = True
            raise ConnectionError("connection reset by peer")
        async with self.ready:
            await self.ready.wait_for(lambda: bool(self.replies) or self.dead)
        if self.dead:
            raise ConnectionError("connection closed")
        if self.pool.drop_after is not None:
            self.pool.drop_after -= 1
        self.replies_read += 1
        reply = self.replies.popleft()
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def disconnect(self, nowait: bool = False) -> None:
        self.dead = True
        async with self.ready:
            self.ready.notify_all()


class FakePool:
    def __init__(self) -> None:
        self.made: list[FakeConnection] = []
        self.released: list[FakeConnection] = []
        self.executed: list[list[bytes]] = []
        self.connect_gate = asyncio.Event()
        self.send_gate = asyncio.Event()
        self.read_gate = asyncio.Event()
        for gate in (self.connect_gate, self.send_gate, self.read_gate):
            gate.set()
        self.drop_after: int | None = None  # replies read before a connection drops
        # Connection attempts so far; those numbered in ``refused`` fail, those in
        # ``held`` wait for ``held_gate``.
        self.attempts = 0
        self.refused: set[int] = set()
        self.held: set[int] = set()
        self.held_gate = asyncio.Event()

    async def get_connection(self) -> FakeConnection:
        self.attempts += 1
        attempt = self.attempts
        await self.connect_gate.wait()
        if attempt in self.held:
            await self.held_gate.wait()
        if attempt in self.refused:
            raise ConnectionError("connection refused")
        connection = FakeConnection(self)
        self.made.append(connection)
        return connection

    async def release(self, connection: FakeConnection) -> None:
        self.released.append(connection)


class FakeClient:
    def __init__(self, max_connections: int | None = None) -> None:
        self.connection_pool = FakePool()
        if max_connections is not None:
            self.connection_pool.max_connections = max_connections  # type: ignore[attr-defined]


def pipeliner(
    client: FakeClient, *, timeout: float | None = 5.0, retry_budget: float = 5.0, **options: Any
) -> Pipeliner:
    return Pipeliner(
        PooledTransport(client.connection_pool),
        lanes=options.pop("lanes", 1),
        timeout=timeout,
        retry_budget=retry_budget,
        translate=lambda exc: BackendError(f"{type(exc).__name__}: {exc}"),
        backoff=Curve(0.001, 0.01),
        **options,
    )


def echo(*words: str) -> list[tuple[str, str]]:
    return [("ECHO", word) for word in words]


async def test_each_caller_gets_its_own_replies_in_order() -> None:
    client = FakeClient()
    pipe = pipeliner(client, lanes=2, max_units=16)
    units = [echo(*(f"{i}.{j}" for j in range(1 + i % 3))) for i in range(600)]
    results = await asyncio.gather(*(pipe.run(unit) for unit in units))
    for unit, replies in zip(units, results, strict=True):
        assert replies == [word.encode() for _, word in unit]
    assert len(client.connection_pool.made) <= 2
    await pipe.aclose()


async def test_a_refused_command_comes_back_as_its_error_and_fails_no_neighbour() -> None:
    pipe = pipeliner(FakeClient())
    results = await asyncio.gather(
        *(pipe.run([("FAIL",) if i == 5 else ("ECHO", str(i))]) for i in range(10))
    )
    assert isinstance(results[5][0], ResponseError)
    assert [r[0] for i, r in enumerate(results) if i != 5] == [
        str(i).encode() for i in range(10) if i != 5
    ]
    await pipe.aclose()


async def test_batches_are_pipelined_several_deep_on_one_connection() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, max_units=4)
    pool.read_gate.clear()  # the server reads everything and answers nothing yet
    calls = [asyncio.ensure_future(pipe.run(echo(str(i)))) for i in range(400)]
    for _ in range(50):
        await asyncio.sleep(0)
    (connection,) = pool.made
    # Batch after batch went out though no reply was read, until the connection was full.
    assert connection.replies_read == 0
    assert len(connection.sends) > BATCHES_PER_CONNECTION // 2
    assert len(pool.executed) <= (BATCHES_PER_CONNECTION + 1) * 4
    pool.read_gate.set()
    results = await asyncio.gather(*calls)
    assert results == [[str(i).encode()] for i in range(400)]
    await pipe.aclose()


async def until(condition: Any, turns: int = 200) -> bool:
    """Whether ``condition()`` holds within ``turns`` turns of the loop."""
    for _ in range(turns):
        if condition():
            return True
        await asyncio.sleep(0)
    return bool(condition())


async def test_the_first_connection_brings_every_lane_along() -> None:
    # A lane connected only when a burst needs it connects in a task that waits behind
    # the burst's own tasks: the burst would go on the lanes connected before it.
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, lanes=3, max_units=4)
    assert await pipe.run(echo("first")) == [b"first"]
    assert await until(lambda: len(pool.made) == 3), "the other lanes connected unasked"
    pool.read_gate.clear()  # replies wait: batches pile up on every connection
    calls = [asyncio.ensure_future(pipe.run(echo(str(i)))) for i in range(60)]
    assert await until(lambda: all(len(c.sends) > 1 for c in pool.made[1:]))
    assert len(pool.made) == 3
    pool.read_gate.set()
    assert await asyncio.gather(*calls) == [[str(i).encode()] for i in range(60)]
    await pipe.aclose()


@pytest.mark.parametrize("room", [1, 2])
async def test_lanes_connect_ahead_of_need_only_with_room_for_the_clients_own(room: int) -> None:
    # A route cache's subscription and reads need connections of the pool too: lanes
    # connected ahead of need must not take the last ones.
    client = FakeClient(max_connections=2 + room)
    pool = client.connection_pool
    pipe = pipeliner(client, lanes=2, spare_connections=2)
    assert await pipe.run(echo("first")) == [b"first"]
    for _ in range(20):
        await asyncio.sleep(0)
    assert pool.attempts == (1 if room < 2 else 2)
    await pipe.aclose()


async def test_a_lane_that_fails_to_connect_ahead_of_need_fails_no_call() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, lanes=2, max_units=4)
    pool.refused = {2}  # the lane connected in the background
    assert await pipe.run(echo("first")) == [b"first"]
    assert await until(lambda: pool.attempts == 2)
    pool.read_gate.clear()
    calls = [asyncio.ensure_future(pipe.run(echo(str(i)))) for i in range(40)]
    # The lane connects again when a batch needs it.
    assert await until(lambda: len(pool.made) == 2)
    pool.read_gate.set()
    assert await asyncio.gather(*calls) == [[str(i).encode()] for i in range(40)]
    assert pipe.last_failure is None
    await pipe.aclose()


async def test_closing_while_a_lane_connects_ahead_of_need_leaves_nothing_running() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, lanes=2)
    pool.held = {2}  # the lane connected in the background never gets its connection
    assert await pipe.run(echo("first")) == [b"first"]
    assert await until(lambda: pool.attempts == 2)
    await asyncio.wait_for(pipe.aclose(), 1.0)
    assert not pipe._tasks
    assert pool.made and all(c in pool.released for c in pool.made)


async def test_units_with_large_replies_follow_one_another_on_one_connection() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, lanes=3, max_units=4)
    pool.read_gate.clear()  # the server answers nothing yet
    large = [asyncio.ensure_future(pipe.run(echo(f"L{i}"), large_reply=True)) for i in range(6)]
    small = [asyncio.ensure_future(pipe.run(echo(f"s{i}"))) for i in range(40)]
    for _ in range(50):
        await asyncio.sleep(0)
    carrying = [
        c for c in pool.made if any(cmd[1].startswith(b"L") for cmds, _ in c.sends for cmd in cmds)
    ]
    assert len(carrying) == 1, "every large reply comes on one connection"
    large_sends = [cmds for cmds, _ in carrying[0].sends if cmds[0][1].startswith(b"L")]
    assert large_sends == [[[b"ECHO", f"L{i}".encode()]] for i in range(6)], "in order, one a batch"
    assert len(pool.made) > 1, "the other units are not kept off the other connections"
    pool.read_gate.set()
    assert await asyncio.gather(*large) == [[f"L{i}".encode()] for i in range(6)]
    assert await asyncio.gather(*small) == [[f"s{i}".encode()] for i in range(40)]
    await pipe.aclose()


async def test_units_with_large_replies_survive_a_dropped_connection() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, lanes=2)
    pool.drop_after = 3  # the connection drops with units still in flight on it
    calls = [pipe.run(echo(f"L{i}"), large_reply=True) for i in range(12)]
    assert await asyncio.gather(*calls) == [[f"L{i}".encode()] for i in range(12)]
    await pipe.aclose()


async def test_a_connection_dropped_mid_batch_loses_and_duplicates_no_reply() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, max_units=8)
    pool.drop_after = 37  # in the middle of the fifth batch
    results = await asyncio.gather(*(pipe.run(echo(f"{i}a", f"{i}b")) for i in range(300)))
    assert results == [[f"{i}a".encode(), f"{i}b".encode()] for i in range(300)]
    assert len(pool.made) == 2  # the dropped connection was replaced
    assert pool.made[0] in pool.released  # and given back, disconnected
    assert pool.made[0].dead
    # Everything in flight on the dropped connection was sent again.
    assert len(pool.executed) > 600
    await pipe.aclose()


async def test_a_cancelled_writer_leaves_the_other_calls_to_complete() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client)
    await pipe.run(echo("warm"))
    pool.send_gate.clear()
    writer = asyncio.ensure_future(pipe.run(echo("writer")))  # finds the lane idle: writes
    await asyncio.sleep(0)
    others = [asyncio.ensure_future(pipe.run(echo(str(i)))) for i in range(50)]
    await asyncio.sleep(0)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    pool.send_gate.set()
    assert await asyncio.gather(*others) == [[str(i).encode()] for i in range(50)]
    await pipe.aclose()


async def test_a_stalled_read_is_retried_then_fails_within_the_budget() -> None:
    client = FakeClient()
    pool = client.connection_pool
    timeout, budget = 0.1, 0.3
    pipe = pipeliner(client, timeout=timeout, retry_budget=budget)
    pool.read_gate.clear()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BackendError, match="TimeoutError"):
        await pipe.run(echo("x"))
    took = loop.time() - started
    assert budget <= took < budget + timeout + timeout / 4 + 0.2
    assert len(pool.made) > 1  # each stalled attempt dropped its connection and retried
    pool.read_gate.set()
    assert await pipe.run(echo("y")) == [b"y"]
    await pipe.aclose()


async def test_queued_calls_fail_at_their_own_hard_end_behind_a_stall() -> None:
    client = FakeClient()
    pool = client.connection_pool
    timeout, budget = 0.1, 0.2
    pipe = pipeliner(client, timeout=timeout, retry_budget=budget, max_units=4)
    pool.read_gate.clear()
    pool.send_gate.clear()  # nothing even leaves: everything waits in the queue
    loop = asyncio.get_running_loop()

    async def timed(i: int) -> float:
        made = loop.time()
        with pytest.raises(BackendError):
            await pipe.run(echo(str(i)))
        return loop.time() - made

    waits = await asyncio.wait_for(asyncio.gather(*(timed(i) for i in range(2000))), 10)
    assert max(waits) < budget + timeout + timeout / 4 + 0.3
    await pipe.aclose()


async def test_settled_calls_leave_nothing_behind() -> None:
    # Held for seconds (a hard end's worth), every settled call's unit would hold its
    # commands, and make each garbage collection of a busy store slower: what stays is
    # what is in flight.
    pipe = pipeliner(FakeClient(), timeout=5.0, retry_budget=5.0, max_units=64)
    for round_ in range(20):
        await asyncio.gather(*(pipe.run(echo(f"{round_}.{i}")) for i in range(500)))
        gc.collect()
        assert not [o for o in gc.get_objects() if type(o).__name__ == "_Pending"]
    await pipe.aclose()


async def test_a_cancel_landing_with_the_deadline_is_a_cancel() -> None:
    # The store's timer has cancelled the attempt, and before the task runs again its
    # caller cancels it too: the caller's cancellation must be what the task raises.
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, timeout=0.05, retry_budget=5.0)
    pool.connect_gate.clear()  # connecting stalls, in the caller's own task
    deadlines = pipe._deadlines
    assert deadlines is not None
    for _ in range(5):
        task = asyncio.ensure_future(pipe.run(echo("x")))
        for _ in range(1_000_000):
            # One loop turn each: the turn after the timer cancelled the task, this test
            # runs before the task does.
            await asyncio.sleep(0)
            if task in deadlines._expired:
                break
        assert task in deadlines._expired  # the store's cancel is on its way
        assert task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
    await pipe.aclose()


async def test_closing_fails_the_waiting_calls() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, max_units=4)
    pool.read_gate.clear()
    calls = [asyncio.ensure_future(pipe.run(echo(str(i)))) for i in range(200)]
    for _ in range(20):
        await asyncio.sleep(0)
    await pipe.aclose()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, BackendError) and "closed" in str(o) for o in outcomes)
    assert pool.made and all(c in pool.released for c in pool.made)
    with pytest.raises(BackendError, match="closed"):
        await pipe.run(echo("late"))


async def test_a_unit_sent_alone_shares_its_connection_with_nothing() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, lanes=2, max_units=4)
    calls = [asyncio.ensure_future(pipe.run(echo(str(i)))) for i in range(100)]
    big = asyncio.ensure_future(pipe.run(echo("big"), 1 << 20, alone=True))
    calls += [asyncio.ensure_future(pipe.run(echo(str(i)))) for i in range(100, 200)]
    results = await asyncio.gather(*calls)
    assert results == [[str(i).encode()] for i in range(200)]
    assert await big == [b"big"]
    # The batch that carried it held nothing else, nothing else was in flight on its
    # connection, and nothing followed it there before its reply was read.
    ((connection, at),) = [
        (c, i)
        for c in pool.made
        for i, (sent, _) in enumerate(c.sends)
        if [b"ECHO", b"big"] in sent
    ]
    sent, unread = connection.sends[at]
    assert sent == [[b"ECHO", b"big"]]
    assert unread == 0
    assert all(unread == 0 for _, unread in connection.sends[at + 1 : at + 2])
    await pipe.aclose()


async def test_a_unit_sent_alone_whose_connection_drops_twice_is_refused() -> None:
    client = FakeClient()
    pool = client.connection_pool
    pipe = pipeliner(client, lanes=2)
    await asyncio.gather(pipe.run(echo("a")), pipe.run(echo("b")))
    for connection in pool.made:
        await connection.disconnect()  # the server drops every connection
    pool.drop_after = 0  # and the next one, before it answers
    big = asyncio.ensure_future(pipe.run(echo("big"), 2 << 20, alone=True))
    with pytest.raises(BackendError, match=r"2097152-byte argument.*proto-max-bulk-len"):
        await big
    assert await pipe.run(echo("after")) == [b"after"]
    await pipe.aclose()
