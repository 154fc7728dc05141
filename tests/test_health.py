"""``ping`` and ``health``: what a readiness probe asks of a store, on fakeredis and on
real servers that stop answering (SIGSTOP) or die (SIGKILL)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest

from kvstore import BackendError, RedisPackageStore, StoreHealth
from kvstore.server_process import LocalServer, free_port

from .conftest import fresh_namespace
from .support import password_server, pkg, url_of

PASSWORD = "pw-never-shown-91ab"


@pytest.fixture
def own_server(binary: Path) -> Iterator[LocalServer]:
    """A server of the test's own (each kind in turn), which it may stop or kill."""
    with password_server(PASSWORD, binary) as running:
        yield running


async def test_a_new_store_has_reached_nothing_yet() -> None:
    async with RedisPackageStore(fakeredis.FakeAsyncRedis(), namespace=fresh_namespace()) as store:
        assert store.health() == StoreHealth(
            connected=False, route_cache_live=None, last_error=None, library_loaded=None
        )


async def test_health_is_a_frozen_record() -> None:
    async with RedisPackageStore(fakeredis.FakeAsyncRedis()) as store:
        with pytest.raises(dataclasses.FrozenInstanceError):
            store.health().connected = True  # type: ignore[misc]


async def test_a_ping_and_a_write_show_the_server_reached_and_the_library_loaded() -> None:
    async with RedisPackageStore(
        fakeredis.FakeAsyncRedis(), namespace=fresh_namespace(), cache_routes=True
    ) as store:
        await store.ping()
        assert store.health().connected
        assert store.health().library_loaded is None  # no write yet
        await store.put_package(pkg())
        assert await store.route_cache_ready()
        assert store.health() == StoreHealth(
            connected=True, route_cache_live=True, last_error=None, library_loaded=True
        )


async def test_a_server_that_cannot_be_reached_shows_not_connected_with_its_error() -> None:
    server = fakeredis.FakeServer()
    async with RedisPackageStore(
        fakeredis.FakeAsyncRedis(server=server), namespace=fresh_namespace(), retry_budget=0
    ) as store:
        await store.ping()
        server.connected = False
        with pytest.raises(BackendError):
            await store.ping()
        health = store.health()
        assert not health.connected
        assert health.last_error is not None and "ConnectionError" in health.last_error
        server.connected = True
        await store.ping()
        assert store.health().connected and store.health().last_error is None


async def test_a_library_the_credential_cannot_load_shows_as_not_loaded() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    async with RedisPackageStore(client, namespace=fresh_namespace()) as store:
        await store.put_package(pkg())
        assert store.health().library_loaded is True
        await client.execute_command("FUNCTION", "FLUSH")  # type: ignore[no-untyped-call]

        async def refuse() -> list[str]:
            raise BackendError("may not load")

        store.load_library = refuse  # type: ignore[method-assign]
        with pytest.raises(BackendError):
            await store.put_package(pkg())
        assert store.health().library_loaded is False


async def test_a_stopped_server_fails_the_ping_within_the_timeout_and_shows_why(
    own_server: LocalServer,
) -> None:
    async with RedisPackageStore.from_url(
        url_of(own_server, PASSWORD), namespace=fresh_namespace(), timeout=0.3, retry_budget=30.0
    ) as store:
        await store.ping()
        assert own_server.pid is not None
        os.kill(own_server.pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(BackendError, match="PING"):
                await store.ping()
            assert loop.time() - began < 5.0  # the timeout, not the 30 s budget
            health = store.health()
            assert not health.connected
            assert health.last_error is not None and "Timeout" in health.last_error
            assert PASSWORD not in health.last_error
        finally:
            os.kill(own_server.pid, signal.SIGCONT)
        await store.ping()
        assert store.health().connected and store.health().last_error is None


async def test_a_killed_server_shows_not_connected_with_the_connection_error(
    own_server: LocalServer,
) -> None:
    async with RedisPackageStore.from_url(
        url_of(own_server, PASSWORD), namespace=fresh_namespace(), timeout=0.5, retry_budget=0.2
    ) as store:
        await store.put_package(pkg())
        own_server.kill()
        with pytest.raises(BackendError):
            await store.ping()
        health = store.health()
        assert not health.connected
        assert health.last_error is not None
        assert health.last_error.startswith(f"127.0.0.1:{own_server.port}: ")
        assert PASSWORD not in health.last_error
        assert health.library_loaded is True  # as the last write found it


async def test_a_refused_connection_fails_the_ping_saying_so_not_that_it_waited() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}"
    async with RedisPackageStore.from_url(url, namespace=fresh_namespace(), timeout=0.3) as store:
        with pytest.raises(BackendError, match="ConnectionError: Error 111 connecting") as raised:
            await store.ping()
        assert "PING" not in str(raised.value) and PASSWORD not in str(raised.value)
        health = store.health()
        assert health.last_error == str(raised.value)
        assert not health.connected
