"""The listing walk on its own: its round trips, as a send it is given sees them.

``kvstore.redis.listing.Walk`` takes the function that sends its commands; here that is
``Recorder.send``, one pipeline of a raw client per round trip (fakeredis or a real
server), which records what each round trip brought and what was under way at once.
The store gives the walk its pipeliner instead; what the walk asks for is the same.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from kvstore import PackageRecord, RedisPackageStore
from kvstore.redis.keyspace import Keyspace
from kvstore.redis.listing import Walk, fetched, read_archive, read_head
from kvstore.redis.wire import Command, flatten

from .conftest import fresh_namespace
from .support import pkg

MIB = 1 << 20


class Recorder:
    """A walk's ``send`` over ``client``: what each round trip brought, and the archive
    bytes of the round trips under way at once (``archive`` bytes per row read)."""

    def __init__(self, client: Redis, archive: int = 0) -> None:
        self.client = client
        self.archive = archive
        self.brought: list[int] = []  # per round trip, the archive bytes it brought
        self.reading: list[int] = []  # per round trip under way, its rows' archive bytes
        self.most = 0  # the most archive bytes under way at once

    async def send(self, commands: list[Command], *, large: bool) -> list[Any]:
        rows = self.archive * sum(map(reads_an_archive, commands))
        self.reading.append(rows)
        self.most = max(self.most, sum(self.reading))
        try:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*flatten(command))
            replies = list(await pipe.execute())
        finally:
            self.reading.remove(rows)
        read = [r for c, r in zip(commands, replies, strict=True) if reads_an_archive(c)]
        # An HGET of an archive, or an HMGET of a row's deployed_at and archive.
        archives = [r[-1] if isinstance(r, list) else r for r in read]
        self.brought.append(sum(len(a) for a in archives if a is not None))
        return replies


def reads_an_archive(command: Command) -> bool:
    """Whether ``command`` reads an archive, from its row or from its blob."""
    name, _, *fields = flatten(command)
    return name in ("HGET", "HMGET") and b"archive" in fields


def walk_of(
    store: RedisPackageStore,
    recorder: Recorder,
    chunk: int = 1000,
    max_bytes: int | None = None,
    layout: int = 2,
) -> Walk:
    """The walk ``iter_packages`` makes, sent through ``recorder``, in a namespace of
    ``layout``."""
    keys = Keyspace(store.namespace)
    return Walk(
        keys,
        recorder.send,
        chunk,
        lambda key, digest: read_archive(keys, key, digest),
        lambda replies: fetched(replies)[0],
        max_bytes=max_bytes,
        layout=lambda: b"%d" % layout,
    )


async def records(walk: Walk) -> list[PackageRecord]:
    return [
        PackageRecord(member.workflow_type, member.content_hash, fetched(replies)[1], member.at)
        async for _, member, replies, _ in walk.rows()
    ]


@pytest.mark.parametrize("layout", [1, 2])
async def test_iter_packages_bounds_the_archives_of_each_round_trip(
    client: Redis, layout: int
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace(), layout=layout)
    # Archives of odd sizes around the bound, and one larger than it, which comes alone.
    sizes = [MIB, MIB + 1, MIB - 1, 3 * MIB, 1, 0, *[MIB] * 30, 2 * MIB, MIB // 3]
    puts = [pkg(f"t{i % 3}", f"h{i:03d}", bytes([i]) * size, n=i) for i, size in enumerate(sizes)]
    for record in puts:
        await store.put_package(record)
    recorder = Recorder(client)
    walk = walk_of(store, recorder, chunk=16, max_bytes=2 * MIB, layout=layout)
    assert await records(walk) == puts
    assert [r async for r in store.iter_packages(chunk=16, max_bytes=2 * MIB)] == puts
    brought = recorder.brought
    assert max(brought) == 3 * MIB  # the large one, alone
    assert sorted(brought)[-2] <= 2 * MIB
    assert sum(brought) == sum(sizes)


async def test_a_listing_asks_for_the_next_archives_before_handing_out_the_last(
    client: Redis,
) -> None:
    # The server sends the next round trip while the rows of one are handed out; the
    # archives under way and being handed out stay within max_bytes.
    store = RedisPackageStore(client, namespace=fresh_namespace())
    for i in range(24):
        await store.put_package(pkg("t", f"h{i:02d}", bytes([i]) * (2 * MIB), n=i))
    recorder = Recorder(client, archive=2 * MIB)
    handed_out = 0
    async for _ in walk_of(store, recorder, max_bytes=8 * MIB).rows():
        # Round trips of two archives: the one whose rows are handed out (4 MiB) and
        # what is under way hold 8 MiB at most.
        assert sum(recorder.reading) <= 4 * MIB
        handed_out += 1
    assert handed_out == 24
    assert recorder.most == 8 * MIB, "two round trips of two archives under way at once"


async def test_a_listing_left_early_leaves_no_round_trip_behind(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    for i in range(12):
        await store.put_package(pkg("t", f"h{i:02d}", bytes([i]) * MIB, n=i))
    recorder = Recorder(client)

    def round_trips() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "Recorder.send" in repr(t.get_coro())]

    rows = walk_of(store, recorder, max_bytes=8 * MIB).rows()
    _, first, _, _ = await anext(rows)
    assert round_trips(), "the next round trips are under way"
    await rows.aclose()  # type: ignore[attr-defined]
    for _ in range(100):  # each is cancelled, and ends at its next turn
        if not round_trips():
            break
        await asyncio.sleep(0)
    assert round_trips() == []
    assert first.content_hash == "h00"
    assert len(await store.list_packages()) == 12


@pytest.mark.parametrize("layout", [1, 2])
async def test_iter_packages_takes_one_round_trip_per_chunk_of_small_archives(
    client: Redis, layout: int
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace(), layout=layout)
    puts = [pkg(f"t{i % 3}", f"h{i:03d}", bytes(100), n=i) for i in range(250)]
    for record in puts:
        await store.put_package(record)
    recorder = Recorder(client)
    walk = walk_of(store, recorder, chunk=100, max_bytes=64 * MIB, layout=layout)
    assert await records(walk) == puts
    # The first members, then their sizes with the next members: two more than chunks.
    assert len(recorder.brought) == 3 + 2


@pytest.mark.parametrize("chunk", [0, -1, 1.5, True])
def test_a_walk_refuses_a_bad_chunk(chunk: Any) -> None:
    async def never(commands: list[Command], *, large: bool) -> list[Any]:
        raise AssertionError("nothing is sent")

    with pytest.raises((TypeError, ValueError), match="chunk"):
        Walk(Keyspace("ns"), never, chunk, lambda key, _: read_head(key), lambda r: r[0][0])
