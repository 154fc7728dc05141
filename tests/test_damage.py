"""Damage no write of the library leaves, made by hand on the server, reaches the caller
as ``SerializationError`` naming the key: never a raw error, never a value the contract
says cannot occur, and never a dead task."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from redis.asyncio import Redis

from kvstore import PackageRecord, RedisPackageStore, SerializationError, StoreError
from kvstore.redis.keyspace import Keyspace
from kvstore.tools.check import check_store

from .conftest import fresh_namespace
from .support import T0

# A routes field whose type or hash no write leaves: (field, value).
DAMAGED_ROUTES = [
    (b"empty-hash", b""),
    (b"nul-hash", b"h\x00i"),
    (b"", b"h1"),
    (b"nul\x00type", b"h1"),
    (b"not-utf8", b"\xff\xfe"),
]


@pytest.mark.parametrize(("field", "value"), DAMAGED_ROUTES)
async def test_a_damaged_route_raises_serialization_error_naming_the_key(
    client: Redis, field: bytes, value: bytes
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    await store.put_package(PackageRecord("order", "h1", b"zip", T0))
    routes = Keyspace(store.namespace).routes
    await client.hset(routes, field, value)
    with pytest.raises(SerializationError, match="routes"):
        await store.list_package_routes()
    if field and b"\x00" not in field:
        with pytest.raises(SerializationError, match="routes"):
            await store.get_package_route(field.decode("utf-8", "replace"))
    assert await store.get_package_route("order") == "h1"  # the sound routes still answer
    await store.aclose()


async def test_a_route_cache_over_a_damaged_route_serves_the_server_and_its_watch_lives(
    client: Redis,
) -> None:
    store = RedisPackageStore(
        client, namespace=fresh_namespace(), cache_routes=True, route_health_interval=0.1
    )
    await store.put_package(PackageRecord("order", "h1", b"zip", T0))
    await client.hset(Keyspace(store.namespace).routes, b"broken", b"h\x00")
    watch = store.watch_routes()
    # The cache cannot load a table holding damage: it is not live, and lookups go to
    # the server, which names the damage to the caller who asks for that route.
    assert not await store.route_cache_ready(timeout=0.5)
    with pytest.raises(SerializationError, match="broken"):
        await store.get_package_route("broken")
    assert await store.get_package_route("order") == "h1"
    # Repaired, the cache loads and the watch, alive all along, hands out the table.
    await client.hdel(Keyspace(store.namespace).routes, b"broken")
    assert await store.route_cache_ready(timeout=10)
    first = await asyncio.wait_for(anext(watch), 10)
    assert (first.workflow_type, first.content_hash) == ("order", "h1")
    await watch.aclose()
    await store.aclose()


class Impostor:
    """A server on loopback that speaks the protocol and answers every command with
    ``answer`` (``+OK``, nil, ...): what a proxy or a server that is not Redis might do."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readline()
                if not header:
                    break
                for _ in range(int(header[1:])):  # "*<n>", then n "$<len>" bulk strings
                    size = int((await reader.readline())[1:])
                    await reader.readexactly(size + 2)
                writer.write(self.answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("answer", [b"+OK\r\n", b"$-1\r\n", b"*-1\r\n", b":7\r\n"])
async def test_a_server_that_is_not_redis_fails_calls_with_the_librarys_errors(
    answer: bytes,
) -> None:
    async with Impostor(answer) as url:
        store = RedisPackageStore.from_url(url, timeout=2, retry_budget=0)
        writes = [
            store.put_package(PackageRecord("order", "h1", b"zip", T0)),
            store.put_package_route("order", "h1"),
            store.delete_package("order", "h1"),
        ]
        reads = [
            store.get_package("order", "h1"),
            store.get_package_route("order"),
            store.list_package_routes(),
            store.list_packages(),
            store.iter_package_heads().__anext__(),
        ]
        for write in writes:
            # Even an integer, what every function replies: the library's check before the
            # first write (FUNCTION LIST) gets no answer Redis gives.
            with pytest.raises(StoreError):
                await write
        for read in reads:
            # Anything but a raw error: a nil route or an empty listing may stand.
            with contextlib.suppress(StoreError, StopAsyncIteration):
                await read
        await store.aclose()


@pytest.mark.parametrize(
    "counter",
    [
        b"9223372036854775807",  # INCR would overflow
        b"18446744073709551616",  # not even a 64-bit integer
        b"9007199254740991",  # 2^53 - 1: its successor is no longer exact in a message
        b"007",
        b"+5",
        b"-0",
        b" 5",
        b"5.0",
        b"",
    ],
)
async def test_a_route_version_no_write_can_raise_refuses_the_write_and_check_says_so(
    client: Redis, counter: bytes
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    keys = Keyspace(store.namespace)
    await store.put_package(PackageRecord("order", "h1", b"zip", T0))
    await client.set(keys.route_version, counter)
    for write in (
        store.put_package(PackageRecord("order", "h2", b"zip", T0)),
        store.put_package_route("order", "h0"),
    ):
        with pytest.raises(SerializationError, match="route-version"):
            await write
    # Nothing of either write landed: no row, no index entry, the route where it was.
    assert await store.get_package("order", "h2") is None
    assert [r.content_hash for r in await store.list_packages()] == ["h1"]
    assert await store.get_package_route("order") == "h1"
    assert await client.get(keys.route_version) == counter
    report = await check_store(store)
    assert [f.kind for f in report.problems] == ["malformed-route-version"]
    await store.aclose()


@pytest.mark.parametrize("counter", [b"-5", b"0", b"9007199254740988"])
async def test_a_route_version_the_next_write_can_raise_is_sound(
    client: Redis, counter: bytes
) -> None:
    store = RedisPackageStore(client, namespace=fresh_namespace())
    keys = Keyspace(store.namespace)
    await client.set(keys.route_version, counter)
    await store.put_package(PackageRecord("order", "h1", b"zip", T0))
    await store.put_package_route("order", "h1")
    assert await client.get(keys.route_version) == b"%d" % (int(counter) + 2)
    assert (await check_store(store)).problems == []
    await store.aclose()
