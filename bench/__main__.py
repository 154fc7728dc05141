"""``python -m bench [--small] [--check] [--json FILE] [--server-binary PATH] [--rounds N]``.

Runs every figure against a server of its own on loopback and prints them as a table.
With ``--check`` it exits 1 when a figure misses its target (figures without a target
are reported only); without it, 0 whenever the bench ran to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

from bench import figures as F
from bench.cache import cache_figures
from bench.growth import catalogue_growth, route_growth
from bench.report import Figure, grid, missed, shown, table
from kvstore.server_process import LocalServer

# bench/stall.py, when present, measures the event loop's longest gap during a put and
# a get of a large archive, store against raw: ``async def loop_stall(url, size) -> dict``.
STALL_MODULE = "bench.stall"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def server_version(url: str) -> str:
    client = Redis.from_url(url)
    info = await client.info("server")
    await client.aclose()
    for name in ("valkey_version", "redis_version"):
        if name in info:
            return f"{name.split('_')[0]} {info[name]}"
    return "unknown"


async def loop_stall(url: str, size: int) -> dict[str, Any] | None:
    """``bench.stall.loop_stall(url, size)``, or ``None`` when the module is absent."""
    try:
        module = importlib.import_module(STALL_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != STALL_MODULE:
            raise
        return None
    found: dict[str, Any] = await module.loop_stall(url, size)
    return found


async def run(url: str, binary: str | None, sizes: F.Sizes) -> dict[str, Any]:
    done: list[Figure] = []

    def measured(new: Figure | list[Figure]) -> None:
        for figure in new if isinstance(new, list) else [new]:
            done.append(figure)
            log(f"  measured {figure.name}")

    measured(await F.put_one(url, sizes, cached=False))
    measured(await F.put_one(url, sizes, cached=True))
    measured(await F.put_concurrent(url, sizes, cached=False))
    measured(await F.put_concurrent(url, sizes, cached=True))
    for size in sizes.archives:
        measured(await F.archive_figures(url, sizes, size))
    for size in sizes.archives:
        measured(await F.layout_figures(url, sizes, size))
    measured(await F.route_lookup(url, sizes))
    measured(await F.listing_memory(url, sizes))
    measured(await F.memory(binary, sizes))
    measured(await cache_figures(url, sizes.cache_archives, sizes.rounds))
    catalogue = await catalogue_growth(url, sizes)
    log("  measured growth with the catalogue")
    routes = await route_growth(url, sizes)
    log("  measured growth with the routes")
    largest = max(size.size for size in sizes.archives)
    stall = await loop_stall(url, largest)
    log("  measured loop stall" if stall is not None else "  no bench/stall.py: stall skipped")
    return {
        "figures": done,
        "catalogue_growth": catalogue,
        "route_growth": routes,
        "stall": None if stall is None else {"size": largest, **stall},
    }


def growth_tables(results: dict[str, Any]) -> str:
    catalogue = grid(
        "How cost grows with the catalogue (1 KiB archives, route caching on; us per put, "
        "one at a time; us per package listed; ratio = store / raw)",
        ("packages", "put", "raw put", "ratio", "list/pkg", "raw list/pkg", "ratio"),
        [
            (
                row["packages"],
                row["put_us"],
                row["put_raw_us"],
                row["put_ratio"],
                row["list_us_per_package"],
                row["list_raw_us_per_package"],
                row["list_ratio"],
            )
            for row in results["catalogue_growth"]
        ],
    )
    routes = grid(
        "How cost grows with the routes (us per get_package_route)",
        ("routes", "cached", "uncached store", "raw HGET"),
        [
            (row["routes"], row["cached_us"], row["uncached_us"], row["raw_hget_us"])
            for row in results["route_growth"]
        ],
    )
    return catalogue + "\n\n" + routes


def stall_text(stall: dict[str, Any] | None) -> str:
    if stall is None:
        return "Event-loop stall: not measured (bench/stall.py is not present)."
    lines = [f"Event-loop stall, {F.size_text(stall['size'])} archive:"]
    lines += [f"    {key} = {shown(value)}" for key, value in stall.items() if key != "size"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--small", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--server-binary", help="a redis-server compatible binary (default: bundled Valkey)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per figure (median is reported)")
    args = parser.parse_args(argv)
    sizes = F.SMALL if args.small else F.FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        sizes = replace(sizes, rounds=args.rounds)
    started = time.monotonic()
    with LocalServer(args.server_binary) as server:
        version = asyncio.run(server_version(server.url))
        log(f"server {server.binary} ({version}) on {server.url}")
        results = asyncio.run(run(server.url, args.server_binary, sizes))
    elapsed = time.monotonic() - started
    figures: list[Figure] = results["figures"]
    print(
        f"server: {version} ({server.binary}); {'small' if args.small else 'full'} run, "
        f"{sizes.rounds} rounds, {elapsed:.0f} s"
    )
    print(table(figures))
    print()
    print(growth_tables(results))
    print()
    print(stall_text(results["stall"]))
    failed = missed(figures)
    print()
    print(
        f"{len(failed)} of {sum(f.met is not None for f in figures)} targets missed"
        + (": " + ", ".join(f.name for f in failed) if failed else "")
    )
    if args.json is not None:
        report = {
            "small": args.small,
            "rounds": sizes.rounds,
            "seconds": elapsed,
            "sizes": asdict(sizes),
            "server_binary": str(server.binary),
            "server_version": version,
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "figures": {f.name: {**asdict(f), "met": f.met} for f in figures},
            "catalogue_growth": results["catalogue_growth"],
            "route_growth": results["route_growth"],
            "stall": results["stall"],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
