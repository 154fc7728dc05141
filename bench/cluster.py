"""``python -m bench.cluster [--archives N] [--size BYTES] [--engines K] [--maxmemory MB]
[--list-archives N] [--rounds N] [--json FILE]``: what layout 2 does for one namespace on
a Redis Cluster.

It starts a cluster of its own, three primaries of the bundled Valkey on loopback, each
with ``maxmemory`` MB (as the server reads ``<n>mb``: MiB) and ``maxmemory-policy
noeviction``, and measures, for one namespace at a time (the cluster flushed between):

- **Spread and memory.** ``--archives`` archives of ``--size`` bytes each (by default
  300 of 1 MiB, 300 MiB, well above any one primary's 128 MiB), each of different bytes
  (seeded, so every run puts the same catalogue and spreads it the same way), put one at
  a time through ``RedisPackageStore`` with layout 2: how many puts succeeded, whether a
  listing (``iter_packages``, each archive's SHA-256 compared with the one put) returns
  every archive byte for byte, and the share of the archive bytes held by the busiest
  primary (the sum of ``HSTRLEN`` of the namespace's blobs and rows on each node, found
  by ``SCAN``), beside each primary's ``used_memory``. Then the same catalogue with
  layout 1, put until the first put fails: how many MiB it got in, and the error.
- **Engines listing at once.** ``--engines`` processes (``python -m bench.processes
  list-on-signal``), each with a store as ``from_url`` makes it by default, connected,
  then told at one moment to ``list_packages()``; a catalogue that fits one primary
  (``--list-archives``, by default four fifths of the archives layout 1 got in before
  its first failure, or all of them if it got them all in), once in layout 2 and once
  in layout 1 (the whole namespace on one primary). A first round checks that each
  engine listed the catalogue put, byte for byte; ``--rounds`` timed rounds follow.
  Reported: each engine's time (the median over rounds of the engines' median, and of
  their maximum), the ratio layout 1 / layout 2, the bytes each primary sent (``INFO
  stats`` ``total_net_output_bytes``, before and after the timed rounds) and the busiest
  primary's share of them, each primary's CPU (``INFO cpu``), the engines' CPU, and how
  busy the machine's cores were (``/proc/stat``).

The physical limit: every process runs on this machine's cores (``os.cpu_count()``: 2
where this was written), three servers and the engines together. Layout 2 spreads the
servers' work over three primaries; it does not spread the engines' own work (reading
and decoding every archive, and in layout 2 hashing it to verify it), and on such a
machine that work is most of what the cores do. Where this was written the cores were
saturated in both layouts, while layout 1's single primary needed about a quarter of
each round: the ratio layout 1 / layout 2 is then bounded by the CPU, not by the servers,
and engines on machines of their own would not take the servers' cores. The busiest
primary's share of the bytes sent (and of the servers' CPU) is what shows the load
spreading whatever the cores: about a third with three primaries, against all of it in
layout 1. The bench prints the cores, how busy they were, and both floors.
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
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import redis

from bench.processes import catalogue_digest, catalogue_line
from bench.report import Figure, grid, missed, shown, table
from kvstore import BackendError, PackageRecord, RedisPackageStore
from kvstore.redis.keyspace import Keyspace
from kvstore.server_process import LocalServer, cluster_url, start_cluster

MiB = 1 << 20
PRIMARIES = 3
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
WORKFLOW_TYPE = "bench"
# Each archive's bytes follow from its number and this seed.
SEED = 20240101
# The listing's catalogue is this share of what layout 1 got in before its first failure,
# so that layout 1 holds it on one primary with room to spare.
LISTING_SHARE = 0.8
# Cores busy at least this share of the time are taken as saturated.
SATURATED = 0.9


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Catalogue:
    """``count`` archives of ``size`` bytes, the i-th of bytes that follow from ``i``."""

    count: int
    size: int

    def record(self, i: int) -> PackageRecord:
        archive = random.Random(SEED + i).randbytes(self.size)
        return PackageRecord(WORKFLOW_TYPE, f"a{i:06d}", archive, T0 + timedelta(seconds=i))

    @property
    def total(self) -> int:
        return self.count * self.size


@dataclass
class Fill:
    """What a put of a catalogue got in, one archive at a time, until its first failure."""

    layout: int
    put: int = 0
    archive_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    # content hash -> the SHA-256 (hex) of the archive put under it
    digests: dict[str, str] = field(default_factory=dict)


async def fill(url: str, namespace: str, layout: int, catalogue: Catalogue) -> Fill:
    done = Fill(layout)
    started = time.perf_counter()
    async with RedisPackageStore.from_url(url, namespace=namespace, layout=layout) as store:
        for i in range(catalogue.count):
            record = catalogue.record(i)
            try:
                await store.put_package(record)
            except BackendError as exc:
                done.error = f"{type(exc).__name__}: {exc}"
                break
            done.put += 1
            done.archive_bytes += len(record.archive)
            done.digests[record.content_hash] = hashlib.sha256(record.archive).hexdigest()
    done.seconds = time.perf_counter() - started
    return done


async def verify_listing(url: str, namespace: str, digests: dict[str, str]) -> dict[str, Any]:
    """Walk ``iter_packages`` once, comparing each archive's SHA-256 with the one put."""
    listed = matched = listed_bytes = 0
    started = time.perf_counter()
    async with RedisPackageStore.from_url(url, namespace=namespace) as store:
        async for record in store.iter_packages():
            listed += 1
            listed_bytes += len(record.archive)
            if hashlib.sha256(record.archive).hexdigest() == digests.get(record.content_hash):
                matched += 1
    return {
        "listed": listed,
        "matched": matched,
        "listed_bytes": listed_bytes,
        "seconds": time.perf_counter() - started,
    }


