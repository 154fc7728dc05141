"""Listings: in order and whole while others write, never a row twice, heads without the
archives, and no archive kept once handed out; the head of one row."""

from __future__ import annotations

import asyncio
import tracemalloc
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from kvstore import InMemoryPackageStore, PackageHead, RedisPackageStore, SerializationError
from kvstore.redis.keyspace import Keyspace, row_id

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


# get_package_head: "is this version stored?" without downloading it.

HeadStore = RedisPackageStore | InMemoryPackageStore


async def _heads_are_get_package_without_the_archive(store: HeadStore) -> None:
    big = pkg("order", "3f2a", bytes(3 << 20), n=1)
    for record in (big, pkg("order", "0b11", b"", n=2), pkg("a:b", "c", n=3)):
        await store.put_package(record)
        found = await store.get_package(record.workflow_type, record.content_hash)
        assert found == record
        assert await store.get_package_head(record.workflow_type, record.content_hash) == (
            PackageHead(
                record.workflow_type, record.content_hash, record.deployed_at, len(record.archive)
            )
        )
    assert await store.get_package_head("a", "b:c") is None  # ("a:b", "c") is another row
    assert await store.get_package_head("order", "3F2A") is None
    await store.put_package_route("order", "19c7")  # a route needs no stored archive
    assert await store.get_package_head("order", "19c7") is None
    await store.put_package(replace(big, archive=b"again", deployed_at=T0))  # re-put
    assert await store.get_package_head("order", "3f2a") == PackageHead("order", "3f2a", T0, 5)
    await store.delete_package("order", "3f2a")
    assert await store.get_package_head("order", "3f2a") is None


async def test_a_head_is_the_stored_row_without_its_archive(client: Redis) -> None:
    await _heads_are_get_package_without_the_archive(
        RedisPackageStore(client, namespace=fresh_namespace())
    )


async def test_the_memory_store_gives_the_same_heads() -> None:
    await _heads_are_get_package_without_the_archive(InMemoryPackageStore())


@pytest.mark.parametrize("make", [InMemoryPackageStore, RedisPackageStore])
@pytest.mark.parametrize(
    ("workflow_type", "content_hash", "error", "named"),
    [
        ("", "h", ValueError, "workflow_type"),
        (b"t", "h", TypeError, "workflow_type"),
        ("t", "h\x00", ValueError, "content_hash"),
        ("t", None, TypeError, "content_hash"),
    ],
)
async def test_a_head_lookup_refuses_a_bad_argument_naming_it(
    client: Redis, make: Any, workflow_type: Any, content_hash: Any, error: type, named: str
) -> None:
    store = make() if make is InMemoryPackageStore else make(client, namespace=fresh_namespace())
    with pytest.raises(error, match=named):
        await store.get_package_head(workflow_type, content_hash)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (("HDEL", "deployed_at"), "missing its deployed_at"),
        (("HSET", "deployed_at", "yesterday"), "cannot be decoded"),
    ],
)
async def test_a_damaged_row_head_raises_serialization_error_naming_its_key(
    client: Redis, damage: tuple[str, ...], said: str
) -> None:
    namespace = fresh_namespace()
    store = RedisPackageStore(client, namespace=namespace)
    await store.put_package(pkg("order", "3f2a"))
    key = Keyspace(namespace).row(row_id("order", "3f2a"))
    command, *args = damage
    await client.execute_command(command, key, *args)  # type: ignore[no-untyped-call]
    with pytest.raises(SerializationError, match=said) as raised:
        await store.get_package_head("order", "3f2a")
    assert repr(key) in str(raised.value)
