"""Replies read off a redis-py connection many at a time.

``Connection.read_response`` costs, per reply, a timer, a formatted host name and three
awaits, more than parsing the reply; on RESP3 each pub/sub message also goes through a
handler that formats it for a debug log. When a connection parses with hiredis, every
reply already received is taken straight from its hiredis reader in one synchronous
run (``take_buffered``). Only when none is left does a read go through
``read_response``, which waits for the socket with the connection's timeout and turns
failures into redis-py's errors (dropping the connection on them), as usual.

A reply the server pushes unasked (RESP3: an invalidation, a maintenance notice) is
handed to redis-py's own push handling, as ``read_response`` would; on a subscription,
the pub/sub pushes are the replies wanted, and are kept.

This reaches below redis-py's public API (the parser's ``_reader``, its "not enough data"
marker, its push handler); ``lean_reader`` checks for each and answers ``None`` when one
is missing, so a redis-py that moved them is read the slow way, not wrongly.
"""

from __future__ import annotations

from typing import Any, Final

from redis.exceptions import ConnectionError, ResponseError

try:
    import hiredis
    from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
except ImportError:  # pragma: no cover - without them, replies are read the slow way
    _AsyncHiredisParser = None  # type: ignore[assignment,misc]
    NOT_ENOUGH_DATA = None
    _PUSH: Any = None
else:
    _PUSH = getattr(hiredis, "PushNotification", None)  # hiredis 3.2 and later

__all__ = [
    "NOT_ENOUGH_DATA",
    "PUBSUB_KINDS",
    "handle_push",
    "lean_reader",
    "passed_on",
    "raise_connection_error",
    "read_replies",
    "take_buffered",
]

# The pushes of a subscription (RESP3), as ``take_buffered(..., keep=PUBSUB_KINDS)`` keeps them.
PUBSUB_KINDS: Final = frozenset(
    {
        b"message",
        b"pmessage",
        b"smessage",
        b"subscribe",
        b"psubscribe",
        b"ssubscribe",
        b"unsubscribe",
        b"punsubscribe",
        b"sunsubscribe",
        b"pong",
    }
)


def lean_reader(connection: Any) -> Any | None:
    """The hiredis reader of ``connection`` when its replies may be taken from it
    directly, else ``None``."""
    parser = getattr(connection, "_parser", None)
    if _AsyncHiredisParser is None or type(parser) is not _AsyncHiredisParser:
        return None
    if str(getattr(connection, "protocol", 2)) == "3" and (
        _PUSH is None or not hasattr(parser, "handle_push_response")
    ):
        return None  # pushes could not be told from replies
    reader = getattr(parser, "_reader", None)
    return reader if reader is not None and getattr(parser, "_connected", False) else None


def take_buffered(
    reader: Any, replies: list[Any], most: int, keep: frozenset[bytes] = frozenset()
) -> list[Any] | None:
    """Append to ``replies`` the replies ``reader`` already holds, up to ``most`` in all.

    A refused command is its ``ResponseError`` value, as redis-py would raise it; a
    reply that is a connection error (the server loading its data, say) is raised, as
    redis-py raises it. Stops at a push whose kind is not in ``keep`` and returns it:
    the caller hands it to redis-py (``handle_push``) and reads on.
    """
    gets = reader.gets
    while len(replies) < most:
        reply = gets()
        if reply is NOT_ENOUGH_DATA:
            return None
        if passed_on(reply, keep):
            return reply  # type: ignore[no-any-return]
        replies.append(reply)
    return None


def passed_on(reply: Any, keep: frozenset[bytes] = frozenset()) -> bool:
    """Whether ``reply``, taken from a hiredis reader, is a push for redis-py's handler
    (``handle_push``): one whose kind is not in ``keep``. Raises it if it is a
    connection error (``raise_connection_error``)."""
    if type(reply) is _PUSH:
        kind = reply[0] if reply else b""
        return (kind if type(kind) is bytes else str(kind).encode()).lower() not in keep
    raise_connection_error(reply)
    return False


def raise_connection_error(reply: Any) -> None:
    """Raise ``reply`` if it is a connection error (a server loading its data, say), or
    an array led by one, as redis-py raises them; any other refusal stays a value."""
    if isinstance(reply, ConnectionError):
        raise reply
    if type(reply) is list and reply and isinstance(reply[0], ConnectionError):
        raise reply[0]


async def handle_push(connection: Any, push: list[Any]) -> None:
    """Hand ``push`` to redis-py's own handling of pushed replies."""
    await connection._parser.handle_push_response(push)


async def read_replies(connection: Any, count: int) -> list[Any]:
    """The next ``count`` replies of ``connection``; a refused command is its
    ``ResponseError`` value, so it fails no neighbour."""
    replies: list[Any] = []
    while len(replies) < count:
        reader = lean_reader(connection)
        if reader is not None:
            push = take_buffered(reader, replies, count)
            if push is not None:
                await handle_push(connection, push)
                continue
            if len(replies) == count:
                break
        try:
            replies.append(await connection.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies
