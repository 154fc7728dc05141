"""The server going backwards: a flush, a restart without the data, an older snapshot.
Every cache converges on what the server holds, without a write, and a watch is given
what changed.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kvstore import PackageRouteRecord, RedisPackageStore
from kvstore.server_process import LocalServer

from .conftest import BACKENDS, Backend, fresh_namespace
from .support import VISIBLE_WITHIN, eventually, next_routes
from .topology import server_binary

# A cache reads the server's version every health interval; a reset that no write
# follows shows within about two of them, a restart adds the reconnection.
CONVERGES_WITHIN = 5.0
HEALTH = 0.1


class ResettableServer:
    """A server of the test's own (or a fakeredis server) whose data the test resets.

    ``how`` is ``flushdb``, ``empty-restart`` (a server without persistence restarts
    empty), ``older-snapshot`` (it restarts from an RDB file saved earlier) or
    ``older-snapshot-live`` (it loads that file with ``DEBUG RELOAD``, connections and
    subscriptions kept, as a failover to a lagging replica would look to a proxy's clients).
    """

    def __init__(self, backend: str, how: str) -> None:
        self.how = how
        self.namespace = fresh_namespace()
        self.server: LocalServer | None = None
        if backend != "fakeredis":
            debug = {"enable-debug-command": "yes"}
            self.server = LocalServer(server_binary(backend), settings=debug).start()
        self.backend = Backend(backend, None if self.server is None else self.server.url)
        self.stores: list[RedisPackageStore] = []

    def store(self, **options: Any) -> RedisPackageStore:
        store = self.backend.store(self.namespace, **options)
        self.stores.append(store)
        return store

    async def admin(self, *command: Any) -> Any:
        client = self.backend.client()
        try:
            return await client.execute_command(*command)  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()

    @property
    def _dump(self) -> Path:
        assert self.server is not None
        return self.server.data_dir / "dump.rdb"

    async def save_point(self) -> None:
        """Keep the data as it is now, for an ``older-snapshot`` reset to bring back."""
        if self.how.startswith("older-snapshot"):
            await self.admin("SAVE")
            shutil.copy(self._dump, self._dump.with_name("older.rdb"))

    async def reset(self) -> None:
        """The server's data goes back. Blocking, so no cache notices until it is done."""
        if self.how == "flushdb":
            await self.admin("FLUSHDB")
            return
        assert self.server is not None
        if self.how == "older-snapshot-live":
            shutil.copy(self._dump.with_name("older.rdb"), self._dump)
            await self.admin("DEBUG", "RELOAD", "NOSAVE")
            return
        self.server.stop()
        self._dump.unlink(missing_ok=True)
        if self.how == "older-snapshot":
            shutil.copy(self._dump.with_name("older.rdb"), self._dump)
        self.server.start()

    async def aclose(self) -> None:
        for store in self.stores:
            await store.aclose()
        if self.server is not None:
            self.server.stop()
            self.server.remove_data()


# On a server of the test's own, each reset is slow; a flush of fakeredis is not.
RESET_CASES = [
    pytest.param(
        (backend, how),
        id=f"{how}-{backend}",
        marks=[] if backend == "fakeredis" else [pytest.mark.slow],
    )
    for how in ["flushdb", "empty-restart", "older-snapshot", "older-snapshot-live"]
    for backend in BACKENDS
    if backend != "fakeredis" or how == "flushdb"  # fakeredis has no restart
]


@pytest.fixture(params=RESET_CASES)
async def resettable(request: pytest.FixtureRequest) -> AsyncIterator[ResettableServer]:
    server = ResettableServer(*request.param)
    yield server
    await server.aclose()


async def fill_then_reset(
    server: ResettableServer, *others: RedisPackageStore
) -> tuple[RedisPackageStore, RedisPackageStore]:
    """Two caching stores, a writer and a reader; 40 route writes, which the reader and
    the caching stores ``others`` have all applied; then the reset.

    An older snapshot is saved after the tenth write of each type: it brings back
    ``order -> h9`` and ``spare -> s9``.
    """
    writer = server.store(cache_routes=True, route_health_interval=HEALTH)
    reader = server.store(cache_routes=True, route_health_interval=HEALTH)
    for store in (writer, reader):
        assert await store.route_cache_ready(VISIBLE_WITHIN)
    for i in range(30):
        await writer.put_package_route("order", f"h{i}")
        if i < 10:
            await writer.put_package_route("spare", f"s{i}")
        if i == 9:
            await server.save_point()

    async def caught_up() -> bool:
        for store in (reader, *others):
            ready = await store.route_cache_ready(0)
            if not (ready and await store.get_package_route("order") == "h29"):
                return False
        return True

    assert await eventually(caught_up)
    await server.reset()
    return writer, reader


async def converges(store: RedisPackageStore, truth: RedisPackageStore) -> bool:
    """Whether ``store`` answers from memory, within the bound, what the server holds."""

    async def agrees() -> bool:
        server = {r.workflow_type: r.content_hash for r in await truth.list_package_routes()}
        found = {t: await store.get_package_route(t) for t in ("order", "spare")}
        return await store.route_cache_ready(0) and found == {t: server.get(t) for t in found}

    return await eventually(agrees, CONVERGES_WITHIN)


async def test_after_a_reset_every_cache_converges_on_the_server_without_a_write(
    resettable: ResettableServer,
) -> None:
    writer, reader = await fill_then_reset(resettable)
    truth = resettable.store()
    expected = "h9" if resettable.how.startswith("older-snapshot") else None
    assert await truth.get_package_route("order") == expected
    for store in (writer, reader):
        assert await converges(store, truth)
        assert await store.get_package_route("order") == expected


async def test_after_a_reset_a_write_is_seen_by_its_writer_at_once_and_by_every_cache(
    resettable: ResettableServer,
) -> None:
    writer, reader = await fill_then_reset(resettable)
    await writer.put_package_route("order", "new")
    assert await writer.get_package_route("order") == "new", "its own acknowledged write"
    truth = resettable.store()
    for store in (writer, reader):
        assert await converges(store, truth)
        assert await store.get_package_route("order") == "new"
    await writer.put_package_route("spare", "newer")
    assert await writer.get_package_route("spare") == "newer"
    assert await converges(reader, truth)
    assert await reader.get_package_route("spare") == "newer"


async def test_after_a_reset_a_watch_is_given_the_routes_that_changed(
    resettable: ResettableServer,
) -> None:
    watcher = resettable.store(cache_routes=True, route_health_interval=HEALTH)
    assert await watcher.route_cache_ready(VISIBLE_WITHIN)
    async with watcher.watch_routes() as watch:
        writer, _ = await fill_then_reset(resettable, watcher)
        await next_routes(watch, 40)  # every write before the reset
        await writer.put_package_route("order", "new")
        # The reload finds what changed against what the watch was told: "order"
        # (h9 again after an older snapshot, unless the new write is already in it);
        # "spare" is s9 there or has no route, which a watch does not yield.
        allowed = {PackageRouteRecord("order", "new")}
        if resettable.how.startswith("older-snapshot"):
            allowed.add(PackageRouteRecord("order", "h9"))
        seen = [await next_routes(watch, 1)]
        while seen[-1] != [PackageRouteRecord("order", "new")]:
            assert len(seen) < 3, seen
            seen.append(await next_routes(watch, 1))
        assert {r for (r,) in seen} <= allowed, seen
