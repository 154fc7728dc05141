"""Staleness: another store's write becomes visible to a cache, never through a dead or
stalled subscription, and a gap in the versions makes it reload.

Every test runs on fakeredis, on each real server, and on Valkey through a RESP2 client
(fakeredis where it has what the test needs); a store's cache is checked against what
another store wrote, never against a mock.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import pytest

from kvstore import RedisPackageStore
from kvstore.redis.keyspace import Keyspace
from kvstore.server_process import LocalServer

from .conftest import WITH_RESP2, Backend, StoreFactory, backend_over, fresh_namespace
from .support import VISIBLE_WITHIN, eventually, pkg
from .topology import raw_command, server_binary

backend = backend_over(*WITH_RESP2)


async def test_a_route_written_elsewhere_becomes_visible(stores: StoreFactory) -> None:
    writer, reader = stores(), stores(cache_routes=True)
    await writer.put_package(pkg("order", "h1"))
    assert await reader.route_cache_ready(VISIBLE_WITHIN)
    assert await reader.get_package_route("order") == "h1"  # from the snapshot

    def sees(workflow_type: str, content_hash: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return await reader.get_package_route(workflow_type) == content_hash

        return check

    await writer.put_package(pkg("order", "h2", n=1))
    assert await eventually(sees("order", "h2"))
    await writer.put_package_route("order", "h1")
    assert await eventually(sees("order", "h1"))
    await writer.put_package_with_routes(pkg("multi", "h3", n=2), ["billing"])
    assert await eventually(sees("billing", "h3"))
    assert await reader.get_package_route("multi") == "h3"
    assert await reader.get_package_route("never") is None
    assert await reader.route_cache_ready(0), "it stayed live, so those answers were cached"
    assert await reader.list_package_routes() == await writer.list_package_routes()


@pytest.mark.slow
async def test_another_stores_write_is_seen_during_a_long_burst_of_own_writes(
    backend: Backend,
) -> None:
    # A busy store's subscription carries its own writes' messages too; read a batch at
    # a time with a pause after each, it fell further behind the longer a burst lasted.
    if backend.name == "fakeredis":
        pytest.skip("fakeredis delivers messages as they are published")
    namespace = fresh_namespace()
    # A server of its own: the burst leaves a hundred thousand rows behind.
    with LocalServer(server_binary(backend.kind)) as own:
        async with (
            RedisPackageStore.from_url(
                own.url, namespace=namespace, cache_routes=True, **backend.client_options
            ) as busy,
            RedisPackageStore.from_url(own.url, namespace=namespace) as other,
        ):
            assert await busy.route_cache_ready(VISIBLE_WITHIN)
            bursting = True

            async def burst() -> None:
                n = 0
                while bursting and n < 400_000:
                    await asyncio.gather(
                        *(busy.put_package(pkg(f"t{n + i}", "h", n=n + i)) for i in range(4000))
                    )
                    n += 4000

            async def sees(content_hash: str) -> bool:
                return await busy.get_package_route("watched") == content_hash

            bursts = asyncio.get_running_loop().create_task(burst())
            try:
                for i in range(3):
                    await asyncio.sleep(1.0)  # well into the burst
                    await other.put_package_route("watched", f"elsewhere-{i}")
                    assert await eventually(functools.partial(sees, f"elsewhere-{i}"))
            finally:
                bursting = False
                await bursts


async def test_a_store_reads_its_own_writes_at_once(stores: StoreFactory) -> None:
    store = stores(cache_routes=True)
    assert await store.route_cache_ready(VISIBLE_WITHIN)
    # No pause between write and read: the script's reply updates the cache.
    for i in range(50):
        await store.put_package_route("order", f"h{i}")
        assert await store.get_package_route("order") == f"h{i}"
        await store.put_package(pkg(f"type-{i}", f"p{i}", n=i))
        assert await store.get_package_route(f"type-{i}") == f"p{i}"


async def test_many_writers_converge_to_the_server(stores: StoreFactory) -> None:
    readers = [stores(cache_routes=True) for _ in range(2)]
    writers = [stores(cache_routes=True), stores()]
    for reader in readers:
        assert await reader.route_cache_ready(VISIBLE_WITHIN)
    await asyncio.gather(
        *(
            writer.put_package_route(f"type-{i % 7}", f"h{i}-{w}")
            for i in range(300)
            for w, writer in enumerate(writers)
        )
    )
    truth = await writers[1].list_package_routes()

    for store in [*readers, writers[0]]:

        async def agrees(store: RedisPackageStore = store) -> bool:
            found = [await store.get_package_route(r.workflow_type) for r in truth]
            return found == [r.content_hash for r in truth]

        assert await eventually(agrees)


async def test_while_the_subscription_is_down_lookups_ask_the_server(
    stores: StoreFactory, backend: Backend
) -> None:
    if backend.name == "fakeredis":
        pytest.skip("acts behind the store's back with a real server's CLIENT commands")
    writer = stores()
    await writer.put_package_route("order", "old")
    admin = backend.raw
    # The cache's own user, whose right to subscribe the test takes away to keep the
    # cache down for as long as it likes.
    user, port = f"cache-{writer.namespace}", admin.connection_pool.connection_kwargs["port"]
    await raw_command(admin, "ACL", "SETUSER", user, "on", ">pw", "+@all", "~*", "allchannels")
    cached = RedisPackageStore.from_url(
        f"redis://{user}:pw@127.0.0.1:{port}", namespace=writer.namespace, cache_routes=True
    )
    try:
        assert await cached.route_cache_ready(VISIBLE_WITHIN)
        assert await cached.get_package_route("order") == "old"
        await raw_command(admin, "ACL", "SETUSER", user, "-ssubscribe")
        assert await admin.client_kill_filter(_type="pubsub", username=user) >= 1

        async def down() -> bool:
            return not await cached.route_cache_ready(0)

        assert await eventually(down)
        # The change is published while no subscription exists, so it is never delivered:
        # only asking the server gives the new value, and it must be given at once.
        await writer.put_package_route("order", "new")
        assert await cached.get_package_route("order") == "new"
        # Allowed again, it resubscribes and reloads in full, then answers from memory.
        await raw_command(admin, "ACL", "SETUSER", user, "+ssubscribe")
        assert await cached.route_cache_ready(VISIBLE_WITHIN)
        assert await cached.get_package_route("order") == "new"
        await writer.put_package_route("order", "newer")

        async def follows() -> bool:
            return await cached.get_package_route("order") == "newer"

        assert await eventually(follows)
    finally:
        await cached.aclose()
        await admin.acl_deluser(user)


@pytest.mark.slow
async def test_a_silently_stalled_subscription_is_noticed_by_the_health_check(
    stores: StoreFactory, backend: Backend
) -> None:
    if backend.name == "fakeredis":
        pytest.skip("acts behind the store's back with a real server's CLIENT commands")
    cached = stores(cache_routes=True, route_health_interval=0.1)
    assert await cached.route_cache_ready(VISIBLE_WITHIN)
    admin = backend.raw
    # A paused server answers nothing, PING included, yet the connection stays open.
    await admin.client_pause(1500, all=True)

    async def down() -> bool:
        return not await cached.route_cache_ready(0)

    assert await eventually(down, within=1.0), "no reply to PING for two intervals"
    assert await cached.route_cache_ready(5.0), "live again once the server answers"


async def test_a_skipped_version_makes_the_cache_reload(
    stores: StoreFactory, backend: Backend
) -> None:
    cached, writer = stores(cache_routes=True), stores()
    await writer.put_package_route("order", "h1")
    assert await cached.route_cache_ready(VISIBLE_WITHIN)
    # A message three versions ahead: versions in between were never seen, so the
    # cache must not trust it, and must take the table from the server instead.
    keys = Keyspace(cached.namespace)
    client = cached.client
    cache = cached.route_cache
    assert cache is not None
    reloads = cache.reloads
    found = await client.get(keys.route_version)
    assert found is not None
    version = int(found)
    # Sharded, as the functions publish: a plain PUBLISH never reaches the cache.
    await client.execute_command(
        "SPUBLISH", keys.route_changes, b"%d\x00forged\x00order" % (version + 3)
    )
    await writer.put_package_route("billing", "h2")

    async def reloaded() -> bool:
        return cache.reloads > reloads and await cached.get_package_route("billing") == "h2"

    assert await eventually(reloaded)
    assert await cached.get_package_route("order") == "h1"
