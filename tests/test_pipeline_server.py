"""The pipeliner's bounds against real servers that stall (SIGSTOP) or refuse a call.

Every call ends within about ``retry_budget + timeout`` however many are queued; a
caller's cancellation always arrives as ``CancelledError``; a put the server would refuse
fails alone. A stopped server is always continued in a ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from redis.asyncio import Redis

from kvstore import BackendError, RedisPackageStore
from kvstore.redis.scripts import load_library
from kvstore.redis.transports import _stream_writer
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import pkg
from .test_acl import rule_for
from .topology import Relay, raw_command


@contextmanager
def stopped(server: LocalServer) -> Iterator[None]:
    """The server process frozen (SIGSTOP): it accepts connections and answers nothing."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


@pytest.mark.slow
async def test_every_call_ends_within_its_budget_however_many_are_in_flight(
    server: LocalServer,
) -> None:
    # Thousands of calls behind a stalled server: each must fail about retry_budget +
    # timeout after it was made, not after the calls queued before it have had their turn.
    timeout, budget = 1.0, 2.0
    loop = asyncio.get_running_loop()
    async with RedisPackageStore.from_url(
        server.url, namespace=fresh_namespace(), timeout=timeout, retry_budget=budget
    ) as store:
        await store.put_package(pkg("t", "warm"))

        async def timed(i: int) -> float:
            made = loop.time()
            with pytest.raises(BackendError):
                await store.put_package(pkg("t", f"h{i}", bytes(100), i))
            return loop.time() - made

        with stopped(server):
            waits = await asyncio.wait_for(asyncio.gather(*(timed(i) for i in range(3000))), 60)
        assert max(waits) < budget + timeout + 1.5  # a correctness bound, not a speed figure
        await store.put_package(pkg("t", "after"))  # the store carries on once the server does


