"""What the Redis store promises beyond the shared contract: keys, layout, errors, load."""

from __future__ import annotations

import asyncio
import shutil
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from redis.asyncio import Redis
from redis.crc import key_slot

from kvstore import (
    BackendError,
    PackageHead,
    PackageRecord,
    RedisPackageStore,
    SerializationError,
    StoreError,
)
from kvstore.conformance import run_package_store_suite
from kvstore.redis.keyspace import Keyspace, row_id
from kvstore.redis.scripts import LIBRARY, Library, build_library, load_library
from kvstore.redis.streamed import STREAM_FROM
from kvstore.tools.server_process import LocalServer

from .conftest import SERVERS, fresh_namespace

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


async def library_names(client: Redis) -> set[bytes]:
    listed = await client.function_list()
    return {
        (entry if isinstance(entry, dict) else dict(zip(entry[::2], entry[1::2], strict=True)))[
            b"library_name"
        ]
        for entry in listed
    }


def build_library_with_extra_line(folder: Path) -> Library:
    """The library another release would have: the same files, one line more."""
    shutil.copytree(Path(__file__).resolve().parent.parent / "lua", folder)
    (folder / "library.lua").write_text((folder / "library.lua").read_text() + "\n-- v2\n")
    return build_library(folder)


def pkg(
    workflow_type: str, content_hash: str, archive: bytes = b"zip", n: int = 0
) -> PackageRecord:
    return PackageRecord(workflow_type, content_hash, archive, T0 + timedelta(microseconds=n))


@pytest.fixture(params=["fakeredis", *SERVERS])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """A raw client on fakeredis or on each real server, to look behind the store."""
    if request.param == "fakeredis":
        raw: Redis = fakeredis.FakeAsyncRedis()
    else:
        raw = Redis.from_url(request.getfixturevalue(f"{request.param}_server").url)
    yield raw
    await raw.aclose()


