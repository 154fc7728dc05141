"""Replies taken many at a time off a connection's hiredis reader, or read off its stream
in slices, are exactly the replies redis-py would have read one at a time: in order,
refusals as values, connection errors raised, and pushes (RESP3) handed to redis-py's own
handling, never taken for a reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import hiredis
import pytest
from redis._parsers.base import BaseParser
from redis._parsers.encoders import Encoder
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError, ConnectionError, InvalidResponse, ResponseError

from kvstore.redis.replies import PUBSUB_KINDS, lean_reader, read_replies, take_buffered
from kvstore.redis.streamed import STREAM_FROM, _stream_of, read_streamed
from kvstore.redis.wire import pack_commands
from kvstore.server_process import LocalServer

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
    # If a redis-py upgrade moves what the lean paths need, this fails rather than the
    # store silently reading one reply at a time, or a large archive in one step.
    async with held(Redis.from_url(valkey_server.url, protocol=protocol)) as connection:
        assert lean_reader(connection) is not None
        assert _stream_of(connection) is not None, "a large archive is read in slices"


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


@pytest.mark.parametrize("reading", ["read_replies", "read_streamed"])
async def test_a_push_among_replies_goes_to_redis_pys_handler(
    valkey_server: LocalServer, reading: str
) -> None:
    read = {"read_replies": read_replies, "read_streamed": read_streamed}[reading]
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
        # The server pushes an invalidation of key, which is in the socket before the
        # replies that follow; the value is large enough to be read in slices.
        await writer.set(key, bytes(2 * STREAM_FROM))
        await asyncio.sleep(0.05)
        await connection.send_packed_command(
            pack_commands([("PING",), ("ECHO", b"a"), ("GET", key)]), check_health=False
        )
        replies = await read(connection, 3)
    await writer.aclose()
    assert replies == [b"PONG", b"a", bytes(2 * STREAM_FROM)]
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


# Replies that may hold an archive, read off the stream in slices.


@pytest.mark.parametrize("protocol", [2, 3])
async def test_streamed_replies_are_the_replies_hiredis_makes(
    server: LocalServer, protocol: int
) -> None:
    sizes = [0, 1, STREAM_FROM - 1, STREAM_FROM, STREAM_FROM + 1, 3 * STREAM_FROM + 7]

    def commands(key: str) -> list[tuple[Any, ...]]:
        made: list[tuple[Any, ...]] = []
        for i, size in enumerate(sizes):
            made += [
                ("HSET", f"{key}h{i}", "archive", bytes([i + 1]) * size, "stamp", f"s{i}"),
                ("HMGET", f"{key}h{i}", "archive", "stamp", "absent"),
                ("GET", f"{key}absent"),
                ("INCR", f"{key}h{i}"),  # refused: WRONGTYPE
                ("HGETALL", f"{key}h{i}"),  # a map in RESP3
                ("ZRANGEBYLEX", f"{key}absent", "-", "+"),
            ]
        return made

    replies = {}
    for reading in (read_replies, read_streamed):
        sent = commands(f"{fresh_namespace()}:")
        async with held(Redis.from_url(server.url, protocol=protocol)) as connection:
            await connection.send_packed_command(pack_commands(sent), check_health=False)
            replies[reading] = await reading(connection, len(sent))
    streamed, parsed = replies[read_streamed], replies[read_replies]
    assert len(streamed) == len(parsed) == 6 * len(sizes)
    for i, (mine, theirs) in enumerate(zip(streamed, parsed, strict=True)):
        if isinstance(theirs, ResponseError):
            assert type(mine) is type(theirs) and str(mine) == str(theirs), i
        else:
            assert mine == theirs, i
    assert streamed[-5] == [bytes([6]) * (3 * STREAM_FROM + 7), b"s5", None]


async def test_what_the_parser_read_ahead_is_read_through_it(valkey_server: LocalServer) -> None:
    # hiredis reads ahead of the reply it parses: the next reply has begun inside it, so
    # it must finish that reply, the archive made in one step.
    key = f"{fresh_namespace()}:big"
    async with held(Redis.from_url(valkey_server.url)) as connection:
        await connection.send_packed_command(
            pack_commands([("SET", key, bytes(3 * STREAM_FROM)), ("ECHO", b"a"), ("GET", key)]),
            check_health=False,
        )
        await asyncio.sleep(0.05)  # all of it has come
        assert await read_replies(connection, 2) == [b"OK", b"a"]
        parser = lean_reader(connection)
        assert parser is not None and parser.has_data()
        assert await read_streamed(connection, 1) == [bytes(3 * STREAM_FROM)]


class _Connection:
    """Just enough of a redis-py connection over a stream the test feeds."""

    def __init__(self) -> None:
        self._reader = asyncio.StreamReader()
        self.encoder = Encoder("utf-8", "strict", decode_responses=False)  # type: ignore[no-untyped-call]
        self.protocol = 2
        self._parser = _AsyncHiredisParser(65536)
        self._parser.on_connect(self)  # type: ignore[no-untyped-call]


async def test_a_stream_that_ends_mid_reply_is_a_connection_error() -> None:
    connection = _Connection()
    connection._reader.feed_data(b"*2\r\n$%d\r\n" % (2 * STREAM_FROM) + bytes(STREAM_FROM))
    connection._reader.feed_eof()
    with pytest.raises(ConnectionError):
        await read_streamed(connection, 1)


async def test_a_bulk_string_longer_than_it_said_is_a_protocol_error() -> None:
    connection = _Connection()
    connection._reader.feed_data(b"$%d\r\n" % STREAM_FROM + bytes(STREAM_FROM + 5) + b"\r\n")
    with pytest.raises(InvalidResponse):
        await read_streamed(connection, 1)


async def test_a_length_that_is_not_a_number_is_a_protocol_error() -> None:
    connection = _Connection()
    connection._reader.feed_data(b"$12x\r\n")
    with pytest.raises(InvalidResponse):
        await read_streamed(connection, 1)


async def test_a_loading_server_is_raised_from_a_streamed_reply() -> None:
    connection = _Connection()
    connection._reader.feed_data(b"-LOADING Redis is loading the dataset\r\n")
    with pytest.raises(BusyLoadingError):
        await read_streamed(connection, 1)
