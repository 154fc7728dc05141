"""The whole contract on a real three-primary Redis Cluster started on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from kvstore import BackendError, PackageRecord, RedisPackageStore, SerializationError
from kvstore.conformance import SCENARIOS, T0, run_scenario
from kvstore.redis.keyspace import Keyspace, archive_digest
from kvstore.redis.scripts import LIBRARY
from kvstore.server_process import CLUSTER_SLOTS, LocalServer, cluster_url, start_cluster

from .conftest import fresh_namespace
from .test_cli import ok
from .test_store_library import impostor_text, replace_library

# A cluster of its own.
pytestmark = pytest.mark.slow

SLOTS = CLUSTER_SLOTS


def command(client: redis.Redis, *args: object) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[LocalServer]]:
    with ExitStack() as stack:
        yield start_cluster(stack)


@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_cluster_keeps_the_promise(
    cluster: list[LocalServer], scenario: str, layout: int
) -> None:
    url = cluster_url(cluster)
    await run_scenario(
        scenario,
        lambda: RedisPackageStore.from_url(url, namespace=fresh_namespace(), layout=layout),
    )


async def test_archives_spread_over_every_primary_stored_once_and_verified(
    cluster: list[LocalServer],
) -> None:
    namespace = fresh_namespace()
    keys = Keyspace(namespace)
    archives = [bytes([i]) * 5000 for i in range(60)]  # kept as blobs
    async with RedisPackageStore.from_url(cluster_url(cluster), namespace=namespace) as store:
        for i, archive in enumerate(archives):
            await store.put_package(PackageRecord("order", f"h{i}", archive, T0))
        for i, archive in enumerate(archives[:20]):  # the same bytes under other names
            await store.put_package_with_routes(PackageRecord("copy", f"c{i}", archive, T0), ["x"])
        per_node = []
        for node in cluster:
            with redis.Redis(port=node.port) as raw:
                per_node.append(list(raw.scan_iter(match=keys.blob_pattern, count=1000)))
        # Each primary holds some of the namespace's archives, and each archive is held once.
        assert all(len(held) >= 8 for held in per_node), [len(h) for h in per_node]
        assert sorted(k for held in per_node for k in held) == sorted(
            keys.blob(archive_digest(a)) for a in archives
        )
        listed = await store.list_packages()
        assert len(listed) == 80
        assert {r.content_hash: r.archive for r in listed} == {
            **{f"h{i}": a for i, a in enumerate(archives)},
            **{f"c{i}": a for i, a in enumerate(archives[:20])},
        }
        # A flipped byte on the blob's own node is reported, never returned.
        victim = keys.blob(archive_digest(archives[7]))
        owner = next(n for n, held in zip(cluster, per_node, strict=True) if victim in held)
        with redis.Redis(port=owner.port) as raw:
            raw.hset(victim, "archive", b"\x08" + archives[7][1:])
        with pytest.raises(SerializationError, match="do not match its digest"):
            await store.get_package("order", "h7")
        with pytest.raises(SerializationError, match="do not match its digest"):
            await store.list_packages()
        await store.put_package(PackageRecord("order", "h7", archives[7], T0))  # mended
        assert (await store.get_package("order", "h7")) is not None


async def test_a_given_cluster_client_works_and_stays_open(cluster: list[LocalServer]) -> None:
    client = RedisCluster(host="127.0.0.1", port=cluster[1].port)
    async with RedisPackageStore(client, namespace=fresh_namespace()) as store:
        await store.put_package(PackageRecord("order", "h1", b"zip", T0))
        assert await store.get_package_route("order") == "h1"
    assert await client.ping()
    await client.aclose()


async def test_namespaces_spread_over_shards_and_each_stays_in_one_slot(
    cluster: list[LocalServer],
) -> None:
    namespaces = [fresh_namespace() for _ in range(12)]
    shards = {key_slot(ns.encode()) * 3 // SLOTS for ns in namespaces}
    assert len(shards) > 1
    client = RedisCluster(host="127.0.0.1", port=cluster[0].port)
    for ns in namespaces:
        async with RedisPackageStore(client, namespace=ns) as store:
            await store.put_package_with_routes(PackageRecord("a:b", "{c}", b"", T0), ["x y"])
        slot = key_slot(ns.encode())
        owner = client.get_node_from_key(f"{{{ns}}}")
        keys = await client.execute_command(
            "CLUSTER", "GETKEYSINSLOT", slot, 100, target_nodes=owner
        )
        assert len(keys) >= 4 and all(k.startswith(b"{" + ns.encode() + b"}:") for k in keys)
        assert {key_slot(k) for k in keys} == {slot}
    await client.aclose()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_cluster_keeps_the_promise_with_route_caching(
    cluster: list[LocalServer], scenario: str
) -> None:
    url = cluster_url(cluster)
    await run_scenario(
        scenario,
        lambda: RedisPackageStore.from_url(url, namespace=fresh_namespace(), cache_routes=True),
    )


async def test_route_caches_follow_writes_on_the_namespace_shard(
    cluster: list[LocalServer],
) -> None:
    url = cluster_url(cluster)
    namespaces = [fresh_namespace() for _ in range(6)]  # spread over the shards
    for ns in namespaces:
        async with (
            RedisPackageStore.from_url(url, namespace=ns, cache_routes=True) as reader,
            RedisPackageStore.from_url(url, namespace=ns) as writer,
        ):
            assert await reader.route_cache_ready(10)
            async with reader.watch_routes() as watch:
                await writer.put_package(PackageRecord("order", "h1", b"zip", T0))
                await writer.put_package_route("order", "h0")
                seen = [await asyncio.wait_for(watch.__anext__(), 10) for _ in range(2)]
            assert [r.content_hash for r in seen] == ["h1", "h0"]
            assert await reader.get_package_route("order") == "h0"
            assert await reader.route_cache_ready(0), "answered from memory"


async def test_a_route_cache_reaches_a_cluster_that_wants_a_password() -> None:
    # The cache opens a client of its own to the namespace's shard: it must carry the
    # cluster's credentials, or it never goes live and every lookup costs a round trip.
    password = "cluster-secret"
    with ExitStack() as stack:
        url = cluster_url(start_cluster(stack, password), password)
        async with (
            RedisPackageStore.from_url(url, namespace=fresh_namespace()) as writer,
            RedisPackageStore.from_url(
                url, namespace=writer.namespace, cache_routes=True
            ) as cached,
        ):
            await writer.put_package(PackageRecord("order", "h1", b"zip", T0))
            assert await cached.route_cache_ready(10)
            assert await cached.get_package_route("order") == "h1"


async def node_stats(nodes: list[LocalServer]) -> list[dict[str, Any]]:
    stats = []
    for node in nodes:
        async with redis.asyncio.Redis(port=node.port) as raw:
            stats.append(await raw.info("commandstats"))
    return stats


async def test_a_write_costs_no_key_lookup_on_the_server(cluster: list[LocalServer]) -> None:
    # A cluster client asks a node where the keys of an FCALL are (COMMAND GETKEYS) unless
    # told where to send it: that would be a second round trip per write.
    async with RedisPackageStore.from_url(
        cluster_url(cluster), namespace=fresh_namespace()
    ) as store:
        await store.put_package(PackageRecord("order", "h0", b"zip", T0))
        before = await node_stats(cluster)
        for i in range(20):  # of archives kept as blobs: two calls each
            await store.put_package(PackageRecord("order", f"h{i}", b"zip" * 2000, T0))
        await store.put_package_route("order", "h1")
        await store.delete_package("order", "h2")
        after = await node_stats(cluster)
    lookups = [
        a.get("cmdstat_command|getkeys", {}).get("calls", 0)
        - b.get("cmdstat_command|getkeys", {}).get("calls", 0)
        for a, b in zip(after, before, strict=True)
    ]
    calls = [
        a["cmdstat_fcall"]["calls"] - b.get("cmdstat_fcall", {}).get("calls", 0)
        for a, b in zip(after, before, strict=True)
        if "cmdstat_fcall" in a
    ]
    # Each put of layout 2 is two calls: the blob on its node, then the row.
    assert sum(calls) == 2 * 20 + 2
    assert lookups == [0, 0, 0]


async def test_a_store_loads_the_library_on_every_primary(cluster: list[LocalServer]) -> None:
    for node in cluster:
        async with redis.asyncio.Redis(port=node.port) as raw:
            await raw.function_flush()
    async with RedisPackageStore.from_url(
        cluster_url(cluster), namespace=fresh_namespace()
    ) as store:
        await store.put_package(PackageRecord("order", "h1", b"zip", T0))
        assert await store.get_package_route("order") == "h1"
    for node in cluster:
        async with redis.asyncio.Redis(port=node.port) as raw:
            listed = await raw.function_list(library=LIBRARY.name)
            assert len(listed) == 1, node.port


def test_setup_loads_the_library_on_every_primary(cluster: list[LocalServer]) -> None:
    for node in cluster:
        with redis.Redis(port=node.port) as raw:
            raw.function_flush()
    said = ok("setup", "--url", cluster_url(cluster)).splitlines()
    assert sorted(said) == sorted(f"127.0.0.1:{n.port}: loaded {LIBRARY.name}" for n in cluster)
    said = ok("setup", "--url", cluster_url(cluster)).splitlines()
    assert all(line.endswith(f"{LIBRARY.name} was loaded already") for line in said)
    assert len(said) == 3


async def test_another_library_of_the_name_on_one_primary_fails_every_write(
    cluster: list[LocalServer],
) -> None:
    odd = cluster[1]
    async with redis.asyncio.Redis(port=odd.port) as raw:
        await replace_library(raw, impostor_text())
    try:
        async with RedisPackageStore.from_url(
            cluster_url(cluster), namespace=fresh_namespace()
        ) as store:
            with pytest.raises(BackendError) as raised:
                await store.put_package(PackageRecord("order", "h1", b"zip", T0))
            assert str(raised.value).startswith(f"127.0.0.1:{odd.port}: the library {LIBRARY.name}")
            with pytest.raises(BackendError, match="is not this release's kvstore library"):
                await store.load_library()
    finally:
        async with redis.asyncio.Redis(port=odd.port) as raw:
            await replace_library(raw, LIBRARY.text)
