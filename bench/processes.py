"""The bench's other processes, so that what they do is not charged to the one timed.

``python -m bench.processes subscribe URL NAMESPACE``: another engine. It opens a store
of ``NAMESPACE`` with ``cache_routes=True``, prints ``ready`` once its cache is live, and
keeps following route changes until its standard input closes (the bench closes it, and
a bench that dies closes it too).

``python -m bench.processes changes URL NAMESPACE TYPE``: another engine that says when its
cache applies each write of ``TYPE``'s route: it prints ``ready``, then a line
``<time.monotonic()> <hash>`` per write, until its standard input closes. The monotonic
clock is the machine's, so the bench compares it with its own.

``python -m bench.processes list-rss URL NAMESPACE``: a process that only lists, its store
caching routes as an engine's does. It walks ``iter_packages()`` once and prints, as
JSON, its resident memory before the walk and its peak during it (``VmRSS`` and
``VmHWM`` of ``/proc/self/status``, the peak reset first where the kernel allows;
elsewhere ``ru_maxrss``), with what it listed.

``python -m bench.processes list-on-signal URL NAMESPACE``: an engine that lists when
told (``python -m bench.cluster``). It opens a store of ``NAMESPACE`` as ``from_url``
makes it by default, reads the namespace's routes once, so that it is connected, and
prints ``ready``; then, for each line of its standard input, lists with
``list_packages()`` and prints, as JSON, how long that took (``seconds``, from reading
the line to holding the list), the CPU time the process spent meanwhile (``cpu``), its
``time.monotonic()`` at the start and at the end, and what it listed. The line ``check``
adds ``catalogue``, the SHA-256 (hex) of the lines ``<type>\0<hash>\0<archive SHA-256
hex>\n`` of every record in sorted order, computed after the timing: a bench compares it
with the catalogue it put. It ends when its standard input closes.

``python -m bench.processes list-on-signal URL NAMESPACE [--archive-cache DIR]
[--archive-cache-bytes N] [--start-up] [--read-from-replicas] [--replica-read-timeout S]``:
the same engine with options. ``--archive-cache`` gives its store that archive cache
(``archive_cache_bytes`` N, else the store's default); ``--start-up`` has each listing do
what an engine does when it starts, ``list_packages()`` then ``list_package_routes()``,
timed together, and adds ``routes``, how many it read. ``--read-from-replicas`` opens the
store with ``read_from_replicas=True`` (``replica_read_timeout`` S, else the store's
default) and adds ``replica_units`` and ``primary_units``: how many units of the listing
a replica sent, and how many went to the primary instead (a replica behind or failing).
Every listing adds ``warnings``, how many the store logged during it (a replica that
failed a read says so there); each is also written to standard error. The line
``digest`` lists nothing: it reports ``catalogue`` for the last listing, so that a bench
can have every engine of a fleet report its time before any of them spends CPU on a
digest.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

from kvstore import PackageRecord, RedisPackageStore
from kvstore.redis.options import DEFAULTS

_STATUS = Path("/proc/self/status")


async def subscribe(url: str, namespace: str) -> int:
    async with RedisPackageStore.from_url(url, namespace=namespace, cache_routes=True) as store:
        if not await store.route_cache_ready(30.0):
            print("the route cache did not go live", file=sys.stderr)
            return 1
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        # Blocks a worker thread, not the loop: the cache keeps following meanwhile.
        await loop.run_in_executor(None, sys.stdin.read)
    return 0


async def changes(url: str, namespace: str, workflow_type: str) -> int:
    async with RedisPackageStore.from_url(url, namespace=namespace, cache_routes=True) as store:
        if not await store.route_cache_ready(30.0):
            print("the route cache did not go live", file=sys.stderr)
            return 1

        async def report() -> None:
            async with store.watch_routes() as watch:
                async for route in watch:  # applied by the cache as it yields it
                    if route.workflow_type == workflow_type:
                        print(f"{time.monotonic()!r} {route.content_hash}", flush=True)

        reporting = asyncio.get_running_loop().create_task(report())
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        reporting.cancel()
    return 0


def _status_kib(name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    # "5" resets VmHWM to the current RSS (Linux 4.0 and later).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def list_rss(url: str, namespace: str) -> dict[str, object]:
    # Route caching on, as engines run it: its table is in the baseline.
    async with RedisPackageStore.from_url(url, namespace=namespace, cache_routes=True) as store:
        if not await store.route_cache_ready(30.0):
            raise RuntimeError("the route cache did not go live")
        baseline = _status_kib("VmRSS")
        reset = _reset_peak() if baseline is not None else False
        if baseline is None:
            baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        listed = archive_bytes = 0
        async for record in store.iter_packages():
            listed += 1
            archive_bytes += len(record.archive)
            del record
        peak = _status_kib("VmHWM") if reset else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "baseline_kib": baseline,
        "peak_kib": peak,
        "listed": listed,
        "archive_bytes": archive_bytes,
        "peak_reset": reset,
    }


class _Warnings(logging.Handler):
    """Counts the store's warnings, and writes each to standard error."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        print(f"engine {os.getpid()}: {record.getMessage()}", file=sys.stderr, flush=True)


