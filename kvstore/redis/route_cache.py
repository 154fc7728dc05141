"""Every route of a namespace held in memory, kept true by the server's announcements.

The scripts that write routes (``lua/put_package-5.lua``, ``lua/put_route-3.lua``) raise
the namespace's route version (``{ns}:route-version``) and publish the change, with that
version, on ``{ns}:route-changes`` in the same atomic step. A ``RouteCache``:

1. subscribes to the channel (``SSUBSCRIBE``: the scripts publish with ``SPUBLISH``) and
   waits for the server to confirm it, so every change from then on reaches it;
2. reads the routes and the version in one ``MULTI``/``EXEC`` (a snapshot at version V);
3. applies, in order, each message above V, skipping those at or below V (already in
   the snapshot). A message that skips a version means one was lost: it reloads.

It answers lookups only while this holds ("live"). Until the first snapshot, while the
subscription is being re-established, and during a reload, it answers nothing and the
store asks the server, so no lookup is served from a table that is not being kept up to
date. A subscription that dies silently (no error, no data) is noticed by a ``PING``
sent after ``health_interval`` seconds of quiet and unanswered for as long again: a
silently dead subscription serves stale routes for at most about
``2 * health_interval`` seconds. On any failure the cache drops its subscription, goes
not live, and starts again from step 1, so a reconnect always reloads in full.

Writes made through the store that owns the cache are applied at once (``note_write``),
so a store always reads its own writes. Every entry remembers the version that set it
and is only replaced by a higher one, so writes applied from the reply and from the
channel, in whatever order they arrive, leave the newest value.

On a single node (``redis.asyncio.Redis``, Sentinel, fakeredis) the cache subscribes and
reads through the store's client. On a cluster the channel carries the namespace's hash
tag, so its messages stay on the shard that holds the namespace: each session opens a
client of its own to that shard's primary, found anew, so a failover or a moved slot
(after which the server ends shard subscriptions) is followed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Final

from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kvstore.records import PackageRouteRecord
from kvstore.redis.keyspace import FORMAT_VERSION, Keyspace

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # pragma: no cover - redis-py depends on async-timeout below 3.11.3
    from async_timeout import timeout as _deadline

_log = logging.getLogger(__name__)

_PING: Final = b"kvstore-route-cache"
_FIRST_RETRY = 0.05
_MAX_RETRY = 2.0
# Setting up a subscription has a bound even when the store's calls have none.
_DEFAULT_SETUP_TIMEOUT = 10.0


def _init_parameters(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes, through every ``__init__`` it inherits."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names - {"self", "args", "kwargs"}


class RouteCacheError(Exception):
    """The subscription or its snapshot failed; the cache is not live until it recovers."""


class RouteCache:
    """The routes of one namespace, live while the subscription that updates them is.

    ``lookup`` answers only while live; the owner asks the server otherwise. ``start``
    launches the background task (it needs a running event loop); ``aclose`` stops it
    and ends every watch.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        keys: Keyspace,
        *,
        timeout: float | None,
        health_interval: float = 1.0,
        watch_limit: int = 10_000,
    ) -> None:
        if health_interval <= 0:
            raise ValueError(f"health_interval must be positive, not {health_interval!r}")
        self._client = client
        # The single node that serves the namespace's slot, for the session under way.
        self._node: Redis | None = None
        self._keys = keys
        self._setup_timeout = timeout if timeout is not None else _DEFAULT_SETUP_TIMEOUT
        self._health_interval = health_interval
        self._watch_limit = watch_limit
        # What lookups answer: the stream's table plus this store's own newer writes.
        self.routes: dict[str, str] = {}
        self._versions: dict[str, int] = {}
        # The table exactly as of ``_stream_version``: what watches are told about.
        self._stream_routes: dict[str, str] = {}
        self._stream_version = 0
        self.live = False
        self.last_error: BaseException | None = None
        self._changed = asyncio.Event()
        self._watches: set[RouteWatch] = set()
        self._task: asyncio.Task[None] | None = None
        self._session_went_live = False
        self._closed = False

    # The owner's side.

    def start(self) -> None:
        """Launch the subscription task if it is not running; idempotent."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_live(self, timeout: float) -> bool:
        """Whether the cache is live, waiting up to ``timeout`` seconds for it."""
        self.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.live and not self._closed:
            remaining = end - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return self.live
        return self.live

    def note_write(self, version: int, content_hash: str, types: Iterable[str]) -> None:
        """Apply a route write this process made, from the script's reply."""
        for workflow_type in types:
            if version > self._versions.get(workflow_type, -1):
                self.routes[workflow_type] = content_hash
                self._versions[workflow_type] = version

    def watch(self) -> RouteWatch:
        """A new watch of route writes; see ``RouteWatch``."""
        if self._closed:
            raise RuntimeError("the store is closed")
        self.start()
        watch = RouteWatch(self, self._watch_limit)
        if self.live:
            watch._take_table()
        self._watches.add(watch)
        return watch

    async def aclose(self) -> None:
        self._closed = True
        self.live = False
        task, self._task = self._task, None
        # A cancellation that races a wake-up can be swallowed by asyncio.wait_for on
        # Python 3.11 (inside redis-py or fakeredis): cancel until it takes, boundedly.
        for _ in range(200):
            if task is None or task.done():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved, so it is never reported as lost
        for watch in list(self._watches):
            watch._finish()
        self._watches.clear()
        self._changed.set()

    # The subscription.

    async def _run(self) -> None:
        delay = _FIRST_RETRY
        # Runs for the life of the store; every turn waits on the server or sleeps.
        while not self._closed:
            self._session_went_live = False
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = exc
                _log.warning(
                    "route cache of %r lost its subscription: %s", self._keys.namespace, exc
                )
            self._go_down()
            if self._session_went_live:
                delay = _FIRST_RETRY
                continue  # it was working: try again at once, then back off
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY)

    async def _follow(self) -> None:
        """Subscribe, load, and follow the channel until something fails."""
        node = self._node = await self._node_client()
        pubsub = node.pubsub()
        saved_retry: Retry | None = None
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
            connection = pubsub.connection
            assert connection is not None
            # redis-py would silently reconnect and resubscribe, losing the messages of
            # the gap; failing at once lets the cache go not live and reload instead.
            saved_retry = connection.retry
            connection.retry = Retry(NoBackoff(), 0, supported_errors=())
            async with _deadline(self._setup_timeout):
                await pubsub.ssubscribe(self._keys.route_changes)
                await self._confirmed(pubsub)
                await self._reload()
            self._session_went_live = True
            await self._listen(pubsub)
        finally:
            self._go_down()
            if saved_retry is not None and pubsub.connection is not None:
                pubsub.connection.retry = saved_retry
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            self._node = None
            if node is not self._client:
                await node.aclose()

    async def _node_client(self) -> Redis:
        """The client of the node whose shard holds the namespace (its channel included)."""
        if isinstance(self._client, Redis):
            return self._client
        # A cluster: a client of its own to the primary that serves the namespace's slot,
        # found anew each session, so a moved slot or a failover is followed.
        await self._client.initialize()
        node = self._client.get_node_from_key(self._keys.route_changes.decode("ascii"))
        if node is None:
            raise RouteCacheError(f"no cluster node serves {self._keys.route_changes!r}")
        options: dict[str, Any] = dict(self._client.get_connection_kwargs())
        connection_class = options.pop("connection_class", Connection)
        # The cluster's connection options include its own (callbacks, pool sizes): keep
        # those a connection of this class takes, credentials and TLS among them.
        accepted = _init_parameters(connection_class)
        options = {k: v for k, v in options.items() if k in accepted}
        pool = ConnectionPool(
            connection_class=connection_class, host=node.host, port=node.port, **options
        )
        return Redis.from_pool(pool)  # closing the client closes the pool

    async def _confirmed(self, pubsub: PubSub) -> None:
        # The server sends the confirmation before any message of the channel.
        for _ in range(16):
            message = await pubsub.get_message(timeout=self._setup_timeout)
            if message is None:
                break
            if message["type"] == "ssubscribe":
                return
        raise RouteCacheError("the server did not confirm the subscription")

    async def _listen(self, pubsub: PubSub) -> None:
        awaiting_pong = False
        # Ends by an exception, cancellation or closing; each turn waits at most one interval.
        while not self._closed:
            message = await pubsub.get_message(timeout=self._health_interval)
            if message is None:
                if awaiting_pong:
                    raise RouteCacheError(
                        f"no reply to PING within {self._health_interval}s; "
                        "the subscription is presumed dead"
                    )
                await pubsub.ping(_PING)
                awaiting_pong = True
                continue
            awaiting_pong = False
            kind = message["type"]
            if kind == "smessage":
                await self._on_message(message["data"])
            elif kind == "ssubscribe":
                raise RouteCacheError("the subscription was re-established: changes may be lost")
            elif kind == "sunsubscribe":
                # The server drops shard subscribers when their slot moves to another node.
                raise RouteCacheError("the server ended the subscription: its slot moved")

    async def _on_message(self, data: Any) -> None:
        if not isinstance(data, bytes):
            raise RouteCacheError(f"unexpected message on the route channel: {data!r}")
        version_text, _, rest = data.partition(b"\x00")
        content_hash, *types = rest.split(b"\x00")
        version = int(version_text)
        if version <= self._stream_version:
            return  # published before the snapshot was read, so already in it
        # The snapshot found no counter (0): the write that makes it starts from the
        # server's clock (lua/library.lua, next_route_version), so its first version
        # follows 0. Messages arrive in order after the subscription, which came first.
        fresh = self._stream_version == 0
        if (version != self._stream_version + 1 and not fresh) or not types:
            # A version never announced (a lost message, or a script stopped midway):
            # only a fresh snapshot is sure to be right.
            _log.info(
                "route cache of %r reloads: version %d after %d",
                self._keys.namespace,
                version,
                self._stream_version,
            )
            await self._reload()
            return
        text = content_hash.decode("utf-8")
        changed = [t.decode("utf-8") for t in types]
        self._stream_version = version
        for workflow_type in changed:
            self._stream_routes[workflow_type] = text
        self.note_write(version, text, changed)
        for watch in self._watches:
            watch._push([PackageRouteRecord(t, text) for t in changed])

    async def _reload(self) -> None:
        self.live = False
        version, table = await self._snapshot()
        routes = dict(table)
        versions = dict.fromkeys(table, version)
        for workflow_type, own in self._versions.items():
            if own > version:  # this store's write, newer than the snapshot
                routes[workflow_type] = self.routes[workflow_type]
                versions[workflow_type] = own
        changes = [
            PackageRouteRecord(t, h)
            for t, h in sorted(table.items())
            if self._stream_routes.get(t) != h
        ]
        self._stream_routes = table
        self._stream_version = version
        self.routes = routes
        self._versions = versions
        self.live = True
        for watch in self._watches:
            watch._push(changes)
        self._changed.set()

    async def _snapshot(self) -> tuple[int, dict[str, str]]:
        keys = self._keys
        assert self._node is not None, "snapshots are taken within a session"
        pipe = self._node.pipeline(transaction=True)
        pipe.get(keys.format)
        pipe.get(keys.route_version)
        pipe.hgetall(keys.routes)
        found, version, pairs = await pipe.execute()
        if found is not None and found != FORMAT_VERSION:
            raise RouteCacheError(f"{keys.format!r} says layout {found!r}")
        try:
            table = {t.decode("utf-8"): h.decode("utf-8") for t, h in pairs.items()}
        except UnicodeDecodeError as exc:
            raise RouteCacheError(f"{keys.routes!r} holds text that is not UTF-8") from exc
        return (0 if version is None else int(version)), table

    def _go_down(self) -> None:
        self.live = False
        self._changed.set()

    def _table(self) -> list[PackageRouteRecord]:
        return [PackageRouteRecord(t, h) for t, h in sorted(self._stream_routes.items())]

    def _forget(self, watch: RouteWatch) -> None:
        self._watches.discard(watch)


