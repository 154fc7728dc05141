"""A namespace's slot moved to another primary while stores use it, on a cluster of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import redis
from redis.crc import key_slot

from kvstore import PackageRecord, RedisPackageStore
from kvstore.server_process import LocalServer, cluster_url, start_cluster

from .conftest import fresh_namespace
from .support import T0
from .test_cluster import command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[LocalServer]]:
    with ExitStack() as stack:
        yield start_cluster(stack)


def move_slot(nodes: list[LocalServer], slot: int) -> None:
    """Move ``slot``, keys and all, from the primary serving it to the next one, as an
    operator resharding does: IMPORTING, MIGRATING, MIGRATE, then SETSLOT NODE."""
    clients = [redis.Redis(port=n.port) for n in nodes]
    try:
        ids = [command(c, "CLUSTER", "MYID").decode() for c in clients]
        owner = next(
            i for i, c in enumerate(clients) if command(c, "CLUSTER", "COUNTKEYSINSLOT", slot)
        )
        target = (owner + 1) % len(nodes)
        source, destination = clients[owner], clients[target]
        command(destination, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[owner])
        command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        for _ in range(1000):  # bounded: a namespace of a test holds a few keys
            keys = command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            command(source, "MIGRATE", "127.0.0.1", nodes[target].port, "", 0, 5000, "KEYS", *keys)
        for client in clients:
            command(client, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    finally:
        for client in clients:
            client.close()


async def test_route_caches_and_watches_follow_a_moved_slot(cluster: list[LocalServer]) -> None:
    url = cluster_url(cluster)
    namespace = fresh_namespace()
    async with (
        RedisPackageStore.from_url(
            url, namespace=namespace, cache_routes=True, route_health_interval=0.2
        ) as reader,
        RedisPackageStore.from_url(url, namespace=namespace) as writer,
    ):
        await writer.put_package(PackageRecord("order", "h0", b"zip", T0))
        assert await reader.route_cache_ready(10)
        async with reader.watch_routes() as watch:
            first = await asyncio.wait_for(anext(watch), 10)
            assert first.content_hash == "h0"
            move_slot(cluster, key_slot(namespace.encode()))
            for i in range(1, 11):
                await writer.put_package_route("order", f"h{i}")
            # Each write as it happens, or, across the reconnection, the route's value
            # as the reload finds it: the last value handed out is the last written.
            seen: list[str] = []
            while not seen or seen[-1] != "h10":
                seen.append((await asyncio.wait_for(anext(watch), 15)).content_hash)
        assert seen[-1] == "h10"
        assert await reader.route_cache_ready(15), "live again on the slot's new primary"
        assert await reader.get_package_route("order") == "h10"
        await writer.put_package_route("order", "h11")
        for _ in range(100):  # bounded: the change crosses within milliseconds
            if await reader.get_package_route("order") == "h11":
                break
            await asyncio.sleep(0.05)
        assert await reader.get_package_route("order") == "h11"


async def test_a_store_that_only_reads_becomes_live_again_after_a_moved_slot(
    cluster: list[LocalServer],
) -> None:
    url = cluster_url(cluster)
    namespace = fresh_namespace()
    async with RedisPackageStore.from_url(url, namespace=namespace) as writer:
        await writer.put_package(PackageRecord("order", "h0", b"zip", T0))
    async with RedisPackageStore.from_url(
        url, namespace=namespace, cache_routes=True, route_health_interval=0.2
    ) as reader:
        assert await reader.route_cache_ready(10)
        move_slot(cluster, key_slot(namespace.encode()))
        await asyncio.sleep(1)  # the server ends the shard subscription: the cache reconnects
        assert await reader.route_cache_ready(15)
        assert await reader.get_package_route("order") == "h0"
