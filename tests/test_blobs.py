"""Layout 2: each archive but the smallest a blob named by its SHA-256, stored once
however many rows refer to it; every archive verified on every read; a store follows its
namespace's layout."""

from __future__ import annotations

import hashlib

import pytest
from redis.asyncio import Redis

from kvstore import PackageRecord, SerializationError
from kvstore.redis.keyspace import INLINE_LIMIT, Keyspace, archive_digest, row_id

from .conftest import StoreFactory
from .support import pkg

MIB = 1 << 20
STAMP = b"2026-03-01T00:00:00.000000Z"


async def blobs(client: Redis, keys: Keyspace) -> dict[bytes, bytes]:
    """Every blob of the namespace: digest -> archive."""
    found = {}
    async for key in client.scan_iter(match=keys.blob_pattern):
        digest = keys.digest_of(key)
        assert digest is not None, key
        archive = await client.hget(key, "archive")
        assert isinstance(archive, bytes)
        found[digest] = archive
    return found


async def test_the_same_archive_under_several_rows_is_stored_once(
    stores: StoreFactory, client: Redis
) -> None:
    store = stores()
    keys = Keyspace(store.namespace)
    shared, other = b"PK shared" * 1000, b"PK other" * 1000
    await store.put_package_with_routes(pkg("order", "h1", shared), ["billing", "audit"])
    await store.put_package(pkg("order", "h1", shared, n=1))  # re-deployed
    await store.put_package(pkg("refund", "r9", shared, n=2))  # under a new name
    await store.put_package(pkg("order", "h2", other, n=3))
    assert await blobs(client, keys) == {
        archive_digest(shared): shared,
        archive_digest(other): other,
    }
    # Deleting a row leaves the blob another row refers to.
    await store.delete_package("order", "h1")
    assert await store.get_package("refund", "r9") == pkg("refund", "r9", shared, n=2)
    assert [r.archive for r in await store.list_packages()] == [shared, other]


