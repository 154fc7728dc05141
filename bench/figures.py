"""The five figures: each times the store and the raw redis-py floor on the same server."""

from __future__ import annotations

import asyncio
import gc
import itertools
import statistics
import time
import tracemalloc
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from redis.asyncio import Redis

from kvstore import PackageRecord, RedisPackageStore
from kvstore.redis.keyspace import FORMAT_VERSION, Keyspace, encode_stamp, row_id
from kvstore.redis.scripts import PUT_PACKAGE, load_library
from kvstore.tools.server_process import LocalServer

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
KIB = 1024
_namespaces = itertools.count()


@dataclass(frozen=True)
class Sizes:
    rounds: int
    put_one: int
    put_concurrent: int
    raw_in_flight: int
    listed: int
    lookups: int
    raw_lookups: int
    staleness_samples: int
    memory_packages: int


FULL = Sizes(
    rounds=5,
    put_one=2000,
    put_concurrent=4000,
    raw_in_flight=90,
    listed=10_000,
    lookups=50_000,
    raw_lookups=3000,
    staleness_samples=300,
    memory_packages=10_000,
)
SMALL = Sizes(
    rounds=2,
    put_one=100,
    put_concurrent=400,
    raw_in_flight=90,
    listed=500,
    lookups=2000,
    raw_lookups=200,
    staleness_samples=20,
    memory_packages=300,
)


@dataclass
class Figure:
    """One line of the table: ``ratio`` is compared with ``target`` as ``sense`` says."""

    name: str
    what: str
    store: float
    floor: float
    unit: str
    ratio: float
    target: float | None
    sense: str  # "<=", ">=", or "report" (no target: both sides are shown)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio <= self.target if self.sense == "<=" else self.ratio >= self.target


def namespace() -> str:
    return f"bench-{next(_namespaces)}"


