"""Plain server commands for the operator's tools (``status``, ``check``, ``gc``).

The store has methods for the contract only; the tools also need ``INFO``, ``CONFIG
GET``, ``SCAN`` and ``WATCH``. They borrow the store's own client for those: the store
sends its calls on connections of its own (its lanes), so a borrowed command takes
another pooled connection and never interleaves with the store's pipelines. Each
command is bounded by the store's ``timeout``, since a client made by ``from_url`` has no
socket timeout of its own, and its failures become ``BackendError`` as the store's do
(``kvstore.redis.failures``), password redacted.

``Admin`` speaks to one server (``status`` and ``check`` refuse a cluster); ``Servers``
to every server that holds a namespace's keys, each primary of a cluster included, as
``gc`` needs: a namespace's blobs spread over all of them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoPermissionError, RedisError, WatchError

from kvstore.errors import BackendError
from kvstore.redis.calls import Calls
from kvstore.redis.failures import backend_error, client_secrets
from kvstore.redis.keyspace import Keyspace
from kvstore.redis.store import RedisPackageStore
from kvstore.redis.target import target_for

T = TypeVar("T")
# A server of ``Servers``: None for the one server, else a primary of the cluster.
Node = ClusterNode | None

# Keys asked of SCAN at a time, and commands sent in one pipeline.
CHUNK = 1000


def glob_escape(raw: bytes) -> bytes:
    """``raw`` as a ``MATCH`` pattern that matches exactly it (``*?[]\\`` escaped)."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", raw)


def library_calls(store: RedisPackageStore) -> Calls:
    """Calls of the library's functions for a tool of ``store``'s namespace, made the way
    the store makes its writes (``kvstore.redis.calls``), on connections of their own;
    close them with ``aclose``."""
    target = target_for(store.client)
    return Calls(target, Keyspace(store.namespace), store.options, spare_connections=0)


def borrow_client(store: RedisPackageStore) -> Redis:
    """The store's client; ``TypeError`` for a cluster client (the tools speak to one node)."""
    return target_for(store.client).admin_client()


class _Bounded:
    """Commands of one store's tool, each bounded by the store's ``timeout`` and translated."""

    def __init__(self, store: RedisPackageStore, client: Redis | RedisCluster) -> None:
        self.store = store
        self.timeout = store.options.timeout
        self._secrets = client_secrets(client)

    async def bounded(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result; ``BackendError`` on a timeout or any refusal but NOPERM.

        ``NoPermissionError`` passes through, for callers to say what the credential may
        not read, and ``WatchError``, for a check-and-set to judge again.
        """
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except (NoPermissionError, WatchError):
            raise
        except asyncio.TimeoutError:
            raise BackendError(f"{self.store!r}: no reply within {self.timeout} seconds") from None
        except RedisError as exc:
            error = self.error(exc)
            raise error from error.__cause__  # the cause is kept only when nothing was redacted

    def error(self, exc: BaseException) -> BackendError:
        """``exc``, a failure of a command sent here, as ``BackendError`` naming the store."""
        return backend_error(exc, repr(self.store), self._secrets)

    async def command(self, *args: Any, node: Node = None) -> Any:
        raise NotImplementedError

    async def scan(self, pattern: bytes, node: Node = None) -> AsyncIterator[list[bytes]]:
        """The keys ``SCAN MATCH pattern`` meets on ``node``, a batch at a time, each key
        once: every key there from the first batch to the last (SCAN's promise; it may
        meet a key twice, which is not handed out again)."""
        seen: set[bytes] = set()
        cursor: Any = 0
        while True:
            cursor, keys = await self.command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", CHUNK, node=node
            )
            if isinstance(cursor, dict):  # a cluster client's reply names the node
                (cursor,) = cursor.values()
            new = [key for key in keys if key not in seen]
            seen.update(new)
            yield new
            if int(cursor) == 0:
                return


class Admin(_Bounded):
    """Commands on one server for one store's namespace, each bounded and translated."""

    def __init__(self, store: RedisPackageStore) -> None:
        self.client = borrow_client(store)
        super().__init__(store, self.client)

    async def command(self, *args: Any, node: Node = None) -> Any:
        """The reply to one command on the one server (``node`` is always ``None``)."""
        return await self.bounded(self.client.execute_command(*args))  # type: ignore[no-untyped-call]


class Servers(_Bounded):
    """Commands to the servers of one store: its one server, or any primary of its
    cluster, named by a ``Node``; each bounded and translated as ``Admin``'s."""

    def __init__(self, store: RedisPackageStore) -> None:
        self.client = store.client
        super().__init__(store, self.client)
        self._target = target_for(self.client)

    async def primaries(self) -> list[Node]:
        """Every server that may hold a key: the one server, or each primary, as the
        cluster's slot table has them now."""
        nodes: list[Node] = await self.bounded(self._target.primaries())
        return nodes

    def node_of(self, key: bytes) -> Node:
        """The server that holds ``key`` (call ``primaries`` first, on a cluster)."""
        try:
            node: Node = self._target.node_of(key)
        except LookupError as exc:
            raise BackendError(f"{self.store!r}: {exc}") from None
        return node

    def name(self, node: Node) -> str:
        return self.store.server if node is None else node.name

    async def command(self, *args: Any, node: Node = None) -> Any:
        """The reply to one command on ``node``."""
        options: dict[str, Any] = {} if node is None else {"target_nodes": node}
        return await self.bounded(self.client.execute_command(*args, **options))

    async def batch(self, commands: Sequence[Sequence[Any]], node: Node = None) -> list[Any]:
        """The replies to ``commands``, pipelined (to ``node``, or on a cluster each to
        its key's slot when ``node`` is None), a refusal as its exception value."""
        if not commands:
            return []
        options: dict[str, Any] = {} if node is None else {"target_nodes": node}
        pipe: Any
        async with self.client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command, **options)
            replies: list[Any] = await self.bounded(pipe.execute(raise_on_error=False))
        return replies
