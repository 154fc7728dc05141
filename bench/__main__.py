"""``python -m bench [--small] [--json FILE] [--server-binary PATH]``: run every figure."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import redis

from bench.figures import (
    FULL,
    SMALL,
    Figure,
    Sizes,
    list_packages,
    memory,
    put_concurrent,
    put_one,
    route_lookup,
)
from kvstore.tools.server_process import LocalServer


async def run(url: str, binary: str | None, sizes: Sizes) -> list[Figure]:
    figures = []
    for measure in (put_one, put_concurrent, list_packages, route_lookup):
        figures.append(await measure(url, sizes))
        print(f"  measured {figures[-1].name}", file=sys.stderr)
    figures.append(await memory(binary, sizes))
    print("  measured memory", file=sys.stderr)
    return figures


def table(figures: list[Figure]) -> str:
    lines = [
        f"{'figure':<15} {'store':>12} {'floor':>12} {'unit':>4} {'ratio':>8} "
        f"{'target':>8}  result",
    ]
    for f in figures:
        target = "-" if f.target is None else f"{f.sense}{f.target:g}"
        result = {True: "met", False: "MISSED", None: "reported"}[f.met]
        lines.append(
            f"{f.name:<15} {f.store:>12.6g} {f.floor:>12.6g} {f.unit:>4} {f.ratio:>8.3f} "
            f"{target:>8}  {result}"
        )
    lines.append("")
    for f in figures:
        lines.append(f"{f.name}: {f.what}")
        for key, value in f.extra.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"    {key} = {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--small", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--server-binary", help="a redis-server compatible binary (default: bundled Valkey)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per figure (median is reported)")
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        sizes = Sizes(**{**asdict(sizes), "rounds": args.rounds})
    with LocalServer(args.server_binary) as server:
        print(f"server {server.binary} on {server.url}", file=sys.stderr)
        figures = asyncio.run(run(server.url, args.server_binary, sizes))
    print(table(figures))
    if args.json is not None:
        report = {
            "small": args.small,
            "rounds": sizes.rounds,
            "sizes": asdict(sizes),
            "server_binary": str(server.binary),
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "figures": {f.name: {**asdict(f), "met": f.met} for f in figures},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
