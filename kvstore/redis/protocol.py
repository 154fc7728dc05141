"""The contract between this package and its Lua library, and the shapes of server replies.

What the Python side and the server-side Lua (``lua/``) must agree on byte for byte is
written here once, so that neither side spells it again:

* the refusals an operation replies instead of writing anything (``lua/library.lua``
  documents them): ``KVSTORE_TYPE <i> <found> <expected>``, ``KVSTORE_FORMAT <found>``
  and ``KVSTORE_ARGS <argument> <why>``, recognised by ``type_refusal``,
  ``format_refusal`` and ``args_refusal``;
* the route-change message every function that writes routes publishes (built by
  ``announce_routes`` in ``lua/library.lua``): ``encode_route_change`` makes the bytes the
  Lua publishes, ``decode_route_change`` reads them back, refusing anything else;
* pairs as the server sends them, a flat list in RESP2 and a map in RESP3 (``HGETALL``,
  ``CONFIG GET``, each library of ``FUNCTION LIST``): ``field_pairs`` reads either;
* what each command the store reads with may reply (``REPLY_SHAPES``, ``fits``), so a
  server that is not Redis (or a proxy that answers ``+OK`` to everything) fails the
  call with ``BackendError`` rather than a raw ``TypeError`` deep in the decoding;
* a workflow type or a content hash as the server holds it: ``stored_text`` reads it,
  refusing what no write of the library leaves (bytes that are not UTF-8, empty text,
  a NUL) with ``SerializationError`` naming where it was found.

Nothing here does I/O. ``tests/test_protocol.py`` checks that what the Lua publishes on
fakeredis, Valkey and Redis is exactly what ``encode_route_change`` makes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from redis.exceptions import ResponseError

from kvstore.errors import SerializationError
from kvstore.redis.wire import PrePacked

TYPE_REFUSAL = "KVSTORE_TYPE"
FORMAT_REFUSAL = "KVSTORE_FORMAT"
ARGS_REFUSAL = "KVSTORE_ARGS"
# What an ARGS refusal names: one of the call's keys or arguments, counted from 1.
_ARGUMENT = re.compile(r"(?:KEYS|ARGV)\[[1-9][0-9]*\]")
# The argument of FCALL that KEYS[1] is: FCALL, the function's name, the key count, keys.
_FIRST_KEY = 3
_tuple = tuple.__new__


@dataclass(frozen=True, slots=True)
class TypeRefusal:
    """``KVSTORE_TYPE <index> <found> <expected>``: ``KEYS[index]`` (counted from 1, as
    Lua counts) holds a ``found`` (a type as ``TYPE`` names it) where the operation
    needs an ``expected`` (``string``, ``hash``, ``zset``, or ``counter``, a string
    holding an integer). The operation wrote nothing."""

    index: int
    found: str
    expected: str

    def key_of(self, fcall: Sequence[Any]) -> Any:
        """The refused key, ``KEYS[index]``, of ``fcall``: the ``FCALL`` refused, as the
        flat sequence sent (``FCALL``, the function, the key count, the keys, ...)."""
        return fcall[_FIRST_KEY + self.index - 1]


@dataclass(frozen=True, slots=True)
class ArgsRefusal:
    """``KVSTORE_ARGS <argument> <why>``: the call is not one the library's callers make;
    ``argument`` (``KEYS[i]`` or ``ARGV[i]``, counted from 1) is missing, one too many,
    or not the key or channel of ``KEYS[1]``'s namespace the operation takes there, as
    ``why`` says in words. The operation wrote nothing."""

    argument: str
    why: str


class RouteChange(NamedTuple):
    """What a route-change message says: the routes table's new ``version``, and the
    workflow ``types`` (at least one) whose routes now point at ``content_hash``."""

    version: int
    content_hash: str
    types: tuple[str, ...]


def type_refusal(reply: object) -> TypeRefusal | None:
    """What ``reply`` refused if it is a ``KVSTORE_TYPE`` refusal, else ``None``.

    ``reply`` is a reply as the store's connections hand it (a refusal is its
    ``ResponseError``); anything else, a malformed refusal included, is ``None``, so the
    caller reports the reply as the server's failure.
    """
    if not isinstance(reply, ResponseError):
        return None
    words = str(reply).split(" ")
    if len(words) != 4 or words[0] != TYPE_REFUSAL or not _is_decimal(words[1]):
        return None
    index = int(words[1])
    if index < 1 or not words[2] or not words[3]:
        return None
    return TypeRefusal(index, words[2], words[3])


def format_refusal(reply: object) -> bytes | None:
    """The layout the namespace holds if ``reply`` is a ``KVSTORE_FORMAT`` refusal (the
    marker names another layout than the caller's), else ``None``."""
    if not isinstance(reply, ResponseError):
        return None
    code, space, found = str(reply).partition(" ")
    if code != FORMAT_REFUSAL or not space:
        return None
    return found.encode("utf-8")


def args_refusal(reply: object) -> ArgsRefusal | None:
    """What ``reply`` refused if it is a ``KVSTORE_ARGS`` refusal, else ``None`` (a
    malformed one included, so the caller reports it as the server's failure)."""
    if not isinstance(reply, ResponseError):
        return None
    code, _, rest = str(reply).partition(" ")
    argument, _, why = rest.partition(" ")
    if code != ARGS_REFUSAL or not _ARGUMENT.fullmatch(argument) or not why.strip():
        return None
    return ArgsRefusal(argument, why)


def encode_route_change(version: int, content_hash: str, types: Sequence[str]) -> bytes:
    """The message the library publishes when it points ``types`` at ``content_hash`` at
    route ``version``: ``<version>\\0<hash>\\0<type>[\\0<type>...]`` in UTF-8, the version
    in decimal. ``ValueError`` if no type is given, or a type or the hash is empty or
    holds NUL: no message could say it."""
    text = "\x00".join((content_hash, *types))
    # The join's NULs are the separators: one more is in a field, and an empty field
    # leaves two together or one at an end. Counted rather than looped: every put does it.
    if not types or not content_hash or not all(types) or text.count("\x00") != len(types):
        raise ValueError(
            f"a route change needs a hash and at least one type, each non-empty text "
            f"without NUL: {content_hash!r}, {list(types)!r}"
        )
    return b"%d\x00%b" % (version, text.encode("utf-8"))


def decode_route_change(data: bytes) -> RouteChange:
    """What the route-change message ``data`` says; ``ValueError`` if it is not one (not
    UTF-8, fewer than three fields, a version not in decimal as Lua's ``%d`` writes it,
    an empty hash or type), ``TypeError`` if it is not bytes. What it accepts is exactly
    what ``encode_route_change`` makes."""
    if not isinstance(data, bytes):
        raise TypeError(f"a route change is bytes, not {type(data).__name__}")
    try:
        fields = data.decode("utf-8").split("\x00")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not a route change: {data!r}") from exc
    if len(fields) < 3 or not _is_decimal(fields[0]) or "" in fields:
        raise ValueError(f"not a route change: {data!r}")
    # Made as a plain tuple is: a route cache decodes each message of another store.
    return _tuple(RouteChange, (int(fields[0]), fields[1], tuple(fields[2:])))


def field_pairs(reply: Any) -> list[tuple[Any, Any]]:
    """The ``(field, value)`` pairs of a reply that is a flat list of them (RESP2) or a map
    (RESP3, or a reply redis-py made a dict), in the server's order.

    ``ValueError`` for a list of odd length, ``TypeError`` for any other reply: neither
    is a reply of pairs.
    """
    if isinstance(reply, dict):
        return list(reply.items())
    if isinstance(reply, (list, tuple)):
        if len(reply) % 2:
            raise ValueError(f"a reply of pairs has an even length, not {len(reply)}")
        return list(zip(reply[::2], reply[1::2], strict=True))
    raise TypeError(f"a reply of pairs is a list or a map, not {type(reply).__name__}")


# What a Redis-protocol server may reply to each command the store reads or writes with
# (a refusal aside, which is handled before): nil is ``type(None)``.
REPLY_SHAPES: dict[str, type | tuple[type, ...]] = {
    "GET": (bytes, type(None)),
    "HGET": (bytes, type(None)),
    "HMGET": list,
    "HGETALL": (list, dict),
    "HSTRLEN": int,
    "ZRANGEBYLEX": list,
    "FCALL": int,  # every operation of the library replies an integer
    "WAIT": int,
    "WAITAOF": list,
}


def fits(command: Sequence[Any], reply: Any) -> bool:
    """Whether ``reply`` is a shape the server may give to ``command``."""
    first = command[0]
    name = first.args[0] if isinstance(first, PrePacked) else first
    shape = REPLY_SHAPES.get(name) if isinstance(name, str) else None
    return shape is None or isinstance(reply, shape)


# The route version counter's bounds: versions travel as Lua numbers (doubles), exact
# up to 2^53 - 1 (``route_counter`` in ``lua/library.lua`` refuses a counter whose next
# value would not be).
MAX_ROUTE_VERSION = 2**53 - 1
_COUNTER = re.compile(rb"-?[1-9][0-9]*|0")


def is_route_counter(value: bytes) -> bool:
    """Whether ``value`` is a route version counter the next write can raise, by the
    rule the Lua applies: an integer as ``INCR`` reads one, below ``2^53 - 1``."""
    if not _COUNTER.fullmatch(value) or len(value.lstrip(b"-")) > 16:
        return False
    return -MAX_ROUTE_VERSION <= int(value) < MAX_ROUTE_VERSION


def stored_text(value: Any, where: str) -> str:
    """``value``, a type or a hash the server held at ``where``, as text; damage (not
    UTF-8, empty, holding NUL) raises ``SerializationError`` naming ``where``."""
    try:
        text = bytes(value).decode("utf-8")
    except (TypeError, UnicodeDecodeError) as exc:
        raise SerializationError(f"{where} is not UTF-8 text: {value!r}") from exc
    if not text or "\x00" in text:
        why = "empty" if not text else "text holding NUL"
        raise SerializationError(f"{where} is {why}, which no write leaves: {value!r}")
    return text


def _is_decimal(text: str) -> bool:
    """Whether ``text`` is an integer as Lua's ``%d`` writes it: ASCII digits, maybe after
    a minus, with no leading zero (so a message decodes only from the bytes that
    ``encode_route_change`` makes of what it says)."""
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit() and (digits[0] != "0" or text == "0")
