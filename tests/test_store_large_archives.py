"""Large archives: read in slices off the socket, whole at every size around the slice,
and whole again when the connection drops halfway."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from kvstore import RedisPackageStore
from kvstore.redis.keyspace import row_id
from kvstore.redis.streamed import STREAM_FROM
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import pkg


@pytest.mark.slow
async def test_large_archive_round_trips_on_a_real_server(server: LocalServer) -> None:
    archive = bytes(range(256)) * (64 * 1024 * 3)  # 48 MiB
    async with RedisPackageStore.from_url(server.url, namespace=fresh_namespace()) as store:
        await store.put_package(pkg("big", "h", archive))
        got = await store.get_package("big", "h")
        assert got is not None and got.archive == archive
    assert row_id("big", "h") == b"big\x00h"


async def test_archives_around_the_size_read_in_slices_come_back_whole(
    server: LocalServer,
) -> None:
    sizes = [STREAM_FROM - 1, STREAM_FROM, STREAM_FROM + 1, 5 * STREAM_FROM + 3]
    records = [
        pkg("t", f"h{i}", bytes(range(256)) * (size // 256) + bytes(size % 256), n=i)
        for i, size in enumerate(sizes)
    ]
    async with RedisPackageStore.from_url(server.url, namespace=fresh_namespace()) as store:
        for record in records:
            await store.put_package(record)
        # One at a time, many at once, and listed in round trips of a few archives.
        assert [await store.get_package("t", r.content_hash) for r in records] == records
        found = await asyncio.gather(*(store.get_package("t", r.content_hash) for r in records))
        assert found == records
        assert [r async for r in store.iter_packages(max_bytes=4 * STREAM_FROM)] == records


@pytest.mark.slow
async def test_large_gets_cut_off_mid_archive_come_back_whole(server: LocalServer) -> None:
    # An archive read in slices whose connection drops halfway is read again, whole.
    killer = Redis.from_url(server.url)
    archives = [bytes([i]) * (6 * STREAM_FROM + i) for i in range(4)]
    async with RedisPackageStore.from_url(
        server.url, namespace=fresh_namespace(), timeout=2.0, retry_budget=10.0
    ) as store:
        for i, archive in enumerate(archives):
            await store.put_package(pkg("t", f"h{i}", archive, n=i))
        gets = asyncio.gather(*(store.get_package("t", f"h{i % 4}") for i in range(24)))
        killed = 0
        for _ in range(3):
            await asyncio.sleep(0.02)
            killed += await killer.client_kill_filter(_type="normal", skipme=True)
        found = await gets
        assert killed > 0
        assert [r.archive if r else None for r in found] == [archives[i % 4] for i in range(24)]
    await killer.aclose()
