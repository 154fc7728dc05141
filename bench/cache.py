"""What the archive cache saves an engine started again on the same host.

``python -m bench.cache [--archives N] [--rounds N] [--server-binary PATH]`` lists N
archives of 1 MiB, each of other bytes (each its own blob), with a store made fresh for
each listing, as an engine started again makes one: with a warm cache (a directory that
holds every archive) against a cold one (an empty directory), and reports the time and
the bytes the server sent (``INFO stats`` ``total_net_output_bytes``) of each, warm /
cold. ``python -m bench`` reports the same figures. Reported only: no target.

The cold listing writes every archive to the cache, and waits for those writes as a
listing does (within its ``max_bytes``); a listing without a cache is reported beside
them. Files just written are in the page cache, as an engine started again soon after
finds them.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis.asyncio import Redis

from bench import figures as F
from bench.report import Figure, table
from kvstore import RedisPackageStore
from kvstore.server_process import LocalServer


async def _sent(client: Redis) -> int:
    return int((await client.info("stats"))["total_net_output_bytes"])


async def cache_figures(url: str, archives: int, rounds: int) -> list[Figure]:
    """The warm cache against the cold one, listing ``archives`` x 1 MiB."""
    ns = F.namespace()
    listed = F.records(archives, F.MIB, distinct=True)
    async with RedisPackageStore.from_url(url, namespace=ns) as store:
        for start in range(0, len(listed), 16):
            await asyncio.gather(*(store.put_package(r) for r in listed[start : start + 16]))
    info = Redis.from_url(url)
    sent: dict[str, list[int]] = {"warm": [], "cold": [], "none": []}
    root = Path(tempfile.mkdtemp(prefix="kvstore-bench-cache-"))
    warm_dir = root / "warm"

    def listing(kind: str) -> Callable[[], Awaitable[float]]:
        async def round_() -> float:
            directory = {"warm": warm_dir, "cold": root / "cold", "none": None}[kind]
            if kind == "cold":
                shutil.rmtree(root / "cold", ignore_errors=True)
            before = await _sent(info)
            start = time.perf_counter()
            async with RedisPackageStore.from_url(
                url, namespace=ns, archive_cache=directory
            ) as store:
                count = sum([1 async for _ in store.iter_packages()])
            elapsed = time.perf_counter() - start
            sent[kind].append(await _sent(info) - before)
            if count != len(listed):
                raise RuntimeError(f"listed {count} of {len(listed)} packages")
            return elapsed

        return round_

    try:
        async with RedisPackageStore.from_url(url, namespace=ns, archive_cache=warm_dir) as store:
            await store.list_packages()  # the warm directory, filled
        (warm, cold, bare), _ = await F.median_rounds(
            rounds, listing("warm"), listing("cold"), listing("none")
        )
    finally:
        await info.aclose()
        shutil.rmtree(root, ignore_errors=True)
        raw = Redis.from_url(url)
        await raw.flushdb()
        await raw.aclose()
    warm_bytes, cold_bytes = (statistics.median(sent[k]) for k in ("warm", "cold"))
    what = f"a listing of {archives} x 1 MiB by a store made fresh"
    return [
        Figure(
            "cache_list_1MiB",
            f"{what}, warm archive cache against a cold one (ratio = warm / cold)",
            warm * 1e3,
            cold * 1e3,
            "ms",
            warm / cold,
            extra={"no_cache_ms": bare * 1e3, "cold / no cache": cold / bare},
        ),
        Figure(
            "cache_list_1MiB_sent",
            f"{what}: MiB the server sent, warm archive cache against a cold one "
            "(ratio = warm / cold)",
            warm_bytes / F.MIB,
            cold_bytes / F.MIB,
            "MiB",
            warm_bytes / cold_bytes,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__)
    parser.add_argument("--archives", type=int, default=F.FULL.cache_archives)
    parser.add_argument("--rounds", type=int, default=F.FULL.rounds)
    parser.add_argument(
        "--server-binary", help="a redis-server compatible binary (default: bundled Valkey)"
    )
    args = parser.parse_args(argv)
    if args.archives < 1 or args.rounds < 1:
        parser.error("--archives and --rounds must be at least 1")
    with LocalServer(args.server_binary) as server:
        figures = asyncio.run(cache_figures(server.url, args.archives, args.rounds))
    print(table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
