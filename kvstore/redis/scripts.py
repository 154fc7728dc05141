"""The Lua scripts, one per atomic server operation, loaded from the package's resources.

A script's file name is ``<name>-<number of KEYS>.lua``; its header documents each
``KEYS[i]``, ``ARGV[i]`` and every reply.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

from kvstore.redis.wire import Command, Recurring, flatten


@dataclass(frozen=True)
class Script:
    name: str
    numkeys: int
    body: bytes
    sha: bytes

    def evalsha(self, keys: list[bytes], args: list[bytes]) -> Command:
        return ("EVALSHA", self.sha, self.numkeys, *keys, *args)

    def head(self, *leading: bytes) -> Recurring:
        """``EVALSHA``, the digest, the key count and the ``leading`` keys and arguments
        that every call of a namespace shares, formatted once."""
        return Recurring("EVALSHA", self.sha, self.numkeys, *leading)

    def eval_instead(self, command: Command) -> Command:
        """The ``EVAL`` of this script's ``EVALSHA`` ``command``, for a server that lost it."""
        return ("EVAL", self.body, *flatten(command)[2:])


def _script_folder() -> Traversable:
    # ``kvstore/lua`` is the top-level ``lua/`` folder: a link to it in a checkout, a
    # copy of it in a built wheel.
    return resources.files("kvstore") / "lua"


def load_scripts() -> dict[str, Script]:
    scripts: dict[str, Script] = {}
    for entry in _script_folder().iterdir():
        if not entry.name.endswith(".lua"):
            continue
        name, _, numkeys = entry.name[: -len(".lua")].rpartition("-")
        body = entry.read_bytes()
        sha = hashlib.sha1(body).hexdigest().encode("ascii")
        scripts[name] = Script(name, int(numkeys), body, sha)
    return scripts


SCRIPTS = load_scripts()
PUT_PACKAGE = SCRIPTS["put_package"]
DELETE_PACKAGE = SCRIPTS["delete_package"]
PUT_ROUTE = SCRIPTS["put_route"]
