"""Replies that may hold a large archive, read off the socket in slices.

hiredis makes a bulk string into ``bytes`` in one step once all of it has come: for an
archive of 64 MiB that is a copy, and the page faults of fresh memory, of about 30 ms
during which the event loop runs nothing. ``read_streamed`` reads the replies of a unit
itself instead, from the connection's stream: a bulk string of ``STREAM_FROM`` bytes or
more is written slice by slice into the ``bytes`` it becomes (see ``_bulk``), the loop
running between slices. Everything else is parsed here too, so nothing of the unit's
replies passes through hiredis, which reads ahead of the reply it parses.

It can only start where hiredis holds nothing: the next byte on the stream then begins
the unit's first reply. When hiredis holds something (it read ahead of an earlier reply
on the connection), when its parser is not hiredis, or when the connection decodes
replies to text, the unit is read through ``kvstore.redis.replies.read_replies`` as any
other: the same replies, the archive made in one step.

This reaches below redis-py's public API: the connection's ``_reader`` (its
``asyncio.StreamReader``), checked before use.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, Final

from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError, InvalidResponse

from kvstore.redis.replies import handle_push, lean_reader, raise_connection_error, read_replies
from kvstore.redis.wire import SLICE

__all__ = ["STREAM_FROM", "read_streamed"]

# A bulk string this long or longer is read in slices; a shorter one in one read.
STREAM_FROM: Final = 1 << 20


class _Push(list[Any]):
    """A reply the server pushed unasked (RESP3), for redis-py's own handling."""


def _stream_of(connection: Any) -> asyncio.StreamReader | None:
    """The stream the next replies of ``connection`` may be read from here, if any."""
    reader = lean_reader(connection)
    stream = getattr(connection, "_reader", None)
    encoder = getattr(connection, "encoder", None)
    if (
        reader is None
        or reader.has_data()
        or not isinstance(stream, asyncio.StreamReader)
        or getattr(encoder, "decode_responses", True)
    ):
        return None
    return stream


async def read_streamed(connection: Any, count: int) -> list[Any]:
    """The next ``count`` replies of ``connection``, as ``read_replies`` gives them: a
    refused command is its ``ResponseError`` value; a connection error is raised."""
    stream = _stream_of(connection)
    if stream is None:
        return await read_replies(connection, count)
    replies: list[Any] = []
    try:
        while len(replies) < count:
            reply = await _reply(stream)
            if type(reply) is _Push:
                await handle_push(connection, reply)
                continue
            raise_connection_error(reply)
            replies.append(reply)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
        raise ConnectionError(f"the connection failed while a reply was read: {exc!r}") from exc
    except ValueError as exc:  # a length or number that is not one
        raise InvalidResponse(f"Protocol error: {exc}") from exc
    return replies


async def _reply(stream: asyncio.StreamReader) -> Any:
    """One reply, RESP2 or RESP3, as hiredis would make it."""
    line = await stream.readuntil(b"\r\n")
    kind, body = line[:1], line[1:-2]
    if kind in (b"$", b"=", b"!"):
        size = int(body)
        if size < 0:
            return None
        data = await _bulk(stream, size)
        if kind == b"=":
            return data[4:]  # a verbatim string's "txt:"
        return _error(data) if kind == b"!" else data
    if kind in (b"*", b"~", b">"):
        size = int(body)
        if size < 0:
            return None
        items = [await _reply(stream) for _ in range(size)]
        return _Push(items) if kind == b">" else items
    if kind == b"%":
        pairs = [await _reply(stream) for _ in range(2 * int(body))]
        return dict(zip(pairs[::2], pairs[1::2], strict=True))
    if kind == b"|":  # attributes, then the reply they describe
        for _ in range(2 * int(body)):
            await _reply(stream)
        return await _reply(stream)
    if kind in (b":", b"("):
        return int(body)
    if kind == b"+":
        return body
    if kind == b"-":
        return _error(body)
    if kind == b"_":
        return None
    if kind == b"#":
        return body == b"t"
    if kind == b",":
        return float(body)
    raise InvalidResponse(f"Protocol error, got {kind!r} as reply type byte")


def _error(text: bytes) -> Exception:
    # As redis-py makes an error reply into its exception.
    error: Exception = BaseParser.parse_error(  # type: ignore[no-untyped-call]
        text.decode("utf-8", errors="replace")
    )
    return error


async def _bulk(stream: asyncio.StreamReader, size: int) -> bytes:
    """A bulk string's ``size`` bytes and the line end after them."""
    if size < STREAM_FROM:
        return (await stream.readexactly(size + 2))[:-2]
    # The slices are written into the bytes the archive becomes: an io.BytesIO over a
    # zeroed bytes object of its size that it alone holds. Zeroed memory comes mapped
    # and untouched from the C allocator, or, reused, cleared in one fast pass; each
    # slice is then copied once, and handing the buffer out copies nothing. No step of
    # the loop copies more than a slice; grown slice by slice instead, the buffer could
    # be copied whole at a growth, and joined at the end it would be.
    zeroed = bytes(size)
    out = io.BytesIO(zeroed)  # shares zeroed's bytes, which it alone holds once it goes
    del zeroed
    left = size
    since_turn = 0
    while left:
        piece = await stream.read(min(left, SLICE))
        if not piece:
            raise ConnectionError("the server closed the connection in the middle of a reply")
        out.write(piece)
        left -= len(piece)
        since_turn += len(piece)
        if since_turn >= SLICE:
            since_turn = 0
            await asyncio.sleep(0)  # what came in quickly still lets the loop run
    if await stream.readexactly(2) != b"\r\n":
        raise InvalidResponse("Protocol error: a bulk string longer than it said")
    return out.getvalue()