@pytest.mark.slow
async def test_a_cancel_that_lands_with_the_stores_own_deadline_is_never_swallowed(
    server: LocalServer,
) -> None:
    # The store's timer and the caller's cancel() fire together: the call must end with
    # CancelledError, the task must count no cancellation left, and asyncio.timeout must
    # see its own cancellation and raise TimeoutError, never BackendError.
    if sys.version_info < (3, 11):
        pytest.skip("asyncio.timeout and Task.cancelling are Python 3.11 and newer")
    timeout = 0.2
    outcomes: list[str] = []

    async def plain_cancel(store: RedisPackageStore, delay: float) -> None:
        task = asyncio.create_task(store.get_package_route("t"))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # the bug: BackendError, or still retrying
            outcomes.append(f"cancel became {type(exc).__name__}")
            return
        outcomes.append("cancelled" if task.cancelled() else "finished")

    async def under_timeout(store: RedisPackageStore, delay: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            async with asyncio.timeout(delay):
                await store.get_package_route("t")
        except TimeoutError:
            outcomes.append("timed out" if task.cancelling() == 0 else "cancel left pending")
        except BaseException as exc:
            outcomes.append(f"timeout became {type(exc).__name__}")

    async def one(i: int, delay: float) -> None:
        # A fresh store: its first call opens the connection in the caller's own task,
        # which is where the store's deadline cancels it.
        async with RedisPackageStore.from_url(
            server.url, namespace=fresh_namespace(), timeout=timeout, retry_budget=5.0
        ) as store:
            if i % 2:
                await plain_cancel(store, delay)
            else:
                await asyncio.create_task(under_timeout(store, delay))

    rng = random.Random(7)
    with stopped(server):
        for _ in range(6):
            # Cancels at jittered moments around the deadline, which fires within a
            # quarter of the timeout after it (one shared timer ticking every timeout/4).
            await asyncio.wait_for(
                asyncio.gather(*(one(i, timeout + rng.uniform(-0.02, 0.08)) for i in range(40))),
                30,
            )
    unexpected = [o for o in outcomes if o not in ("cancelled", "timed out")]
    assert unexpected == []
    assert len(outcomes) == 240


@pytest.mark.parametrize("protocol", [2, 3])
async def test_an_archive_over_the_servers_limit_fails_alone(protocol: int) -> None:
    # proto-max-bulk-len 1mb: a server sent a 2 MiB argument drops the connection, and
    # with it every call pipelined beside the put. The store reads the limit (a flat
    # list in RESP2, a map in RESP3) and never sends the put.
    with LocalServer(settings={"proto-max-bulk-len": "1mb"}) as small:
        async with RedisPackageStore.from_url(
            small.url,
            namespace=fresh_namespace(),
            timeout=2.0,
            retry_budget=2.0,
            protocol=protocol,
        ) as store:
            await store.put_package(pkg("t", "warm"))
            calls = [store.put_package(pkg("t", f"h{i}", bytes(100), i)) for i in range(200)]
            calls.insert(100, store.put_package(pkg("t", "big", bytes(2 << 20), 999)))
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            big = outcomes.pop(100)
            assert isinstance(big, BackendError)
            assert f"{2 << 20} bytes, over the server's proto-max-bulk-len of {1 << 20}" in str(big)
            assert outcomes == [None] * 200
            assert len(await store.list_packages()) == 201
            # Just under the limit goes through.
            await store.put_package(pkg("t", "fits", bytes((1 << 20) - 4096)))


async def test_a_user_who_cannot_read_the_limit_still_fails_alone() -> None:
    # Without CONFIG rights the limit is unknown: the large put is sent alone on a
    # connection, so that connection is all the server drops.
    namespace = fresh_namespace()
    with LocalServer(settings={"proto-max-bulk-len": "1mb"}) as small:
        admin = Redis.from_url(small.url)
        await raw_command(admin, "ACL", "SETUSER", "engine", "on", ">pw", *rule_for(namespace))
        await load_library(admin)  # an operator's step: the rule may not load it
        await admin.aclose()
        async with RedisPackageStore.from_url(
            f"redis://engine:pw@127.0.0.1:{small.port}",
            namespace=namespace,
            timeout=2.0,
            retry_budget=2.0,
        ) as store:
            await store.put_package(pkg("t", "warm"))
            calls = [store.put_package(pkg("t", f"h{i}", bytes(100), i)) for i in range(200)]
            calls.insert(100, store.put_package(pkg("t", "big", bytes(2 << 20), 999)))
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            big = outcomes.pop(100)
            assert isinstance(big, BackendError)
            assert "proto-max-bulk-len" in str(big) and str(2 << 20) in str(big)
            assert outcomes == [None] * 200
            assert len(await store.list_packages()) == 201


async def test_the_first_call_connects_every_lane_and_a_burst_uses_them_all(
    server: LocalServer,
) -> None:
    # Lanes connected only when a burst needs them are connected by tasks that wait
    # behind the burst's own: the whole burst would go on the first call's connection.
    client = Redis.from_url(server.url, client_name="every-lane")
    watcher = Redis.from_url(server.url)

    async def lanes() -> list[str]:
        """The last command of each of the store's connections."""
        return [c["cmd"] for c in await watcher.client_list() if c["name"] == "every-lane"]

    await load_library(watcher)  # so the store's connections are its lanes alone
    try:
        async with RedisPackageStore(client, namespace=fresh_namespace(), lanes=3) as store:
            await store.put_package(pkg("t", "first"))
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while len(await lanes()) < 3 and loop.time() < end:
                await asyncio.sleep(0.01)
            assert len(await lanes()) == 3
            await asyncio.gather(*(store.put_package(pkg("t", f"h{i}", n=i)) for i in range(3000)))
            assert await lanes() == ["fcall"] * 3
    finally:
        await client.aclose()
        await watcher.aclose()


async def test_large_archives_sent_in_slices_interleave_with_small_calls(
    server: LocalServer,
) -> None:
    # A large put goes out a slice at a time, the loop running between slices: small
    # calls made meanwhile go on other lanes or wait their turn, and every call gets
    # its own reply, the archives back byte for byte.
    big = [bytes([i]) * (5 * (1 << 20) + i) for i in range(3)]
    async with RedisPackageStore.from_url(server.url, namespace=fresh_namespace()) as store:
        await store.put_package(pkg("t", "warm"))
        small = [pkg("t", f"s{i}", f"{i}".encode(), i) for i in range(300)]
        await asyncio.gather(
            *(
                store.put_package(pkg("t", f"b{i}", archive, 1000 + i))
                for i, archive in enumerate(big)
            ),
            *(store.put_package(record) for record in small),
        )
        got = await asyncio.gather(
            *(store.get_package("t", f"b{i}") for i in range(len(big))),
            *(store.get_package("t", record.content_hash) for record in small),
        )
        assert [r.archive if r else None for r in got] == [*big, *(r.archive for r in small)]


async def test_the_installed_redis_py_lets_slices_go_to_the_transport_uncopied(
    server: LocalServer,
) -> None:
    # If a redis-py upgrade moves the connection's writer, this fails rather than every
    # slice of a large archive being copied once more on its way out.
    client = Redis.from_url(server.url)
    connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await connection.connect()
        assert _stream_writer(connection) is not None
    finally:
        await client.connection_pool.release(connection)
        await client.aclose()


@pytest.mark.slow
async def test_a_connection_dropped_while_slices_are_sent_loses_nothing(
    server: LocalServer,
) -> None:
    # The server drops the store's connections while large archives are going out a
    # slice at a time: the rest of a command never goes out on a new connection (where
    # the server would take it for commands), every put is sent again whole, and
    # every call after it gets its own reply.
    killer = Redis.from_url(server.url)
    big = [bytes([i + 1]) * (12 * (1 << 20) + i) for i in range(3)]
    try:
        async with RedisPackageStore.from_url(
            server.url, namespace=fresh_namespace(), timeout=5.0, retry_budget=20.0
        ) as store:
            await store.put_package(pkg("t", "warm"))
            puts = asyncio.gather(
                *(store.put_package(pkg("t", f"b{i}", a, 10 + i)) for i, a in enumerate(big))
            )
            killed = 0
            for _ in range(20):
                await asyncio.sleep(0.005)
                killed += await killer.client_kill_filter(_type="normal", skipme=True)
                if puts.done():
                    break
            await puts
            small = [pkg("t", f"s{i}", f"{i}".encode(), 100 + i) for i in range(200)]
            await asyncio.gather(*(store.put_package(r) for r in small))
            got = await asyncio.gather(*(store.get_package("t", f"b{i}") for i in range(3)))
            assert [r.archive if r else None for r in got] == big
            listed = {r.content_hash: r.archive for r in await store.list_packages()}
            assert all(listed[r.content_hash] == r.archive for r in small)
            assert killed > 0
    finally:
        await killer.aclose()


async def test_a_reply_behind_large_ones_on_its_connection_is_not_cut_short_by_their_time(
    valkey_server: LocalServer,
) -> None:
    # Large replies follow each other on one connection. Over a slow link each takes
    # 0.4 s, within the 0.7 s timeout, but the fourth arrives 1.6 s after it was sent:
    # its timeout runs from the moment the replies before it were read, so nothing is
    # cut short and sent again.
    archive_size, count = 2 << 20, 4
    relay = await Relay(valkey_server.port, rate=5 << 20).start()
    namespace = fresh_namespace()
    try:
        async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as writer:
            records = [pkg("t", f"h{i}", os.urandom(archive_size), i) for i in range(count)]
            for record in records:
                await writer.put_package(record)
        url = f"redis://127.0.0.1:{relay.port}"
        async with (
            RedisPackageStore.from_url(
                url, namespace=namespace, timeout=0.7, retry_budget=10.0
            ) as store,
            Redis.from_url(valkey_server.url) as raw,
        ):
            await store.get_package("t", "h0")  # connected, and the layout known
            sent = (await raw.info("stats"))["total_net_output_bytes"]
            got = await asyncio.gather(*(store.get_package("t", r.content_hash) for r in records))
            assert got == records
            resent = (await raw.info("stats"))["total_net_output_bytes"] - sent
            assert resent < (count + 0.5) * archive_size, "a reply was cut short and sent again"
            assert store.health().last_error is None
    finally:
        await relay.aclose()
