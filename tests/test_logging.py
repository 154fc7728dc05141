"""What the store says through ``logging.getLogger("kvstore")``: retries, spent budgets,
the route cache going down and coming back, a foreign layout; never a password or an
archive."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import fakeredis
import pytest
from redis.asyncio import Redis

from kvstore import BackendError, RedisPackageStore, SerializationError
from kvstore.redis.keyspace import Keyspace
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import password_server, pkg, url_of
from .test_pipeline import FakeClient, echo, pipeliner
from .topology import eventually

PASSWORD = "pw-never-logged-5e1f"
ARCHIVE = b"archive-never-logged-77c2"


@pytest.fixture
def guarded_server() -> Iterator[LocalServer]:
    """A server of the test's own, with a password, which the test may stop or kill."""
    with password_server(PASSWORD) as running:
        yield running


def said(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records)


def assert_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    text = said(caplog)
    assert PASSWORD not in text
    assert ARCHIVE.decode() not in text


async def test_a_retry_is_logged_at_debug_and_a_spent_budget_at_warning(
    guarded_server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore")
    async with RedisPackageStore.from_url(
        url_of(guarded_server, PASSWORD), namespace=fresh_namespace(), timeout=0.2, retry_budget=0.6
    ) as store:
        await store.put_package(pkg(archive=ARCHIVE))
        assert guarded_server.pid is not None
        os.kill(guarded_server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BackendError):
                await store.put_package(pkg("wf", "h2", ARCHIVE))
        finally:
            os.kill(guarded_server.pid, signal.SIGCONT)
    pipeline = [r for r in caplog.records if r.name == "kvstore.redis.pipeline"]
    assert any(r.levelno == logging.DEBUG and "retried" in r.getMessage() for r in pipeline)
    gave_up = [r for r in pipeline if r.levelno == logging.WARNING]
    assert gave_up and all("retry budget spent" in r.getMessage() for r in gave_up)
    assert "Timeout" in gave_up[0].getMessage()
    assert_no_secret(caplog)


async def test_thousands_of_calls_failing_together_log_a_few_lines_not_thousands(
    guarded_server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with RedisPackageStore.from_url(
        url_of(guarded_server, PASSWORD), namespace=fresh_namespace(), timeout=0.2, retry_budget=0.2
    ) as store:
        await store.ping()
        assert guarded_server.pid is not None
        os.kill(guarded_server.pid, signal.SIGSTOP)
        try:
            outcomes = await asyncio.gather(
                *(store.get_package("wf", f"h{i}") for i in range(2000)), return_exceptions=True
            )
        finally:
            os.kill(guarded_server.pid, signal.SIGCONT)
    assert all(isinstance(o, BackendError) for o in outcomes)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 20, len(warnings)


async def test_calls_expiring_together_in_the_queue_say_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A connection that sends nothing (the pipeliner's fake): every call waits in the
    # queue until its hard end, and they all reach it together.
    client = FakeClient()
    pipe = pipeliner(client, timeout=0.1, retry_budget=0.2, max_units=4)
    client.connection_pool.read_gate.clear()
    client.connection_pool.send_gate.clear()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(pipe.run(echo(str(i))) for i in range(2000)), return_exceptions=True),
        10,
    )
    await pipe.aclose()
    assert all(isinstance(o, BackendError) for o in outcomes)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 3, len(warnings)
    assert any("gave up at their hard end" in r.getMessage() for r in warnings)


async def test_a_call_without_trouble_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore")
    async with RedisPackageStore(fakeredis.FakeAsyncRedis(), namespace=fresh_namespace()) as store:
        await store.put_package(pkg(archive=ARCHIVE))
        await store.list_packages()
        await store.ping()
    assert [r for r in caplog.records if r.name.startswith("kvstore")] == []


async def test_the_route_cache_says_it_went_down_came_back_and_reloaded(
    guarded_server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvstore")
    async with RedisPackageStore.from_url(
        url_of(guarded_server, PASSWORD),
        namespace=fresh_namespace(),
        cache_routes=True,
        route_health_interval=0.2,
    ) as store:
        assert await store.route_cache_ready()
        await store.put_package(pkg(archive=ARCHIVE))
        async with Redis.from_url(url_of(guarded_server, PASSWORD)) as raw:
            await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]

        def live_again() -> bool:
            return sum("is live" in r.getMessage() for r in caplog.records) >= 2

        await eventually(live_again, within=10.0, what="the cache came back")
    cache = [r for r in caplog.records if r.name == "kvstore.redis.route_cache"]
    down = [r for r in cache if "lost its subscription" in r.getMessage()]
    assert down and down[0].levelno == logging.WARNING
    live = [r for r in cache if "is live" in r.getMessage()]
    assert [r.levelno for r in live] == [logging.INFO, logging.INFO]
    assert cache.index(down[0]) < cache.index(live[1])  # down, then back
    assert_no_secret(caplog)


async def test_a_foreign_layout_is_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    client = fakeredis.FakeAsyncRedis()
    namespace = fresh_namespace()
    await client.set(Keyspace(namespace).format, b"999")
    async with RedisPackageStore(client, namespace=namespace) as store:
        with pytest.raises(SerializationError):
            await store.list_package_routes()
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.name == "kvstore.redis.store"
    assert "b'999'" in error.getMessage()


async def test_a_closed_store_spends_no_budget_and_says_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore")
    store = RedisPackageStore(fakeredis.FakeAsyncRedis(), namespace=fresh_namespace())
    await store.aclose()
    with pytest.raises(BackendError):
        await asyncio.wait_for(store.ping(), 5.0)
    assert [r for r in caplog.records if r.name.startswith("kvstore")] == []


def test_an_application_that_configures_no_logging_sees_none() -> None:
    # Python prints unhandled warnings on stderr; a library's are the application's call.
    probe = (
        "import asyncio\n"
        "from kvstore import BackendError, RedisPackageStore\n"
        "async def main():\n"
        "    async with RedisPackageStore.from_url(\n"
        "        'redis://127.0.0.1:1', timeout=0.2, retry_budget=0.1\n"
        "    ) as store:\n"
        "        try:\n"
        "            await store.list_packages()\n"
        "        except BackendError:\n"
        "            print('failed')\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert (done.stdout, done.stderr) == ("failed\n", "")
