"""``python -m bench.fleet [--engines 1,4,8,16] [--archives N] [--sizes 1024,1048576]
[--rounds R] [--json FILE] [--server-binary PATH]``: a fleet of engines restarting at
once, with and without the archive cache.

It starts one server of its own (a single node of the bundled Valkey on loopback, or
``--server-binary``) and puts one catalogue per archive size in ``--sizes``, in a
namespace of its own, with layout 2: ``--archives`` archives of that size, each of
different bytes (seeded, so every run puts the same catalogues), by default as many as
make 200 MiB and at most 2000 (200 x 1 MiB and 2000 x 1 KiB). An archive of 4 KiB or less
stays inside its row, where no cache is used: the 1 KiB catalogue shows what the cache
costs where it cannot help.

Then, for each count K in ``--engines``, K engine processes (``python -m bench.processes
list-on-signal --start-up``) start at once; once every one is connected and has said
so, all are told at one moment to do what an engine does when it starts:
``list_packages()``, then ``list_package_routes()``. Each reports how long that took,
from reading the signal to holding both. Three configurations per K, run one after the
other in every round:

- **no cache**: today's listing, every archive from the server (the baseline);
- **cold cache**: every engine given one archive cache directory, empty (the engines of
  one host share one directory);
- **warm cache**: the same directory, as the cold fleet left it.

Each engine then reports the SHA-256 of what it listed (every record's type, hash and
archive digest, as ``bench.cluster`` does), compared with the catalogue put. Reported per
catalogue, K and configuration: each engine's time (the median over rounds of the
engines' median, and of their maximum), the bytes the server sent (``INFO stats``
``total_net_output_bytes``, before the signal and after the last reply), the engines' and
the server's CPU, how busy the cores were (``/proc/stat``), and the ratios warm / no cache
and cold / no cache of the same run.

Judged, for the largest K up to 8 (8 by default) and the 1 MiB catalogue (else the
largest size): the bytes the server sent for the warm fleet / those it sent for the
no-cache fleet, at most 0.01; and an engine's time (the median engine) warm / no cache, at
most 0.33.

The physical limit: every process runs on this machine's cores (``os.cpu_count()``: 2
where this was written), the server and up to 16 engines together. A warm engine does not
wait for the server, but it still reads every archive from its file and hashes it to
check it, and decodes every row: with K engines above the cores, that work queues for
the cores, in every configuration. The bench prints the cores, how busy they were, and
each engine's CPU per listing, so that the time ratio can be read against them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import redis

from bench.cluster import engine_reply, machine_ticks, server_counters, tell
from bench.processes import catalogue_digest, catalogue_line
from bench.report import Figure, grid, missed, table
from kvstore import PackageRecord, RedisPackageStore
from kvstore.redis.keyspace import INLINE_LIMIT
from kvstore.redis.options import DEFAULTS
from kvstore.server_process import LocalServer

KiB = 1 << 10
MiB = 1 << 20
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
WORKFLOW_TYPE = "bench"
# Each archive's bytes follow from its size, its number and this seed.
SEED = 20240301
# By default a catalogue holds this many archive bytes, in at most MOST_ARCHIVES archives.
CATALOGUE_BYTES = 200 * MiB
MOST_ARCHIVES = 2000
CONFIGS = ("none", "cold", "warm")
CONFIG_TEXT = {"none": "no cache", "cold": "cold cache", "warm": "warm cache"}
# The figures judged are those of this many engines (or the most up to it) ...
JUDGED_ENGINES = 8
# ... listing archives of this size (or the largest given).
JUDGED_SIZE = MiB
# The targets: warm / no cache.
SENT_TARGET = 0.01
TIME_TARGET = 0.33
PUTS_AT_ONCE = 16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def size_text(size: int) -> str:
    if size % MiB == 0:
        return f"{size // MiB} MiB"
    if size % KiB == 0:
        return f"{size // KiB} KiB"
    return f"{size} B"


@dataclass(frozen=True)
class Catalogue:
    """``count`` archives of ``size`` bytes, the i-th of bytes that follow from ``size``
    and ``i``."""

    count: int
    size: int

    def record(self, i: int) -> PackageRecord:
        archive = random.Random(f"{SEED}:{self.size}:{i}").randbytes(self.size)
        return PackageRecord(WORKFLOW_TYPE, f"a{i:06d}", archive, T0 + timedelta(seconds=i))

    @property
    def total(self) -> int:
        return self.count * self.size

    @property
    def namespace(self) -> str:
        return f"bench.fleet.{self.size}"


def default_count(size: int) -> int:
    return max(1, min(MOST_ARCHIVES, CATALOGUE_BYTES // size))


async def put_catalogue(url: str, catalogue: Catalogue) -> str:
    """Put ``catalogue`` with layout 2; the digest of the listing that holds it whole."""
    lines = []
    async with RedisPackageStore.from_url(url, namespace=catalogue.namespace, layout=2) as store:
        for start in range(0, catalogue.count, PUTS_AT_ONCE):
            batch = [
                catalogue.record(i)
                for i in range(start, min(start + PUTS_AT_ONCE, catalogue.count))
            ]
            await asyncio.gather(*(store.put_package(r) for r in batch))
            lines += [
                catalogue_line(
                    r.workflow_type, r.content_hash, hashlib.sha256(r.archive).hexdigest()
                )
                for r in batch
            ]
    return catalogue_digest(lines)


def server_version(url: str) -> str:
    with redis.Redis.from_url(url) as client:
        info = client.info("server")
    for name in ("valkey_version", "redis_version"):
        if name in info:
            return f"{name.split('_')[0]} {info[name]}"
    return "unknown"


def cached_files(directory: Path) -> tuple[int, int]:
    """``(files, bytes)`` of the archives ``directory`` holds (temporary files left out)."""
    files = total = 0
    for path in directory.iterdir():
        if not path.name.startswith("."):
            files += 1
            total += path.stat().st_size
    return files, total


def fleet(
    server: LocalServer,
    namespace: str,
    count: int,
    cache: Path | None,
    cache_bytes: int,
    expected: str,
) -> dict[str, Any]:
    """``count`` engines started at once, told at once to list as they do at start-up."""
    command = [sys.executable, "-m", "bench.processes", "list-on-signal", server.url, namespace]
    command.append("--start-up")
    if cache is not None:
        command += ["--archive-cache", str(cache), "--archive-cache-bytes", str(cache_bytes)]
    engines: list[subprocess.Popen[str]] = []
    try:
        launched = time.monotonic()
        for _ in range(count):
            engines.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        for engine in engines:  # the barrier: every engine connected before any lists
            engine_reply(engine, "ready")
        ready = time.monotonic() - launched
        before = server_counters([server])[0]
        ticks = machine_ticks()
        sent = tell(engines, "list")
        replies = [engine_reply(e, "its listing") for e in engines]
        ticks_after = machine_ticks()
        after = server_counters([server])[0]
        # Only once every engine has its listing: the digests take CPU of their own.
        tell(engines, "digest")
        digests = [engine_reply(e, "its digest")["catalogue"] for e in engines]
    finally:
        for engine in engines:
            if engine.stdin is not None:
                with contextlib.suppress(BrokenPipeError):  # an engine that died
                    engine.stdin.close()
        for engine in engines:  # closing, each store waits for its writes to the cache
            try:
                engine.wait(60)
            except subprocess.TimeoutExpired:
                engine.kill()
                engine.wait()
            if engine.stdout is not None:
                engine.stdout.close()
    busy = None
    if ticks is not None and ticks_after is not None and ticks_after[1] > ticks[1]:
        busy = (ticks_after[0] - ticks[0]) / (ticks_after[1] - ticks[1])
    return {
        "seconds": [r["seconds"] for r in replies],
        "engine_cpu_s": [r["cpu"] for r in replies],
        "wall_s": max(r["ended"] for r in replies) - sent,
        "ready_s": ready,
        "sent_bytes": after["net_output_bytes"] - before["net_output_bytes"],
        "server_cpu_s": after["cpu"] - before["cpu"],
        "machine_busy": busy,
        "listed": [r["listed"] for r in replies],
        "routes": [r["routes"] for r in replies],
        "whole": sum(d == expected for d in digests),
    }


def summary(runs: list[dict[str, Any]], engines: int) -> dict[str, Any]:
    """One configuration's rounds, as the report shows them."""
    busy = [r["machine_busy"] for r in runs if r["machine_busy"] is not None]
    return {
        "engines": engines,
        "rounds": len(runs),
        "median_s": statistics.median(statistics.median(r["seconds"]) for r in runs),
        "max_s": statistics.median(max(r["seconds"]) for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "ready_s": statistics.median(r["ready_s"] for r in runs),
        "sent_bytes": statistics.median(r["sent_bytes"] for r in runs),
        "engine_cpu_s": statistics.median(statistics.mean(r["engine_cpu_s"]) for r in runs),
        "server_cpu_s": statistics.median(r["server_cpu_s"] for r in runs),
        "machine_busy": statistics.median(busy) if busy else None,
        "whole": sum(r["whole"] for r in runs),
        "listings": engines * len(runs),
        "listed": sorted({n for r in runs for n in r["listed"]}),
        "routes": sorted({n for r in runs for n in r["routes"]}),
        "cached_files": [r.get("cached_files") for r in runs],
        "cached_bytes": [r.get("cached_bytes") for r in runs],
    }


def run_catalogue(
    server: LocalServer, catalogue: Catalogue, args: argparse.Namespace, root: Path
) -> dict[str, Any]:
    log(f"{catalogue.count} archives of {size_text(catalogue.size)}: putting")
    expected = asyncio.run(put_catalogue(server.url, catalogue))
    cache_bytes = max(DEFAULTS.archive_cache_bytes, 2 * catalogue.total)
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        k: {c: [] for c in CONFIGS} for k in args.engines
    }
    for round_ in range(args.rounds):
        for k in args.engines:
            host = root / f"host-{catalogue.size}-{k}"
            for config in CONFIGS:
                log(f"  round {round_ + 1}: {k} engine(s), {CONFIG_TEXT[config]}")
                if config == "cold":  # an empty directory; the warm fleet then finds it full
                    shutil.rmtree(host, ignore_errors=True)
                    host.mkdir()
                cache = None if config == "none" else host
                done = fleet(server, catalogue.namespace, k, cache, cache_bytes, expected)
                if cache is not None:
                    done["cached_files"], done["cached_bytes"] = cached_files(cache)
                runs[k][config].append(done)
            shutil.rmtree(host, ignore_errors=True)
    return {
        "size": catalogue.size,
        "archives": catalogue.count,
        "archive_bytes": catalogue.total,
        "inline": catalogue.size <= INLINE_LIMIT,
        "fleets": [
            {"engines": k, **{c: summary(runs[k][c], k) for c in CONFIGS}} for k in args.engines
        ],
    }