class RouteWatch:
    """An async iterator of the writes to a namespace's routes, as the cache sees them.

    It first yields every route of the table as of version V, the version the cache
    holds when the watch is made (or first loads, if it is not live yet), in code-point
    order of workflow type; then each route write above V, in the order the server
    applied them, including writes that left a route where it was. While the
    subscription is down nothing is yielded; once it is back, each route whose value
    changed meanwhile is yielded once, with its current value. A watch that falls
    ``limit`` writes behind its reader is handed the whole table again instead of the
    writes it missed. So the last value yielded for each type is always the route's
    value as of the cache. It ends when the store is closed or the watch is
    (``aclose``, or leaving ``async with``).
    """

    def __init__(self, cache: RouteCache, limit: int) -> None:
        self._cache = cache
        self._limit = limit
        self._pending: deque[PackageRouteRecord] = deque()
        self._needs_table = True
        self._wake = asyncio.Event()
        self._done = False

    def _push(self, changes: list[PackageRouteRecord]) -> None:
        # Called while the cache is live, its table already holding ``changes``.
        self._wake.set()
        if self._needs_table:
            self._take_table()
        elif len(self._pending) + len(changes) > self._limit:
            self._pending.clear()
            self._needs_table = True
        else:
            self._pending.extend(changes)

    def _take_table(self) -> None:
        self._needs_table = False
        self._pending.extend(self._cache._table())

    def _finish(self) -> None:
        self._done = True
        self._wake.set()

    def __aiter__(self) -> RouteWatch:
        return self

    async def __anext__(self) -> PackageRouteRecord:
        # Each turn returns or waits for a wake-up; the wake-ups are the cache's writes.
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._done:
                raise StopAsyncIteration
            if self._needs_table and self._cache.live:
                self._take_table()
                continue
            self._wake.clear()
            await self._wake.wait()

    async def aclose(self) -> None:
        self._cache._forget(self)
        self._finish()
        self._pending.clear()

    async def __aenter__(self) -> RouteWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
