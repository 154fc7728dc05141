"""``python -m bench.durability [--puts N] [--in-flight N] [--rounds N]``: what
``durability="fsync"`` costs.

On a Valkey of its own with its append-only file on, once with ``appendfsync everysec``
(the default) and once with ``always``, it times puts of 1 KiB one at a time and many in
flight, on a store with ``durability="memory"`` and one with ``"fsync"``, side by side
and interleaved, beside the raw floor of the same guarantee: one raw ``FCALL`` followed
by ``WAITAOF 1 0 <ms>`` per put (one at a time), and the raw calls kept ``--raw-in-flight``
in flight, each followed by its own ``WAITAOF`` on a connection of its own. Ratios:
fsync against memory (what the guarantee costs the store) and fsync against the raw floor.
Nothing here has a target: the cost is the server's fsync, which the store can only share.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from redis.asyncio import Redis

from bench.figures import call, load_put, median_rounds, namespace, raw_put_command, records
from bench.report import sig3
from kvstore import RedisPackageStore
from kvstore.redis.keyspace import Keyspace
from kvstore.server_process import LocalServer

WAIT_MS = 5000


async def store_rate(url: str, ns: str, durability: str, puts: int, in_flight: bool) -> float:
    """Puts per second on a store of ``ns`` with ``durability``."""
    async with RedisPackageStore.from_url(url, namespace=ns, durability=durability) as store:
        await store.put_package(records(1)[0])  # connected outside the timing
        await asyncio.sleep(0.05)  # the other lanes too
        batch = records(puts)
        start = time.perf_counter()
        if in_flight:
            await asyncio.gather(*(store.put_package(r) for r in batch))
        else:
            for r in batch:
                await store.put_package(r)
        return puts / (time.perf_counter() - start)


async def raw_rate(url: str, ns: str, puts: int, in_flight: int) -> float:
    """Puts per second of raw redis-py, each followed by its own ``WAITAOF``."""
    keys = Keyspace(ns)
    clients = [Redis.from_url(url) for _ in range(max(1, in_flight))]
    commands = [raw_put_command(keys, r) for r in records(puts)]
    for client in clients:
        await client.ping()
    queue = list(reversed(commands))

    async def worker(client: Redis) -> None:
        while queue:
            await call(client, queue.pop())
            await call(client, ("WAITAOF", 1, 0, WAIT_MS))

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - start
    for client in clients:
        await client.aclose()
    return puts / elapsed


async def measure(fsync: str, args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    settings = {"appendonly": "yes", "appendfsync": fsync}
    rows: list[tuple[str, float, float, float]] = []
    with LocalServer(settings=settings) as server:
        raw = Redis.from_url(server.url)
        await load_put(raw)
        await raw.aclose()
        url = server.url
        for label, puts, in_flight in (
            ("one at a time", args.puts, 0),
            (f"{args.in_flight} in flight", args.in_flight, args.raw_in_flight),
        ):
            ns = namespace()
            sides: list[Any] = [
                lambda n=ns, p=puts, f=in_flight: store_rate(url, n, "memory", p, bool(f)),
                lambda n=ns, p=puts, f=in_flight: store_rate(url, n, "fsync", p, bool(f)),
                lambda n=ns, p=puts, f=in_flight: raw_rate(url, n, p, f),
            ]
            (memory, fsync_rate, raw_rate_), _ = await median_rounds(args.rounds, *sides)
            rows.append((f"appendfsync {fsync}, {label}", memory, fsync_rate, raw_rate_))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.durability", description=__doc__)
    parser.add_argument("--puts", type=int, default=200, help="puts one at a time per round")
    parser.add_argument("--in-flight", type=int, default=4000, help="puts in flight per round")
    parser.add_argument("--raw-in-flight", type=int, default=90, help="raw calls in flight")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    header = ("puts of 1 KiB", "memory /s", "fsync /s", "raw+WAITAOF /s", "fsync/memory")
    print("  ".join(header) + "  fsync/raw")
    for fsync in ("everysec", "always"):
        for label, memory, fsync_rate, raw in asyncio.run(measure(fsync, args)):
            print(
                f"{label}  {sig3(memory)}  {sig3(fsync_rate)}  {sig3(raw)}  "
                f"{sig3(fsync_rate / memory)}  {sig3(fsync_rate / raw)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
