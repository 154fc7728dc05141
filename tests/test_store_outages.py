"""A server that is gone, silent or restarting: each call ends within its timeout and
retry budget, and one sent during a short outage rides it out."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from kvstore import BackendError, RedisPackageStore, StoreError
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import pkg

# Servers that are gone, paused or restarting, and calls that wait them out.
pytestmark = pytest.mark.slow


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