def clients(nodes: list[LocalServer]) -> list[redis.Redis]:
    return [redis.Redis(port=node.port) for node in nodes]


def archive_bytes_on(client: redis.Redis, namespace: str) -> tuple[int, int]:
    """``(archives, bytes)`` of ``namespace`` held by this node: the ``archive`` field of
    every blob and every row there (a row of layout 2 holds one only when small)."""
    keys = Keyspace(namespace)
    count = total = 0
    for pattern in (keys.blob_pattern, keys.prefix + b"pkg:*"):
        found = list(client.scan_iter(match=pattern, count=1000))
        if not found:
            continue
        pipe = client.pipeline(transaction=False)
        for key in found:
            pipe.hstrlen(key, "archive")
        lengths = pipe.execute()
        count += sum(1 for n in lengths if n)
        total += sum(lengths)
    return count, total


def node_memory(nodes: list[LocalServer], namespace: str) -> list[dict[str, Any]]:
    rows = []
    for node, client in zip(nodes, clients(nodes), strict=True):
        with client:
            archives, held = archive_bytes_on(client, namespace)
            rows.append(
                {
                    "port": node.port,
                    "used_memory": int(client.info("memory")["used_memory"]),
                    "archives": archives,
                    "archive_bytes": held,
                    "keys": int(client.dbsize()),
                }
            )
    return rows


def flush(nodes: list[LocalServer]) -> None:
    for client in clients(nodes):
        with client:
            client.flushall()


def server_counters(nodes: list[LocalServer]) -> list[dict[str, float]]:
    """Each server's bytes sent and CPU seconds so far. ``net_output_bytes`` counts every
    byte it sent; ``client_output_bytes`` those it sent to clients, its replication
    stream to its replicas taken out (``total_net_repl_output_bytes``; a server that does
    not report it, older than Redis 7, has all its bytes counted, as ``repl_counted`` 0
    says)."""
    counters = []
    for client in clients(nodes):
        with client:
            stats, cpu = client.info("stats"), client.info("cpu")
            sent = float(stats["total_net_output_bytes"])
            to_replicas = stats.get("total_net_repl_output_bytes")
            counters.append(
                {
                    "net_output_bytes": sent,
                    "client_output_bytes": sent - float(to_replicas or 0),
                    "repl_counted": float(to_replicas is not None),
                    "cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
                }
            )
    return counters


