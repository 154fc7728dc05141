"""Failures become ``BackendError`` naming the server, and no message shows a password."""

from __future__ import annotations

import traceback

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError

from kvstore import BackendError, RedisPackageStore
from kvstore.redis.failures import backend_error, client_secrets, describe, redact
from kvstore.tools.admin import Admin


@pytest.mark.parametrize(
    ("text", "secrets", "redacted"),
    [
        ("AUTH hunter2 failed", ["hunter2"], "AUTH *** failed"),
        ("hunter2, then hunter2", ["hunter2"], "***, then ***"),
        ("invalid password", ["p"], "invalid password"),  # only where it stands whole
        ("invalid password p", ["p"], "invalid password ***"),
        ("'pass' is wrong", ["pass"], "'***' is wrong"),
        ("bypass pass passes", ["pass"], "bypass *** passes"),
        ("word- word-s", ["word-"], "*** word-s"),  # ends in a non-word character
        ("a.b*c and aXb*c", ["a.b*c"], "*** and aXb*c"),  # a secret, not a pattern
        ("one two", ["one", "two"], "*** ***"),
        ("nothing to hide", [], "nothing to hide"),
        ("nothing to hide", [""], "nothing to hide"),  # an empty secret hides nothing
    ],
)
def test_redact_masks_each_secret_where_it_stands_whole(
    text: str, secrets: list[str], redacted: str
) -> None:
    assert redact(text, secrets) == redacted


@pytest.mark.parametrize(
    ("exc", "described"),
    [
        (ConnectionError("Error 111 connecting"), "ConnectionError: Error 111 connecting"),
        (TimeoutError(), "TimeoutError"),
        (ResponseError("WRONGTYPE Operation"), "ResponseError: WRONGTYPE Operation"),
    ],
)
def test_describe_names_the_class_and_the_text(exc: BaseException, described: str) -> None:
    assert describe(exc) == described


@pytest.mark.parametrize(
    ("exc", "secrets", "message", "keeps_cause"),
    [
        (
            ConnectionError("Error 111 connecting"),
            ["hunter2"],
            "127.0.0.1:6379: ConnectionError: Error 111 connecting",
            True,
        ),
        (TimeoutError(), [], "127.0.0.1:6379: TimeoutError", True),
        (
            AuthenticationError("invalid password hunter2"),
            ["hunter2"],
            "127.0.0.1:6379: AuthenticationError: invalid password ***",
            False,
        ),
    ],
)
def test_backend_error_names_the_server_and_keeps_the_cause_unless_redacted(
    exc: BaseException, secrets: list[str], message: str, keeps_cause: bool
) -> None:
    error = backend_error(exc, "127.0.0.1:6379", secrets)
    assert isinstance(error, BackendError)
    assert str(error) == message
    assert error.__cause__ is (exc if keeps_cause else None)


@pytest.mark.parametrize("secrets", [[], ["hunter2"]])
def test_a_backend_error_raised_in_an_except_shows_a_password_nowhere(secrets: list[str]) -> None:
    try:
        try:
            raise AuthenticationError("WRONGPASS hunter2")
        except AuthenticationError as exc:
            error = backend_error(exc, "srv", secrets)
            raise error from error.__cause__
    except BackendError as raised:
        shown = "".join(traceback.format_exception(raised))
    assert ("hunter2" in shown) == (not secrets), shown


async def test_client_secrets_are_the_password_its_connections_send() -> None:
    async with Redis(password="hunter2") as client:
        assert client_secrets(client) == ["hunter2"]
    async with Redis() as client:
        assert client_secrets(client) == []
    cluster = RedisCluster(host="127.0.0.1", port=7000, password="hunter2")
    assert client_secrets(cluster) == ["hunter2"]
    await cluster.aclose()


async def test_the_tools_translate_failures_as_the_store_does() -> None:
    async with (
        Redis(password="hunter2") as client,
        RedisPackageStore(client, namespace="ns") as store,
    ):
        admin = Admin(store)
        error = admin.error(ResponseError("WRONGPASS hunter2 is not it"))
        assert str(error) == f"{store!r}: ResponseError: WRONGPASS *** is not it"
        assert error.__cause__ is None
        plain = ResponseError("WRONGTYPE Operation")
        assert admin.error(plain).__cause__ is plain
