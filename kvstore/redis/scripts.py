"""The server-side Lua: one Redis Functions library built from the top-level ``lua/`` folder.

``lua/library.lua`` holds what the operations share; every other file is one atomic
operation, named ``<operation>-<number of KEYS>.lua``, its header documenting each
``KEYS[i]``, ``ARGV[i]``, publish and reply. The library's text is ``library.lua``
followed by each operation registered as a function (``redis.register_function``) whose
body reads its keys and arguments as ``KEYS`` and ``ARGV``, as the file has them.

Versions side by side: the library and its functions are named by a digest of that
text (library ``kvstore_<12 hex>``, functions ``kvstore_<12 hex>_<operation>``). Two
releases of kvstore whose Lua differs load two libraries and never replace each other's
functions, so engines of both can share a server during a rolling upgrade. A library
stays on the server (persisted and replicated with the data) until an operator removes
it with ``FUNCTION DELETE kvstore_<12 hex>`` once no engine runs that release.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from kvstore.redis.target import Send, Target, target_for
from kvstore.redis.wire import PrePacked

PRELUDE = "library.lua"
_NAME = "kvstore_{digest}"  # the library; its functions add "_<operation>"


@dataclass(frozen=True)
class Function:
    """One operation of the library, called with ``FCALL``."""

    operation: str
    name: str
    numkeys: int

    def call_prefix(self, *leading: bytes) -> PrePacked:
        """``FCALL``, the function's name, the key count and the ``leading`` keys and
        arguments that every call of a namespace shares, formatted once."""
        return PrePacked("FCALL", self.name, self.numkeys, *leading)


@dataclass(frozen=True)
class Library:
    name: str
    text: bytes
    functions: dict[str, Function]


def _script_folder() -> Traversable:
    # ``kvstore/lua`` is the top-level ``lua/`` folder: a link to it in a checkout, a
    # copy of it in a built wheel.
    return resources.files("kvstore") / "lua"


def build_library(folder: Traversable | None = None) -> Library:
    """The library of the ``.lua`` files in ``folder`` (the package's ``lua/``)."""
    folder = _script_folder() if folder is None else folder
    prelude = b""
    operations: list[tuple[str, int, bytes]] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".lua"):
            continue
        if entry.name == PRELUDE:
            prelude = entry.read_bytes()
            continue
        operation, _, numkeys = entry.name[: -len(".lua")].rpartition("-")
        operations.append((operation, int(numkeys), entry.read_bytes()))
    operations.sort()

    def text(name: str) -> bytes:
        parts = [b"#!lua name=%b\n" % name.encode(), prelude]
        for operation, _, body in operations:
            parts += [
                b"\nredis.register_function('%b_%b', function(keys, args)\n"
                % (name.encode(), operation.encode()),
                b"local KEYS, ARGV = keys, args\n",
                body,
                b"" if body.endswith(b"\n") else b"\n",
                b"end)\n",
            ]
        return b"".join(parts)

    # The digest is of the text with the name left out, which then carries it.
    digest = hashlib.sha256(text(_NAME)).hexdigest()[:12]
    name = _NAME.format(digest=digest)
    functions = {
        operation: Function(operation, f"{name}_{operation}", numkeys)
        for operation, numkeys, _ in operations
    }
    return Library(name, text(name), functions)


def is_missing_function(reply: object) -> bool:
    """Whether ``reply`` is the server's answer to an ``FCALL`` of a function it lacks."""
    return isinstance(reply, ResponseError) and "function not found" in str(reply).lower()


async def load_library(
    client: Redis | RedisCluster | Target,
    library: Library | None = None,
    *,
    send: Send | None = None,
) -> list[str]:
    """Load ``library`` (this release's) on the server, or on every primary of a cluster.

    Idempotent: a server that holds it already counts as done. One line per server says
    which: ``"<server>: loaded <name>"`` or ``"<server>: <name> was loaded already"``.
    Raises what the client raises, ``NoPermissionError`` when the credential may not
    ``FUNCTION LOAD``. ``send``, on a single node, sends the command instead of the
    client and returns its reply, a refusal as its ``ResponseError`` value: a store
    sends it on its own connections, so a load needs none of the pool's besides them.
    """
    library = LIBRARY if library is None else library
    target = client if isinstance(client, Target) else target_for(client)
    return [
        f"{server}: {_loaded(library, reply)}"
        for server, reply in await target.load_library(library.text, send)
    ]


def _loaded(library: Library, reply: Any) -> str:
    """What a ``FUNCTION LOAD`` of ``library`` that replied ``reply`` did; raises any
    refusal but the server holding it already."""
    if isinstance(reply, ResponseError):
        if "already exists" not in str(reply):
            raise reply
        return f"{library.name} was loaded already"
    return f"loaded {library.name}"


LIBRARY = build_library()
PUT_PACKAGE = LIBRARY.functions["put_package"]
DELETE_PACKAGE = LIBRARY.functions["delete_package"]
PUT_ROUTE = LIBRARY.functions["put_route"]
