"""Commands in the Redis protocol, with the arguments that recur in every call formatted once.

A command is a tuple of arguments: ``bytes``, ``str``, ``int``, or ``PrePacked``, a run
of arguments that many calls share (a command name, a function name, a namespace's
keys). The run is formatted when the store is made, so a call only formats what is its
own: on a put, that halves the client's packing work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

Command = tuple[Any, ...]

# The longest part ``pack_parts`` emits of a large argument: sent one at a time, with the
# event loop free to run between them.
SLICE = 1 << 20


def _bulk(arg: bytes | str | int) -> bytes:
    data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
    return b"$%d\r\n%b\r\n" % (len(data), data)


class PrePacked:
    """A run of ``args`` that stands for all of them in a command, formatted once."""

    __slots__ = ("args", "packed")

    def __init__(self, *args: bytes | str | int) -> None:
        if not args:
            raise ValueError("a pre-packed run needs at least one argument")
        self.args = args
        self.packed = b"".join(_bulk(arg) for arg in args)

    def __repr__(self) -> str:
        return f"PrePacked{self.args!r}"


def flatten(command: Command) -> Command:
    """``command`` with every ``PrePacked`` run spelled out, as a client method takes it."""
    if not any(type(arg) is PrePacked for arg in command):
        return command
    flat: list[Any] = []
    for arg in command:
        if type(arg) is PrePacked:
            flat.extend(arg.args)
        else:
            flat.append(arg)
    return tuple(flat)


# The headers of bulk strings under 256 bytes, formatted once: keys, row ids, stamps,
# hashes and types are all that short.
_BULK_HEADERS: Final = tuple(b"$%d\r\n" % n for n in range(256))


def pack_commands(commands: Sequence[Command]) -> bytes:
    """``commands`` in the Redis protocol: each an array of bulk strings."""
    parts: list[bytes] = []
    append = parts.append
    headers = _BULK_HEADERS
    for command in commands:
        count = len(command)
        head = len(parts)
        append(b"")  # the array header, once its length is known
        for arg in command:
            kind = type(arg)
            if kind is bytes:
                # Joined once, at the end: an argument is copied no sooner.
                size = len(arg)
                append(headers[size] if size < 256 else b"$%d\r\n" % size)
                append(arg)
                append(b"\r\n")
            elif kind is PrePacked:
                append(arg.packed)
                count += len(arg.args) - 1
            else:
                append(_bulk(arg))
        parts[head] = b"*%d\r\n" % count
    return b"".join(parts)


def pack_parts(commands: Sequence[Command], slice_size: int = SLICE) -> list[bytes | memoryview]:
    """``commands`` in the Redis protocol, as parts to send one after another.

    Joined, the parts are ``pack_commands(commands)``, byte for byte. A ``bytes``
    argument of ``slice_size`` bytes or more is never copied: it is a run of
    ``memoryview`` slices of it, ``slice_size`` bytes each (the last one shorter), with
    the protocol around it in the parts before and after. Everything else is joined
    into as few parts as that allows.
    """
    if slice_size <= 0:
        raise ValueError(f"slice_size must be positive, not {slice_size!r}")
    parts: list[bytes | memoryview] = []
    run: list[bytes] = []  # protocol not yet joined into a part
    for command in commands:
        count = len(command)
        head = len(run)
        run.append(b"")  # the array header, once its length is known
        for arg in command:
            kind = type(arg)
            if kind is bytes and len(arg) >= slice_size:
                if head >= 0:
                    # The header must come before the run is cut: count what is left.
                    run[head] = b"*%d\r\n" % (len(command) + _prepacked_extra(command))
                    head = -1
                run.append(b"$%d\r\n" % len(arg))
                parts.append(b"".join(run))
                run = [b"\r\n"]
                view = memoryview(arg)
                parts.extend(view[i : i + slice_size] for i in range(0, len(arg), slice_size))
            elif kind is bytes:
                run.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
            elif kind is PrePacked:
                run.append(arg.packed)
                count += len(arg.args) - 1
            else:
                run.append(_bulk(arg))
        if head >= 0:
            run[head] = b"*%d\r\n" % count
    if run:
        parts.append(b"".join(run))
    return [part for part in parts if len(part)]


def _prepacked_extra(command: Command) -> int:
    """How many more arguments ``command`` has than items, its runs spelled out."""
    return sum(len(arg.args) - 1 for arg in command if type(arg) is PrePacked)
