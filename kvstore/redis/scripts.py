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

Checked before it is trusted: anyone who may ``FUNCTION LOAD`` can load another library
under this release's name. ``check_library`` reads what each server holds under it
(``FUNCTION LIST LIBRARYNAME <name> WITHCODE``) and ``held`` compares it with the text,
byte for byte; ``load_library`` does so whenever the server says the library "already
exists", and refuses another (``mismatch_error``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from importlib.abc import Traversable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from kvstore.errors import BackendError
from kvstore.redis.protocol import field_pairs
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


class Held(Enum):
    """What a server holds under a library's name."""

    OURS = "the library, byte for byte"
    ABSENT = "no library of that name"
    OTHER = "a library of that name whose code differs"
    UNCHECKED = "not known: the credential may not FUNCTION LIST"


def held(reply: Any, library: Library) -> Held:
    """What the server holds under ``library``'s name, by ``reply``, its answer to
    ``FUNCTION LIST LIBRARYNAME <name> WITHCODE`` (a refusal: ``UNCHECKED``).
    ``ValueError`` for a reply no Redis gives."""
    if isinstance(reply, ResponseError):
        return Held.UNCHECKED
    if not isinstance(reply, list):
        raise ValueError(f"FUNCTION LIST had an answer no Redis gives: {reply!r:.100}")
    name = library.name.encode()
    for entry in reply:
        fields = {_as_bytes(k): v for k, v in field_pairs(entry)}
        if _as_bytes(fields.get(b"library_name")) == name:
            code = _as_bytes(fields.get(b"library_code"))
            return Held.OURS if code == library.text else Held.OTHER
    return Held.ABSENT


async def ask_held(send: Send, library: Library) -> Held:
    """What the server that ``send`` reaches holds under ``library``'s name."""
    return held(await send(("FUNCTION", "LIST", "LIBRARYNAME", library.name, "WITHCODE")), library)


def mismatch_error(
    library: Library, servers: list[str], missing: str | None = None
) -> BackendError:
    """The error of every write, and of a load, where ``servers`` hold a library of
    ``library``'s name whose code is not ``library``'s (``missing``: a function of
    ``library`` the call found missing from it)."""
    lacks = "" if missing is None else f", and has no function {missing}"
    return BackendError(
        f"{', '.join(servers)}: the library {library.name} there is not this release's "
        f"kvstore library (its code differs{lacks}), so no write uses it; remove it with "
        f"`FUNCTION DELETE {library.name}`, then run `kvstore setup --url URL`"
    )


async def check_library(
    client: Redis | RedisCluster | Target,
    library: Library | None = None,
    *,
    send: Send | None = None,
) -> list[tuple[str, Held]]:
    """What each server that must hold ``library`` (this release's) holds under its
    name: on the server, or on every primary of a cluster. ``send`` as ``load_library``
    takes it."""
    library = LIBRARY if library is None else library
    target = client if isinstance(client, Target) else target_for(client)
    return await target.load_library(lambda to_server: ask_held(to_server, library), send)


async def load_library(
    client: Redis | RedisCluster | Target,
    library: Library | None = None,
    *,
    send: Send | None = None,
) -> list[str]:
    """Load ``library`` (this release's) on the server, or on every primary of a cluster.

    Idempotent: a server that holds it already counts as done, once its code is checked
    to be ``library``'s byte for byte (``FUNCTION LIST ... WITHCODE``). One line per
    server says which: ``"<server>: loaded <name>"``, ``"<server>: <name> was loaded
    already"``, or, where the credential may not ``FUNCTION LIST``, ``"<server>: <name>
    was loaded already (its code not checked: this credential may not FUNCTION LIST)"``.
    A server that holds another library of that name raises ``BackendError`` saying to
    delete it (``mismatch_error``), once every server was seen to. Raises what the
    client raises, ``NoPermissionError`` when the credential may not ``FUNCTION LOAD``.
    ``send``, on a single node, sends the commands instead of the client and returns
    each reply, a refusal as its ``ResponseError`` value: a store sends them on its own
    connections, so a load needs none of the pool's besides them.
    """
    library = LIBRARY if library is None else library
    said = await load_on_servers(client, library, send=send)
    other = [server for server, found, _ in said if found is Held.OTHER]
    if other:
        raise mismatch_error(library, other)
    return [f"{server}: {line}" for server, _, line in said]


async def load_on_servers(
    client: Redis | RedisCluster | Target,
    library: Library | None = None,
    *,
    send: Send | None = None,
) -> list[tuple[str, Held, str]]:
    """``load_library``'s work, raising nothing for another library of the name: each
    server's name, what it then holds under the library's name, and the line that
    says so."""
    library = LIBRARY if library is None else library
    target = client if isinstance(client, Target) else target_for(client)
    said = await target.load_library(lambda to_server: _load(to_server, library), send)
    return [(server, found, line) for server, (found, line) in said]


async def _load(send: Send, library: Library) -> tuple[Held, str]:
    """``FUNCTION LOAD`` of ``library`` on the server ``send`` reaches: what the server
    then holds under its name, and the line that says so. Raises any refusal but the
    server holding a library of that name already."""
    for _ in range(_LOADS):
        reply = await send(("FUNCTION", "LOAD", library.text))
        if not isinstance(reply, ResponseError):
            return Held.OURS, f"loaded {library.name}"
        if "already exists" not in str(reply):
            raise reply
        found = await ask_held(send, library)
        if found is Held.UNCHECKED:
            return found, (
                f"{library.name} was loaded already (its code not checked: this "
                "credential may not FUNCTION LIST)"
            )
        if found is not Held.ABSENT:
            return found, f"{library.name} was loaded already"
        # Deleted between the load and the list: load it again.
    return Held.ABSENT, f"{library.name} was deleted as often as it was loaded"


# How many times a load goes on when the library is deleted between its load and its check.
_LOADS = 3


def _as_bytes(value: Any) -> Any:
    """``value`` as bytes if it is text (a client that decodes replies), else as it is."""
    return value.encode() if isinstance(value, str) else value


LIBRARY = build_library()
PUT_PACKAGE = LIBRARY.functions["put_package"]
DELETE_PACKAGE = LIBRARY.functions["delete_package"]
PUT_ROUTE = LIBRARY.functions["put_route"]
# Layout 2: the blob and the row in one call on one server; on a cluster, the blob on its
# own node first, then the row.
PUT_PACKAGE_BLOB = LIBRARY.functions["put_package_blob"]
PUT_PACKAGE_DIGEST = LIBRARY.functions["put_package_digest"]
PUT_BLOB = LIBRARY.functions["put_blob"]
DROP_BLOB = LIBRARY.functions["drop_blob"]
PUT_PACKAGE_INLINE = LIBRARY.functions["put_package_inline"]
# kvstore migrate (kvstore.tools.migrate): the layout marker flipped from 1 to 2, then
# each row still holding its archive made a row of its blob, which is written first.
SET_LAYOUT = LIBRARY.functions["set_layout"]
MIGRATE_ROW = LIBRARY.functions["migrate_row"]