@pytest.mark.parametrize("size", [0, 1, INLINE_LIMIT, INLINE_LIMIT + 1, 2 * MIB + 3])
async def test_a_flipped_byte_in_an_archive_is_reported_naming_the_row_never_returned(
    stores: StoreFactory, client: Redis, size: int
) -> None:
    store = stores()
    keys = Keyspace(store.namespace)
    archive = bytes(range(256)) * (size // 256) + bytes(size % 256)
    await store.put_package(pkg("order", "h1", archive))
    await store.put_package(pkg("order", "h2", b"fine", n=1))
    digest = archive_digest(archive)
    damaged = bytearray(archive or b"\x00")
    damaged[len(damaged) // 2] ^= 0x01
    row = keys.row(row_id("order", "h1"))
    # A small archive is kept inside its row, a larger one in its blob: each verified.
    held_by = row if size <= INLINE_LIMIT else keys.blob(digest)
    assert await client.hexists(held_by, "archive")
    await client.hset(held_by, "archive", bytes(damaged))
    says = f"{row!r} holds an archive whose bytes do not match its digest {digest.decode()}"
    for read in (
        store.get_package("order", "h1"),
        store.list_packages(),
        store.iter_packages(max_bytes=MIB).__anext__(),
    ):
        with pytest.raises(SerializationError) as raised:
            await read
        assert str(raised.value).startswith(says), raised.value
    # What reads no archive still answers, and the other package is whole.
    assert (await store.get_package_head("order", "h1")) is not None
    assert await store.get_package("order", "h2") == pkg("order", "h2", b"fine", n=1)
    # A put of the same bytes mends the blob.
    await store.put_package(pkg("order", "h1", archive))
    assert await store.get_package("order", "h1") == pkg("order", "h1", archive)


async def test_a_missing_blob_is_reported_naming_the_row(
    stores: StoreFactory, client: Redis
) -> None:
    store = stores()
    keys = Keyspace(store.namespace)
    gone = b"PK gone" * 1000
    await store.put_package(pkg("order", "h1", gone))
    await client.delete(keys.blob(archive_digest(gone)))
    row = keys.row(row_id("order", "h1"))
    for read in (store.get_package("order", "h1"), store.list_packages()):
        with pytest.raises(SerializationError, match="which is missing") as raised:
            await read
        assert str(raised.value).startswith(repr(row))


@pytest.mark.parametrize(("field", "value"), [("digest", b"0" * 63), ("size", b"-1")])
async def test_a_row_with_a_damaged_digest_or_size_is_reported_naming_it(
    stores: StoreFactory, client: Redis, field: str, value: bytes
) -> None:
    store = stores()
    keys = Keyspace(store.namespace)
    await store.put_package(pkg("order", "h1", b"PK"))
    row = keys.row(row_id("order", "h1"))
    await client.hset(row, field, value)
    for read in (store.get_package("order", "h1"), store.list_packages()):
        with pytest.raises(SerializationError, match=f"holds a {field}") as raised:
            await read
        assert str(raised.value).startswith(repr(row))


async def test_a_store_writes_in_the_layout_its_namespace_has(
    stores: StoreFactory, client: Redis
) -> None:
    keys = Keyspace((old := stores(layout=1)).namespace)
    await old.put_package(pkg("order", "h1", b"inline"))
    # A store that would make layout 2 writes layout 1 where the namespace has it.
    new = stores(layout=2)
    await new.put_package(pkg("order", "h2", b"still inline", n=1))
    assert await client.hget(keys.row(row_id("order", "h2")), "archive") == b"still inline"
    assert await blobs(client, keys) == {}
    # Migrated under it (the marker changed, as `kvstore migrate` changes it), the next
    # put is refused once, then made again in layout 2; reads take rows of both layouts.
    await client.set(keys.format, b"2")
    large = b"a blob " * 1000
    await new.put_package(pkg("order", "h3", large, n=2))
    await new.put_package_route("order", "h1")
    await new.delete_package("order", "h2")
    assert await blobs(client, keys) == {archive_digest(large): large}
    expected = [pkg("order", "h1", b"inline"), pkg("order", "h3", large, n=2)]
    assert await new.list_packages() == expected
    assert await old.list_packages() == expected
    assert [h.size async for h in new.iter_package_heads()] == [6, 7000]
    assert await new.get_package_route("order") == "h1"


async def test_a_row_migrated_while_a_listing_walks_is_listed_once_as_it_became(
    stores: StoreFactory, client: Redis
) -> None:
    store = stores(layout=1)
    keys = Keyspace(store.namespace)
    records = [pkg("order", f"h{i}", b"archive %d " % i * 1000, n=i) for i in range(8)]
    for record in records:
        await store.put_package(record)
    listed = []
    async for record in store.iter_packages(chunk=2):
        listed.append(record)
        if len(listed) == 1:
            # Every row becomes a row of layout 2 under the walk, as a migration makes it.
            await client.set(keys.format, b"2")
            for r in records:
                row = keys.row(row_id(r.workflow_type, r.content_hash))
                digest = hashlib.sha256(r.archive).hexdigest().encode()
                await client.hset(keys.blob(digest), mapping={"archive": r.archive, "written": 1})
                await client.hdel(row, "archive")
                await client.hset(row, mapping={"digest": digest, "size": len(r.archive)})
    assert listed == records


async def test_a_blob_s_key_is_named_by_the_digest_the_store_computed(
    stores: StoreFactory, client: Redis
) -> None:
    store = stores()
    record = PackageRecord("order", "h1", b"\x00\xff PK" * 1000, pkg().deployed_at)
    await store.put_package(record)
    digest = hashlib.sha256(record.archive).hexdigest()
    key = f"{store.namespace}/blob/{{{digest}}}"
    assert await client.hget(key, "archive") == record.archive
    row = await client.hgetall(f"{{{store.namespace}}}:pkg:order\x00h1")
    assert row == {b"deployed_at": STAMP, b"digest": digest.encode(), b"size": b"5000"}


@pytest.mark.parametrize("size", [0, 1, INLINE_LIMIT])
async def test_a_small_archive_stays_inside_its_row_with_its_digest(
    stores: StoreFactory, client: Redis, size: int
) -> None:
    store = stores()
    record = pkg("order", "h1", b"s" * size)
    await store.put_package(record)
    keys = Keyspace(store.namespace)
    row = await client.hgetall(keys.row(row_id("order", "h1")))
    digest = hashlib.sha256(record.archive).hexdigest().encode()
    assert row == {
        b"deployed_at": STAMP,
        b"archive": record.archive,
        b"digest": digest,
        b"size": b"%d" % size,
    }
    assert await blobs(client, keys) == {}
    assert await store.get_package("order", "h1") == record
    assert await store.list_packages() == [record]
    # Put again as a large archive, the row refers to a blob and keeps no archive of its own.
    await store.put_package(pkg("order", "h1", b"L" * (INLINE_LIMIT + 1)))
    assert not await client.hexists(keys.row(row_id("order", "h1")), "archive")
    assert (await store.get_package("order", "h1")) == pkg("order", "h1", b"L" * (INLINE_LIMIT + 1))