def catalogue_digest(lines: list[bytes]) -> str:
    """The SHA-256 (hex) of ``lines``, each ``<type>\\0<hash>\\0<archive SHA-256 hex>``,
    in sorted order, each ended by a newline: what a listing holds, in 64 digits."""
    return hashlib.sha256(b"".join(line + b"\n" for line in sorted(lines))).hexdigest()


def catalogue_line(workflow_type: str, content_hash: str, archive_digest: str) -> bytes:
    return f"{workflow_type}\0{content_hash}\0{archive_digest}".encode()


def _listed(records: list[PackageRecord]) -> str:
    return catalogue_digest(
        [
            catalogue_line(r.workflow_type, r.content_hash, hashlib.sha256(r.archive).hexdigest())
            for r in records
        ]
    )


async def list_on_signal(
    url: str,
    namespace: str,
    archive_cache: str | None = None,
    archive_cache_bytes: int = DEFAULTS.archive_cache_bytes,
    start_up: bool = False,
    read_from_replicas: bool = False,
    replica_read_timeout: float = DEFAULTS.replica_read_timeout,
) -> int:
    warnings = _Warnings()
    logging.getLogger("kvstore").addHandler(warnings)
    async with RedisPackageStore.from_url(
        url,
        namespace=namespace,
        archive_cache=archive_cache,
        archive_cache_bytes=archive_cache_bytes,
        read_from_replicas=read_from_replicas,
        replica_read_timeout=replica_read_timeout,
    ) as store:
        await store.list_package_routes()
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        last: list[PackageRecord] = []
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return 0
            if line.strip() == "digest":
                print(json.dumps({"catalogue": _listed(last)}), flush=True)
                continue
            last = []  # the listing before, let go of before this one
            # The round trips replicas answered, and those the primary answered instead.
            units = store.health().replica_reads
            warned = warnings.count
            cpu, started = time.process_time(), time.monotonic()
            records = await store.list_packages()
            routes = await store.list_package_routes() if start_up else None
            ended = time.monotonic()
            report: dict[str, object] = {
                "seconds": ended - started,
                "cpu": time.process_time() - cpu,
                "started": started,
                "ended": ended,
                "listed": len(records),
                "archive_bytes": sum(len(r.archive) for r in records),
                "warnings": warnings.count - warned,
            }
            if routes is not None:
                report["routes"] = len(routes)
            now = store.health().replica_reads
            if units is not None and now is not None:
                report["replica_units"] = now[0] - units[0]
                report["primary_units"] = now[1] - units[1]
            if line.strip() == "check":
                report["catalogue"] = _listed(records)
            last = records
            del records
            print(json.dumps(report), flush=True)


def _list_on_signal(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processes list-on-signal")
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("--archive-cache")
    parser.add_argument("--archive-cache-bytes", type=int, default=DEFAULTS.archive_cache_bytes)
    parser.add_argument("--start-up", action="store_true")
    parser.add_argument("--read-from-replicas", action="store_true")
    parser.add_argument("--replica-read-timeout", type=float, default=DEFAULTS.replica_read_timeout)
    args = parser.parse_args(argv)
    return asyncio.run(
        list_on_signal(
            args.url,
            args.namespace,
            args.archive_cache,
            args.archive_cache_bytes,
            args.start_up,
            args.read_from_replicas,
            args.replica_read_timeout,
        )
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["list-on-signal"]:
        return _list_on_signal(argv[1:])
    if argv[:1] == ["changes"] and len(argv) == 4:
        return asyncio.run(changes(*argv[1:]))
    if len(argv) != 3 or argv[0] not in ("subscribe", "list-rss"):
        print(__doc__, file=sys.stderr)
        return 2
    what, url, namespace = argv
    if what == "subscribe":
        return asyncio.run(subscribe(url, namespace))
    print(json.dumps(asyncio.run(list_rss(url, namespace))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
