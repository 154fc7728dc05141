"""Listings: in order and whole while others write, never a row twice, heads without the
archives, and no archive kept once handed out."""

from __future__ import annotations

import asyncio
import tracemalloc
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from kvstore import PackageHead, RedisPackageStore

from .conftest import fresh_namespace
from .support import T0, pkg


async def test_iter_packages_walks_chunks_in_order_while_others_delete(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    records = [pkg(f"t{i % 3}", f"h{i:04d}", n=i) for i in range(250)]
    for record in records:
        await store.put_package(record)
    seen = []
    async for record in store.iter_packages(chunk=16):
        seen.append(record)
        if len(seen) % 16 == 1:
            # Remove rows already listed: ranks shift, yet nothing unlisted may be skipped.
            await store.delete_package(seen[0].workflow_type, seen[-1].content_hash)
            await store.delete_package(record.workflow_type, record.content_hash)
    assert seen == records


async def test_heads_list_what_iter_packages_lists_without_the_archives(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    records = [pkg(f"t{i % 3}", f"h{i:03d}", bytes(i * 37), n=i) for i in range(40)]
    for record in records:
        await store.put_package(record)
    await store.put_package(pkg("t0", "h000", b"again", n=99))  # re-put: moves to the end
    await store.delete_package("t1", "h001")
    expected = [
        PackageHead(r.workflow_type, r.content_hash, r.deployed_at, len(r.archive))
        for r in await store.list_packages()
    ]
    assert [h async for h in store.iter_package_heads(chunk=7)] == expected
    assert expected[-1] == PackageHead("t0", "h000", T0 + timedelta(microseconds=99), 5)
    assert PackageHead("t0", "h000", T0, 0) not in expected
    with pytest.raises(ValueError, match="chunk"):
        await anext(store.iter_package_heads(chunk=0))


async def test_no_listing_returns_a_row_twice_while_rows_are_re_put_later(client: Redis) -> None:
    # Listings in small chunks race a writer that keeps moving rows to later stamps: a
    # row read at its old place must not be returned again at its new one.
    store = RedisPackageStore(client, namespace=fresh_namespace())
    records = [pkg(f"t{i % 5}", f"h{i:03d}", n=i) for i in range(60)]
    for record in records:
        await store.put_package(record)
    stop = asyncio.Event()

    async def re_put() -> None:
        n = 1000
        while not stop.is_set():
            for record in records:
                n += 1
                await store.put_package(replace(record, deployed_at=T0 + timedelta(microseconds=n)))
                if stop.is_set():
                    return

    async def walk(i: int) -> list[tuple[str, str]]:
        await asyncio.sleep(i * 0.002)
        if i % 2:
            return [
                (h.workflow_type, h.content_hash) async for h in store.iter_package_heads(chunk=3)
            ]
        return [(r.workflow_type, r.content_hash) async for r in store.iter_packages(chunk=3)]

    writer = asyncio.create_task(re_put())
    try:
        listings = await asyncio.wait_for(asyncio.gather(*(walk(i) for i in range(30))), 60)
    finally:
        stop.set()
        await writer
    twice = [ids for ids in listings if len(ids) != len(set(ids))]
    assert twice == []
    assert all(len(ids) <= len(records) for ids in listings)


async def test_a_listing_holds_no_archive_it_has_already_handed_out(client: Redis) -> None:
    # The client's memory during a walk is a round trip's archives, not the catalogue's:
    # nothing the store keeps (a pending call's bookkeeping included) may hold on to
    # replies its caller has let go of.
    store = RedisPackageStore(client, namespace=fresh_namespace())
    mib = 1 << 20
    for i in range(24):
        await store.put_package(pkg("t", f"h{i:02d}", bytes([i]) * (2 * mib), n=i))
    tracemalloc.start()
    try:
        listed = 0
        async for record in store.iter_packages(max_bytes=4 * mib):
            listed += len(record.archive)
            del record
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await store.aclose()
    assert listed == 48 * mib
    assert peak < 16 * mib  # two round trips' archives and the parser's copies at most


@pytest.mark.parametrize("bad", [0, -1, 1.5, "64", True, None])
async def test_iter_packages_refuses_a_bad_max_bytes(client: Redis, bad: Any) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    with pytest.raises((TypeError, ValueError), match="max_bytes"):
        await anext(store.iter_packages(max_bytes=bad))
