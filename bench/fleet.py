"""``python -m bench.fleet [--engines 1,4,8,16] [--archives N] [--sizes 1024,1048576]
[--rounds R] [--replica-read-timeout S] [--json FILE] [--server-binary PATH]``: a fleet
of engines restarting at once, with and without the archive cache, and reading from
replicas.

It starts servers of its own (the bundled Valkey on loopback, or ``--server-binary``):
one primary and two replicas of it (``replicaof``), there throughout. It puts one
catalogue per archive size in ``--sizes`` on the primary, in a namespace of its own,
with layout 2: ``--archives`` archives of that size, each of different bytes (seeded, so
every run puts the same catalogues), by default as many as make 200 MiB and at most 2000
(200 x 1 MiB and 2000 x 1 KiB). An archive of 4 KiB or less stays inside its row, where
no cache is used: the 1 KiB catalogue shows what the cache costs where it cannot help.
Once a catalogue is put, the bench waits until both replicas are online and have applied
every byte of the primary's replication stream (``INFO replication``) before it measures.

Then, for each count K in ``--engines``, K engine processes (``python -m bench.processes
list-on-signal --start-up``) start at once; once every one is connected and has said
so, all are told at one moment to do what an engine does when it starts:
``list_packages()``, then ``list_package_routes()``. Each reports how long that took,
from reading the signal to holding both. Four configurations per K, run one after the
other in every round:

- **no cache**: today's listing, every archive from the primary (the baseline);
- **cold cache**: every engine given one archive cache directory, empty (the engines of
  one host share one directory);
- **warm cache**: the same directory, as the cold fleet left it;
- **replicas**: no cache, every engine's store opened with ``read_from_replicas=True``
  (``--read-from-replicas``) and ``replica_read_timeout`` S (the store's default unless
  ``--replica-read-timeout`` says otherwise): each read asks the primary its replication
  position, and each of its units goes to a replica that has applied it, else to the
  primary (``kvstore.redis.replicas``).

Each engine then reports the SHA-256 of what it listed (every record's type, hash and
archive digest, as ``bench.cluster`` does), compared with the catalogue put; reading
from replicas, how many units of its listing a replica sent and how many the primary did
instead; and how many warnings its store logged (a replica that failed to answer a unit
within ``replica_read_timeout`` is one). Reported per catalogue, K and configuration:
each engine's time (the median over rounds of the engines' median, and of their
maximum), the bytes each server sent to clients (``INFO stats``:
``total_net_output_bytes`` less ``total_net_repl_output_bytes``, the replication stream,
before the signal and after the last reply), the engines' and the servers' CPU, how busy
the cores were (``/proc/stat``), and the ratios warm / no cache, cold / no cache and
replicas / no cache of the same run.

Judged, for the largest K up to 8 (8 by default) and the 1 MiB catalogue (else the
largest size): the bytes the primary sent for the warm fleet / those it sent for the
no-cache fleet, at most 0.01; an engine's time (the median engine) warm / no cache, at
most 0.33; and the bytes the primary sent to clients for the fleet reading from replicas
/ those it sent for the no-cache fleet, at most 0.40. The time with replicas / no cache
is reported only: see below.

The physical limit: every process runs on this machine's cores (``os.cpu_count()``: 2
where this was written), the three servers and up to 16 engines together. A warm engine
does not wait for the server, but it still reads every archive from its file and hashes
it to check it, and decodes every row: with K engines above the cores, that work queues
for the cores, in every configuration. Replicas take the bytes off the primary, but here
they share the primary's cores: the engines' work and the servers' together are what the
time measures, so the replicas cannot make an engine faster on this machine as they
would on hosts of their own. The bench prints the cores, how busy they were, and each
engine's and each server's CPU per listing, so that the time ratios can be read against
them.
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
from contextlib import ExitStack
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
CONFIGS = ("none", "cold", "warm", "replicas")
# The configurations of the archive cache, every read from the primary.
CACHE_CONFIGS = ("none", "cold", "warm")
CONFIG_TEXT = {
    "none": "no cache",
    "cold": "cold cache",
    "warm": "warm cache",
    "replicas": "replicas",
}
# The primary's replicas, there throughout; the fleet of "replicas" reads from them.
REPLICAS = 2
# A full sync starts at once instead of waiting for more replicas to join it.
NODE_SETTINGS = {"repl-diskless-sync-delay": "0"}
# The longest the replicas may take to apply a catalogue put, in seconds.
SYNC_WITHIN = 300.0
# The figures judged are those of this many engines (or the most up to it) ...
JUDGED_ENGINES = 8
# ... listing archives of this size (or the largest given).
JUDGED_SIZE = MiB
# The targets: warm / no cache.
SENT_TARGET = 0.01
TIME_TARGET = 0.33
# ... and replicas / no cache, of the bytes the primary sent to clients.
REPLICAS_SENT_TARGET = 0.40
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


@dataclass(frozen=True)
class Servers:
    """The primary and its replicas."""

    primary: LocalServer
    replicas: list[LocalServer]

    @property
    def every(self) -> list[LocalServer]:
        """The primary, then each replica."""
        return [self.primary, *self.replicas]


def start_servers(stack: ExitStack, binary: str | None) -> Servers:
    """A primary and ``REPLICAS`` replicas of it, each stopped and removed by ``stack``."""
    primary = stack.enter_context(LocalServer(binary, settings=NODE_SETTINGS))
    following = {**NODE_SETTINGS, "replicaof": f"127.0.0.1 {primary.port}"}
    replicas = [
        stack.enter_context(LocalServer(binary, settings=following)) for _ in range(REPLICAS)
    ]
    return Servers(primary, replicas)


def replicas_behind(servers: Servers) -> list[str]:
    """What keeps each replica from serving reads now, one line per replica that is not
    online at the primary, linked to it, and at its replication offset in its history."""
    with redis.Redis(port=servers.primary.port) as client:
        primary = client.info("replication")
    online = {
        int(value["port"])
        for name, value in primary.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    }
    behind = []
    for replica in servers.replicas:
        with redis.Redis(port=replica.port) as client:
            found = client.info("replication")
        if replica.port not in online:
            behind.append(f"{replica.port}: not online at the primary")
        elif found.get("master_link_status") != "up":
            behind.append(f"{replica.port}: link {found.get('master_link_status')}")
        elif found.get("master_replid") != primary["master_replid"]:
            behind.append(f"{replica.port}: another history")
        elif int(found.get("slave_repl_offset", -1)) < int(primary["master_repl_offset"]):
            behind.append(
                f"{replica.port}: at {found.get('slave_repl_offset')} of "
                f"{primary['master_repl_offset']}"
            )
    return behind


def wait_in_sync(servers: Servers, within: float = SYNC_WITHIN) -> float:
    """Return once every replica holds every write the primary has (``replicas_behind``
    says none is behind), in the seconds it took; raise after ``within`` seconds."""
    started = time.monotonic()
    while behind := replicas_behind(servers):
        if time.monotonic() - started > within:
            raise RuntimeError(f"replicas not in sync within {within:g} s: {'; '.join(behind)}")
        time.sleep(0.05)
    return time.monotonic() - started


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
    servers: Servers,
    namespace: str,
    count: int,
    cache: Path | None,
    cache_bytes: int,
    expected: str,
    from_replicas: float | None = None,
) -> dict[str, Any]:
    """``count`` engines started at once, told at once to list as they do at start-up;
    given ``from_replicas``, their stores read from the primary's replicas, with that
    ``replica_read_timeout``."""
    url = servers.primary.url
    command = [sys.executable, "-m", "bench.processes", "list-on-signal", url, namespace]
    command.append("--start-up")
    if cache is not None:
        command += ["--archive-cache", str(cache), "--archive-cache-bytes", str(cache_bytes)]
    if from_replicas is not None:
        command += ["--read-from-replicas", "--replica-read-timeout", str(from_replicas)]
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
        before = server_counters(servers.every)
        ticks = machine_ticks()
        sent = tell(engines, "list")
        replies = [engine_reply(e, "its listing") for e in engines]
        ticks_after = machine_ticks()
        after = server_counters(servers.every)
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
    # Each server's bytes to clients (the engines, and this bench's INFO), and its CPU.
    sent_bytes = [
        a["client_output_bytes"] - b["client_output_bytes"]
        for a, b in zip(after, before, strict=True)
    ]
    cpu = [a["cpu"] - b["cpu"] for a, b in zip(after, before, strict=True)]
    return {
        "seconds": [r["seconds"] for r in replies],
        "engine_cpu_s": [r["cpu"] for r in replies],
        "wall_s": max(r["ended"] for r in replies) - sent,
        "ready_s": ready,
        "sent_bytes": sent_bytes[0],
        "replica_sent_bytes": sent_bytes[1:],
        "server_cpu_s": cpu[0],
        "replica_cpu_s": cpu[1:],
        "machine_busy": busy,
        "listed": [r["listed"] for r in replies],
        "routes": [r["routes"] for r in replies],
        "whole": sum(d == expected for d in digests),
        "replica_units": sum(r.get("replica_units", 0) for r in replies),
        "primary_units": sum(r.get("primary_units", 0) for r in replies),
        "warnings": sum(r["warnings"] for r in replies),
    }


def each_median(runs: list[list[float]]) -> list[float]:
    """Of rounds that each give one number per replica, the median of each replica's."""
    return [statistics.median(found) for found in zip(*runs, strict=True)]


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
        "replica_sent_bytes": each_median([r["replica_sent_bytes"] for r in runs]),
        "engine_cpu_s": statistics.median(statistics.mean(r["engine_cpu_s"]) for r in runs),
        "server_cpu_s": statistics.median(r["server_cpu_s"] for r in runs),
        "replica_cpu_s": each_median([r["replica_cpu_s"] for r in runs]),
        "machine_busy": statistics.median(busy) if busy else None,
        "whole": sum(r["whole"] for r in runs),
        "listings": engines * len(runs),
        "listed": sorted({n for r in runs for n in r["listed"]}),
        "routes": sorted({n for r in runs for n in r["routes"]}),
        "cached_files": [r.get("cached_files") for r in runs],
        "cached_bytes": [r.get("cached_bytes") for r in runs],
        "replica_units": sum(r["replica_units"] for r in runs),
        "primary_units": sum(r["primary_units"] for r in runs),
        "warnings": sum(r["warnings"] for r in runs),
    }


