"""Every key a store writes: one slot per namespace but for the blobs of archives, each
layout as docs/keyspace.md documents it,
a route version that never goes back; and what the store does on finding a key it did
not write: it refuses, names the key, and writes nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from kvstore import PackageHead, PackageRecord, RedisPackageStore, SerializationError
from kvstore.redis.keyspace import Keyspace, archive_digest, row_id

from .conftest import fresh_namespace
from .support import pkg


async def test_every_key_of_a_namespace_but_its_blobs_sits_in_one_slot(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    one, two = b"one" * 2000, b"two" * 2000  # archives kept as blobs
    await store.put_package_with_routes(pkg("a:b", "{x}", one), ["c d"])
    await store.put_package(pkg("é", "h", two, n=1))
    keys = [k async for k in client.scan_iter(match=f"{{{store.namespace}}}:*")]
    assert len(keys) == 6  # format, index, routes, route version and two rows
    assert {key_slot(k) for k in keys} == {key_slot(store.namespace.encode())}
    # Each blob's slot follows its digest, whatever the namespace.
    blobs = [k async for k in client.scan_iter(match=f"{store.namespace}/blob/*")]
    digests = {archive_digest(one), archive_digest(two)}
    assert {key_slot(k) for k in blobs} == {key_slot(d) for d in digests}
    assert len({key_slot(d) for d in digests}) == 2


async def test_two_namespaces_on_one_server_never_see_each_other(client: Redis) -> None:
    first, second = (RedisPackageStore(client, namespace=fresh_namespace()) for _ in range(2))
    await first.put_package(pkg("order", "h1"))
    await second.put_package(pkg("order", "h2"))
    await second.delete_package("order", "h1")
    assert [r.content_hash for r in await first.list_packages()] == ["h1"]
    assert [r.content_hash for r in await second.list_packages()] == ["h2"]
    assert await first.get_package_route("order") == "h1"
    assert await second.get_package_route("order") == "h2"


@pytest.mark.parametrize("layout", [1, 2])
async def test_keyspace_is_as_documented(client: Redis, layout: int) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace(), layout=layout)
    before = await server_microseconds(client)
    archive = b"bytes" * 1000  # a blob in layout 2 (small ones stay inside their rows)
    await store.put_package(pkg("order", "h1", archive))
    ns = store.namespace
    assert await client.get(f"{{{ns}}}:format") == b"%d" % layout
    assert await client.zrange(f"{{{ns}}}:packages", 0, -1, withscores=True) == [
        (b"2026-03-01T00:00:00.000000Z order\x00h1", 0.0)
    ]
    row = await client.hgetall(f"{{{ns}}}:pkg:order\x00h1")
    assert await client.hgetall(f"{{{ns}}}:routes") == {b"order": b"h1"}
    if layout == 1:
        assert row == {b"archive": archive, b"deployed_at": b"2026-03-01T00:00:00.000000Z"}
        assert [k async for k in client.scan_iter(match=f"{ns}/blob/*")] == []
        return
    digest = hashlib.sha256(archive).hexdigest().encode()
    assert row == {
        b"deployed_at": b"2026-03-01T00:00:00.000000Z",
        b"digest": digest,
        b"size": b"5000",
    }
    blob = await client.hgetall(f"{ns}/blob/{{{digest.decode()}}}")
    assert blob.keys() == {b"archive", b"written"}
    assert blob[b"archive"] == archive
    assert before <= int(blob[b"written"]) <= await server_microseconds(client)


async def server_microseconds(client: Redis) -> int:
    seconds, micros = await client.time()
    return seconds * 1_000_000 + micros


async def counter_value(client: Redis, key: bytes) -> int:
    value = await client.get(key)
    assert isinstance(value, bytes)
    return int(value)


@pytest.mark.parametrize("write", ["put", "route"])
async def test_a_route_version_counter_made_anew_starts_above_any_the_lost_one_reached(
    client: Redis, write: str
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    counter = Keyspace(store.namespace).route_version
    before = await server_microseconds(client)
    await WRITES[write](store)
    first = await counter_value(client, counter)
    # Started at the server's clock in microseconds, then raised by the write.
    assert before < first <= await server_microseconds(client) + 1
    for _ in range(20):
        await WRITES[write](store)
    reached = await counter_value(client, counter)
    assert reached == first + 20
    await client.delete(counter)  # as FLUSHDB, or a restart that kept no data, would
    await WRITES[write](store)
    assert await counter_value(client, counter) > reached


@pytest.mark.parametrize("namespace", ["", "a{b", "a}b", "with space", "x" * 65, "é"])
def test_a_namespace_that_could_break_the_hash_tag_is_refused(namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        Keyspace(namespace)


async def test_a_newer_layout_is_refused_by_every_call(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package(pkg("order", "h1"))
    await client.set(f"{{{store.namespace}}}:format", b"3")
    calls = [
        store.put_package(pkg("order", "h2", n=1)),
        store.put_package_route("order", "h2"),
        store.delete_package("order", "h1"),
        store.get_package("order", "h1"),
        store.get_package_route("order"),
        store.list_packages(),
        store.list_package_routes(),
    ]
    for call in calls:
        with pytest.raises(SerializationError, match=r"format.*layout b'3'"):
            await call
    await client.set(f"{{{store.namespace}}}:format", b"2")
    assert [r.content_hash for r in await store.list_packages()] == ["h1"]
    assert await store.get_package_route("order") == "h1"


async def test_undecodable_data_raises_serialization_error_naming_the_key(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package(pkg("order", "h1"))
    row = f"{{{store.namespace}}}:pkg:order\x00h1"
    await client.hset(row, "deployed_at", b"yesterday")
    with pytest.raises(SerializationError, match="pkg:order"):
        await store.get_package("order", "h1")
    await client.hdel(row, "archive")
    with pytest.raises(SerializationError, match="pkg:order"):
        await store.get_package("order", "h1")
    await client.hset(f"{{{store.namespace}}}:routes", b"billing", b"\xff\xfe")
    with pytest.raises(SerializationError, match="routes"):
        await store.list_package_routes()
    with pytest.raises(SerializationError, match="routes"):
        await store.get_package_route("billing")


WRITES: dict[str, Callable[[RedisPackageStore], Awaitable[None]]] = {
    "put": lambda store: store.put_package_with_routes(pkg("order", "h1"), ["invoice"]),
    "route": lambda store: store.put_package_route("order", "h1"),
    "delete": lambda store: store.delete_package("order", "h1"),
}


# Each key a write touches, spoilt with another type: (operation, key, spoil, found, wanted).
SPOILT = [
    ("put", "format", "list", "list", "string"),
    ("put", "index", "string", "string", "zset"),
    ("put", "routes", "string", "string", "hash"),
    ("put", "route_version", "hash", "hash", "counter"),
    ("put", "route_version", "text", "string", "counter"),
    ("put", "row", "string", "string", "hash"),
    ("route", "format", "hash", "hash", "string"),
    ("route", "routes", "zset", "zset", "hash"),
    ("route", "route_version", "text", "string", "counter"),
    ("delete", "format", "list", "list", "string"),
    ("delete", "index", "hash", "hash", "zset"),
    ("delete", "row", "string", "string", "hash"),
]


async def spoil(client: Redis, key: bytes, kind: str) -> None:
    await client.delete(key)
    if kind == "list":
        await client.rpush(key, b"someone else's")
    elif kind == "string":
        await client.set(key, b"someone else's")
    elif kind == "text":
        await client.set(key, b"not a number")
    elif kind == "hash":
        await client.hset(key, b"someone", b"else's")
    else:
        await client.zadd(key, {b"someone else's": 1})


async def everything(client: Redis, namespace: str) -> dict[bytes, bytes | None]:
    """Every key of ``namespace`` with its serialized value."""
    # A thousand keys a round trip: a session's server holds every other test's keys too.
    keys = [k async for k in client.scan_iter(match=f"{{{namespace}}}:*", count=1000)]
    return {k: await client.dump(k) for k in keys}


@pytest.mark.parametrize(("operation", "key", "kind", "found", "wanted"), SPOILT)
async def test_a_write_over_a_key_of_another_type_writes_nothing_and_names_the_key(
    client: Redis, operation: str, key: str, kind: str, found: str, wanted: str
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package_with_routes(pkg("order", "h1"), ["billing"])
    await store.put_package(pkg("other", "h0", n=1))
    keys = Keyspace(store.namespace)
    spoilt = keys.row(row_id("order", "h1")) if key == "row" else getattr(keys, key)
    await spoil(client, spoilt, kind)
    before = await everything(client, store.namespace)
    with pytest.raises(SerializationError) as raised:
        await WRITES[operation](store)
    assert str(raised.value) == f"{spoilt!r} holds a {found}, not a {wanted}; nothing was written"
    assert await everything(client, store.namespace) == before


READS: dict[str, Callable[[RedisPackageStore], Awaitable[object]]] = {
    "get": lambda store: store.get_package("order", "h1"),
    "list": lambda store: store.list_packages(),
    "heads": lambda store: store.iter_package_heads().__anext__(),
    "route": lambda store: store.get_package_route("order"),
    "routes": lambda store: store.list_package_routes(),
}

# Each key a read meets, spoilt with another type: (read, key, spoil, wanted, command).
SPOILT_READS = [
    ("get", "format", "list", "string", "GET"),
    ("get", "row", "string", "hash", "HMGET"),
    ("list", "index", "string", "zset", "ZRANGEBYLEX"),
    ("list", "row", "zset", "hash", "HMGET"),
    ("heads", "row", "list", "hash", "HMGET"),
    ("route", "routes", "string", "hash", "HGET"),
    ("routes", "routes", "zset", "hash", "HGETALL"),
]


@pytest.mark.parametrize(("read", "key", "kind", "wanted", "command"), SPOILT_READS)
async def test_a_read_of_a_key_of_another_type_is_damage_naming_the_key(
    client: Redis, read: str, key: str, kind: str, wanted: str, command: str
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package(pkg("order", "h1"))
    keys = Keyspace(store.namespace)
    spoilt = keys.row(row_id("order", "h1")) if key == "row" else getattr(keys, key)
    await spoil(client, spoilt, kind)
    with pytest.raises(SerializationError) as raised:
        await READS[read](store)
    assert str(raised.value) == (
        f"{spoilt!r} is not a {wanted}: the server refused {command} (WRONGTYPE)"
    )


@pytest.mark.parametrize(
    "member",
    [
        b"garbage",
        b"2026-03-01T00:00:00.000000Z order",  # a row id without its NUL
        b"2026-03-01T00:00:00.000000Z \x00h1",  # an empty workflow type
        b"2026-03-01T00:00:00.000000Z order\x00\xff",  # a hash that is not UTF-8
        b"2026-13-01T00:00:00.000000Z order\x00h1",  # no such month
        b"2026-03-01T00:00:00.000000Zxorder\x00h1",  # no space after the stamp
    ],
)
async def test_a_malformed_index_member_raises_serialization_error_naming_it(
    client: Redis, member: bytes
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package(pkg("order", "h1"))
    index = f"{{{store.namespace}}}:packages"
    await client.zadd(index, {member: 0})

    async def heads() -> list[PackageHead]:
        return [head async for head in store.iter_package_heads(chunk=1)]

    async def records() -> list[PackageRecord]:
        return [record async for record in store.iter_packages(chunk=1)]

    for listing in [store.list_packages(), records(), heads()]:
        with pytest.raises(SerializationError) as raised:
            await listing
        assert index in str(raised.value)
        assert repr(member) in str(raised.value)
