"""A Sentinel-managed primary fails over under load, and no acknowledged put is lost.

Every server here is a real process on 127.0.0.1: a primary, one replica and three
Sentinels (quorum 2). Stores write with ``min_replicas=1``, so a put is acknowledged only
once the replica has it; the replica is the node the Sentinels promote.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from kvstore import BackendError, RedisPackageStore
from kvstore.server_process import free_port

from .conftest import fresh_namespace
from .support import large, pkg
from .topology import (
    SentinelGroup,
    Writer,
    check_outcome,
    eventually,
    raw_command,
    replicated_pair,
    server_binary,
    wait_in_sync,
)

# A Sentinel group of its own, failed over.
pytestmark = pytest.mark.slow


@pytest.fixture
async def group(binary: Path, tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    with SentinelGroup(binary, tmp_path) as started:
        await started.wait_watching(within=20)
        yield started


def sentinel_store(group: SentinelGroup, namespace: str) -> RedisPackageStore:
    return RedisPackageStore.from_url(
        group.url(),
        namespace=namespace,
        min_replicas=1,
        replica_timeout=0.5,
        timeout=2.0,
        retry_budget=3.0,
    )


async def test_acknowledged_puts_survive_a_failover_and_the_same_stores_carry_on(
    group: SentinelGroup,
) -> None:
    namespace = fresh_namespace()
    stores = [sentinel_store(group, namespace) for _ in range(3)]
    writers = [Writer(f"engine-{i}", stores[i % len(stores)]) for i in range(6)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(writer.run(stop, limit=20_000)) for writer in writers]
    try:
        await eventually(
            lambda: all(len(w.acked) >= 10 for w in writers),
            within=20,
            what="every writer acknowledged before the failover",
        )
        old_port = group.primary.port
        group.primary.kill()
        new_port = await group.wait_promoted(old_port, within=30)
        assert new_port == group.replica.port, "the only replica is promoted"
        # The failed node rejoins as a replica of the new primary, so WAIT can be met again.
        group.primary.settings["replicaof"] = f"127.0.0.1 {new_port}"
        await asyncio.to_thread(group.primary.start)
        before = {w.name: len(w.acked) for w in writers}
        await eventually(
            lambda: all(len(w.acked) >= before[w.name] + 10 for w in writers),
            within=30,
            what="every writer acknowledged on the new primary through the same store",
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    try:
        for store in stores:
            await check_outcome(store, writers)
    finally:
        for store in stores:
            await store.aclose()
    async with RedisPackageStore.from_url(group.replica.url, namespace=namespace) as direct:
        stored = await check_outcome(direct, writers)
    assert stored >= sum(len(w.acked) for w in writers)


async def test_a_put_no_replica_acknowledged_raises_backend_error(
    binary: Path, tmp_path: Path
) -> None:
    primary, replica = replicated_pair(binary, tmp_path)
    with primary, replica:
        wait_in_sync(replica.port, within=15)
        namespace = fresh_namespace()
        # A replica that is in sync acknowledges at once, but a busy machine may take
        # longer than the short wait below: the put that must succeed waits generously.
        async with RedisPackageStore.from_url(
            primary.url, namespace=namespace, min_replicas=1, replica_timeout=10
        ) as patient:
            await patient.put_package(pkg("order", "h1", b"PK"))
        replica.stop()
        async with RedisPackageStore.from_url(
            primary.url, namespace=namespace, min_replicas=1, replica_timeout=0.3
        ) as store:
            with pytest.raises(BackendError, match="0 of 1 replicas acknowledged"):
                await store.put_package(pkg("order", "h2", b"PK"))


def messages(exc: BaseException) -> Iterator[str]:
    """Every text an exception and the exceptions chained to it show."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield from map(str, current.args)
        todo += [current.__cause__, current.__context__]
    yield "".join(traceback.format_exception_only(exc))


async def add_user(port: int, user: str, password: str) -> None:
    async with Redis(port=port) as admin:
        await raw_command(admin, "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")


