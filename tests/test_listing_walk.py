"""How a listing walks the index: the round trips it makes, watched on the pipeliner."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from kvstore import RedisPackageStore

from .conftest import fresh_namespace
from .support import pkg


def count_round_trips(store: RedisPackageStore) -> list[int]:
    """Watch ``store``'s round trips: for each, the bytes of the archives it brought."""
    brought: list[int] = []
    run = store._pipeliner.run

    async def counted(commands: Any, size: int = 0, **options: Any) -> list[Any]:
        replies = await run(commands, size, **options)
        rows = [r for c, r in zip(commands, replies, strict=True) if "HMGET" in repr(c[0])]
        brought.append(sum(len(r[0]) for r in rows if r[0] is not None))
        return replies

    store._pipeliner.run = counted  # type: ignore[method-assign]
    return brought


async def test_iter_packages_bounds_the_archives_of_each_round_trip(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    mib = 1 << 20
    # Archives of odd sizes around the bound, and one larger than it, which comes alone.
    sizes = [mib, mib + 1, mib - 1, 3 * mib, 1, 0, *[mib] * 30, 2 * mib, mib // 3]
    records = [
        pkg(f"t{i % 3}", f"h{i:03d}", bytes([i]) * size, n=i) for i, size in enumerate(sizes)
    ]
    for record in records:
        await store.put_package(record)
    brought = count_round_trips(store)
    seen = [r async for r in store.iter_packages(chunk=16, max_bytes=2 * mib)]
    assert seen == records
    assert max(brought) == 3 * mib  # the large one, alone
    assert sorted(brought)[-2] <= 2 * mib
    assert sum(brought) == sum(sizes)


async def test_a_listing_asks_for_the_next_archives_before_handing_out_the_last(
    client: Redis,
) -> None:
    # The server sends the next round trip while the rows of one are handed out; the
    # archives under way and being handed out stay within max_bytes.
    store = RedisPackageStore(client, namespace=fresh_namespace())
    mib = 1 << 20
    for i in range(24):
        await store.put_package(pkg("t", f"h{i:02d}", bytes([i]) * (2 * mib), n=i))
    run = store._pipeliner.run
    reading: list[int] = []  # the archive bytes of each round trip under way
    most = 0

    async def watched(commands: Any, size: int = 0, **options: Any) -> list[Any]:
        nonlocal most
        rows = 2 * mib * sum("HMGET" in repr(c[0]) for c in commands)
        reading.append(rows)
        most = max(most, sum(reading))
        try:
            return await run(commands, size, **options)
        finally:
            reading.remove(rows)

    store._pipeliner.run = watched  # type: ignore[method-assign]
    handed_out = 0
    async for _ in store.iter_packages(max_bytes=8 * mib):
        # Round trips of two archives: the one whose rows are handed out (4 MiB) and
        # what is under way hold 8 MiB at most.
        assert sum(reading) <= 4 * mib
        handed_out += 1
    assert handed_out == 24
    assert most == 8 * mib, "two round trips of two archives under way at once"


async def test_iter_packages_takes_one_round_trip_per_chunk_of_small_archives(
    client: Redis,
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    records = [pkg(f"t{i % 3}", f"h{i:03d}", bytes(100), n=i) for i in range(250)]
    for record in records:
        await store.put_package(record)
    brought = count_round_trips(store)
    assert [r async for r in store.iter_packages(chunk=100)] == records
    # The first members, then their sizes with the next members: two more than chunks.
    assert len(brought) == 3 + 2
