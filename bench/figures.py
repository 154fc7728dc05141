"""The figures: each times the store and the raw redis-py floor on the same server.

Each figure interleaves rounds of the store and of the floor (so drift in a shared
machine hits both) and reports the medians. The store is used as engines use it: made
with ``from_url`` and its defaults, route caching on where the figure says so, with
another engine's caching store of the same namespace subscribed from another process.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, cast
from urllib.parse import urlparse

from redis.asyncio import Redis

from bench.report import Figure
from kvstore import PackageRecord, RedisPackageStore
from kvstore.redis.keyspace import BLOB_LAYOUT, Keyspace, archive_digest, encode_stamp, row_id
from kvstore.redis.scripts import PUT_PACKAGE_BLOB, load_library
from kvstore.server_process import LocalServer, valkey_binary

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
KIB = 1024
MIB = 1024 * KIB
_namespaces = itertools.count()
_rows = itertools.count()


@dataclass(frozen=True)
class ArchiveSize:
    """One archive size: puts and gets per round, rows listed, rounds (``None``: the run's)."""

    size: int
    puts: int
    gets: int
    listed: int
    rounds: int | None = None


@dataclass(frozen=True)
class Sizes:
    rounds: int
    put_one: int
    put_concurrent: int
    raw_in_flight: int
    benchmark_requests: int
    archives: tuple[ArchiveSize, ...]
    lookups: int
    raw_lookups: int
    staleness_samples: int
    memory_packages: int
    rss_archive: int
    rss_packages: int
    growth_packages: tuple[int, ...]
    growth_puts: int
    growth_routes: tuple[int, ...]
    cache_archives: int = 64  # 1 MiB archives listed with a warm and a cold archive cache


FULL = Sizes(
    rounds=7,
    put_one=2000,
    put_concurrent=4000,
    raw_in_flight=90,
    benchmark_requests=100_000,
    archives=(
        ArchiveSize(KIB, puts=0, gets=2000, listed=10_000),  # the 1 KiB put is put_one
        ArchiveSize(MIB, puts=100, gets=100, listed=64),
        ArchiveSize(16 * MIB, puts=8, gets=8, listed=16, rounds=5),
    ),
    lookups=50_000,
    raw_lookups=3000,
    staleness_samples=300,
    memory_packages=10_000,
    rss_archive=16 * MIB,
    rss_packages=64,  # 1 GiB
    growth_packages=(1000, 10_000, 100_000),
    growth_puts=500,
    growth_routes=(10, 10_000),
)
SMALL = Sizes(
    rounds=2,
    put_one=100,
    put_concurrent=400,
    raw_in_flight=90,
    benchmark_requests=20_000,
    archives=(
        ArchiveSize(KIB, puts=0, gets=100, listed=500),
        ArchiveSize(MIB, puts=5, gets=5, listed=4),
        ArchiveSize(16 * MIB, puts=1, gets=1, listed=2, rounds=1),
    ),
    lookups=2000,
    raw_lookups=200,
    staleness_samples=20,
    memory_packages=300,
    rss_archive=MIB,
    rss_packages=16,
    growth_packages=(1000, 10_000),
    growth_puts=50,
    growth_routes=(10, 10_000),
    cache_archives=8,
)


def namespace() -> str:
    return f"bench-{os.getpid()}-{next(_namespaces)}"


def size_name(size: int) -> str:
    """``1KiB``, ``16MiB``: the size as figure names carry it."""
    return f"{size // MIB}MiB" if size >= MIB else f"{size // KIB}KiB"


def size_text(size: int) -> str:
    """``1 KiB``, ``16 MiB``: the size as descriptions carry it."""
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def archive_of(size: int) -> bytes:
    # Archives are opaque bytes to the store and the server; one object per size is
    # shared by every record, so making records costs no copies.
    return (b"kvstore-bench-archive " * (size // 22 + 1))[:size]


def records(count: int, size: int = KIB, *, distinct: bool = False) -> list[PackageRecord]:
    """``count`` records never made before in this run: each put inserts a new row.
    Their archives are one object, or with ``distinct`` each of other bytes (layout 2
    stores an archive once however many rows refer to it)."""
    archive = archive_of(size)
    out = []
    for _ in range(count):
        i = next(_rows)
        own = (b"%d " % i + archive)[:size] if distinct else archive
        out.append(PackageRecord(f"type-{i}", f"h{i}", own, T0 + timedelta(microseconds=i)))
    return out


async def median_rounds(
    rounds: int,
    *sides: Callable[[], Awaitable[float]],
    settle: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[float], list[list[float]]]:
    """The median of each side over ``rounds`` rounds, the sides taking turns in each,
    and each round starting with the next side: none always goes first, after whatever
    came before (a process's freed memory, say, is reused by whoever allocates next).
    ``settle``, when given, is awaited before each side: what the side before left
    running (another engine still applying its writes, say) is over before it starts."""
    samples: list[list[float]] = [[] for _ in sides]
    for round_ in range(rounds):
        for i in range(len(sides)):
            turn = (round_ + i) % len(sides)
            if settle is not None:
                await settle()
            samples[turn].append(await sides[turn]())
    return [statistics.median(s) for s in samples], samples


def cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` has used, user and system (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def quiet(pid: int, within: float = 10.0) -> None:
    """Return once process ``pid`` uses no CPU for a tenth of a second, or after
    ``within`` seconds: another engine has then applied every write it was sent."""
    end = time.monotonic() + within
    used = cpu_seconds(pid)
    while time.monotonic() < end:
        await asyncio.sleep(0.1)
        now = cpu_seconds(pid)
        if now == used:
            return
        used = now


# Seconds the lanes a store's first call brings along are given to connect.
LANES_CONNECT = 0.05


# The raw put: the one place that says how the store's put operation is invoked on the
# server. The raw side of every figure and redis-benchmark both go through ``put_call``;
# how the server is readied for it is ``load_put``; ``RAW_PUT`` names it in the report.

RAW_PUT = "FCALL"


async def load_put(client: Redis) -> None:
    """Make the put operation callable by ``put_call`` on ``client``'s server."""
    await load_library(client)


def put_call(
    keys: Keyspace,
    row: bytes,
    stamp: bytes,
    archive: bytes,
    content_hash: bytes,
    types: list[bytes],
) -> tuple[Any, ...]:
    """The command the store sends for one put on one server (layout 2: the archive's
    blob, named by its digest, and the row, in one call), as a raw client sends it;
    the digest is computed here, as the store computes it for each put."""
    digest = archive_digest(archive)
    return (
        *(RAW_PUT, PUT_PACKAGE_BLOB.name, PUT_PACKAGE_BLOB.numkeys),
        *(keys.format, keys.index, keys.routes, keys.route_version, keys.row(row)),
        keys.blob(digest),
        *(BLOB_LAYOUT, keys.route_changes, row, stamp, digest, b"%d" % len(archive)),
        *(content_hash, archive, *types),
    )


def raw_put_command(keys: Keyspace, r: PackageRecord) -> tuple[Any, ...]:
    """The put of ``r`` for raw redis-py."""
    return put_call(
        keys,
        row_id(r.workflow_type, r.content_hash),
        encode_stamp(r.deployed_at),
        r.archive,
        r.content_hash.encode(),
        [r.workflow_type.encode()],
    )


async def raw_get(raw: Redis, keys: Keyspace, row_key: bytes) -> bytes:
    """A verified get as raw redis-py makes it: the row, then its blob unless the row
    holds the archive (a small one), hashed."""
    fields = [b"archive", b"deployed_at", b"digest", b"size"]
    archive, _, digest, _ = cast(list[bytes], await raw.hmget(row_key, fields))
    if archive is None:
        archive = cast(bytes, await raw.hget(keys.blob(digest), b"archive"))
    assert archive_digest(archive) == digest
    return archive


def benchmark_binary() -> str | None:
    """``redis-benchmark`` on the PATH, else ``valkey-benchmark`` there or beside the
    bundled Valkey; ``None`` when there is neither."""
    found = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if found is not None:
        return found
    try:
        beside = valkey_binary().parent / "valkey-benchmark"
    except ImportError:
        return None
    return str(beside) if beside.is_file() else None


def benchmark_command(url: str, keys: Keyspace, requests: int, size: int = KIB) -> list[str]:
    """``redis-benchmark`` sending ``requests`` puts of ``size``-byte archives, 50
    connections with 16 in flight each: the server's limit for the put, with no
    client in the way. Every put writes one row, ``type-benchmark:h`` (a command line
    cannot carry the NUL of a row id; the script never parses it): the function
    checks that its row key is the row of its row id, and each ``__rand_int__`` is
    drawn anew for every place it appears, so no two could agree. The content hash is
    ``h`` and one drawn from ``requests`` values, so messages differ. Every put
    re-points one route, as each of the store's does: random types would leave a table
    of ``requests`` routes in the namespace, which each store the bench opens in it
    then loads and keeps (a raw client never does)."""
    binary = benchmark_binary()
    if binary is None:
        raise FileNotFoundError("redis-benchmark")
    where = urlparse(url)
    rand = b"__rand_int__"
    command = put_call(
        keys,
        b"type-benchmark:h",
        encode_stamp(T0),
        archive_of(size),
        b"h" + rand,
        [b"type-benchmark"],
    )
    args = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in command]
    return [
        binary,
        *("-h", where.hostname or "127.0.0.1", "-p", str(where.port or 6379)),
        *("-n", str(requests), "-c", "50", "-P", "16", "-r", str(requests), "--csv"),
        *args,
    ]


async def run_benchmark(command: list[str]) -> float:
    """Requests per second that ``redis-benchmark`` reports for ``command``."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {err.decode(errors='replace')[-500:]}")
    rows = list(csv.DictReader(io.StringIO(out.decode(errors="replace"))))
    if not rows or "rps" not in rows[-1]:
        raise RuntimeError(f"redis-benchmark printed no rate: {out[-500:]!r}")
    return float(rows[-1]["rps"])


async def call(client: Redis, command: tuple[Any, ...]) -> Any:
    """One raw command, exactly as redis-py sends it."""
    return await client.execute_command(*command)  # type: ignore[no-untyped-call]


# Another engine: a caching store of the namespace, in a process of its own.


@asynccontextmanager
async def engine_process(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m bench.processes *args``, once it says ``ready``; its standard input is
    closed when the block ends, which ends it (killed if it does not end in 15 s)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.processes",
        *args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60.0)
        if line.strip() != b"ready":
            raise RuntimeError(f"the other engine did not start (it said {line!r})")
        yield process
    finally:
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 15.0)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()


@asynccontextmanager
async def other_engine(url: str, ns: str) -> AsyncIterator[int]:
    """A process with a caching store of ``ns``, live until the block ends; yields its pid."""
    async with engine_process("subscribe", url, ns) as process:
        yield process.pid


@asynccontextmanager
async def writer(url: str, ns: str, cached: bool) -> AsyncIterator[RedisPackageStore]:
    """A store of ``ns`` as an engine opens it, its route cache live when ``cached``."""
    async with RedisPackageStore.from_url(url, namespace=ns, cache_routes=cached) as store:
        if cached and not await store.route_cache_ready(30.0):
            raise RuntimeError("the writer's route cache did not go live")
        yield store


def caching_label(cached: bool) -> str:
    return (
        "route caching on (writer caches; another process's caching store subscribed)"
        if cached
        else "route caching off"
    )


# 1. One put at a time.


async def put_one(url: str, sizes: Sizes, *, cached: bool) -> Figure:
    raw = Redis.from_url(url)
    await load_put(raw)
    ns = namespace()
    keys = Keyspace(ns)

    async def store_round() -> float:
        batch = records(sizes.put_one)
        async with writer(url, ns, cached) as store:
            await store.put_package(records(1)[0])  # connected outside the timing
            start = time.perf_counter()
            for r in batch:
                await store.put_package(r)
            return (time.perf_counter() - start) / len(batch)

    async def raw_round() -> float:
        commands = [raw_put_command(keys, r) for r in records(sizes.put_one)]
        await call(raw, raw_put_command(keys, records(1)[0]))
        start = time.perf_counter()
        for command in commands:
            await call(raw, command)
        return (time.perf_counter() - start) / len(commands)

    async with _maybe_other_engine(url, ns, cached) as settle:
        (store_t, raw_t), _ = await median_rounds(
            sizes.rounds, store_round, raw_round, settle=settle
        )
    await raw.aclose()
    return Figure(
        "put_one_cached" if cached else "put_one",
        f"put_package one at a time, 1 KiB, {caching_label(cached)} "
        "(time per call; floor: one raw "
        f"{RAW_PUT} of the same operation on the same namespace)",
        store_t * 1e6,
        raw_t * 1e6,
        "us",
        store_t / raw_t,
        1.0 if cached else 1.10,
        "<=",
    )


@asynccontextmanager
async def _maybe_other_engine(
    url: str, ns: str, cached: bool
) -> AsyncIterator[Callable[[], Awaitable[None]] | None]:
    """With ``cached``, another engine's process for the block; yields what waits for it
    to be quiet (every write of the side before applied), or ``None`` without one."""
    if not cached:
        yield None
        return
    async with other_engine(url, ns) as pid:
        yield lambda: quiet(pid)


# 2. Thousands of puts in flight on one store; the server's own limit beside them.


async def put_concurrent(url: str, sizes: Sizes, *, cached: bool) -> list[Figure]:
    raw = Redis.from_url(url)  # a default client: its pool grows to what is in flight
    await load_put(raw)
    ns = namespace()
    keys = Keyspace(ns)

    async def store_round() -> float:
        batch = records(sizes.put_concurrent)
        async with writer(url, ns, cached) as store:
            await store.put_package(records(1)[0])
            # Every lane connected outside the timing, as in an engine's store that has
            # run a moment: the first call connects the others in the background.
            await asyncio.sleep(LANES_CONNECT)
            start = time.perf_counter()
            await asyncio.gather(*(store.put_package(r) for r in batch))
            return len(batch) / (time.perf_counter() - start)

    async def raw_round() -> float:
        commands = [raw_put_command(keys, r) for r in records(sizes.put_concurrent)]
        gate = asyncio.Semaphore(sizes.raw_in_flight)

        async def one(command: tuple[Any, ...]) -> None:
            async with gate:
                await call(raw, command)

        start = time.perf_counter()
        await asyncio.gather(*(one(c) for c in commands))
        return len(commands) / (time.perf_counter() - start)

    sides = [store_round, raw_round]
    benchmark: list[str] | None = None
    if cached and benchmark_binary() is not None:
        benchmark = benchmark_command(url, keys, sizes.benchmark_requests)

        async def benchmark_round() -> float:
            assert benchmark is not None
            return await run_benchmark(benchmark)

        sides.append(benchmark_round)
    async with _maybe_other_engine(url, ns, cached) as settle:
        # redis-benchmark's 100,000 writes keep the other engine busy after it ends.
        medians, _ = await median_rounds(sizes.rounds, *sides, settle=settle)
    await raw.aclose()
    store_t, raw_t = medians[0], medians[1]
    figures = [
        Figure(
            "put_concurrent_cached" if cached else "put_concurrent",
            f"{sizes.put_concurrent} put_package in flight on one store, 1 KiB, "
            f"{caching_label(cached)} (calls/s; floor: raw {RAW_PUT} kept "
            f"{sizes.raw_in_flight} in flight)",
            store_t,
            raw_t,
            "/s",
            store_t / raw_t,
            3.5 if cached else 3.0,
            ">=",
        )
    ]
    if not cached:
        return figures
    if benchmark is None:
        figures.append(
            Figure(
                "put_vs_server_limit",
                "skipped: no redis-benchmark or valkey-benchmark found (Debian's redis-tools "
                "brings the first)",
                store_t,
                None,
                "/s",
                None,
                extra={"skipped": True},
            )
        )
        return figures
    limit = medians[2]
    figures.append(
        Figure(
            "put_vs_server_limit",
            f"{sizes.put_concurrent} put_package in flight, route caching on, as a "
            "fraction of redis-benchmark's rate for the same operation, arguments and "
            f"namespace ({sizes.benchmark_requests} requests, 50 connections, "
            "16 pipelined each)",
            store_t,
            limit,
            "/s",
            store_t / limit,
            0.4,
            ">=",
            extra={"redis_benchmark": " ".join(benchmark[:13]) + " ..."},
        )
    )
    return figures


# 3. Archives of each size: put, get and listing.


async def archive_figures(url: str, sizes: Sizes, size: ArchiveSize) -> list[Figure]:
    raw = Redis.from_url(url)
    await load_put(raw)
    ns = namespace()
    keys = Keyspace(ns)
    label, text = size_name(size.size), size_text(size.size)
    rounds = sizes.rounds if size.rounds is None else min(size.rounds, sizes.rounds)
    figures = []
    async with writer(url, ns, cached=True) as store:  # as engines run it
        if size.puts:

            async def store_put() -> float:
                batch = records(size.puts, size.size)
                await store.put_package(records(1, size.size)[0])
                start = time.perf_counter()
                for r in batch:
                    await store.put_package(r)
                return (time.perf_counter() - start) / len(batch)

            async def raw_put() -> float:
                batch = records(size.puts, size.size)
                start = time.perf_counter()
                for r in batch:  # each hashed as it is put, as the store hashes it
                    await call(raw, raw_put_command(keys, r))
                return (time.perf_counter() - start) / len(batch)

            (store_t, raw_t), _ = await median_rounds(rounds, store_put, raw_put)
            figures.append(
                Figure(
                    f"put_{label}",
                    f"put_package one at a time, {text}, route caching on "
                    f"(time per call; floor: the archive hashed and one raw {RAW_PUT})",
                    store_t * 1e6,
                    raw_t * 1e6,
                    "us",
                    store_t / raw_t,
                    1.10,
                    "<=",
                )
            )
        await raw.flushdb()
        listed = records(size.listed, size.size)
        for start in range(0, len(listed), 100):
            await asyncio.gather(*(store.put_package(r) for r in listed[start : start + 100]))
        got = [listed[i % len(listed)] for i in range(size.gets)]
        row_keys = [keys.row(row_id(r.workflow_type, r.content_hash)) for r in got]

        async def store_get() -> float:
            start = time.perf_counter()
            for r in got:
                await store.get_package(r.workflow_type, r.content_hash)
            return (time.perf_counter() - start) / len(got)

        async def raw_gets() -> float:
            start = time.perf_counter()
            for key in row_keys:
                await raw_get(raw, keys, key)
            return (time.perf_counter() - start) / len(row_keys)

        (store_t, raw_t), _ = await median_rounds(rounds, store_get, raw_gets)
        figures.append(
            Figure(
                f"get_{label}",
                f"get_package one at a time, {text} (time per call; floor: a raw HMGET of "
                "the row, an HGET of its blob and the archive hashed)",
                store_t * 1e6,
                raw_t * 1e6,
                "us",
                store_t / raw_t,
                1.10,
                "<=",
            )
        )

        async def store_list() -> float:
            start = time.perf_counter()
            found = await store.list_packages()
            elapsed = time.perf_counter() - start
            assert len(found) == len(listed)
            return elapsed

        async def raw_list() -> float:
            start = time.perf_counter()
            members = cast(list[bytes], await raw.zrange(keys.index, 0, -1))
            pipe = raw.pipeline(transaction=False)
            for member in members:
                pipe.hmget(keys.row(member[28:]), "archive", "deployed_at", "digest")
            rows = await pipe.execute()
            pipe = raw.pipeline(transaction=False)
            for archive, _, digest in rows:
                if archive is None:  # in a blob; a small one is inside its row
                    pipe.hget(keys.blob(digest), "archive")
            blobs = iter(await pipe.execute())
            archives = [row[0] if row[0] is not None else next(blobs) for row in rows]
            for (_, _, digest), archive in zip(rows, archives, strict=True):
                assert archive_digest(archive) == digest
            elapsed = time.perf_counter() - start
            assert len(archives) == len(listed)
            return elapsed

        (store_t, raw_t), _ = await median_rounds(rounds, store_list, raw_list)
        figures.append(
            Figure(
                f"list_{label}",
                f"list_packages of {size.listed} x {text} (time per listing; floor: one "
                "ZRANGE, one pipelined HMGET of every row, one of every blob, each archive "
                "hashed)",
                store_t * 1e3,
                raw_t * 1e3,
                "ms",
                store_t / raw_t,
                1.2,
                "<=",
            )
        )
    await raw.flushdb()
    await raw.aclose()
    return figures


# 4. Route lookups from the cache, and how stale another engine's cache can be.


async def route_lookup(url: str, sizes: Sizes) -> list[Figure]:
    raw = Redis.from_url(url)
    ns = namespace()
    keys = Keyspace(ns)
    types = [f"type-{i}" for i in range(100)]
    fields = [t.encode() for t in types]
    async with writer(url, ns, cached=False) as plain, writer(url, ns, cached=True) as cached:
        for i, workflow_type in enumerate(types):
            await plain.put_package_route(workflow_type, f"h{i}")
        await cached.route_cache_ready(30.0)

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

        (store_t, raw_t), _ = await median_rounds(sizes.rounds, cached_round, raw_round)
        staleness = await cross_engine_staleness(url, ns, plain, sizes.staleness_samples)
    await raw.aclose()
    p99 = percentile(staleness, 0.99)
    return [
        Figure(
            "route_lookup",
            "get_package_route from the cache, 100 routes (time per lookup; floor: a raw "
            "HGET; ratio = floor / store, the speed-up)",
            store_t * 1e6,
            raw_t * 1e6,
            "us",
            raw_t / store_t,
            50.0,
            ">=",
        ),
        Figure(
            "route_staleness",
            "another engine's cache sees a route write, p99 (ms from the write's return to its "
            "cache applying it, that engine in a process of its own)",
            p99 * 1e3,
            None,
            "ms",
            None,
            50.0,
            "<=",
            "store",
            {
                "samples": len(staleness),
                "p50_ms": statistics.median(staleness) * 1e3,
                "max_ms": max(staleness) * 1e3,
            },
        ),
    ]


async def cross_engine_staleness(
    url: str, ns: str, writer: RedisPackageStore, samples: int
) -> list[float]:
    """Seconds from the return of ``writer``'s route write to the moment another engine,
    in a process of its own, has it in its cache (``bench.processes changes``).

    Both sides read the machine's monotonic clock. A write its cache applied before the
    writer's reply came back counts as 0; one never applied within 2 s counts as 2 s.
    """
    workflow_type = "staleness"
    found: list[float] = []
    async with engine_process("changes", url, ns, workflow_type) as process:
        assert process.stdout is not None
        for i in range(samples):
            value = f"stale-{i}"
            await writer.put_package_route(workflow_type, value)
            returned = time.monotonic()
            seen = returned + 2.0
            try:
                while True:
                    line = await asyncio.wait_for(process.stdout.readline(), 2.0)
                    at, _, applied = line.decode().strip().partition(" ")
                    if applied == value:
                        seen = float(at)
                        break
            except asyncio.TimeoutError:
                pass
            found.append(max(0.0, seen - returned))
            await asyncio.sleep(0.002)  # spread the samples over time
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# 5. Client memory of a listing of large archives, in a process that only lists.


async def listing_memory(url: str, sizes: Sizes) -> Figure:
    ns = namespace()
    catalogue = sizes.rss_archive * sizes.rss_packages
    async with writer(url, ns, cached=False) as store:
        for r in records(sizes.rss_packages, sizes.rss_archive):
            await store.put_package(r)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.processes",
        "list-rss",
        url,
        ns,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await process.communicate()
    raw = Redis.from_url(url)
    await raw.flushdb()
    await raw.aclose()
    if process.returncode != 0:
        raise RuntimeError(f"the listing process failed: {err.decode(errors='replace')[-800:]}")
    found = json.loads(out)
    if found["listed"] != sizes.rss_packages:
        raise RuntimeError(f"the listing process listed {found['listed']} packages")
    over = (found["peak_kib"] - found["baseline_kib"]) / KIB
    return Figure(
        "iter_packages_rss",
        f"client memory of iter_packages() over {sizes.rss_packages} x "
        f"{size_text(sizes.rss_archive)}, in a process that only lists: peak RSS above "
        "the baseline (floor: the catalogue's size; ratio = peak / catalogue)",
        over,
        catalogue / MIB,
        "MiB",
        over * MIB / catalogue,
        200.0,
        "<=",
        "store",
        {
            "baseline_mib": found["baseline_kib"] / KIB,
            "peak_mib": found["peak_kib"] / KIB,
            "peak_reset": found["peak_reset"],
        },
    )


# 6. Server memory per package.


async def memory(binary: str | None, sizes: Sizes) -> Figure:
    batch = records(sizes.memory_packages, distinct=True)
    archive_bytes = sum(len(r.archive) for r in batch)

    async def store_layout(url: str) -> None:
        async with RedisPackageStore.from_url(url, namespace=namespace()) as store:
            for start in range(0, len(batch), 1000):
                await asyncio.gather(*(store.put_package(r) for r in batch[start : start + 1000]))

    async def raw_layout(url: str) -> None:
        # The straightforward layout: a hash per package, a zset entry scored by time,
        # a route hash field; written by plain redis-py.
        raw = Redis.from_url(url)
        for start in range(0, len(batch), 1000):
            pipe = raw.pipeline(transaction=False)
            for r in batch[start : start + 1000]:
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
        per_package[name] = (after - before - archive_bytes) / len(batch)
    return Figure(
        "memory",
        f"server memory per package beyond its archive ({sizes.memory_packages} x 1 KiB, "
        "each of other bytes, layout 2: a row and a blob; floor: a hash + a zset entry + "
        "a route field)",
        per_package["store"],
        per_package["raw"],
        "B",
        per_package["store"] / per_package["raw"],
    )


# 7. What layout 2 (blobs named by digest, verified on every read) costs beside layout 1
# (archives inside rows), store against store in the same run: reported, no target.


async def layout_figures(url: str, sizes: Sizes, size: ArchiveSize) -> list[Figure]:
    label, text = size_name(size.size), size_text(size.size)
    rounds = sizes.rounds if size.rounds is None else min(size.rounds, sizes.rounds)
    listed = records(size.listed, size.size)
    got = [listed[i % len(listed)] for i in range(max(size.gets, 1))]
    puts = max(size.puts, 1)
    stores = [RedisPackageStore.from_url(url, namespace=namespace(), layout=n) for n in (2, 1)]
    try:
        for store in stores:
            for start in range(0, len(listed), 100):
                await asyncio.gather(*(store.put_package(r) for r in listed[start : start + 100]))

        def timed_puts(store: RedisPackageStore) -> Callable[[], Awaitable[float]]:
            async def round_() -> float:
                batch = records(puts, size.size)
                start = time.perf_counter()
                for r in batch:
                    await store.put_package(r)
                elapsed = (time.perf_counter() - start) / len(batch)
                for r in batch:
                    await store.delete_package(r.workflow_type, r.content_hash)
                return elapsed

            return round_

        def timed_gets(store: RedisPackageStore) -> Callable[[], Awaitable[float]]:
            async def round_() -> float:
                start = time.perf_counter()
                for r in got:
                    await store.get_package(r.workflow_type, r.content_hash)
                return (time.perf_counter() - start) / len(got)

            return round_

        def timed_list(store: RedisPackageStore) -> Callable[[], Awaitable[float]]:
            async def round_() -> float:
                start = time.perf_counter()
                await store.list_packages()
                return time.perf_counter() - start

            return round_

        figures = []
        for what, timed, unit, scale in (
            ("put", timed_puts, "us", 1e6),
            ("get", timed_gets, "us", 1e6),
            ("list", timed_list, "ms", 1e3),
        ):
            (blobs, inline), _ = await median_rounds(rounds, *map(timed, stores))
            figures.append(
                Figure(
                    f"layout_{what}_{label}",
                    f"{what} of {text} archives in layout 2 (blobs, hashed on put, verified "
                    "on read) beside layout 1 (archives inside rows), store against store",
                    blobs * scale,
                    inline * scale,
                    unit,
                    blobs / inline,
                )
            )
        return figures
    finally:
        for store in stores:
            await store.aclose()