def record(i: int, workflow_type: str | None = None) -> PackageRecord:
    archive = (f"{i:08d}".encode() * (KIB // 8))[:KIB]
    return PackageRecord(
        workflow_type or f"type-{i}", f"h{i}", archive, T0 + timedelta(microseconds=i)
    )


def raw_put_command(keys: Keyspace, r: PackageRecord) -> tuple[Any, ...]:
    """The FCALL the store sends for ``put_package(r)``, built outside the timing."""
    row = row_id(r.workflow_type, r.content_hash)
    return (
        "FCALL",
        PUT_PACKAGE.name,
        PUT_PACKAGE.numkeys,
        keys.format,
        keys.index,
        keys.routes,
        keys.route_version,
        keys.row(row),
        FORMAT_VERSION,
        keys.route_changes,
        row,
        encode_stamp(r.deployed_at),
        r.archive,
        r.content_hash.encode(),
        r.workflow_type.encode(),
    )


async def call(client: Redis, command: tuple[Any, ...]) -> Any:
    """One raw command, exactly as redis-py sends it."""
    return await client.execute_command(*command)  # type: ignore[no-untyped-call]


# 1. One put at a time.


async def put_one(url: str, sizes: Sizes) -> Figure:
    raw = Redis.from_url(url)
    await load_library(raw)
    records = [record(i) for i in range(sizes.put_one)]

    async def store_round() -> float:
        async with RedisPackageStore.from_url(url, namespace=namespace()) as store:
            await store.put_package(records[0])  # connect outside the timing
            start = time.perf_counter()
            for r in records:
                await store.put_package(r)
            return (time.perf_counter() - start) / len(records)

    async def raw_round() -> float:
        keys = Keyspace(namespace())
        commands = [raw_put_command(keys, r) for r in records]
        await call(raw, commands[0])
        start = time.perf_counter()
        for command in commands:
            await call(raw, command)
        return (time.perf_counter() - start) / len(commands)

    store_s, raw_s = [], []
    for _ in range(sizes.rounds):  # interleaved, so drift in the machine hits both
        store_s.append(await store_round())
        raw_s.append(await raw_round())
    await raw.aclose()
    store_t, raw_t = statistics.median(store_s), statistics.median(raw_s)
    return Figure(
        "put_one",
        "put_package one at a time, 1 KiB (time per call)",
        store_t * 1e6,
        raw_t * 1e6,
        "us",
        store_t / raw_t,
        1.10,
        "<=",
    )


# 2. Thousands of puts in flight on one store.


async def put_concurrent(url: str, sizes: Sizes) -> Figure:
    raw = Redis.from_url(url)  # a default client: its pool grows to what is in flight
    await load_library(raw)
    records = [record(i) for i in range(sizes.put_concurrent)]

    async def store_round() -> float:
        async with RedisPackageStore.from_url(url, namespace=namespace()) as store:
            await store.put_package(records[0])
            start = time.perf_counter()
            await asyncio.gather(*(store.put_package(r) for r in records))
            return len(records) / (time.perf_counter() - start)

    async def raw_round() -> float:
        keys = Keyspace(namespace())
        commands = [raw_put_command(keys, r) for r in records]
        gate = asyncio.Semaphore(sizes.raw_in_flight)

        async def one(command: tuple[Any, ...]) -> None:
            async with gate:
                await call(raw, command)

        start = time.perf_counter()
        await asyncio.gather(*(one(c) for c in commands))
        return len(commands) / (time.perf_counter() - start)

    store_s, raw_s = [], []
    for _ in range(sizes.rounds):
        store_s.append(await store_round())
        raw_s.append(await raw_round())
    await raw.aclose()
    store_t, raw_t = statistics.median(store_s), statistics.median(raw_s)
    return Figure(
        "put_concurrent",
        f"{sizes.put_concurrent} put_package in flight (calls/s; "
        f"raw: {sizes.raw_in_flight} in flight)",
        store_t,
        raw_t,
        "/s",
        store_t / raw_t,
        3.0,
        ">=",
    )


# 3. Listing the catalogue.


async def list_packages(url: str, sizes: Sizes) -> Figure:
    raw = Redis.from_url(url)
    store = RedisPackageStore.from_url(url, namespace=namespace())
    records = [record(i) for i in range(sizes.listed)]
    for start in range(0, len(records), 1000):
        await asyncio.gather(*(store.put_package(r) for r in records[start : start + 1000]))
    keys = Keyspace(store.namespace)

    async def store_round() -> float:
        start = time.perf_counter()
        listed = await store.list_packages()
        elapsed = time.perf_counter() - start
        assert len(listed) == len(records)
        return elapsed

    async def floor_round() -> float:
        start = time.perf_counter()
        members = cast(list[bytes], await raw.zrange(keys.index, 0, -1))
        pipe = raw.pipeline(transaction=False)
        for member in members:
            pipe.hmget(keys.row(member[28:]), "archive", "deployed_at")
        rows = await pipe.execute()
        elapsed = time.perf_counter() - start
        assert len(rows) == len(records)
        return elapsed

    store_s, raw_s = [], []
    for _ in range(sizes.rounds):
        store_s.append(await store_round())
        raw_s.append(await floor_round())
    store_t, raw_t = statistics.median(store_s), statistics.median(raw_s)

    # Client memory while iterating: the peak of what Python allocates, against the
    # catalogue the iterator walks through (the store holds one chunk at a time).
    chunk = max(1, min(1000, sizes.listed // 10))
    gc.collect()
    tracemalloc.start()
    try:
        count = 0
        async for _ in store.iter_packages(chunk=chunk):
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    catalogue = sum(len(r.archive) for r in records)
    await store.aclose()
    await raw.aclose()
    return Figure(
        "list_packages",
        f"list_packages of {sizes.listed} x 1 KiB (s per listing; floor: ZRANGE + HMGET pipeline)",
        store_t,
        raw_t,
        "s",
        store_t / raw_t,
        1.3,
        "<=",
        {
            "iter_packages_chunk": chunk,
            "iter_packages_peak_bytes": peak,
            "catalogue_archive_bytes": catalogue,
            "iter_peak_over_catalogue": peak / catalogue,
            "iterated": count,
        },
    )


# 4. Route lookups from the cache, and how stale another engine's cache can be.


async def route_lookup(url: str, sizes: Sizes) -> Figure:
    raw = Redis.from_url(url)
    ns = namespace()
    writer = RedisPackageStore.from_url(url, namespace=ns)
    cached = RedisPackageStore.from_url(url, namespace=ns, cache_routes=True)
    types = [f"type-{i}" for i in range(100)]
    for i, workflow_type in enumerate(types):
        await writer.put_package_route(workflow_type, f"h{i}")
    if not await cached.route_cache_ready(10.0):
        raise RuntimeError("the route cache did not go live")
    keys = Keyspace(ns)
    fields = [t.encode() for t in types]

    async def cached_round() -> float:
        start = time.perf_counter()
        for i in range(sizes.lookups):
            await cached.get_package_route(types[i % 100])
        return (time.perf_counter() - start) / sizes.lookups

    async def raw_round() -> float:
        start = time.perf_counter()
        for i in range(sizes.raw_lookups):
            await raw.hget(keys.routes, fields[i % 100])
        return (time.perf_counter() - start) / sizes.raw_lookups

    store_s, raw_s = [], []
    for _ in range(sizes.rounds):
        store_s.append(await cached_round())
        raw_s.append(await raw_round())
    store_t, raw_t = statistics.median(store_s), statistics.median(raw_s)

    staleness = await cross_engine_staleness(writer, cached, sizes.staleness_samples)
    await asyncio.gather(writer.aclose(), cached.aclose(), raw.aclose())
    p50 = statistics.median(staleness)
    p99 = percentile(staleness, 0.99)
    return Figure(
        "route_lookup",
        "get_package_route, cached vs raw HGET (time per lookup; ratio = raw / cached)",
        store_t * 1e6,
        raw_t * 1e6,
        "us",
        raw_t / store_t,
        50.0,
        ">=",
        {
            "staleness_samples": len(staleness),
            "staleness_p50_ms": p50 * 1e3,
            "staleness_p99_ms": p99 * 1e3,
            "staleness_max_ms": max(staleness) * 1e3,
            "staleness_target_ms": 50.0,
            "staleness_met": p99 * 1e3 <= 50.0,
        },
    )


async def cross_engine_staleness(
    writer: RedisPackageStore, reader: RedisPackageStore, samples: int
) -> list[float]:
    """Seconds from the return of ``writer``'s route write to ``reader``'s cache holding it.

    The reader's lookups are polled as an engine would make them; each sample waits at
    most 2 s and counts as 2 s if the change never shows up.
    """
    loop = asyncio.get_running_loop()
    found: list[float] = []
    for i in range(samples):
        value = f"stale-{i}"
        await writer.put_package_route("staleness", value)
        returned = loop.time()
        seen = returned + 2.0
        for _ in range(200_000):
            if await reader.get_package_route("staleness") == value:
                seen = loop.time()
                break
            if loop.time() - returned > 2.0:
                break
            await asyncio.sleep(0)
        found.append(max(0.0, seen - returned))
        await asyncio.sleep(0.002)  # spread the samples over time
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# 5. Server memory per package.


async def memory(binary: str | None, sizes: Sizes) -> Figure:
    records = [record(i) for i in range(sizes.memory_packages)]
    archive_bytes = sum(len(r.archive) for r in records)

    async def store_layout(url: str) -> None:
        async with RedisPackageStore.from_url(url, namespace=namespace()) as store:
            for start in range(0, len(records), 1000):
                batch = records[start : start + 1000]
                await asyncio.gather(*(store.put_package(r) for r in batch))

    async def raw_layout(url: str) -> None:
        # The straightforward layout: a hash per package, a zset entry scored by time,
        # a route hash field; written by plain redis-py.
        raw = Redis.from_url(url)
        for start in range(0, len(records), 1000):
            pipe = raw.pipeline(transaction=False)
            for r in records[start : start + 1000]:
                pkg_id = f"{r.workflow_type}:{r.content_hash}"
                pipe.hset(
                    f"raw:pkg:{pkg_id}",
                    mapping={"archive": r.archive, "deployed_at": r.deployed_at.isoformat()},
                )
                pipe.zadd("raw:packages", {pkg_id: r.deployed_at.timestamp()})
                pipe.hset("raw:routes", r.workflow_type, r.content_hash)
            await pipe.execute()
        await raw.aclose()

    per_package = {}
    for name, write in (("store", store_layout), ("raw", raw_layout)):
        with LocalServer(binary) as server:
            client = Redis.from_url(server.url)
            before = int((await client.info("memory"))["used_memory"])
            await write(server.url)
            after = int((await client.info("memory"))["used_memory"])
            await client.aclose()
        per_package[name] = (after - before - archive_bytes) / len(records)
    return Figure(
        "memory",
        f"server bytes per package beyond its archive ({sizes.memory_packages} x 1 KiB; "
        "floor: hash + zset entry + route field)",
        per_package["store"],
        per_package["raw"],
        "B",
        per_package["store"] / per_package["raw"],
        None,
        "report",
        {"archive_bytes": archive_bytes, "packages": len(records)},
    )
