"""The kvstore library of server functions: loaded once when a server lacks it, again
when the server lost it, on the store's own connections, and named by its digest so
that two releases share a server."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from kvstore import BackendError, PackageRecord, RedisPackageStore
from kvstore.redis.scripts import LIBRARY, Library, build_library, load_library
from kvstore.server_process import LocalServer

from .conftest import SERVERS, Backend, fresh_namespace
from .support import as_map, pkg


async def library_names(client: Redis) -> set[bytes]:
    listed = await client.function_list()
    return {as_map(entry)[b"library_name"] for entry in listed}


def build_library_with_extra_line(folder: Path) -> Library:
    """The library another release would have: the same files, one line more."""
    shutil.copytree(Path(__file__).resolve().parent.parent / "lua", folder)
    (folder / "library.lua").write_text((folder / "library.lua").read_text() + "\n-- v2\n")
    return build_library(folder)


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


@pytest.mark.slow
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


# A library of this release's name is trusted only once its code is this release's.


IMPOSTOR_PUTS = (
    "put_package",
    "put_package_inline",
    "put_package_blob",
    "put_package_digest",
    "put_blob",
)


def impostor_text(functions: tuple[str, ...] = IMPOSTOR_PUTS) -> bytes:
    """A library of this release's name whose puts (of either layout) only touch the
    routes: the put it answers stores no package."""
    # KEYS[3] is the routes of every put of a row; the blob's put has one key.
    body = "if #keys >= 3 then redis.call('HSET', keys[3], 'impostor', 'h0') end return 1"
    registered = "".join(
        f"redis.register_function('{LIBRARY.name}_{f}', function(keys, args) {body} end)\n"
        for f in functions
    )
    return f"#!lua name={LIBRARY.name}\n{registered}".encode()


async def replace_library(client: Redis, text: bytes) -> None:
    """``FUNCTION LOAD REPLACE`` of ``text``, sent as the bytes it is."""
    await client.execute_command("FUNCTION", "LOAD", "REPLACE", text)  # type: ignore[no-untyped-call]


def mismatch(server: str, missing: str | None = None) -> str:
    lacks = "" if missing is None else f", and has no function {missing}"
    return (
        f"{server}: the library {LIBRARY.name} there is not this release's kvstore library "
        f"(its code differs{lacks}), so no write uses it; remove it with `FUNCTION DELETE "
        f"{LIBRARY.name}`, then run `kvstore setup --url URL`"
    )


async def test_a_library_of_this_release_s_name_with_other_code_fails_every_write(
    client: Redis,
) -> None:
    await client.function_flush()
    await replace_library(client, impostor_text())
    try:
        async with RedisPackageStore(client, namespace=fresh_namespace()) as store:
            for write in (
                store.put_package(pkg("order", "h1")),
                store.put_package_route("order", "h1"),
                store.delete_package("order", "h1"),
            ):
                with pytest.raises(BackendError) as raised:
                    await write
                assert str(raised.value) == mismatch(store.server)
            assert await store.list_packages() == []
            assert await store.list_package_routes() == []
            assert store.health().library_loaded is False
            # `kvstore setup` reports it rather than "was loaded already".
            with pytest.raises(BackendError) as raised:
                await store.load_library()
            assert str(raised.value) == mismatch(store.server)
            with pytest.raises(BackendError) as raised:
                await load_library(client)
            assert str(raised.value) == mismatch(store.server)
            # What the message says to do; the same store then writes.
            await client.function_delete(LIBRARY.name)
            assert await store.load_library() == [f"{store.server}: loaded {LIBRARY.name}"]
            await store.put_package(pkg("order", "h1"))
            assert [r.content_hash for r in await store.list_packages()] == ["h1"]
            assert store.health().library_loaded is True
    finally:
        await client.function_flush()
        await load_library(client)


async def test_a_library_replaced_after_the_check_fails_a_call_of_a_function_it_lacks(
    client: Redis,
) -> None:
    # Checked once per store, then trusted: a library replaced under it is seen when a
    # call finds its function missing, as the library's error naming the function.
    async with RedisPackageStore(client, namespace=fresh_namespace()) as store:
        await store.put_package(pkg("order", "h1"))
        await replace_library(client, impostor_text())
        try:
            with pytest.raises(BackendError) as raised:
                await store.put_package_route("order", "h1")
            assert str(raised.value) == mismatch(
                store.server, missing=LIBRARY.functions["put_route"].name
            )
            with pytest.raises(BackendError) as raised:
                await store.put_package(pkg("order", "h2", n=1))
            assert str(raised.value) == mismatch(store.server)
        finally:
            await replace_library(client, LIBRARY.text)
        await store.load_library()
        await store.put_package_route("order", "h1")


async def test_the_library_is_checked_once_per_store_and_after_each_load(client: Redis) -> None:
    await load_library(client)
    async with RedisPackageStore(client, namespace=fresh_namespace()) as store:
        sent: list[Any] = []
        send = store._calls.send_one

        async def counted(command: Any) -> Any:
            sent.append(command[:2])
            return await send(command)

        store._calls.send_one = counted  # type: ignore[method-assign]
        for i in range(5):
            await store.put_package(pkg("order", f"h{i}", n=i))
        assert sent == [("FUNCTION", "LIST")]
        await client.function_flush()
        await store.put_package(pkg("order", "h9", n=9))
        assert sent == [("FUNCTION", "LIST"), ("FUNCTION", "LOAD")]
        await client.function_flush()
        await replace_library(client, LIBRARY.text)
        await store.load_library()  # "already exists": its code is checked
        assert sent[2:] == [("FUNCTION", "LOAD"), ("FUNCTION", "LIST")]


# A storm of FUNCTION FLUSH and FUNCTION DELETE under many puts in flight: each call loads
# the library and sends itself again as often as the library goes away, within its retry
# budget, and then fails with the library's error, never a raw "Function not found".

EXHAUSTED = re.compile(
    rf"the function {LIBRARY.name}_put_package of the kvstore library {LIBRARY.name} was "
    r"missing again after each of \d+ loads in [\d.]+ s: something removes the library "
    r"\(FUNCTION FLUSH or FUNCTION DELETE\) as often as it is loaded"
)
STORM_SECONDS = 1.0
WRITERS = 20


async def storm(
    raw: Redis, store: RedisPackageStore, between: float, restart: Callable[[], None] | None = None
) -> tuple[list[PackageRecord], list[BackendError]]:
    """``WRITERS`` tasks putting packages one after another while ``raw`` deletes the
    library (FUNCTION FLUSH and FUNCTION DELETE by turns) every ``between`` seconds for
    ``STORM_SECONDS`` (``restart``: the server restarted halfway): the puts acknowledged,
    and the errors raised. Any other exception fails the test."""
    loop = asyncio.get_running_loop()
    end = loop.time() + STORM_SECONDS
    done = asyncio.Event()
    acknowledged: list[PackageRecord] = []
    refused: list[BackendError] = []

    async def writer(w: int) -> None:
        for i in range(100_000):
            if done.is_set():
                return
            record = pkg(f"t{w}", f"h{i}", n=i)
            try:
                await store.put_package(record)
            except BackendError as exc:
                refused.append(exc)
            else:
                acknowledged.append(record)

    async def remover() -> None:
        restarted = restart is None
        for k in range(100_000):
            now = loop.time()
            if now > end:
                break
            if not restarted and now > end - STORM_SECONDS / 2:
                await asyncio.to_thread(restart)  # type: ignore[arg-type]
                restarted = True
                continue
            with contextlib.suppress(ResponseError, ConnectionError):  # none to delete
                if k % 2:
                    await raw.function_flush()
                else:
                    await raw.function_delete(LIBRARY.name)
            await asyncio.sleep(between)
        done.set()

    await asyncio.gather(remover(), *(writer(w) for w in range(WRITERS)))
    return acknowledged, refused


async def stored(store: RedisPackageStore) -> set[tuple[str, str]]:
    return {(r.workflow_type, r.content_hash) async for r in store.iter_packages()}


# A second or so each: fakeredis in the fast subset, the real servers in the full run.
@pytest.mark.parametrize(
    "backend",
    ["fakeredis", *(pytest.param(name, marks=pytest.mark.slow) for name in SERVERS)],
    indirect=True,
)
async def test_puts_hold_through_a_storm_of_function_flushes(backend: Backend) -> None:
    async with backend.store(retry_budget=2.0) as store, backend.client() as raw:
        await store.put_package(pkg("first", "h"))
        acknowledged, refused = await storm(raw, store, 0.001)
        await load_library(raw)
        assert acknowledged, "no put was acknowledged during the storm"
        held = await stored(store)
        assert [r for r in acknowledged if (r.workflow_type, r.content_hash) not in held] == []
        assert [str(e) for e in refused if not EXHAUSTED.search(str(e))] == []


@pytest.mark.slow
async def test_puts_hold_through_a_storm_of_function_flushes_and_a_restart() -> None:
    # Persisted, so a restart keeps every acknowledged put (and the library, if it is
    # loaded at that moment).
    with LocalServer(settings={"appendonly": "yes", "appendfsync": "always"}) as server:

        def restart() -> None:
            server.stop()
            server.start()

        async with (
            RedisPackageStore.from_url(
                server.url, namespace=fresh_namespace(), retry_budget=5.0
            ) as store,
            Redis.from_url(server.url) as raw,
        ):
            acknowledged, refused = await storm(raw, store, 0.02, restart)
            await load_library(raw)
            held = await stored(store)
            assert [r for r in acknowledged if (r.workflow_type, r.content_hash) not in held] == []
            assert [str(e) for e in refused if not EXHAUSTED.search(str(e))] == []


async def test_a_library_removed_as_often_as_it_is_loaded_fails_the_put_with_its_error(
    client: Redis,
) -> None:
    async with RedisPackageStore(client, namespace=fresh_namespace(), retry_budget=0.3) as store:
        await store.put_package(pkg("order", "h0"))
        loads = 0
        load = store.load_library

        async def load_then_remove() -> list[str]:
            nonlocal loads
            loads += 1
            said = await load()
            await client.function_flush()
            return said

        store.load_library = load_then_remove  # type: ignore[method-assign]
        await client.function_flush()
        with pytest.raises(BackendError) as raised:
            await store.put_package(pkg("order", "h1"))
        assert loads > 1  # loaded again after the first miss, until the budget was spent
        assert str(raised.value) == (
            f"{store.server}: the function {LIBRARY.name}_put_package_inline of the kvstore "
            f"library {LIBRARY.name} was missing again after each of {loads} loads in 0.3 s: "
            "something removes the library (FUNCTION FLUSH or FUNCTION DELETE) as often as it is "
            "loaded, or another library of its name without that function is loaded where "
            "this credential may not check its code (FUNCTION LIST); nothing was written"
        )
        store.load_library = load  # type: ignore[method-assign]
        await store.put_package(pkg("order", "h1"))
        assert [r.content_hash for r in await store.list_packages()] == ["h0", "h1"]


async def test_a_put_whose_library_load_stalls_ends_at_its_hard_end(client: Redis) -> None:
    # retry_budget + timeout bounds a call whatever it waits on: here a load of the
    # library that never ends (a server that stalls on FUNCTION LOAD, say).
    async with RedisPackageStore(
        client, namespace=fresh_namespace(), retry_budget=0.2, timeout=0.3
    ) as store:
        await store.put_package(pkg("order", "h0"))
        load = store.load_library

        async def stalled() -> list[str]:
            await asyncio.sleep(1.5)  # far past the put's hard end
            return await load()

        store.load_library = stalled  # type: ignore[method-assign]
        await client.function_flush()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BackendError, match=r"no reply within 0\.5 s, retries included"):
            await store.put_package(pkg("order", "h1"))
        assert loop.time() - started < 0.5 + 0.9  # the hard end, with slack, not the stall
        store.load_library = load  # type: ignore[method-assign]
        await asyncio.sleep(1.5)  # the stalled load ends (one load runs at a time)
        await store.put_package(pkg("order", "h1"))
