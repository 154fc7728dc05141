"""``durability="fsync"``: a write is acknowledged once it is fsynced to the primary's
append-only file (``WAITAOF``), one wait for each batch of writes; and a server that
cannot say so fails the write with the library's error, naming why."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from kvstore import BackendError, RedisPackageStore
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import pkg
from .topology import server_binary


@pytest.fixture(scope="module", params=["everysec", "always"])
def aof_valkey(request: pytest.FixtureRequest) -> Iterator[LocalServer]:
    """A Valkey with its append-only file on, fsynced as ``request.param`` says."""
    settings = {"appendonly": "yes", "appendfsync": request.param}
    with LocalServer(settings=settings) as running:
        yield running


def waitaof_calls(server: LocalServer) -> int:
    with redis.Redis(port=server.port) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))


async def test_fsynced_writes_share_one_wait_per_batch(aof_valkey: LocalServer) -> None:
    store = RedisPackageStore.from_url(
        aof_valkey.url, namespace=fresh_namespace(), durability="fsync"
    )
    records = [pkg(f"t{i % 7}", f"h{i:04d}", bytes([i % 256]) * 1024, n=i) for i in range(400)]
    before = waitaof_calls(aof_valkey)
    await asyncio.gather(*(store.put_package(r) for r in records))
    await store.put_package_route("t0", "h0000")
    await store.delete_package("t1", "h0001")
    waits = waitaof_calls(aof_valkey) - before
    assert 1 <= waits <= 400 // 8, f"{waits} waits for 402 writes: batches share one"
    assert len(await store.list_packages()) == 399
    assert await store.get_package_route("t0") == "h0000"
    await store.aclose()


async def test_an_fsync_wait_for_a_missing_replica_fails_within_its_timeout(
    aof_valkey: LocalServer,
) -> None:
    store = RedisPackageStore.from_url(
        aof_valkey.url,
        namespace=fresh_namespace(),
        durability="fsync",
        min_replicas=1,
        replica_timeout=0.05,
    )
    with pytest.raises(BackendError, match=r"fsynced on [01] of 1 primary and 0 of 1 replicas"):
        await store.put_package(pkg())
    assert await store.get_package("wf", "h1") == pkg(), "applied on the primary all the same"
    await store.aclose()


async def test_fsync_durability_without_an_append_only_file_fails_naming_why() -> None:
    with LocalServer(settings={"appendonly": "no"}) as server:
        store = RedisPackageStore.from_url(
            server.url, namespace=fresh_namespace(), durability="fsync"
        )
        with pytest.raises(BackendError, match=r"appendonly is off.*not known to be on disk"):
            await store.put_package(pkg())
        await store.aclose()


async def test_fsync_durability_on_a_server_without_waitaof_fails_naming_why() -> None:
    # Redis 7.0 (Debian's) has no WAITAOF; fakeredis has none either.
    stores: list[RedisPackageStore] = [
        RedisPackageStore(fakeredis.FakeAsyncRedis(), durability="fsync"),
    ]
    with LocalServer(server_binary("redis"), settings={"appendonly": "yes"}) as server:
        with redis.Redis(port=server.port) as probe:
            version = str(probe.info("server")["redis_version"])
        if tuple(int(p) for p in version.split(".")[:2]) < (7, 2):
            stores.append(RedisPackageStore.from_url(server.url, durability="fsync"))
        for store in stores:
            with pytest.raises(BackendError, match=r"no WAITAOF.*7\.2"):
                await store.put_package(pkg())
            await store.aclose()


def test_durability_is_one_of_its_values_and_not_on_a_cluster() -> None:
    client = fakeredis.FakeAsyncRedis()
    with pytest.raises(ValueError, match="durability must be one of 'memory', 'fsync'"):
        RedisPackageStore(client, durability="disk")
    with pytest.raises(TypeError, match="durability must be a str"):
        RedisPackageStore(client, durability=1)  # type: ignore[arg-type]
    cluster = RedisCluster(host="127.0.0.1", port=7000)
    with pytest.raises(ValueError, match="durability need a single-primary client"):
        RedisPackageStore(cluster, durability="fsync")
