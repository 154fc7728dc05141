"""The client a store is given or makes: which it refuses, that it is left open, either
protocol, and a password that never shows."""

from __future__ import annotations

import fakeredis
import pytest
from redis.asyncio import Redis

from kvstore import BackendError, RedisPackageStore
from kvstore.conformance import run_package_store_suite
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import pkg


async def test_a_decoding_client_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        RedisPackageStore(fakeredis.FakeAsyncRedis(decode_responses=True))


def test_a_client_of_another_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="client"):
        RedisPackageStore(object())  # type: ignore[arg-type]


async def test_aclose_leaves_a_given_client_open(client: Redis) -> None:
    async with RedisPackageStore(client, namespace=fresh_namespace()) as store:
        await store.put_package(pkg("order", "h1"))
    assert await client.ping()


@pytest.mark.slow
@pytest.mark.parametrize("cache_routes", [False, True])
@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_client_of_either_protocol_keeps_the_whole_contract(
    valkey_server: LocalServer, protocol: int, cache_routes: bool
) -> None:
    # Replies, and a route cache's messages, are read differently in RESP2 and RESP3.
    await run_package_store_suite(
        lambda: RedisPackageStore(
            Redis.from_url(valkey_server.url, protocol=protocol),
            namespace=fresh_namespace(),
            cache_routes=cache_routes,
        )
    )


async def test_no_password_in_errors_or_repr() -> None:
    secret = "s3cret-Pa55"
    with LocalServer(settings={"requirepass": "the-real-one"}) as locked:
        bad = RedisPackageStore.from_url(
            f"redis://:{secret}@127.0.0.1:{locked.port}", namespace=fresh_namespace()
        )
        assert secret not in repr(bad)
        with pytest.raises(BackendError) as caught:
            await bad.put_package(pkg("order", "h1"))
        assert secret not in str(caught.value)
        assert secret not in repr(caught.value.__cause__)
        await bad.aclose()
        good = RedisPackageStore.from_url(
            f"redis://:the-real-one@127.0.0.1:{locked.port}", namespace=fresh_namespace()
        )
        await good.put_package(pkg("order", "h1"))
        assert "the-real-one" not in repr(good)
        await good.aclose()
    with pytest.raises(ValueError) as bad_url:
        RedisPackageStore.from_url(f"http://:{secret}@127.0.0.1:1")
    assert secret not in str(bad_url.value)


@pytest.mark.parametrize("password", ["p", "pass", "word-"])
async def test_a_short_password_is_redacted_without_mangling_the_message(password: str) -> None:
    with LocalServer(settings={"requirepass": "the-right-one"}) as server:
        url = f"redis://:{password}@127.0.0.1:{server.port}"
        async with RedisPackageStore.from_url(url, timeout=2.0, retry_budget=0) as store:
            with pytest.raises(BackendError) as raised:
                await store.get_package_route("order")
    message = str(raised.value)
    assert "password" in message.lower(), message  # the server's words, whole
    assert f" {password} " not in f" {message} " and f":{password}@" not in message