def run_catalogue(
    servers: Servers, catalogue: Catalogue, args: argparse.Namespace, root: Path
) -> dict[str, Any]:
    log(f"{catalogue.count} archives of {size_text(catalogue.size)}: putting")
    expected = asyncio.run(put_catalogue(servers.primary.url, catalogue))
    log(f"  the replicas in sync after {wait_in_sync(servers):.1f} s")
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
                cache = host if config in ("cold", "warm") else None
                if config == "replicas":
                    wait_in_sync(servers)  # nothing is written meanwhile: at once
                done = fleet(
                    servers,
                    catalogue.namespace,
                    k,
                    cache,
                    cache_bytes,
                    expected,
                    from_replicas=args.replica_read_timeout if config == "replicas" else None,
                )
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
    none, cold, warm, replicas = (chosen[c] for c in CONFIGS)
    what = (
        f"{k} engines restarting at once, each listing {catalogue['archives']} x "
        f"{size_text(catalogue['size'])} ({catalogue['archive_bytes'] / MiB:.3g} MiB) and "
        "the routes"
    )

    def listings(configs: tuple[str, ...], key: str) -> int:
        return sum(f[c][key] for cat in results for f in cat["fleets"] for c in configs)

    per_engine = warm["sent_bytes"] / k
    every_none = none["sent_bytes"] + sum(none["replica_sent_bytes"])
    every_replicas = replicas["sent_bytes"] + sum(replicas["replica_sent_bytes"])
    units = replicas["replica_units"] + replicas["primary_units"]
    return [
        Figure(
            "fleet_warm_sent",
            f"{what}: bytes the primary sent for the warm-cache fleet (store) against the "
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
            f"{what}: bytes the primary sent for the cold-cache fleet (store) against the "
            "no-cache fleet (floor); ratio = cold / no cache",
            cold["sent_bytes"] / MiB,
            none["sent_bytes"] / MiB,
            "MiB",
            cold["sent_bytes"] / none["sent_bytes"],
        ),
        Figure(
            "fleet_whole",
            "listings that held the whole catalogue byte for byte (their digest against the "
            "catalogue put), of every engine of every fleet without a cache, with a cold one "
            "and with a warm one, of every catalogue and round",
            listings(CACHE_CONFIGS, "whole"),
            listings(CACHE_CONFIGS, "listings"),
            "listings",
            listings(CACHE_CONFIGS, "whole") / listings(CACHE_CONFIGS, "listings"),
            1.0,
            ">=",
        ),
        Figure(
            "fleet_replicas_primary_sent",
            f"{what}: bytes the primary sent to clients for the fleet reading from "
            f"{REPLICAS} replicas, no cache (store), against the no-cache fleet reading from "
            "the primary (floor); ratio = replicas / no cache",
            replicas["sent_bytes"] / MiB,
            none["sent_bytes"] / MiB,
            "MiB",
            replicas["sent_bytes"] / none["sent_bytes"],
            REPLICAS_SENT_TARGET,
            "<=",
            extra={
                **{
                    f"replica_{i}_sent_MiB": sent / MiB
                    for i, sent in enumerate(replicas["replica_sent_bytes"], 1)
                },
                "every_server_sent replicas / no cache": every_replicas / every_none,
                "units_a_replica_sent_%": 100 * replicas["replica_units"] / units if units else 0.0,
                "units_sent_to_the_primary": replicas["primary_units"],
                "store_warnings_logged": replicas["warnings"],
            },
        ),
        Figure(
            "fleet_replicas_time",
            f"{what}: time per engine (the median engine), reading from {REPLICAS} replicas, "
            "no cache (store), against no cache from the primary (floor); ratio = replicas / "
            "no cache",
            replicas["median_s"] * 1000,
            none["median_s"] * 1000,
            "ms",
            replicas["median_s"] / none["median_s"],
            extra={
                "slowest_engine replicas / no cache": replicas["max_s"] / none["max_s"],
                "cores_busy_replicas_%": percent(replicas["machine_busy"]),
                "primary_cpu_ms_replicas": replicas["server_cpu_s"] * 1000,
                "primary_cpu_ms_no_cache": none["server_cpu_s"] * 1000,
                "replicas_cpu_ms_replicas": sum(replicas["replica_cpu_s"]) * 1000,
            },
        ),
        Figure(
            "fleet_replicas_whole",
            "listings that held the whole catalogue byte for byte, of every engine of every "
            "fleet reading from replicas, of every catalogue and round",
            listings(("replicas",), "whole"),
            listings(("replicas",), "listings"),
            "listings",
            listings(("replicas",), "whole") / listings(("replicas",), "listings"),
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
                    *(sent / MiB for sent in s["replica_sent_bytes"]),
                    s["engine_cpu_s"] * 1000,
                    s["server_cpu_s"] * 1000,
                    sum(s["replica_cpu_s"]) * 1000,
                    percent(s["machine_busy"]),
                    f"{s['whole']}/{s['listings']}",
                )
            )
    inline = " (each inside its row: no cache applies)" if catalogue["inline"] else ""
    first = catalogue["fleets"][0]["none"]
    return grid(
        f"{catalogue['archives']} archives of {size_text(catalogue['size'])}{inline}: "
        f"medians over {first['rounds']} rounds; MiB each server sent to clients",
        (
            "engines",
            "config",
            "median ms",
            "max ms",
            "fleet ms",
            "time/none",
            "primary MiB",
            "sent/none",
            *(f"replica {i} MiB" for i in range(1, len(first["replica_sent_bytes"]) + 1)),
            "engine CPU ms",
            "primary CPU ms",
            "replicas CPU ms",
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
    none, warm, replicas = chosen["none"], chosen["warm"], chosen["replicas"]
    lines = [
        f"The physical limit here: {cores} cores for the primary, its {REPLICAS} replicas and "
        f"up to {max(args.engines)} engines, all on this machine.",
        f"- {k} engines, {size_text(catalogue['size'])}: an engine's CPU per listing was "
        f"{none['engine_cpu_s'] * 1000:.0f} ms without a cache and "
        f"{warm['engine_cpu_s'] * 1000:.0f} ms with a warm one (reading every archive from "
        "its file and hashing it to check it); the primary's CPU per fleet "
        f"{none['server_cpu_s'] * 1000:.0f} ms and {warm['server_cpu_s'] * 1000:.0f} ms.",
        f"- {k} engines' CPU over {cores} cores alone takes "
        f"{k * none['engine_cpu_s'] / cores * 1000:.0f} ms without a cache and "
        f"{k * warm['engine_cpu_s'] / cores * 1000:.0f} ms warm: the least a fleet can take "
        f"here (it took {none['wall_s'] * 1000:.0f} ms and {warm['wall_s'] * 1000:.0f} ms).",
        f"- Reading from {REPLICAS} replicas, the primary spent "
        f"{replicas['server_cpu_s'] * 1000:.0f} ms of CPU and the replicas "
        + " and ".join(f"{cpu * 1000:.0f} ms" for cpu in replicas["replica_cpu_s"])
        + f", on the same cores as the engines; the fleet took "
        f"{replicas['wall_s'] * 1000:.0f} ms.",
        f"- The cores were busy {percent(none['machine_busy'])}% of the time without a cache "
        f"and {percent(warm['machine_busy'])}% warm (/proc/stat: every process and the "
        "kernel's own work, loopback traffic included).",
        "With more engines than cores, each engine's time is the cores' queue as much as its "
        "own work, whatever the configuration, and replicas on the same cores add servers "
        "to that queue, not cores; the bytes each server sent do not depend on the cores.",
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
        "replicas": REPLICAS,
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
        "--replica-read-timeout",
        type=float,
        default=DEFAULTS.replica_read_timeout,
        help="the engines' replica_read_timeout reading from replicas, in seconds "
        f"(the store's default, {DEFAULTS.replica_read_timeout:g})",
    )
    parser.add_argument(
        "--server-binary", help="a redis-server compatible binary (default: bundled Valkey)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or (args.archives is not None and args.archives < 1):
        parser.error("--rounds and --archives must be at least 1")
    if not 0 < args.replica_read_timeout < float("inf"):
        parser.error("--replica-read-timeout must be a positive number of seconds")
    catalogues = [Catalogue(args.archives or default_count(s), s) for s in args.sizes]
    started, load_before = time.monotonic(), load_average()
    root = Path(tempfile.mkdtemp(prefix="kvstore-bench-fleet-"))
    try:
        with ExitStack() as stack:
            servers = start_servers(stack, args.server_binary)
            version = server_version(servers.primary.url)
            repl_counted = all(c["repl_counted"] for c in server_counters(servers.every))
            log(
                f"{version}: primary on {servers.primary.url}, replicas on "
                + ", ".join(r.url for r in servers.replicas)
            )
            log(f"the replicas in sync after {wait_in_sync(servers):.1f} s")
            results = [run_catalogue(servers, c, args, root) for c in catalogues]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    load = {"before": load_before, "after": load_average()}
    found = figures(results)
    cores = os.cpu_count()
    print(
        f"bench.fleet: {version}, one primary and {REPLICAS} replicas; engines "
        f"{','.join(map(str, args.engines))}; "
        + "; ".join(f"{c.count} x {size_text(c.size)}" for c in catalogues)
        + f"; {args.rounds} rounds; {cores} cores shared by the servers and every engine; "
        f"{elapsed:.0f} s"
    )
    print(table(found))
    if not repl_counted:
        print(
            "The server does not report total_net_repl_output_bytes: the bytes each server "
            "sent include its replication stream (while nothing is written, a ping every "
            "10 s)."
        )
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
        report["repl_counted"] = repl_counted
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
