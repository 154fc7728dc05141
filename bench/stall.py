"""How long the event loop stalls while a large archive is put and got.

An engine runs the store in the event loop that serves everything else it does, so a
put or a get of a large archive must let the loop run while the archive moves. A ticking
task (``await asyncio.sleep(0)`` in a loop) measures the longest gap between two of its
turns while one ``put_package`` and then one ``get_package`` of ``size`` bytes run,
for the store and, side by side in the same run and on the same server, for raw
redis-py moving the same bytes (``HSET`` and ``HGET`` of one hash field, as a put
and a get of the same row do).

``await loop_stall(url, size)`` returns the figures in milliseconds (the median over
``rounds`` of each round's longest gap); ``python -m bench.stall`` prints them for
16 and 64 MiB on a server it starts itself.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from redis.asyncio import Redis

from kvstore import PackageRecord, RedisPackageStore
from kvstore.server_process import LocalServer

MIB = 1 << 20
_namespaces = itertools.count()


async def _longest_gap(work: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """The longest time, in seconds, the loop did not turn while ``work`` ran: by the
    clock, and in the CPU time of the loop's thread (what the work itself took, without
    the time the system gave other processes, the server included)."""
    longest = longest_cpu = 0.0
    done = False

    async def tick() -> None:
        nonlocal longest, longest_cpu
        last, last_cpu = time.perf_counter(), time.thread_time()
        while not done:
            await asyncio.sleep(0)
            now, now_cpu = time.perf_counter(), time.thread_time()
            longest = max(longest, now - last)
            longest_cpu = max(longest_cpu, now_cpu - last_cpu)
            last, last_cpu = now, now_cpu

    ticker = asyncio.get_running_loop().create_task(tick())
    await asyncio.sleep(0)  # the ticker is running before the work starts
    try:
        await work()
    finally:
        done = True
        await ticker
    return longest, longest_cpu


async def loop_stall(url: str, size: int, *, rounds: int = 3) -> dict[str, float]:
    """The loop's longest stall (ms) during a put and a get of ``size`` bytes.

    Keys: ``store_put_ms``, ``store_get_ms`` (``RedisPackageStore``), ``raw_put_ms``,
    ``raw_get_ms`` (redis-py's ``HSET``/``HGET`` of the same bytes), each also as
    ``..._cpu_ms`` (the loop thread's CPU time in that gap, which the system's other
    processes do not inflate), and ``size``. Each is the median over ``rounds`` of the
    longest gap a ticking task saw.
    """
    archive = bytes(range(256)) * (size // 256) + bytes(size % 256)
    found: dict[str, list[float]] = {}
    raw = Redis.from_url(url)
    namespace = f"stall-{next(_namespaces)}-{time.monotonic_ns()}"

    async def measure(name: str, work: Callable[[], Awaitable[Any]]) -> None:
        wall, cpu = await _longest_gap(work)
        found.setdefault(f"{name}_ms", []).append(wall)
        found.setdefault(f"{name}_cpu_ms", []).append(cpu)

    # Route caching on, as engines run it.
    async with RedisPackageStore.from_url(url, namespace=namespace, cache_routes=True) as store:
        # Connections made, the route cache live, and the server's limit read, outside
        # the timing.
        if not await store.route_cache_ready(30.0):
            raise RuntimeError("the store's route cache did not go live")
        await store.put_package(PackageRecord("warm", "up", archive[: 1 << 20], _now()))
        await raw.ping()
        try:
            for i in range(rounds):
                record = PackageRecord("stall", f"h{i}", archive, _now())
                key = f"stall-raw:{namespace}:{i}"
                await measure("store_put", functools.partial(store.put_package, record))
                await measure("store_get", functools.partial(store.get_package, "stall", f"h{i}"))
                await measure("raw_put", functools.partial(raw.hset, key, "archive", archive))
                await measure("raw_get", functools.partial(raw.hget, key, "archive"))
                await raw.delete(key)
                await store.delete_package("stall", record.content_hash)
        finally:
            await store.delete_package("warm", "up")
            await raw.aclose()
    figures = {name: statistics.median(values) * 1e3 for name, values in found.items()}
    figures["size"] = float(size)
    return figures


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def _main(url: str, sizes: list[int], rounds: int) -> None:
    names = ["store_put", "raw_put", "store_get", "raw_get"]
    print(f"{'MiB':>5} " + " ".join(f"{n:>17}" for n in names))
    print("      " + " ".join(f"{'wall / cpu ms':>17}" for _ in names))
    for size in sizes:
        f = await loop_stall(url, size * MIB, rounds=rounds)
        cells = [f"{f[n + '_ms']:>8.2f} /{f[n + '_cpu_ms']:>7.2f}" for n in names]
        print(f"{size:>5} " + " ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__)
    parser.add_argument("--sizes", default="16,64", help="archive sizes in MiB (16,64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", help="a server to use instead of starting one")
    parser.add_argument("--server-binary", help="the server to start (default: Valkey)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.url:
        asyncio.run(_main(args.url, sizes, args.rounds))
        return 0
    options: dict[str, Any] = {}
    if args.server_binary:
        options["binary"] = args.server_binary
    with LocalServer(**options) as server:
        asyncio.run(_main(server.url, sizes, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
