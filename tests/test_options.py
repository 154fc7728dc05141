"""Every store option is checked when the store is made, in one place."""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from kvstore import RedisPackageStore
from kvstore.redis.options import StoreOptions

NAN = math.nan
INF = math.inf

BAD: list[tuple[str, object, type[Exception]]] = [
    ("namespace", "", ValueError),
    ("namespace", "{x}", ValueError),
    ("namespace", 7, TypeError),
    ("timeout", NAN, ValueError),
    ("timeout", INF, ValueError),
    ("timeout", -INF, ValueError),
    ("timeout", 0, ValueError),
    ("timeout", -1.0, ValueError),
    ("timeout", True, TypeError),
    ("timeout", "10", TypeError),
    ("lanes", 0, ValueError),
    ("lanes", -2, ValueError),
    ("lanes", True, TypeError),
    ("lanes", 1.5, TypeError),
    ("lanes", 2.0, TypeError),
    ("lanes", "2", TypeError),
    ("lanes", None, TypeError),
    ("retry_budget", NAN, ValueError),
    ("retry_budget", INF, ValueError),
    ("retry_budget", -0.5, ValueError),
    ("retry_budget", False, TypeError),
    ("retry_budget", "5", TypeError),
    ("retry_budget", None, TypeError),
    ("min_replicas", -1, ValueError),
    ("min_replicas", True, TypeError),
    ("min_replicas", 1.0, TypeError),
    ("replica_timeout", NAN, ValueError),
    ("replica_timeout", INF, ValueError),
    ("replica_timeout", 0, ValueError),
    ("replica_timeout", -1, ValueError),
    ("replica_timeout", 0.0004, ValueError),  # 0 ms: WAIT would block for ever
    ("replica_timeout", True, TypeError),
    ("replica_timeout", None, TypeError),
    ("cache_routes", 1, TypeError),
    ("cache_routes", "yes", TypeError),
    ("cache_routes", None, TypeError),
    ("route_health_interval", NAN, ValueError),
    ("route_health_interval", INF, ValueError),
    ("route_health_interval", 0, ValueError),
    ("route_health_interval", -1, ValueError),
    ("route_health_interval", True, TypeError),
    ("route_health_interval", "1", TypeError),
    ("layout", 3, ValueError),
    ("layout", 0, ValueError),
    ("layout", "2", TypeError),
    ("layout", True, TypeError),
    ("layout", 2.0, TypeError),
    ("archive_cache", "", ValueError),
    ("archive_cache", "a\0b", ValueError),
    ("archive_cache", b"/tmp/cache", TypeError),
    ("archive_cache", 7, TypeError),
    ("archive_cache_bytes", 0, ValueError),
    ("archive_cache_bytes", -1, ValueError),
    ("archive_cache_bytes", 1.5, TypeError),
    ("archive_cache_bytes", True, TypeError),
    ("archive_cache_bytes", None, TypeError),
]


@pytest.mark.parametrize(("option", "value", "kind"), BAD)
def test_a_bad_option_is_refused_by_the_constructor_naming_it(
    option: str, value: Any, kind: type[Exception]
) -> None:
    client = fakeredis.FakeAsyncRedis()
    with pytest.raises(kind, match=option):
        RedisPackageStore(client, **{option: value})


@pytest.mark.parametrize(("option", "value", "kind"), BAD)
def test_a_bad_option_is_refused_by_from_url_before_a_client_is_made(
    option: str, value: Any, kind: type[Exception]
) -> None:
    # The URL is unusable too: the option's error comes first, so no client was made.
    with pytest.raises(kind, match=option):
        RedisPackageStore.from_url("nonsense://", **{option: value})


@pytest.mark.parametrize(("option", "value", "kind"), BAD)
def test_store_options_refuse_the_same_values(
    option: str, value: Any, kind: type[Exception]
) -> None:
    with pytest.raises(kind, match=option):
        StoreOptions(**{option: value})


@pytest.mark.parametrize(
    "changes",
    [
        {"timeout": None},
        {"timeout": 5},
        {"timeout": 0.001},
        {"retry_budget": 0},
        {"lanes": 1},
        {"min_replicas": 2, "replica_timeout": 0.001},
        {"cache_routes": True, "route_health_interval": 0.05},
        {"namespace": "a.b:c-d_e"},
        {"archive_cache": "/nonexistent/archives", "archive_cache_bytes": 1},
        {"archive_cache": Path("relative/archives")},
    ],
)
async def test_good_options_are_kept_as_given(changes: dict[str, Any]) -> None:
    async with RedisPackageStore(fakeredis.FakeAsyncRedis(), **changes) as store:
        assert store.options == dataclasses.replace(StoreOptions(), **changes)


def test_constructor_and_from_url_take_every_option_with_its_default() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(StoreOptions)}
    for entry in (RedisPackageStore.__init__, RedisPackageStore.from_url):
        parameters = inspect.signature(entry).parameters
        keyword_only = {
            name: p.default
            for name, p in parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        assert keyword_only == defaults, entry.__name__


async def test_from_url_gives_the_store_the_options_it_was_given() -> None:
    store = RedisPackageStore.from_url(
        "redis://127.0.0.1:1", namespace="opts", timeout=2, lanes=3, cache_routes=True
    )
    try:
        assert store.options == StoreOptions(
            namespace="opts", timeout=2, lanes=3, cache_routes=True
        )
    finally:
        await store.aclose()
