"""A store that caches its routes keeps the whole contract, and refuses what a store
that does not refuses.

Every test runs on fakeredis, on each real server, and on Valkey through a RESP2 client.
"""

from __future__ import annotations

import pytest

from kvstore import RedisPackageStore, SerializationError
from kvstore.conformance import BAD_TEXT, SCENARIOS, run_scenario
from kvstore.redis.keyspace import Keyspace

from .conftest import WITH_RESP2, Backend, StoreFactory, backend_over
from .support import VISIBLE_WITHIN

backend = backend_over(*WITH_RESP2)


@pytest.mark.slow
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "live"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_cached_store_keeps_the_contract(backend: Backend, scenario: str, warm: bool) -> None:
    async def make() -> RedisPackageStore:
        store = backend.store(cache_routes=True)
        if warm:
            assert await store.route_cache_ready(VISIBLE_WITHIN)
        return store

    await run_scenario(scenario, make)


async def test_a_foreign_layout_keeps_the_cache_off(stores: StoreFactory) -> None:
    cached = stores(cache_routes=True)
    await cached.client.set(Keyspace(cached.namespace).format, b"9")
    with pytest.raises(SerializationError, match="layout"):
        await cached.get_package_route("order")
    assert not await cached.route_cache_ready(0.3)
    with pytest.raises(SerializationError, match="layout"):
        await cached.get_package_route("order")


async def test_cached_lookup_refuses_what_the_uncached_one_refuses(stores: StoreFactory) -> None:
    cached, plain = stores(cache_routes=True), stores()
    assert await cached.route_cache_ready(VISIBLE_WITHIN)
    for bad, kind in BAD_TEXT:
        errors = []
        for store in (cached, plain):
            with pytest.raises(kind) as caught:
                await store.get_package_route(bad)  # type: ignore[arg-type]
            errors.append(str(caught.value))
        assert errors[0] == errors[1], bad
        assert "workflow_type" in errors[0]
