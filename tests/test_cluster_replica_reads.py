"""Reads from replicas on a Redis Cluster of three primaries, each with a replica, all
started on loopback: each round trip's commands go to a replica of the shard that holds
their keys (rows and blobs live on different shards), each checked against its own
primary's position, and what no replica of a shard could send goes to the primaries."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from redis.asyncio import Redis

from kvstore import PackageRecord, RedisPackageStore
from kvstore.conformance import SCENARIOS, run_scenario
from kvstore.server_process import LocalServer, cluster_url, start_cluster

from .conftest import fresh_namespace
from .support import large, pkg
from .test_replica_reads import reads_follow_writes

# A cluster of its own.
pytestmark = pytest.mark.slow

PRIMARIES = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[LocalServer]]:
    """Three primaries, then a replica of each."""
    with ExitStack() as stack:
        nodes = start_cluster(stack, replicas=1)
        yield nodes
        for node in nodes:
            if node.pid is not None:
                os.kill(node.pid, signal.SIGCONT)  # a test that stopped one, failing


def stores(cluster: list[LocalServer], **options: Any) -> tuple[RedisPackageStore, ...]:
    url = cluster_url(cluster[:PRIMARIES])
    namespace = fresh_namespace()
    return (
        RedisPackageStore.from_url(url, namespace=namespace),
        RedisPackageStore.from_url(url, namespace=namespace, read_from_replicas=True, **options),
    )


async def replica_reads(cluster: list[LocalServer]) -> list[int]:
    """The reads each replica served, by its own counters."""
    counts = []
    for node in cluster[PRIMARIES:]:
        async with Redis(port=node.port) as replica:
            stats = await replica.info("commandstats")
        counts.append(
            sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("hmget", "hget"))
        )
    return counts


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_the_contract_holds_reading_from_a_clusters_replicas(
    cluster: list[LocalServer], scenario: str
) -> None:
    url = cluster_url(cluster[:PRIMARIES])
    await run_scenario(
        scenario,
        lambda: RedisPackageStore.from_url(
            url, namespace=fresh_namespace(), read_from_replicas=True
        ),
    )


async def test_every_shards_replica_serves_a_listing_whole(cluster: list[LocalServer]) -> None:
    writer, reader = stores(cluster)
    try:
        records = [pkg("wf", f"h{i:02}", large(b"%d" % i), n=i) for i in range(40)]
        for record in records:
            await writer.put_package(record)
        # Until every replica has the puts, a listing's parts may come from primaries.
        for _ in range(50):
            before = await replica_reads(cluster)
            assert await reader.list_packages() == records
            after = await replica_reads(cluster)
            if all(a > b for a, b in zip(after, before, strict=True)):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"not every shard's replica served: {before} -> {after}")
        assert await reader.list_packages() == await writer.list_packages()
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_reads_racing_writes_on_a_cluster_see_every_acknowledged_write(
    cluster: list[LocalServer],
) -> None:
    writer, reader = stores(cluster)
    try:
        await reads_follow_writes(writer, reader, 150)
        served, _ = reader.health().replica_reads or (0, 0)
        assert served > 0
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_a_replica_paused_mid_listing_on_a_cluster(cluster: list[LocalServer]) -> None:
    writer, reader = stores(cluster, replica_read_timeout=0.5, timeout=30.0)
    paused = cluster[PRIMARIES]  # the replica of the first primary
    assert paused.pid is not None
    try:
        catalogue = [pkg("big", f"h{i:03}", os.urandom(1 << 20), n=i) for i in range(24)]
        for record in catalogue:
            await writer.put_package(record)
        await asyncio.sleep(0.5)  # the replicas have the puts
        listed: list[PackageRecord] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        async for record in reader.iter_packages(max_bytes=2 << 20):
            listed.append(record)
            if len(listed) == 3:
                os.kill(paused.pid, signal.SIGSTOP)
        assert listed == catalogue
        # One replica_read_timeout lost, not the store's 30 s timeout.
        assert loop.time() - started < 15.0
    finally:
        os.kill(paused.pid, signal.SIGCONT)
        await writer.aclose()
        await reader.aclose()