def machine_ticks() -> tuple[int, int] | None:
    """``(busy, total)`` clock ticks of every core so far (``/proc/stat``), or ``None``
    where there is no such file: busy is all but idle and waiting for I/O, so it counts
    every process and the kernel's own work (loopback traffic included)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    total = sum(fields)
    return total - fields[3] - fields[4], total


def busiest_share(values: list[float]) -> float:
    """The largest of ``values`` as a percentage of their sum (0 when they sum to 0)."""
    total = sum(values)
    return 100.0 * max(values) / total if total else 0.0


# Engines listing at once.


def engine_reply(engine: subprocess.Popen[str], expected: str) -> dict[str, Any]:
    assert engine.stdout is not None
    line = engine.stdout.readline()
    if not line:
        raise RuntimeError(f"an engine exited (status {engine.wait()}) before {expected}")
    if expected == "ready":
        if line.strip() != "ready":
            raise RuntimeError(f"an engine said {line!r}, not ready")
        return {}
    reply: dict[str, Any] = json.loads(line)
    return reply


def tell(engines: list[subprocess.Popen[str]], what: str) -> float:
    """Send ``what`` to every engine, as close together as the pipes allow; returns the
    monotonic time before the first."""
    sent = time.monotonic()
    for engine in engines:
        stdin: IO[str] | None = engine.stdin
        assert stdin is not None
        stdin.write(what + "\n")
        stdin.flush()
    return sent


def engines_listing(
    nodes: list[LocalServer],
    url: str,
    namespace: str,
    count: int,
    rounds: int,
    expected_catalogue: str,
) -> dict[str, Any]:
    """``count`` engines listing ``namespace`` at once: a checked round, then ``rounds``
    timed ones."""
    command = [sys.executable, "-m", "bench.processes", "list-on-signal", url, namespace]
    engines: list[subprocess.Popen[str]] = []
    try:
        for _ in range(count):
            engines.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        for engine in engines:  # the barrier: every engine connected before any lists
            engine_reply(engine, "ready")
        tell(engines, "check")
        checked = [engine_reply(e, "a checked listing") for e in engines]
        whole = sum(r["catalogue"] == expected_catalogue for r in checked)
        before = server_counters(nodes)
        ticks = machine_ticks()
        timed: list[list[dict[str, Any]]] = []
        walls = []
        for _ in range(rounds):
            sent = tell(engines, "list")
            replies = [engine_reply(e, "a timed listing") for e in engines]
            walls.append(max(r["ended"] for r in replies) - sent)
            timed.append(replies)
        ticks_after = machine_ticks()
        after = server_counters(nodes)
    finally:
        for engine in engines:
            if engine.stdin is not None:
                with contextlib.suppress(BrokenPipeError):  # an engine that died
                    engine.stdin.close()
        for engine in engines:
            try:
                engine.wait(30)
            except subprocess.TimeoutExpired:
                engine.kill()
                engine.wait()
            if engine.stdout is not None:
                engine.stdout.close()
    pairs = list(zip(before, after, strict=True))
    sent_bytes = [b["net_output_bytes"] - a["net_output_bytes"] for a, b in pairs]
    server_cpus = [b["cpu"] - a["cpu"] for a, b in pairs]
    server_cpu = sum(server_cpus)
    engine_cpu = sum(r["cpu"] for replies in timed for r in replies)
    cores = os.cpu_count() or 1
    machine_busy = None
    if ticks is not None and ticks_after is not None and ticks_after[1] > ticks[1]:
        machine_busy = (ticks_after[0] - ticks[0]) / (ticks_after[1] - ticks[1])
    return {
        "engines": count,
        "rounds": rounds,
        "whole_listings": whole,
        "listed": [r["listed"] for r in checked],
        "median_s": statistics.median(statistics.median(r["seconds"] for r in t) for t in timed),
        "max_s": statistics.median(max(r["seconds"] for r in t) for t in timed),
        "wall_s": statistics.median(walls),
        "net_output_bytes": sent_bytes,
        "busiest_net_share": busiest_share(sent_bytes),
        "engine_cpu_s": engine_cpu,
        "server_cpu_s": server_cpus,
        # The CPU every process used over the time the rounds took, against the cores.
        "cpu_busy": (engine_cpu + server_cpu) / (sum(walls) * cores),
        # How busy the cores were meanwhile, whatever kept them busy (None: not known).
        "machine_busy": machine_busy,
        # The shortest a round could take on these cores, given the CPU it took ...
        "cpu_floor_s": (engine_cpu + server_cpu) / (rounds * cores),
        # ... and given the busiest server's CPU, its commands run by one thread.
        "busiest_server_s": max(server_cpus) / rounds,
    }


def listing_layout(
    nodes: list[LocalServer], layout: int, catalogue: Catalogue, args: argparse.Namespace
) -> dict[str, Any]:
    url = cluster_url(nodes)
    namespace = f"bench.cluster.list{layout}"
    put = asyncio.run(fill(url, namespace, layout, catalogue))
    if put.error is not None:
        raise RuntimeError(
            f"the listing's catalogue does not fit layout {layout} ({put.put} of "
            f"{catalogue.count} put: {put.error}); give a smaller --list-archives"
        )
    expected = catalogue_digest(
        [catalogue_line(WORKFLOW_TYPE, h, d) for h, d in put.digests.items()]
    )
    held = node_memory(nodes, namespace)
    log(f"  listing, layout {layout}: {catalogue.count} archives put, {args.engines} engines")
    result = engines_listing(nodes, url, namespace, args.engines, args.rounds, expected)
    flush(nodes)
    return {
        **result,
        "archive_bytes": [n["archive_bytes"] for n in held],
        "sha256_s": sha256_seconds(catalogue),
    }


def sha256_seconds(catalogue: Catalogue) -> float:
    """The time this process takes to hash one listing's archives: what an engine's
    listing of layout 2 spends verifying them (on one core, wherever it runs)."""
    archive = catalogue.record(0).archive
    started = time.perf_counter()
    for _ in range(catalogue.count):
        hashlib.sha256(archive).digest()
    return time.perf_counter() - started


def run(nodes: list[LocalServer], args: argparse.Namespace) -> dict[str, Any]:
    url = cluster_url(nodes)
    full = Catalogue(args.archives, args.size)

    spread_ns = "bench.cluster.spread"
    log(f"  layout 2: putting {full.count} archives of {full.size} bytes")
    put2 = asyncio.run(fill(url, spread_ns, 2, full))
    log(f"  layout 2: {put2.put} put in {put2.seconds:.1f} s; listing")
    listed2 = asyncio.run(verify_listing(url, spread_ns, put2.digests))
    held2 = node_memory(nodes, spread_ns)
    flush(nodes)

    log("  layout 1: putting until the first failure")
    put1 = asyncio.run(fill(url, "bench.cluster.whole", 1, full))
    held1 = node_memory(nodes, "bench.cluster.whole")
    flush(nodes)

    # What layout 1 held on one primary, less a margin, or the whole catalogue.
    fits = int(LISTING_SHARE * put1.put) if put1.error is not None else args.archives
    listing = Catalogue(args.list_archives or max(1, fits), args.size)
    lists = {layout: listing_layout(nodes, layout, listing, args) for layout in (2, 1)}
    return {
        "spread": {"fill": put2, "listing": listed2, "nodes": held2},
        "layout1": {"fill": put1, "nodes": held1},
        "listing_archives": listing.count,
        "lists": lists,
    }


def figures(results: dict[str, Any], args: argparse.Namespace) -> list[Figure]:
    catalogue_mib = args.archives * args.size / MiB
    put2: Fill = results["spread"]["fill"]
    listed = results["spread"]["listing"]
    held2 = results["spread"]["nodes"]
    put1: Fill = results["layout1"]["fill"]
    held1 = results["layout1"]["nodes"]
    lists = results["lists"]
    even = 100.0 / PRIMARIES
    share2 = busiest_share([n["archive_bytes"] for n in held2])
    used = [n["used_memory"] / MiB for n in held2]
    l1_node = max(held1, key=lambda n: n["archive_bytes"])
    two, one = lists[2], lists[1]
    return [
        Figure(
            "spread_puts",
            f"layout 2: puts of {args.archives} archives of {args.size} bytes "
            f"({catalogue_mib:.0f} MiB) that succeeded, on {PRIMARIES} primaries of "
            f"{args.maxmemory} MiB each; ratio = succeeded / tried",
            put2.put,
            args.archives,
            "puts",
            put2.put / args.archives,
            1.0,
            ">=",
            extra={"seconds": put2.seconds, "first_error": put2.error or "none"},
        ),
        Figure(
            "spread_listed_whole",
            "layout 2: archives a listing (iter_packages) returned byte for byte (SHA-256 "
            "as put); floor = archives put; ratio = whole / put",
            listed["matched"],
            put2.put,
            "archives",
            listed["matched"] / put2.put if put2.put else 0.0,
            1.0,
            ">=",
            extra={"listed": listed["listed"], "seconds": listed["seconds"]},
        ),
        Figure(
            "spread_busiest_share",
            "layout 2: share of the namespace's archive bytes (HSTRLEN of its blobs) on "
            f"the busiest primary; floor = an even spread over {PRIMARIES}; "
            "ratio = busiest / even",
            share2,
            even,
            "%",
            share2 / even,
            40.0,
            "<=",
            "store",
            extra={
                "archives_per_primary": " ".join(str(n["archives"]) for n in held2),
                "used_memory_MiB_per_primary": " ".join(shown(u) for u in used),
            },
        ),
        Figure(
            "spread_busiest_used_memory",
            "layout 2: used_memory of the busiest primary; floor = its maxmemory; "
            "ratio = used / maxmemory",
            max(used),
            float(args.maxmemory),
            "MiB",
            max(used) / args.maxmemory,
        ),
        Figure(
            "layout1_held",
            "layout 1: archive MiB the same catalogue got in, one primary holding them all, "
            "before the first put failed; floor = the catalogue; ratio = held / catalogue",
            put1.archive_bytes / MiB,
            catalogue_mib,
            "MiB",
            put1.archive_bytes / (args.archives * args.size),
            extra={
                "puts_before_failure": put1.put,
                "first_error": put1.error or "none: every put succeeded",
                "primary_used_memory_MiB": l1_node["used_memory"] / MiB,
            },
        ),
        Figure(
            "list_engines_median",
            f"{args.engines} engines each listing {results['listing_archives']} archives "
            f"of {args.size} bytes at once: the median engine's time, layout 2 (store) "
            "against layout 1 (floor); ratio = layout 1 / layout 2 (a speed-up)",
            two["median_s"] * 1000,
            one["median_s"] * 1000,
            "ms",
            one["median_s"] / two["median_s"],
            1.8,
            ">=",
            extra={
                "cores": os.cpu_count() or 1,
                "cpu_floor_ms_layout2": two["cpu_floor_s"] * 1000,
                "cpu_floor_ms_layout1": one["cpu_floor_s"] * 1000,
                "engine_cpu_ms_per_listing_layout2": engine_ms(two, args),
                "engine_cpu_ms_per_listing_layout1": engine_ms(one, args),
                "sha256_ms_per_listing": two["sha256_s"] * 1000,
                "cores_busy_layout2": two["machine_busy"],
                "cores_busy_layout1": one["machine_busy"],
                "wall_ms_layout2": two["wall_s"] * 1000,
                "wall_ms_layout1": one["wall_s"] * 1000,
            },
        ),
        Figure(
            "list_engines_max",
            "the same, the slowest engine's time; ratio = layout 1 / layout 2",
            two["max_s"] * 1000,
            one["max_s"] * 1000,
            "ms",
            one["max_s"] / two["max_s"],
        ),
        Figure(
            "list_busiest_server_cpu",
            "CPU time the busiest primary spent per round of listings, layout 2 (store) "
            "against layout 1 (floor); ratio = layout 1 / layout 2 (the load taken off it)",
            two["busiest_server_s"] * 1000,
            one["busiest_server_s"] * 1000,
            "ms",
            one["busiest_server_s"] / two["busiest_server_s"],
        ),
        Figure(
            "list_busiest_net_share",
            "share of the listings' bytes sent (total_net_output_bytes) by the busiest "
            "primary, layout 2 (store) against layout 1 (floor); ratio = layout 2 / layout 1",
            two["busiest_net_share"],
            one["busiest_net_share"],
            "%",
            two["busiest_net_share"] / one["busiest_net_share"],
            40.0,
            "<=",
            "store",
        ),
        Figure(
            "list_whole",
            "engines whose checked listing held the catalogue put, byte for byte, layout 2 "
            "(store) and layout 1 (floor), of the engines",
            two["whole_listings"],
            one["whole_listings"],
            "engines",
            (two["whole_listings"] + one["whole_listings"]) / (2 * args.engines),
            1.0,
            ">=",
        ),
    ]


def engine_ms(listing: dict[str, Any], args: argparse.Namespace) -> float:
    """The CPU one engine spent on one listing, on average, in ms."""
    return 1000 * float(listing["engine_cpu_s"]) / (int(args.engines) * int(args.rounds))


def percent(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.0f}%"


def limit_text(results: dict[str, Any], args: argparse.Namespace) -> str:
    cores = os.cpu_count() or 1
    two, one = results["lists"][2], results["lists"][1]

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms"

    lines = [
        f"The physical limit here: {cores} cores for {PRIMARIES} servers and "
        f"{args.engines} engines, all on this machine.",
        f"- A round of {args.engines} listings at once took {ms(one['median_s'])} (median "
        f"engine) in layout 1 and {ms(two['median_s'])} in layout 2.",
        f"- The busiest primary's CPU per round (its commands run on one thread): "
        f"{ms(one['busiest_server_s'])} in layout 1, where one primary serves every "
        f"listing, {ms(two['busiest_server_s'])} in layout 2.",
        f"- The CPU charged to the engines and servers per round, over the {cores} cores: "
        f"{ms(one['cpu_floor_s'])} in layout 1, {ms(two['cpu_floor_s'])} in layout 2.",
        f"- An engine's CPU per listing: {engine_ms(one, args):.0f} ms in layout 1, "
        f"{engine_ms(two, args):.0f} ms in layout 2, which also verifies each archive "
        f"(SHA-256 of one listing's archives here: {ms(two['sha256_s'])}).",
        f"- The cores were busy {percent(one['machine_busy'])} of the time in layout 1 and "
        f"{percent(two['machine_busy'])} in layout 2 (/proc/stat: every process and the "
        "kernel's own work, such as loopback traffic, which no process is charged for).",
    ]
    busy = [one["machine_busy"], two["machine_busy"]]
    if all(b is not None and b >= SATURATED for b in busy):
        lines.append(
            "The cores were saturated in both layouts, so the ratio measured here is bounded "
            "by this machine's CPU, not by the servers. Layout 2 takes work off the busiest "
            "primary, but not off the engines, whose work (reading, decoding and, in layout "
            "2, hashing every archive) is most of what the cores do"
            + (
                f"; layout 1's single primary needed only {ms(one['busiest_server_s'])} of "
                f"its {ms(one['median_s'])} rounds. "
                if one["busiest_server_s"] < one["median_s"] / 2
                else ". "
            )
            + "With engines on machines of their own, the servers' work is what a listing "
            "waits for; the busiest primary's share of the bytes sent and of the servers' "
            "CPU is what shows that work spread over the primaries."
        )
    else:
        lines.append(
            f"The cores were less than {percent(SATURATED)} busy in at least one layout: "
            "the ratio measured here is that of the servers and the round trips as much as "
            "of the CPU."
        )
    return "\n".join(lines)


def node_tables(results: dict[str, Any]) -> str:
    held2 = results["spread"]["nodes"]
    held1 = results["layout1"]["nodes"]
    memory = grid(
        "Per primary (MiB; archives = blobs or rows holding an archive)",
        (
            "primary",
            "layout 2 archives",
            "layout 2 archive MiB",
            "layout 2 used_memory",
            "layout 1 archives",
            "layout 1 used_memory",
        ),
        [
            (
                f"127.0.0.1:{a['port']}",
                a["archives"],
                a["archive_bytes"] / MiB,
                a["used_memory"] / MiB,
                b["archives"],
                b["used_memory"] / MiB,
            )
            for a, b in zip(held2, held1, strict=True)
        ],
    )
    lists = results["lists"]
    two, one = lists[2], lists[1]
    sent = grid(
        f"What each primary did during the {lists[2]['rounds']} timed rounds of listings "
        "(MiB sent, CPU seconds)",
        ("primary", "layout 2 MiB", "layout 1 MiB", "layout 2 CPU s", "layout 1 CPU s"),
        [
            (f"127.0.0.1:{a['port']}", x / MiB, y / MiB, c2, c1)
            for a, x, y, c2, c1 in zip(
                held2,
                two["net_output_bytes"],
                one["net_output_bytes"],
                two["server_cpu_s"],
                one["server_cpu_s"],
                strict=True,
            )
        ],
    )
    return memory + "\n\n" + sent


def report_json(
    results: dict[str, Any], found: list[Figure], args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    def fill_json(done: Fill) -> dict[str, Any]:
        return {k: v for k, v in asdict(done).items() if k != "digests"}

    return {
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": seconds,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "figures": {f.name: {**asdict(f), "met": f.met} for f in found},
        "spread": {
            "fill": fill_json(results["spread"]["fill"]),
            "listing": results["spread"]["listing"],
            "nodes": results["spread"]["nodes"],
        },
        "layout1": {
            "fill": fill_json(results["layout1"]["fill"]),
            "nodes": results["layout1"]["nodes"],
        },
        "listing_archives": results["listing_archives"],
        "lists": {str(k): v for k, v in results["lists"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--archives", type=int, default=300, help="archives put (300)")
    parser.add_argument("--size", type=int, default=MiB, help="bytes per archive (1 MiB)")
    parser.add_argument("--engines", type=int, default=8, help="engines listing at once (8)")
    parser.add_argument("--maxmemory", type=int, default=128, help="MiB per primary (128)")
    parser.add_argument(
        "--list-archives", type=int, help="archives the engines list (4/5 of what layout 1 held)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed listing rounds (3)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    for name in ("archives", "size", "engines", "maxmemory", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.list_archives is not None and args.list_archives < 1:
        parser.error("--list-archives must be at least 1")
    if args.size <= 4096:
        parser.error("--size must exceed 4096: smaller archives stay inside their rows")
    started = time.monotonic()
    settings = {"maxmemory": f"{args.maxmemory}mb", "maxmemory-policy": "noeviction"}
    with ExitStack() as stack:
        nodes = start_cluster(stack, primaries=PRIMARIES, settings=settings)
        log(f"cluster of {PRIMARIES} primaries on {cluster_url(nodes)}")
        results = run(nodes, args)
    elapsed = time.monotonic() - started
    found = figures(results, args)
    print(
        f"bench.cluster: {PRIMARIES} primaries of {args.maxmemory} MiB (noeviction), "
        f"{args.archives} archives of {args.size} bytes, {args.engines} engines, "
        f"{args.rounds} rounds, {os.cpu_count()} cores, {elapsed:.0f} s"
    )
    print(table(found))
    print()
    print(node_tables(results))
    print()
    print(limit_text(results, args))
    failed = missed(found)
    print()
    print(
        f"{len(failed)} of {sum(f.met is not None for f in found)} targets missed"
        + (": " + ", ".join(f.name for f in failed) if failed else "")
    )
    if args.json is not None:
        report = report_json(results, found, args, elapsed)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
