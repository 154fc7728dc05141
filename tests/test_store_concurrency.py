"""Many callers on one store: thousands of tasks over a tiny pool, a refused or cancelled
call that fails nobody else, connections dropped under them, and a store closed while
they wait."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from redis.asyncio import Redis

from kvstore import BackendError, RedisPackageStore, SerializationError
from kvstore.redis.keyspace import Keyspace
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import pkg


async def test_thousands_of_tasks_share_one_store_over_a_tiny_pool(server: LocalServer) -> None:
    # Two pooled connections for 5,000 concurrent calls: a store that opened one
    # connection per call would fail with "Too many connections".
    raw = Redis.from_url(server.url, max_connections=2)
    async with RedisPackageStore(raw, namespace=fresh_namespace()) as store:
        records = [pkg(f"t{i % 7}", f"h{i}", bytes([i % 256]) * 100, i) for i in range(5000)]
        await asyncio.gather(*(store.put_package(r) for r in records))
        routes = await asyncio.gather(*(store.get_package_route(f"t{i}") for i in range(7)))
        assert await store.list_packages() == records
        assert all(route is not None for route in routes)
    await raw.aclose()


async def test_one_refused_call_never_fails_its_neighbours(client: Redis) -> None:
    good = RedisPackageStore(client, namespace=fresh_namespace())
    broken = RedisPackageStore(client, namespace=fresh_namespace())
    await client.set(f"{{{broken.namespace}}}:routes", b"not a hash")
    outcomes = await asyncio.gather(
        *(
            (broken if i % 10 == 0 else good).put_package(pkg("order", f"h{i}", n=i))
            for i in range(500)
        ),
        return_exceptions=True,
    )
    failed = [i for i, o in enumerate(outcomes) if o is not None]
    assert failed == list(range(0, 500, 10))
    assert all(isinstance(outcomes[i], SerializationError) for i in failed)
    assert len(await good.list_packages()) == 450


@pytest.mark.slow
async def test_a_cancelled_caller_does_not_lose_its_neighbours_calls(server: LocalServer) -> None:
    async with RedisPackageStore.from_url(server.url, namespace=fresh_namespace()) as store:
        for round_ in range(20):
            tasks = [
                asyncio.create_task(store.put_package(pkg("t", f"{round_}-{i}", n=i)))
                for i in range(200)
            ]
            await asyncio.sleep(0)
            for task in tasks[::3]:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            kept = {f"{round_}-{i}" for i, o in enumerate(outcomes) if o is None}
            listed = {r.content_hash for r in await store.list_packages()}
            assert kept <= listed


@pytest.mark.slow
async def test_connections_killed_mid_burst_lose_no_call(server: LocalServer) -> None:
    # Batches are pipelined several deep on each connection; when the server drops the
    # connections, everything in flight on them is sent again, and every call completes.
    killer = Redis.from_url(server.url)
    async with RedisPackageStore.from_url(
        server.url, namespace=fresh_namespace(), timeout=2.0, retry_budget=10.0
    ) as store:
        await store.put_package(pkg("t", "warm"))
        records = [pkg(f"t{i % 5}", f"h{i:05d}", bytes(2048), i) for i in range(6000)]
        puts = asyncio.gather(*(store.put_package(r) for r in records))
        killed = 0
        for _ in range(3):
            await asyncio.sleep(0.01)
            killed += await killer.client_kill_filter(_type="normal", skipme=True)
        await puts
        assert killed > 0
        listed = {r.content_hash for r in await store.list_packages()}
        assert listed >= {r.content_hash for r in records}
    await killer.aclose()


async def test_closing_the_store_fails_the_calls_still_waiting(server: LocalServer) -> None:
    store = RedisPackageStore.from_url(server.url, namespace=fresh_namespace())
    calls = [asyncio.ensure_future(store.put_package(pkg("t", f"h{i}", n=i))) for i in range(3000)]
    await asyncio.sleep(0)
    await store.aclose()
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    assert all(o is None or isinstance(o, BackendError) for o in outcomes)
    assert any(isinstance(o, BackendError) for o in outcomes)
    with pytest.raises(BackendError, match="closed"):
        await store.put_package(pkg("t", "late"))


async def test_a_full_batch_reaches_the_server_before_the_tasks_behind_it_start(
    server: LocalServer,
) -> None:
    # The call that fills a batch sends it from its own task. A probe among the tasks that
    # gather starts later blocks the event loop and polls the server on a connection of its
    # own: the first batch must already be there, though no reply has been read yet.
    namespace = fresh_namespace()
    keys = Keyspace(namespace)
    seen: list[int] = []

    async def probe() -> None:
        with redis.Redis(port=server.port) as sync:
            for _ in range(200):  # at most about two seconds
                seen.append(int(sync.zcard(keys.index)))
                if seen[-1] >= 256:
                    return
                time.sleep(0.01)

    async with RedisPackageStore.from_url(server.url, namespace=namespace) as store:
        await store.put_package(pkg("t", "warm"))  # the first connection is open
        calls = [store.put_package(pkg("t", f"h{i}", n=i)) for i in range(600)]
        await asyncio.gather(*calls[:400], probe(), *calls[400:])
        assert seen[-1] >= 256
        assert len(await store.list_packages()) == 601
