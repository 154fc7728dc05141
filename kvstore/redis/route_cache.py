"""Every route of a namespace held in memory, kept true by the server's announcements.

The functions that write routes (``lua/put_package-5.lua``, ``lua/put_route-3.lua``) raise
the namespace's route version (``{ns}:route-version``) and publish the change, with that
version, on ``{ns}:route-changes`` in the same atomic step. A ``RouteCache``:

1. subscribes to the channel (``SSUBSCRIBE``: the functions publish with ``SPUBLISH``) and
   waits for the server to confirm it, so every change from then on reaches it;
2. reads the routes and the version in one ``MULTI``/``EXEC`` (a snapshot at version V),
   then sends a ``PING`` on the subscription: its answer shows that every message
   published before the snapshot was read has been delivered;
3. applies, in order, each message above V, skipping those at or below V (already in
   the snapshot). A message that skips a version means one was lost: it reloads.

The version rules are a table of their own, without I/O (``kvstore.redis.route_table``):
it also finds a server whose version went *backwards* (a ``FLUSHDB``, a restart without
the data, a restore of an older snapshot, a failover to a lagging replica), and the
cache then forgets what it knew and reloads. A counter made anew starts at the server's
clock in microseconds, so after a flush or an empty restart the next write looks like a
skipped version. A restore keeps an older counter: a snapshot below the highest version
seen, or a message at or below the current one once the ``PING`` was answered, shows it.

A reset that no write follows sends no message, so the cache also reads the version on
its own (a ``GET`` through the store's client, or the shard's node on a cluster: a RESP2
subscription cannot send a ``GET``) once every ``health_interval`` seconds while it is
live, quiet or not (the read also places own writes the table could not place). One
cheap read a second, by default, is what it costs for the bound: a cache converges on
what the server holds within about ``2 * health_interval`` seconds of any reset or
restore (plus the reconnection, when the server restarted). A ``GET`` unanswered for
``health_interval`` seconds ends the session, as an unanswered ``PING`` does.

It answers lookups only while all this holds ("live"). Until the first snapshot, while
the subscription is being re-established, and during a reload, it answers nothing and
the store asks the server, so no lookup is served from a table that is not being kept
up to date. A subscription that dies silently (no error, no data) is noticed by a
``PING`` sent after ``health_interval`` seconds of quiet and unanswered for as long
again: a silently dead subscription serves stale routes for at most about
``2 * health_interval`` seconds. On any failure the cache drops its subscription, goes
not live, and starts again from step 1, so a reconnect always reloads in full.

The subscription is read with the connection's own reply reader, in batches: every
reply received so far is taken at once (up to a batch), each message applied as it is
taken, and once the cache has caught up the replies are left to gather for a
millisecond, so a burst of writes costs one wake-up per batch rather than one per write
(a write of another store is seen at most that much later), and a long burst never
leaves the cache behind. The message of a write this store made is known byte for byte
from the write's reply, so it is applied without being decoded; any other message is
decoded once. A reload that no watch waits on lists no changes.

Writes made through the store that owns the cache are applied at once (``note_write``),
so a store always reads its own acknowledged writes: a reply whose version is not newer
than the cached entry sends lookups of that type to the server until the table can tell
which one is current.

Each session asks the store's target (``kvstore.redis.target``) for the client of the
node that publishes the channel: on a single node (``redis.asyncio.Redis``, Sentinel,
fakeredis) the store's own client; on a cluster, where the channel carries the
namespace's hash tag so its messages stay on the shard that holds the namespace, a
client of that shard's primary, found anew each session, so a failover or a moved slot
(after which the server ends shard subscriptions) is followed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio import Connection, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry

from kvstore.errors import SerializationError
from kvstore.records import PackageRouteRecord
from kvstore.redis.keyspace import LAYOUTS, Keyspace
from kvstore.redis.protocol import (
    decode_route_change,
    encode_route_change,
    field_pairs,
    stored_text,
)
from kvstore.redis.replies import (
    NOT_ENOUGH_DATA,
    PUBSUB_KINDS,
    handle_push,
    lean_reader,
    passed_on,
)
from kvstore.redis.retry import Backoff, no_silent_reconnect
from kvstore.redis.route_table import ASK_SERVER, AskServer, Message, RouteTable
from kvstore.redis.route_watch import RouteWatch
from kvstore.redis.target import Target

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # pragma: no cover - redis-py depends on async-timeout below 3.11.3
    from async_timeout import timeout as _deadline

__all__ = ["ASK_SERVER", "RouteCache", "RouteCacheError"]

_log = logging.getLogger(__name__)

_PING: Final = b"kvstore-route-cache "
# The most replies of the subscription read in one turn, between checks of the clock.
_BATCH = 1024
# After a batch, how long the subscription's replies are left to gather before the
# next is read: a burst of writes costs one wake-up per batch, not one per write.
_GATHER = 0.001
# Own writes whose messages are awaited, beyond which those the stream has passed are
# forgotten (a message that came before its write's reply leaves one behind). Thousands
# of puts in flight put thousands here at once.
_OWN_WRITES = 1 << 16
# Connections a cache takes from its client's pool: the subscription, and another while
# it reads a snapshot or the version.
POOL_CONNECTIONS = 2
# Setting up a subscription has a bound even when the store's calls have none.
_DEFAULT_SETUP_TIMEOUT = 10.0
# Snapshots in a row that each find the server's version going backwards: beyond this
# the session starts again (with backoff) rather than spin.
_MAX_RELOADS = 5


class RouteCacheError(Exception):
    """The subscription or its snapshot failed; the cache is not live until it recovers."""


class RouteCache:
    """The routes of one namespace, live while the subscription that updates them is.

    ``lookup`` answers only while live, and ``ASK_SERVER`` otherwise. ``start``
    launches the background task (it needs a running event loop); ``aclose`` stops it
    and ends every watch.
    """

    def __init__(
        self,
        target: Target,
        keys: Keyspace,
        *,
        timeout: float | None,
        health_interval: float = 1.0,
        watch_limit: int = 10_000,
    ) -> None:
        if health_interval <= 0:
            raise ValueError(f"health_interval must be positive, not {health_interval!r}")
        self._target = target
        # The single node that serves the namespace's slot, for the session under way.
        self._node: Redis | None = None
        self._keys = keys
        self._setup_timeout = timeout if timeout is not None else _DEFAULT_SETUP_TIMEOUT
        self._health_interval = health_interval
        self._watch_limit = watch_limit
        self._table = RouteTable()
        # Raised at every snapshot; a PING carries it, so its answer tells which
        # snapshot it followed.
        self._generation = 0
        self._awaiting_pong = False
        self._changed = asyncio.Event()
        # The message each recent write of this store published, byte for byte, with
        # what it says: such a message is applied without being decoded.
        self._own_writes: dict[bytes, tuple[int, str, Sequence[str]]] = {}
        self._watches: set[RouteWatch] = set()
        self._task: asyncio.Task[None] | None = None
        self._session_went_live = False
        self._closed = False
        # Full loads of the table, the first included (telemetry reads it).
        self.reloads = 0

    # The owner's side.

    @property
    def live(self) -> bool:
        """Whether lookups are answered from memory (except types ``lookup`` defers)."""
        return self._table.answering and not self._closed

    def lookup(self, workflow_type: str) -> str | AskServer | None:
        """The hash the route of ``workflow_type`` points at, ``None`` if it has no
        route, or ``ASK_SERVER`` when the cache cannot answer (the caller asks the
        server). Starts the cache if it is not running."""
        found = self._table.lookup(workflow_type) if not self._closed else ASK_SERVER
        if found is ASK_SERVER:
            self.start()
        return found

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

    def note_write(self, version: int, content_hash: str, types: Sequence[str]) -> None:
        """Apply a route write this process made, from the script's reply."""
        table = self._table
        table.note_write(version, content_hash, types)
        if table.answering and version > table.stream_version:
            # Its message is still to come: the functions publish exactly these bytes.
            announced = encode_route_change(version, content_hash, types)
            self._own_writes[announced] = (version, content_hash, types)

    def _forget_own_writes(self) -> None:
        """Bound the own writes awaited: those the stream has passed never come."""
        if len(self._own_writes) > _OWN_WRITES:
            passed = self._table.stream_version
            self._own_writes = {m: w for m, w in self._own_writes.items() if w[0] > passed}
            if len(self._own_writes) > _OWN_WRITES:
                self._own_writes.clear()  # their messages are then decoded: no harm

    def watch(self) -> RouteWatch:
        """A new watch of route writes; see ``RouteWatch``."""
        if self._closed:
            raise RuntimeError("the store is closed")
        self.start()
        watch = RouteWatch(self, self._watch_limit)
        if self.live:
            watch.take_table()
        self._watches.add(watch)
        return watch

    async def aclose(self) -> None:
        self._closed = True
        self._table.go_down()
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
            watch.finish()
        self._watches.clear()
        self._changed.set()

    # The subscription.

    async def _run(self) -> None:
        backoff = Backoff()
        # Runs for the life of the store; every turn waits on the server or sleeps.
        while not self._closed:
            self._session_went_live = False
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning(
                    "route cache of %r lost its subscription: %s", self._keys.namespace, exc
                )
            self._go_down()
            if self._session_went_live:
                backoff.reset()
                continue  # it was working: try again at once, then back off
            await asyncio.sleep(backoff.next())

    async def _follow(self) -> None:
        """Subscribe, load, and follow the channel until something fails."""
        try:
            node = self._node = await self._target.subscription_client(self._keys.route_changes)
        except LookupError as exc:
            raise RouteCacheError(str(exc)) from None
        self._own_writes.clear()  # a new subscription: their messages may never come
        pubsub = node.pubsub()
        saved_retry: Retry | None = None
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
            connection = pubsub.connection
            assert connection is not None
            # Failing at once lets the cache go not live and reload.
            saved_retry = connection.retry
            connection.retry = no_silent_reconnect()
            async with _deadline(self._setup_timeout):
                await pubsub.ssubscribe(self._keys.route_changes)
                await self._confirmed(pubsub)
                await self._reload(pubsub)
            self._session_went_live = True
            _log.info(
                "route cache of %r is live at route version %d",
                self._keys.namespace,
                self._table.stream_version,
            )
            await self._listen(pubsub)
        finally:
            self._go_down()
            if saved_retry is not None and pubsub.connection is not None:
                pubsub.connection.retry = saved_retry
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            self._node = None
            await self._target.release_subscription_client(node)

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
        connection = pubsub.connection
        assert connection is not None, "a session listens on its subscription"
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self._health_interval
        # Ends by an exception, cancellation or closing; each turn waits at most one interval.
        while not self._closed:
            first = await connection.read_response(
                timeout=self._health_interval, disconnect_on_error=False, push_request=True
            )
            if first is None:
                if self._awaiting_pong:
                    raise RouteCacheError(
                        f"no reply to PING within {self._health_interval}s; "
                        "the subscription is presumed dead"
                    )
                await self._ping(pubsub)
            else:
                self._awaiting_pong = False  # any answer shows the connection alive
                taken = await self._take_replies(pubsub, connection, first)
                self._forget_own_writes()
                # A full batch means more is waiting: read on at the next turn of the loop.
                await asyncio.sleep(_GATHER if taken < _BATCH else 0)
            if loop.time() >= next_check:
                await self._check_version(pubsub)
                next_check = loop.time() + self._health_interval

    async def _take_replies(self, pubsub: PubSub, connection: Connection, first: Any) -> int:
        """Act on ``first``, then on every reply of the subscription received so far, up
        to ``_BATCH`` in all, in order; returns how many.

        The connection's own reply reader, without the pub/sub layer of redis-py over
        it (message dictionaries, a retry wrapper, a timer per message). When it parses
        with hiredis, messages are applied as they are taken from its reader
        (``_apply_held``), and only other replies go through ``_on_reply``; otherwise
        each reply already buffered is read through ``read_response``.
        """
        taken = 1
        reply: Any = first
        reader = lean_reader(connection)
        can_read = getattr(connection, "can_read", None) or connection.can_read_destructive
        while True:
            if reply is Message.RELOAD:
                await self._reload(pubsub)
            elif reader is not None and passed_on(reply, PUBSUB_KINDS):
                await handle_push(connection, reply)
            else:
                outcome = self._on_message(reply)
                if outcome is None:
                    await self._on_reply(pubsub, reply)
                elif outcome is Message.RELOAD:
                    await self._reload(pubsub)
            if reader is not None:
                applied, reply = self._apply_held(reader, _BATCH - taken)
                taken += applied
                if reply is not None:
                    taken += reply is not Message.RELOAD
                    continue
            # What the connection has buffered: a read that returns without waiting.
            if taken >= _BATCH or not await can_read():
                return taken
            # Bounded: a reply whose rest never comes is read on at the next turn (the
            # parser keeps what it has), and the silence is then noticed as usual.
            reply = await connection.read_response(
                timeout=self._health_interval, disconnect_on_error=False, push_request=True
            )
            if reply is None:
                return taken
            taken += 1

    def _apply_held(self, reader: Any, most: int) -> tuple[int, Any]:
        """Apply the channel's messages ``reader`` (hiredis) already holds, in order and
        up to ``most``, each as it is taken: a burst's messages are never gathered in a
        list, garbage every collection would walk. Returns how many were applied and
        what stopped it: ``None`` (nothing left, or ``most`` applied),
        ``Message.RELOAD`` (the last one applied calls for a reload), or the first
        reply that is not a message of the channel, taken from the reader."""
        gets = reader.gets
        apply = self._apply_message
        applied = 0
        while applied < most:
            reply = gets()
            if reply is NOT_ENOUGH_DATA:
                return applied, None
            if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == b"smessage"):
                return applied, reply
            applied += 1
            if apply(reply[2]) is Message.RELOAD:
                return applied, Message.RELOAD
        return applied, None

    async def _on_reply(self, pubsub: PubSub, reply: Any) -> None:
        """Act on one reply of the subscription: a message, a pong, or a change of it."""
        if not isinstance(reply, list):
            # RESP3 answers a PING on a subscribed connection as a plain reply.
            kind, data = b"pong", reply
        elif len(reply) >= 2:
            kind, data = reply[0], reply[-1]
        else:
            raise RouteCacheError(f"unexpected reply on the subscription: {reply!r}")
        if isinstance(kind, str):
            kind = kind.encode()
        kind = kind.lower()
        if kind == b"smessage":
            if self._apply_message(data) is Message.RELOAD:
                await self._reload(pubsub)
        elif kind == b"pong":
            if data == _PING + b"%d" % self._generation:
                self._table.settled()
        elif kind == b"ssubscribe":
            raise RouteCacheError("the subscription was re-established: changes may be lost")
        elif kind == b"sunsubscribe":
            # The server drops shard subscribers when their slot moves to another node.
            raise RouteCacheError("the server ended the subscription: its slot moved")

    async def _ping(self, pubsub: PubSub) -> None:
        await pubsub.ping(_PING + b"%d" % self._generation)
        self._awaiting_pong = True

    async def _check_version(self, pubsub: PubSub) -> None:
        """Read the server's version on its own: a reset that no write follows shows."""
        assert self._node is not None, "versions are read within a session"
        floor = self._table.mark()
        try:
            # Bounded as the PING is: a server this slow is not keeping the cache true.
            async with _deadline(self._health_interval):
                found = await self._node.get(self._keys.route_version)
        except asyncio.TimeoutError:
            raise RouteCacheError(
                f"no answer to GET {self._keys.route_version!r} within {self._health_interval}s"
            ) from None
        if self._table.version_read(_version(found), floor):
            self._log_backwards(_version(found), floor)
            await self._reload(pubsub)

    def _on_message(self, reply: Any) -> Message | None:
        """Apply ``reply`` if it is a message of the channel, saying how; ``None`` for
        any other reply (``_on_reply`` acts on those)."""
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"smessage":
            return self._apply_message(reply[2])
        return None

    def _apply_message(self, data: Any) -> Message:
        """Apply a message of the channel; ``RELOAD``: the caller reloads."""
        if not isinstance(data, bytes):
            raise RouteCacheError(f"unexpected message on the route channel: {data!r}")
        own = self._own_writes.pop(data, None)
        if own is not None:
            # Byte for byte the message of a write this store made: what it says is known.
            version, text, changed = own
        else:
            try:
                version, text, changed = decode_route_change(data)
            except ValueError as exc:
                raise RouteCacheError(f"unexpected message on the route channel: {data!r}") from exc
        before = self._table.stream_version
        outcome = self._table.apply_message(version, text, changed)
        if outcome is Message.APPLIED:
            for watch in self._watches:
                watch.push([PackageRouteRecord(t, text) for t in changed])
        elif outcome is Message.RELOAD:
            # A version never announced, or one the stream had already passed: only a
            # fresh snapshot is sure to be right.
            _log.info(
                "route cache of %r reloads: version %d after %d",
                self._keys.namespace,
                version,
                before,
            )
        return outcome

    async def _reload(self, pubsub: PubSub) -> None:
        self._table.go_down()
        self.reloads += 1
        for _ in range(_MAX_RELOADS):
            floor = self._table.mark()
            async with _deadline(self._setup_timeout):
                version, table = await self._snapshot()
            changes = self._table.apply_snapshot(version, table, floor, changes=bool(self._watches))
            if changes is None:
                self._log_backwards(version, floor)
                continue
            self._generation += 1
            # Answered after every message published before the snapshot was read.
            await self._ping(pubsub)
            for watch in self._watches:
                watch.push([PackageRouteRecord(t, h) for t, h in changes])
            self._changed.set()
            return
        raise RouteCacheError("the server's route version kept going backwards")

    def _log_backwards(self, found: int, floor: int) -> None:
        _log.warning(
            "route cache of %r reloads: the server's route version went back from %d to %d",
            self._keys.namespace,
            floor,
            found,
        )

    async def _snapshot(self) -> tuple[int, dict[str, str]]:
        keys = self._keys
        assert self._node is not None, "snapshots are taken within a session"
        pipe = self._node.pipeline(transaction=True)
        pipe.get(keys.format)
        pipe.get(keys.route_version)
        pipe.hgetall(keys.routes)
        found, version, pairs = await pipe.execute()
        if found is not None and found not in LAYOUTS:
            raise RouteCacheError(f"{keys.format!r} says layout {found!r}")
        where = repr(keys.routes)
        try:
            table = {
                stored_text(t, f"{where} field {t!r}"): stored_text(h, f"{where} field {t!r}")
                for t, h in field_pairs(pairs)
            }
        except SerializationError as exc:
            # Lookups go to the server, which raises the same error to the caller.
            raise RouteCacheError(str(exc)) from exc
        return _version(version), table

    def _go_down(self) -> None:
        self._table.go_down()
        self._changed.set()

    def stream_table(self) -> list[PackageRouteRecord]:
        """The table as of the stream's version, for a watch."""
        return [PackageRouteRecord(t, h) for t, h in self._table.stream_table()]

    def forget(self, watch: RouteWatch) -> None:
        """Stop telling ``watch`` of writes."""
        self._watches.discard(watch)


def _version(found: Any) -> int:
    """The route version a ``GET`` returned: an absent counter is version 0."""
    return 0 if found is None else int(found)