async def test_a_password_in_a_sentinel_or_cluster_url_never_shows(tmp_path: Path) -> None:
    secret = "Pw-n0t-f0r-l0gs"
    binary = server_binary("valkey")
    with SentinelGroup(binary, tmp_path) as group:
        await group.wait_watching(within=20)
        # A user the primary knows: the store works, and shows no password.
        await add_user(group.primary.port, "engine", secret)
        async with RedisPackageStore.from_url(
            group.url(f"engine:{secret}@"), namespace=fresh_namespace()
        ) as store:
            await store.put_package(pkg("order", "h1", b"PK"))
            assert secret not in repr(store)
        # A user it does not know: the refusal shows no password either.
        wrong = RedisPackageStore.from_url(
            group.url(f"nobody:{secret}@"), namespace=fresh_namespace(), retry_budget=0.3
        )
        assert secret not in repr(wrong)
        with pytest.raises(BackendError) as refused:
            await wrong.put_package(pkg("order", "h1", b"PK"))
        await wrong.aclose()
        for text in messages(refused.value):
            assert secret not in text
    nobody_there = free_port()
    cluster = RedisPackageStore.from_url(
        f"redis+cluster://engine:{secret}@127.0.0.1:{nobody_there}",
        namespace=fresh_namespace(),
        timeout=0.5,
        retry_budget=0.3,
    )
    assert secret not in repr(cluster)
    with pytest.raises(BackendError) as unreachable:
        await cluster.get_package_route("order")
    await cluster.aclose()
    for text in messages(unreachable.value):
        assert secret not in text
    for bad in [
        f"redis+sentinel://engine:{secret}@127.0.0.1:1",  # no service
        f"redis+sentinel://engine:{secret}@127.0.0.1:1/svc/zero",  # a db that is no number
        f"redis+cluster://engine:{secret}@127.0.0.1",  # no port
        f"redis+sentinel://engine:{secret}@127.0.0.1:1,127.0.0.1/svc",  # one node without
    ]:
        with pytest.raises(ValueError) as refused_url:
            RedisPackageStore.from_url(bad, namespace=fresh_namespace())
        for text in messages(refused_url.value):
            assert secret not in text, bad


async def test_reads_from_the_replicas_a_sentinel_primary_names_follow_a_failover(
    group: SentinelGroup,
) -> None:
    namespace = fresh_namespace()
    writer = sentinel_store(group, namespace)
    reader = RedisPackageStore.from_url(
        group.url(), namespace=namespace, read_from_replicas=True, replica_read_timeout=0.5
    )

    async def replica_reads(port: int) -> int:
        async with Redis(port=port) as replica:
            stats = await replica.info("commandstats")
        return int(stats.get("cmdstat_hmget", {}).get("calls", 0))

    try:
        before = pkg("order", "before", large(b"PK"))
        await writer.put_package(before)  # min_replicas=1: the replica has it
        assert await reader.get_package("order", "before") == before
        assert await replica_reads(group.replica.port) > 0

        old_port = group.primary.port
        group.primary.kill()
        new_port = await group.wait_promoted(old_port, within=30)
        group.primary.settings["replicaof"] = f"127.0.0.1 {new_port}"
        await asyncio.to_thread(group.primary.start)
        after = pkg("order", "after", large(b"KP"), n=1)
        # Acknowledged by the new primary alone: its replica may not have it yet.
        async with RedisPackageStore.from_url(group.url(), namespace=namespace) as alone:
            await alone.put_package(after)

        assert await reader.get_package("order", "after") == after
        assert await reader.list_packages() == [before, after]
        # The old primary, now a replica of the new one, serves the reads.
        await eventually(
            lambda: _served_by(reader, old_port, replica_reads),
            within=20,
            what="the rejoined node serving reads",
        )
    finally:
        await writer.aclose()
        await reader.aclose()


async def _served_by(
    reader: RedisPackageStore, port: int, reads: Callable[[int], Awaitable[int]]
) -> bool:
    before = await reads(port)
    assert [p.content_hash for p in await reader.list_packages()] == ["before", "after"]
    return await reads(port) > before
