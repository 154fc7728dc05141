"""Replies taken many at a time off a connection's hiredis reader are exactly the replies
redis-py would have read one at a time: in order, refusals as values, connection errors
raised, and pushes (RESP3) handed to redis-py's own handling, never taken for a reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import hiredis
import pytest
from redis._parsers.base import BaseParser
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError, ResponseError

from kvstore.redis.replies import PUBSUB_KINDS, lean_reader, read_replies, take_buffered
from kvstore.redis.wire import pack_commands
from kvstore.tools.server_process import LocalServer

from .conftest import fresh_namespace


@asynccontextmanager
async def held(client: Redis) -> AsyncIterator[Any]:
    """A connection of ``client``'s pool, for the test alone; the client closed after."""
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        yield connection
    finally:
        await pool.release(connection)
        await client.aclose()


def reader() -> Any:
    return hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=NOT_ENOUGH_DATA)


@pytest.mark.parametrize("protocol", [2, 3])
async def test_the_installed_redis_py_is_read_lean(
    valkey_server: LocalServer, protocol: int
) -> None:
    # If a redis-py upgrade moves what the lean path needs, this fails rather than the
    # store silently reading one reply at a time.
    async with held(Redis.from_url(valkey_server.url, protocol=protocol)) as connection:
        assert lean_reader(connection) is not None


@pytest.mark.parametrize("protocol", [2, 3])
async def test_replies_come_in_order_with_refusals_among_them(
    server: LocalServer, protocol: int
) -> None:
    client = Redis.from_url(server.url, protocol=protocol)
    key = f"{fresh_namespace()}:"
    commands: list[tuple[Any, ...]] = []
    for i in range(1500):
        # Values of many sizes, so replies straddle the reads from the socket.
        value = b"v" + bytes([i % 251]) * (i * 37 % 70_000)
        commands += [
            ("SET", key + str(i), value),
            ("INCR", key + str(i)),  # refused: not a number
            ("GET", key + str(i)),
            ("INCR", key + "counter"),
        ]
    async with held(client) as connection:
        await connection.send_packed_command(pack_commands(commands), check_health=False)
        replies = await read_replies(connection, len(commands))
    assert len(replies) == len(commands)
    for i in range(1500):
        ok, refused, value, count = replies[4 * i : 4 * i + 4]
        assert ok in (b"OK", True)
        assert isinstance(refused, ResponseError) and "not an integer" in str(refused)
        assert value == commands[4 * i][2]
        assert count == i + 1


async def test_a_push_among_replies_goes_to_redis_pys_handler(valkey_server: LocalServer) -> None:
    client = Redis.from_url(valkey_server.url, protocol=3)
    writer = Redis.from_url(valkey_server.url)
    key = f"{fresh_namespace()}:tracked"
    pushed: list[Any] = []

    async def on_invalidation(push: Any) -> None:
        pushed.append(push)

    async with held(client) as connection:
        connection._parser.set_invalidation_push_handler(on_invalidation)
        await connection.send_command("CLIENT", "TRACKING", "ON")
        assert await connection.read_response() in (b"OK", "OK")
        await connection.send_command("GET", key)
        assert await connection.read_response() is None
        await writer.set(key, b"changed")  # the server pushes an invalidation of key
        await asyncio.sleep(0.05)  # it is in the socket before the replies that follow
        await connection.send_packed_command(
            pack_commands([("PING",), ("ECHO", b"a"), ("ECHO", b"b")]), check_health=False
        )
        replies = await read_replies(connection, 3)
    await writer.aclose()
    assert replies == [b"PONG", b"a", b"b"]
    assert len(pushed) == 1 and pushed[0][0] == b"invalidate"


def test_what_is_not_yet_whole_stays_in_the_reader() -> None:
    parser = reader()
    replies: list[Any] = []
    parser.feed(b"+one\r\n$5\r\nhel")
    assert take_buffered(parser, replies, 10) is None
    assert replies == [b"one"]
    parser.feed(b"lo\r\n:7\r\n")
    assert take_buffered(parser, replies, 10) is None
    assert replies == [b"one", b"hello", 7]


def test_no_more_than_asked_is_taken() -> None:
    parser = reader()
    replies: list[Any] = []
    parser.feed(b":1\r\n:2\r\n:3\r\n")
    take_buffered(parser, replies, 2)
    assert replies == [1, 2]
    take_buffered(parser, replies, 3)
    assert replies == [1, 2, 3]


def test_a_refusal_is_a_value_and_a_loading_server_is_raised() -> None:
    parser = reader()
    replies: list[Any] = []
    parser.feed(b"-ERR no such thing\r\n:1\r\n-LOADING Redis is loading the dataset\r\n:2\r\n")
    with pytest.raises(BusyLoadingError):
        take_buffered(parser, replies, 10)
    assert isinstance(replies[0], ResponseError) and "no such thing" in str(replies[0])
    assert replies[1] == 1


def test_a_subscription_keeps_its_pushes_and_stops_at_any_other() -> None:
    parser = reader()
    replies: list[Any] = []
    parser.feed(
        b">3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$1\r\nx\r\n"
        b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
        b">3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$1\r\ny\r\n"
    )
    push = take_buffered(parser, replies, 10, PUBSUB_KINDS)
    assert replies == [[b"smessage", b"ch", b"x"]]
    assert push is not None and push[0] == b"invalidate"
    assert take_buffered(parser, replies, 10, PUBSUB_KINDS) is None
    assert replies[-1] == [b"smessage", b"ch", b"y"]