def judged_catalogue(results: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = {c["size"]: c for c in results}
    found: dict[str, Any] = sizes.get(JUDGED_SIZE) or sizes[max(sizes)]
    return found


def judged_fleet(catalogue: dict[str, Any]) -> dict[str, Any]:
    fleets: dict[int, dict[str, Any]] = {f["engines"]: f for f in catalogue["fleets"]}
    upto = [k for k in fleets if k <= JUDGED_ENGINES]
    return fleets[max(upto) if upto else min(fleets)]


def figures(results: list[dict[str, Any]]) -> list[Figure]:
    catalogue = judged_catalogue(results)
    chosen = judged_fleet(catalogue)
    k = chosen["engines"]
    none, cold, warm = (chosen[c] for c in CONFIGS)
    what = (
        f"{k} engines restarting at once, each listing {catalogue['archives']} x "
        f"{size_text(catalogue['size'])} ({catalogue['archive_bytes'] / MiB:.3g} MiB) and "
        "the routes"
    )
    listings = sum(f[c]["listings"] for cat in results for f in cat["fleets"] for c in CONFIGS)
    whole = sum(f[c]["whole"] for cat in results for f in cat["fleets"] for c in CONFIGS)
    per_engine = warm["sent_bytes"] / k
    return [
        Figure(
            "fleet_warm_sent",
            f"{what}: bytes the server sent for the warm-cache fleet (store) against the "
            "no-cache fleet (floor); ratio = warm / no cache",
            warm["sent_bytes"] / MiB,
            none["sent_bytes"] / MiB,
            "MiB",
            warm["sent_bytes"] / none["sent_bytes"],
            SENT_TARGET,
            "<=",
            extra={
                "warm_sent_per_engine_KiB": per_engine / KiB,
                "warm_sent_per_engine_share_of_catalogue_%": 100
                * per_engine
                / catalogue["archive_bytes"],
                "no_cache_sent_per_engine_MiB": none["sent_bytes"] / k / MiB,
            },
        ),
        Figure(
            "fleet_warm_time",
            f"{what}: time per engine (the median engine), warm cache (store) against no "
            "cache (floor); ratio = warm / no cache",
            warm["median_s"] * 1000,
            none["median_s"] * 1000,
            "ms",
            warm["median_s"] / none["median_s"],
            TIME_TARGET,
            "<=",
            extra={
                "warm / cold": warm["median_s"] / cold["median_s"],
                "cores": os.cpu_count() or 1,
                "cores_busy_warm_%": percent(warm["machine_busy"]),
                "cores_busy_no_cache_%": percent(none["machine_busy"]),
                "engine_cpu_ms_per_listing_warm": warm["engine_cpu_s"] * 1000,
                "engine_cpu_ms_per_listing_no_cache": none["engine_cpu_s"] * 1000,
            },
        ),
        Figure(
            "fleet_warm_time_max",
            "the same, the slowest engine; ratio = warm / no cache",
            warm["max_s"] * 1000,
            none["max_s"] * 1000,
            "ms",
            warm["max_s"] / none["max_s"],
        ),
        Figure(
            "fleet_cold_time",
            f"{what}: time per engine (the median engine), cold cache (store) against no "
            "cache (floor); ratio = cold / no cache",
            cold["median_s"] * 1000,
            none["median_s"] * 1000,
            "ms",
            cold["median_s"] / none["median_s"],
            extra={"slowest_engine cold / no cache": cold["max_s"] / none["max_s"]},
        ),
        Figure(
            "fleet_cold_sent",
            f"{what}: bytes the server sent for the cold-cache fleet (store) against the "
            "no-cache fleet (floor); ratio = cold / no cache",
            cold["sent_bytes"] / MiB,
            none["sent_bytes"] / MiB,
            "MiB",
            cold["sent_bytes"] / none["sent_bytes"],
        ),
        Figure(
            "fleet_whole",
            "listings that held the whole catalogue byte for byte (their digest against the "
            "catalogue put), of every engine of every fleet, catalogue and round",
            whole,
            listings,
            "listings",
            whole / listings,
            1.0,
            ">=",
        ),
    ]


def load_average() -> str:
    """The machine's load average over the last minute (``/proc/loadavg``): other work
    sharing the machine shows there."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "unknown"


def percent(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.0f}"


def catalogue_table(catalogue: dict[str, Any]) -> str:
    rows = []
    for found in catalogue["fleets"]:
        none = found["none"]
        for config in CONFIGS:
            s = found[config]
            rows.append(
                (
                    found["engines"],
                    CONFIG_TEXT[config],
                    s["median_s"] * 1000,
                    s["max_s"] * 1000,
                    s["wall_s"] * 1000,
                    s["median_s"] / none["median_s"],
                    s["sent_bytes"] / MiB,
                    s["sent_bytes"] / none["sent_bytes"],
                    s["engine_cpu_s"] * 1000,
                    s["server_cpu_s"] * 1000,
                    percent(s["machine_busy"]),
                    f"{s['whole']}/{s['listings']}",
                )
            )
    inline = " (each inside its row: no cache applies)" if catalogue["inline"] else ""
    return grid(
        f"{catalogue['archives']} archives of {size_text(catalogue['size'])}{inline}: "
        f"medians over {catalogue['fleets'][0]['none']['rounds']} rounds",
        (
            "engines",
            "config",
            "median ms",
            "max ms",
            "fleet ms",
            "time/none",
            "MiB sent",
            "sent/none",
            "engine CPU ms",
            "server CPU ms",
            "busy %",
            "whole",
        ),
        rows,
    )


def limit_text(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cores = os.cpu_count() or 1
    catalogue = judged_catalogue(results)
    chosen = judged_fleet(catalogue)
    k = chosen["engines"]
    none, warm = chosen["none"], chosen["warm"]
    lines = [
        f"The physical limit here: {cores} cores for the server and up to "
        f"{max(args.engines)} engines, all on this machine.",
        f"- {k} engines, {size_text(catalogue['size'])}: an engine's CPU per listing was "
        f"{none['engine_cpu_s'] * 1000:.0f} ms without a cache and "
        f"{warm['engine_cpu_s'] * 1000:.0f} ms with a warm one (reading every archive from "
        "its file and hashing it to check it); the server's CPU per fleet "
        f"{none['server_cpu_s'] * 1000:.0f} ms and {warm['server_cpu_s'] * 1000:.0f} ms.",
        f"- {k} engines' CPU over {cores} cores alone takes "
        f"{k * none['engine_cpu_s'] / cores * 1000:.0f} ms without a cache and "
        f"{k * warm['engine_cpu_s'] / cores * 1000:.0f} ms warm: the least a fleet can take "
        f"here (it took {none['wall_s'] * 1000:.0f} ms and {warm['wall_s'] * 1000:.0f} ms).",
        f"- The cores were busy {percent(none['machine_busy'])}% of the time without a cache "
        f"and {percent(warm['machine_busy'])}% warm (/proc/stat: every process and the "
        "kernel's own work, loopback traffic included).",
        "With more engines than cores, each engine's time is the cores' queue as much as its "
        "own work, whatever the configuration; the bytes the server sent do not depend on "
        "the cores.",
    ]
    return "\n".join(lines)


def report_json(
    results: list[dict[str, Any]],
    found: list[Figure],
    args: argparse.Namespace,
    seconds: float,
    version: str,
) -> dict[str, Any]:
    catalogue = judged_catalogue(results)
    return {
        "kind": "fleet",
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": seconds,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "server_version": version,
        "judged": {"size": catalogue["size"], "engines": judged_fleet(catalogue)["engines"]},
        "figures": {f.name: {**asdict(f), "met": f.met} for f in found},
        "catalogues": results,
    }


def numbers(text: str) -> list[int]:
    try:
        found = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if not found or min(found) < 1:
        raise argparse.ArgumentTypeError(f"give numbers of at least 1: {text!r}")
    return sorted(set(found))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--engines", type=numbers, default=[1, 4, 8, 16], help="engine counts (1,4,8,16)"
    )
    parser.add_argument(
        "--archives", type=int, help="archives per catalogue (200 MiB' worth, at most 2000)"
    )
    parser.add_argument(
        "--sizes", type=numbers, default=[KiB, MiB], help="archive sizes (1024,1048576)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--server-binary", help="a redis-server compatible binary (default: bundled Valkey)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or (args.archives is not None and args.archives < 1):
        parser.error("--rounds and --archives must be at least 1")
    catalogues = [Catalogue(args.archives or default_count(s), s) for s in args.sizes]
    started, load_before = time.monotonic(), load_average()
    root = Path(tempfile.mkdtemp(prefix="kvstore-bench-fleet-"))
    try:
        with LocalServer(args.server_binary) as server:
            version = server_version(server.url)
            log(f"{version} on {server.url}")
            results = [run_catalogue(server, c, args, root) for c in catalogues]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    load = {"before": load_before, "after": load_average()}
    found = figures(results)
    cores = os.cpu_count()
    print(
        f"bench.fleet: {version}, one node; engines {','.join(map(str, args.engines))}; "
        + "; ".join(f"{c.count} x {size_text(c.size)}" for c in catalogues)
        + f"; {args.rounds} rounds; {cores} cores shared by the server and every engine; "
        f"{elapsed:.0f} s"
    )
    print(table(found))
    for catalogue in results:
        print()
        print(catalogue_table(catalogue))
    print()
    print(limit_text(results, args))
    print(
        f"The machine's load average (1 min) was {load['before']} before the run and "
        f"{load['after']} at its end: the load before it is work not this bench's, which "
        "shared the cores with it."
    )
    failed = missed(found)
    print()
    print(
        f"{len(failed)} of {sum(f.met is not None for f in found)} targets missed"
        + (": " + ", ".join(f.name for f in failed) if failed else "")
    )
    if args.json is not None:
        report = report_json(results, found, args, elapsed, version)
        report["load_average"] = load
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