async def test_every_key_of_a_namespace_sits_in_one_slot(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package_with_routes(pkg("a:b", "{x}"), ["c d"])
    await store.put_package(pkg("é", "h", n=1))
    keys = [k async for k in client.scan_iter(match=f"{{{store.namespace}}}:*")]
    assert len(keys) == 6  # format, index, routes, route version and two rows
    assert {key_slot(k) for k in keys} == {key_slot(store.namespace.encode())}


async def test_two_namespaces_on_one_server_never_see_each_other(client: Redis) -> None:
    first, second = (RedisPackageStore(client, namespace=fresh_namespace()) for _ in range(2))
    await first.put_package(pkg("order", "h1"))
    await second.put_package(pkg("order", "h2"))
    await second.delete_package("order", "h1")
    assert [r.content_hash for r in await first.list_packages()] == ["h1"]
    assert [r.content_hash for r in await second.list_packages()] == ["h2"]
    assert await first.get_package_route("order") == "h1"
    assert await second.get_package_route("order") == "h2"


async def test_keyspace_is_as_documented(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package(pkg("order", "h1", b"bytes"))
    ns = store.namespace
    assert await client.get(f"{{{ns}}}:format") == b"1"
    assert await client.zrange(f"{{{ns}}}:packages", 0, -1, withscores=True) == [
        (b"2026-03-01T00:00:00.000000Z order\x00h1", 0.0)
    ]
    assert await client.hgetall(f"{{{ns}}}:pkg:order\x00h1") == {
        b"archive": b"bytes",
        b"deployed_at": b"2026-03-01T00:00:00.000000Z",
    }
    assert await client.hgetall(f"{{{ns}}}:routes") == {b"order": b"h1"}


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
    await client.set(f"{{{store.namespace}}}:format", b"2")
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
        with pytest.raises(SerializationError, match=r"format.*layout b'2'"):
            await call
    await client.set(f"{{{store.namespace}}}:format", b"1")
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
    keys = [k async for k in client.scan_iter(match=f"{{{namespace}}}:*")]
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


async def test_a_server_error_is_a_backend_error(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await client.set(f"{{{store.namespace}}}:routes", b"not a hash")
    with pytest.raises(BackendError, match="WRONGTYPE"):
        await store.list_package_routes()


async def test_the_library_is_loaded_again_after_the_server_lost_it(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package(pkg("order", "h1"))
    await client.function_flush()
    await store.put_package(pkg("order", "h2", n=1))
    await client.function_flush()
    await store.delete_package("order", "h1")
    await client.function_flush()
    await store.put_package_route("order", "h1")
    assert [r.content_hash for r in await store.list_packages()] == ["h2"]
    assert await store.get_package_route("order") == "h1"


async def test_flushall_keeps_the_library(client: Redis) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package(pkg("order", "h1"))
    await client.flushall()
    assert LIBRARY.name.encode() in await library_names(client)


async def test_calls_that_find_the_library_missing_together_load_it_once(
    client: Redis,
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await client.function_flush()
    loads = 0
    load = store.load_library

    async def counted() -> list[str]:
        nonlocal loads
        loads += 1
        return await load()

    store.load_library = counted  # type: ignore[method-assign]
    await asyncio.gather(*(store.put_package(pkg(f"t{i}", "h", n=i)) for i in range(50)))
    assert loads == 1
    assert len(await store.list_packages()) == 50


async def store_slow_to_load_the_library(client: Redis) -> RedisPackageStore:
    """A store on a server without the library, whose load of it takes 0.3 s."""
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await client.function_flush()
    load = store.load_library

    async def slow() -> list[str]:
        await asyncio.sleep(0.3)
        return await load()

    store.load_library = slow  # type: ignore[method-assign]
    return store


async def test_a_caller_cancelled_during_the_load_leaves_it_to_the_others(client: Redis) -> None:
    store = await store_slow_to_load_the_library(client)
    first = asyncio.create_task(store.put_package(pkg("order", "h1")))
    second = asyncio.create_task(store.put_package(pkg("order", "h2", n=1)))
    await asyncio.sleep(0.1)  # both found the library missing and wait for one load
    first.cancel()
    await second
    assert first.cancelled()
    assert [r.content_hash for r in await store.list_packages()] == ["h2"]


async def test_closing_the_store_during_the_load_fails_the_waiting_calls(client: Redis) -> None:
    store = await store_slow_to_load_the_library(client)
    waiting = asyncio.create_task(store.put_package(pkg("order", "h1")))
    await asyncio.sleep(0.1)
    await store.aclose()
    with pytest.raises(BackendError, match="closed"):
        await waiting
    await load_library(client)


async def test_the_library_is_named_by_its_digest_and_leaves_other_releases_alone(
    client: Redis, tmp_path: Path
) -> None:
    # Another release's library (other Lua, so another digest) keeps its functions.
    other = build_library_with_extra_line(tmp_path / "lua")
    assert other.name != LIBRARY.name
    await load_library(client, other)
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package(pkg("order", "h1"))
    names = await library_names(client)
    assert {LIBRARY.name.encode(), other.name.encode()} <= names
    assert await store.load_library() == [f"{store.server}: {LIBRARY.name} was loaded already"]
    await client.function_delete(other.name)


async def test_a_decoding_client_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        RedisPackageStore(fakeredis.FakeAsyncRedis(decode_responses=True))


def test_a_client_of_another_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="client"):
        RedisPackageStore(object())  # type: ignore[arg-type]


async def test_thousands_of_tasks_share_one_store_over_a_tiny_pool(server: LocalServer) -> None:
    # Two pooled connections for 5,000 concurrent calls: a store that opened one
    # connection per call would fail with "Too many connections".
    raw = Redis.from_url(server.url, max_connections=2)
    async with RedisPackageStore(raw, namespace=fresh_namespace()) as store:
        records = [pkg(f"t{i % 7}", f"h{i}", bytes([i % 256]) * 100, i) for i in range(5000)]
        await asyncio.gather(*(store.put_package(r) for r in records))
        routes = await asyncio.gather(*(store.get_package_route(f"t{i}") for i in range(7)))
        assert await store.list_packages() == records
        assert all(route is not None for route in routes)
    await raw.aclose()


@pytest.mark.parametrize("first", ["one put", "a burst"])
async def test_a_store_loads_the_library_on_its_own_connections(first: str) -> None:
    # A fresh server: the first puts find no library. Loaded through the client's pool,
    # it would need a connection the lanes may all hold by then, and every put failed.
    with LocalServer() as fresh:
        raw = Redis.from_url(fresh.url, max_connections=2)
        async with RedisPackageStore(raw, namespace=fresh_namespace()) as store:
            if first == "one put":
                await store.put_package(pkg("t", "h0"))
            await asyncio.gather(*(store.put_package(pkg("t", f"h{i}", n=i)) for i in range(500)))
            assert len(await store.list_packages()) == 500
            assert store.health().library_loaded
        await raw.aclose()


async def test_one_refused_call_never_fails_its_neighbours(client: Redis) -> None:
    good = RedisPackageStore(client, namespace=fresh_namespace())
    broken = RedisPackageStore(client, namespace=fresh_namespace())
    await client.set(f"{{{broken.namespace}}}:routes", b"not a hash")
    outcomes = await asyncio.gather(
        *(
            (broken if i % 10 == 0 else good).put_package(pkg("order", f"h{i}", n=i))
            for i in range(500)
        ),
        return_exceptions=True,
    )
    failed = [i for i, o in enumerate(outcomes) if o is not None]
    assert failed == list(range(0, 500, 10))
    assert all(isinstance(outcomes[i], SerializationError) for i in failed)
    assert len(await good.list_packages()) == 450


async def test_a_cancelled_caller_does_not_lose_its_neighbours_calls(server: LocalServer) -> None:
    async with RedisPackageStore.from_url(server.url, namespace=fresh_namespace()) as store:
        for round_ in range(20):
            tasks = [
                asyncio.create_task(store.put_package(pkg("t", f"{round_}-{i}", n=i)))
                for i in range(200)
            ]
            await asyncio.sleep(0)
            for task in tasks[::3]:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            kept = {f"{round_}-{i}" for i, o in enumerate(outcomes) if o is None}
            listed = {r.content_hash for r in await store.list_packages()}
            assert kept <= listed


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


async def test_unreachable_server_fails_within_the_timeout() -> None:
    with LocalServer() as doomed:
        url = doomed.url
    store = RedisPackageStore.from_url(
        url, namespace=fresh_namespace(), timeout=0.5, retry_budget=1.0
    )
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        await store.get_package_route("order")
    assert 0.5 < time.monotonic() - started < 0.5 + 1.0 + 1.0  # it retried, then gave up
    assert isinstance(caught.value, StoreError)
    await store.aclose()


async def test_a_silent_server_fails_within_the_timeout(server: LocalServer) -> None:
    async with RedisPackageStore.from_url(
        server.url, namespace=fresh_namespace(), timeout=0.3, retry_budget=0.4
    ) as store:
        blocker = Redis.from_url(server.url)
        await blocker.client_pause(1500, all=True)  # the server stops answering anyone
        started = time.monotonic()
        with pytest.raises(BackendError):
            await store.put_package(pkg("order", "h1"))
        assert time.monotonic() - started < 0.3 + 0.4 + 0.5  # last try, budget, slack
        await blocker.client_unpause()
        await store.put_package(pkg("order", "h1"))
        assert await store.get_package_route("order") == "h1"
        await blocker.aclose()


async def test_no_password_in_errors_or_repr() -> None:
    secret = "s3cret-Pa55"
    with LocalServer(settings={"requirepass": "the-real-one"}) as locked:
        bad = RedisPackageStore.from_url(
            f"redis://:{secret}@127.0.0.1:{locked.port}", namespace=fresh_namespace()
        )
        assert secret not in repr(bad)
        with pytest.raises(BackendError) as caught:
            await bad.put_package(pkg("order", "h1"))
        assert secret not in str(caught.value)
        assert secret not in repr(caught.value.__cause__)
        await bad.aclose()
        good = RedisPackageStore.from_url(
            f"redis://:the-real-one@127.0.0.1:{locked.port}", namespace=fresh_namespace()
        )
        await good.put_package(pkg("order", "h1"))
        assert "the-real-one" not in repr(good)
        await good.aclose()
    with pytest.raises(ValueError) as bad_url:
        RedisPackageStore.from_url(f"http://:{secret}@127.0.0.1:1")
    assert secret not in str(bad_url.value)


async def test_aclose_leaves_a_given_client_open(client: Redis) -> None:
    async with RedisPackageStore(client, namespace=fresh_namespace()) as store:
        await store.put_package(pkg("order", "h1"))
    assert await client.ping()


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


async def test_a_call_rides_out_a_short_outage_within_its_retry_budget() -> None:
    with LocalServer(settings={"appendonly": "yes"}) as flaky:
        async with RedisPackageStore.from_url(
            flaky.url, namespace=fresh_namespace(), timeout=1.0, retry_budget=10.0
        ) as store:
            await store.put_package(pkg("order", "h1"))
            flaky.stop()
            restart = asyncio.get_running_loop().call_later(0.5, flaky.start)
            await store.put_package(pkg("order", "h2", n=1))  # sent while the server is down
            assert restart.when() <= asyncio.get_running_loop().time()
            assert [r.content_hash for r in await store.list_packages()] == ["h1", "h2"]
            assert await store.get_package_route("order") == "h2"


@pytest.mark.parametrize("cache_routes", [False, True])
@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_client_of_either_protocol_keeps_the_whole_contract(
    valkey_server: LocalServer, protocol: int, cache_routes: bool
) -> None:
    # Replies, and a route cache's messages, are read differently in RESP2 and RESP3.
    await run_package_store_suite(
        lambda: RedisPackageStore(
            Redis.from_url(valkey_server.url, protocol=protocol),
            namespace=fresh_namespace(),
            cache_routes=cache_routes,
        )
    )


async def test_connections_killed_mid_burst_lose_no_call(server: LocalServer) -> None:
    # Batches are pipelined several deep on each connection; when the server drops the
    # connections, everything in flight on them is sent again, and every call completes.
    killer = Redis.from_url(server.url)
    async with RedisPackageStore.from_url(
        server.url, namespace=fresh_namespace(), timeout=2.0, retry_budget=10.0
    ) as store:
        await store.put_package(pkg("t", "warm"))
        records = [pkg(f"t{i % 5}", f"h{i:05d}", bytes(2048), i) for i in range(6000)]
        puts = asyncio.gather(*(store.put_package(r) for r in records))
        killed = 0
        for _ in range(3):
            await asyncio.sleep(0.01)
            killed += await killer.client_kill_filter(_type="normal", skipme=True)
        await puts
        assert killed > 0
        listed = {r.content_hash for r in await store.list_packages()}
        assert listed >= {r.content_hash for r in records}
    await killer.aclose()


async def test_closing_the_store_fails_the_calls_still_waiting(server: LocalServer) -> None:
    store = RedisPackageStore.from_url(server.url, namespace=fresh_namespace())
    calls = [asyncio.ensure_future(store.put_package(pkg("t", f"h{i}", n=i))) for i in range(3000)]
    await asyncio.sleep(0)
    await store.aclose()
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    assert all(o is None or isinstance(o, BackendError) for o in outcomes)
    assert any(isinstance(o, BackendError) for o in outcomes)
    with pytest.raises(BackendError, match="closed"):
        await store.put_package(pkg("t", "late"))


async def test_a_full_batch_reaches_the_server_before_the_tasks_behind_it_start(
    server: LocalServer,
) -> None:
    # The call that fills a batch sends it from its own task. A probe among the tasks that
    # gather starts later blocks the event loop and polls the server on a connection of its
    # own: the first batch must already be there, though no reply has been read yet.
    namespace = fresh_namespace()
    keys = Keyspace(namespace)
    seen: list[int] = []

    async def probe() -> None:
        with redis.Redis(port=server.port) as sync:
            for _ in range(200):  # at most about two seconds
                seen.append(int(sync.zcard(keys.index)))
                if seen[-1] >= 256:
                    return
                time.sleep(0.01)

    async with RedisPackageStore.from_url(server.url, namespace=namespace) as store:
        await store.put_package(pkg("t", "warm"))  # the first connection is open
        calls = [store.put_package(pkg("t", f"h{i}", n=i)) for i in range(600)]
        await asyncio.gather(*calls[:400], probe(), *calls[400:])
        assert seen[-1] >= 256
        assert len(await store.list_packages()) == 601


@pytest.mark.parametrize("password", ["p", "pass", "word-"])
async def test_a_short_password_is_redacted_without_mangling_the_message(password: str) -> None:
    with LocalServer(settings={"requirepass": "the-right-one"}) as server:
        url = f"redis://:{password}@127.0.0.1:{server.port}"
        async with RedisPackageStore.from_url(url, timeout=2.0, retry_budget=0) as store:
            with pytest.raises(BackendError) as raised:
                await store.get_package_route("order")
    message = str(raised.value)
    assert "password" in message.lower(), message  # the server's words, whole
    assert f" {password} " not in f" {message} " and f":{password}@" not in message


async def test_a_write_after_a_restart_on_empty_data_loads_the_library_again() -> None:
    # The restart closes every connection: the pipeliner's and the pooled one the first
    # load used. The second load meets that closed connection first, and tries again.
    with LocalServer() as server:
        async with RedisPackageStore.from_url(server.url, namespace=fresh_namespace()) as store:
            await store.put_package(pkg("order", "h1"))
            for i in range(3):
                server.stop()
                server.start()  # no persistence: the data and the library are gone
                await store.put_package(pkg("order", f"h{i + 2}"))
                assert await store.get_package_route("order") == f"h{i + 2}"
