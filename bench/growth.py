"""How cost grows: puts and listings as the catalogue grows, lookups as the routes do.

Reported, not judged: each row puts the store beside raw redis-py at one size, so a
cost that grows faster than the floor's shows as a ratio that climbs down the table.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from redis.asyncio import Redis

from bench.figures import (
    Sizes,
    call,
    load_put,
    median_rounds,
    namespace,
    raw_put_command,
    records,
    writer,
)
from kvstore.redis.keyspace import BLOB_LAYOUT, Keyspace


async def catalogue_growth(url: str, sizes: Sizes) -> list[dict[str, Any]]:
    """Per catalogue size: put latency (one at a time, 1 KiB) and listing time per package."""
    raw = Redis.from_url(url)
    await load_put(raw)
    ns = namespace()
    keys = Keyspace(ns)
    rounds = min(5, sizes.rounds)
    rows = []
    async with writer(url, ns, cached=True) as store:  # as engines run it
        stored = 0

        async def store_put() -> float:
            batch = records(sizes.growth_puts)
            start = time.perf_counter()
            for r in batch:
                await store.put_package(r)
            return (time.perf_counter() - start) / len(batch)

        async def raw_put() -> float:
            commands = [raw_put_command(keys, r) for r in records(sizes.growth_puts)]
            start = time.perf_counter()
            for command in commands:
                await call(raw, command)
            return (time.perf_counter() - start) / len(commands)

        async def store_list() -> float:
            start = time.perf_counter()
            found = await store.list_packages()
            return (time.perf_counter() - start) / len(found)

        async def raw_list() -> float:
            start = time.perf_counter()
            members = cast(list[bytes], await raw.zrange(keys.index, 0, -1))
            pipe = raw.pipeline(transaction=False)
            for member in members:
                pipe.hmget(keys.row(member[28:]), "archive", "deployed_at")
            found = await pipe.execute()
            return (time.perf_counter() - start) / len(found)

        for packages in sizes.growth_packages:
            # Filled to the size first; the timed puts add a little on top.
            fill = records(max(0, packages - stored))
            for start in range(0, len(fill), 1000):
                await asyncio.gather(*(store.put_package(r) for r in fill[start : start + 1000]))
            stored = max(stored, packages)
            (put_s, put_raw), _ = await median_rounds(rounds, store_put, raw_put)
            stored += 2 * rounds * sizes.growth_puts
            (list_s, list_raw), _ = await median_rounds(rounds, store_list, raw_list)
            rows.append(
                {
                    "packages": packages,
                    "put_us": put_s * 1e6,
                    "put_raw_us": put_raw * 1e6,
                    "put_ratio": put_s / put_raw,
                    "list_us_per_package": list_s * 1e6,
                    "list_raw_us_per_package": list_raw * 1e6,
                    "list_ratio": list_s / list_raw,
                }
            )
    await raw.flushdb()
    await raw.aclose()
    return rows


async def route_growth(url: str, sizes: Sizes) -> list[dict[str, Any]]:
    """Per routes table size: a lookup from the cache, through an uncaching store, raw."""
    raw = Redis.from_url(url)
    rows = [await _route_row(url, raw, sizes, count) for count in sizes.growth_routes]
    await raw.flushdb()
    await raw.aclose()
    return rows


async def _route_row(url: str, raw: Redis, sizes: Sizes, count: int) -> dict[str, Any]:
    ns = namespace()
    keys = Keyspace(ns)
    types = [f"type-{i}" for i in range(count)]
    fields = [t.encode() for t in types]
    await raw.hset(keys.routes, mapping={t: f"h{i}" for i, t in enumerate(types)})
    await raw.set(keys.format, BLOB_LAYOUT)
    lookups = min(sizes.lookups, 20_000)
    # A stride coprime with the table's size visits its types in a scattered order.
    order = [i * 7919 % count for i in range(max(lookups, sizes.raw_lookups))]
    async with writer(url, ns, cached=False) as plain, writer(url, ns, cached=True) as cached:

        async def cached_round() -> float:
            start = time.perf_counter()
            for i in order[:lookups]:
                await cached.get_package_route(types[i])
            return (time.perf_counter() - start) / lookups

        async def plain_round() -> float:
            start = time.perf_counter()
            for i in order[: sizes.raw_lookups]:
                await plain.get_package_route(types[i])
            return (time.perf_counter() - start) / sizes.raw_lookups

        async def raw_round() -> float:
            start = time.perf_counter()
            for i in order[: sizes.raw_lookups]:
                await raw.hget(keys.routes, fields[i])
            return (time.perf_counter() - start) / sizes.raw_lookups

        (hit, miss, floor), _ = await median_rounds(
            min(5, sizes.rounds), cached_round, plain_round, raw_round
        )
    return {
        "routes": count,
        "cached_us": hit * 1e6,
        "uncached_us": miss * 1e6,
        "raw_hget_us": floor * 1e6,
    }
