"""Watching routes: the table, then every route write in the server's order, across a
lost subscription; a watch and the subscription end when the store closes.

Every test runs on fakeredis, on each real server, and on Valkey through a RESP2 client,
unless it names its servers.
"""

from __future__ import annotations

import asyncio

import pytest

from kvstore import PackageRouteRecord

from .conftest import SERVERS, WITH_RESP2, Backend, StoreFactory, backend_over, each
from .support import VISIBLE_WITHIN, eventually, next_routes, pkg

backend = backend_over(*WITH_RESP2)


async def test_watch_yields_the_table_then_every_route_write(stores: StoreFactory) -> None:
    writer, watcher = stores(cache_routes=True), stores(cache_routes=True)
    await writer.put_package_route("b-existing", "h0")
    await writer.put_package_route("a-existing", "h0")
    assert await watcher.route_cache_ready(VISIBLE_WITHIN)
    async with watcher.watch_routes() as watch:
        assert await next_routes(watch, 2) == [
            PackageRouteRecord("a-existing", "h0"),
            PackageRouteRecord("b-existing", "h0"),
        ]
        await writer.put_package(pkg("order", "h1"))
        await writer.put_package_with_routes(pkg("multi", "h2", n=1), ["billing", "order"])
        await writer.put_package_route("order", "h1")
        await watcher.put_package_route("own", "h3")  # the watcher's own write too
        assert await next_routes(watch, 6) == [
            PackageRouteRecord("order", "h1"),
            PackageRouteRecord("multi", "h2"),
            PackageRouteRecord("billing", "h2"),
            PackageRouteRecord("order", "h2"),
            PackageRouteRecord("order", "h1"),
            PackageRouteRecord("own", "h3"),
        ]


async def test_own_and_foreign_writes_in_a_burst_reach_a_watch_in_server_order(
    stores: StoreFactory,
) -> None:
    # The watcher knows its own writes' messages byte for byte and applies them
    # undecoded; interleaved with another store's, in bursts that arrive together,
    # every write must still come out as the server applied it.
    writer, watcher = stores(cache_routes=True), stores(cache_routes=True)
    assert await watcher.route_cache_ready(VISIBLE_WITHIN)
    async with watcher.watch_routes() as watch:
        expected: list[PackageRouteRecord] = []
        for i in range(40):
            own, other = f"typ\u00e9 {i % 3}", f"h\u00e4sh-{i}"
            await asyncio.gather(
                watcher.put_package_with_routes(pkg(own, other, n=i), ["\u6d41\u308c", own]),
                writer.put_package_route(own, f"foreign-{i}"),
            )
            if i % 2:
                await watcher.put_package_route("\u6d41\u308c", f"mine-{i}")
        seen = await next_routes(watch, 40 * 3 + 20)
        server = {r.workflow_type: r.content_hash for r in await writer.list_package_routes()}
        last: dict[str, str] = {}
        for record in seen:
            last[record.workflow_type] = record.content_hash
        assert last == server
        for workflow_type, content_hash in server.items():
            assert await watcher.get_package_route(workflow_type) == content_hash
        expected = [r for r in seen if r.content_hash.startswith("mine-")]
        assert [r.content_hash for r in expected] == [f"mine-{i}" for i in range(1, 40, 2)]


async def test_watch_made_before_the_cache_loads_starts_from_the_table(
    stores: StoreFactory,
) -> None:
    writer = stores()
    await writer.put_package_route("order", "h1")
    watcher = stores(cache_routes=True)
    watch = watcher.watch_routes()
    await writer.put_package_route("billing", "h2")
    seen = await next_routes(watch, 2)
    assert sorted(seen, key=lambda r: r.workflow_type) == [
        PackageRouteRecord("billing", "h2"),
        PackageRouteRecord("order", "h1"),
    ]
    await watch.aclose()


async def test_watch_catches_up_after_the_subscription_is_lost(
    stores: StoreFactory, backend: Backend
) -> None:
    if backend.name == "fakeredis":
        pytest.skip("acts behind the store's back with a real server's CLIENT commands")
    writer, watcher = stores(), stores(cache_routes=True)
    await writer.put_package_route("order", "h1")
    assert await watcher.route_cache_ready(VISIBLE_WITHIN)
    watch = watcher.watch_routes()
    assert await next_routes(watch, 1) == [PackageRouteRecord("order", "h1")]
    await backend.raw.client_kill_filter(_type="pubsub")
    await writer.put_package_route("order", "h2")
    # Delivered as a write (if the new subscription was up in time) or as a change
    # found by the reload (if not): once either way.
    assert await next_routes(watch, 1) == [PackageRouteRecord("order", "h2")]
    await writer.put_package_route("billing", "h3")
    assert await next_routes(watch, 1) == [PackageRouteRecord("billing", "h3")]
    await watch.aclose()


async def test_closing_the_store_ends_watches_and_the_subscription(backend: Backend) -> None:
    store = backend.store(cache_routes=True)
    assert await store.route_cache_ready(VISIBLE_WITHIN)
    watch = store.watch_routes()
    task = store.route_cache._task if store.route_cache else None
    assert task is not None and not task.done()
    await store.aclose()
    assert task.done()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(watch.__anext__(), VISIBLE_WITHIN)
    with pytest.raises(RuntimeError, match="closed"):
        store.watch_routes()


@pytest.mark.parametrize("backend", each(*SERVERS), indirect=True)
async def test_closing_the_store_releases_its_subscription_on_the_server(
    backend: Backend,
) -> None:
    admin = backend.raw

    async def subscribers() -> int:
        return len(await admin.client_list(_type="pubsub"))

    before = await subscribers()
    store = backend.store(cache_routes=True)
    assert await store.route_cache_ready(VISIBLE_WITHIN)
    assert await subscribers() == before + 1
    await store.aclose()

    async def released() -> bool:
        return await subscribers() == before

    assert await eventually(released)


async def test_watch_needs_caching_on(stores: StoreFactory) -> None:
    store = stores()
    with pytest.raises(RuntimeError, match="cache_routes"):
        store.watch_routes()
    assert not await store.route_cache_ready(0)
