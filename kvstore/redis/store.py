"""The package store over Redis, Valkey, a Redis Cluster or fakeredis.

Writes are single calls of the kvstore library's Redis functions (``lua/``, loaded by
``kvstore.redis.scripts``), so a deploy's row, index entry and routes change together or
not at all. The keys are laid out in ``kvstore.redis.keyspace``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError, NoPermissionError, RedisError, ResponseError

from kvstore.errors import BackendError, SerializationError
from kvstore.records import (
    PackageHead,
    PackageRecord,
    PackageRouteRecord,
    check_chunk,
    check_record,
    check_route_types,
    check_text,
)
from kvstore.redis.keyspace import (
    FORMAT_VERSION,
    Keyspace,
    decode_stamp,
    encode_stamp,
    row_id,
    split_index_member,
    split_row_id,
)
from kvstore.redis.options import DEFAULTS, StoreOptions
from kvstore.redis.pipeline import Pipeliner
from kvstore.redis.retry import Backoff, Budget, no_client_retries
from kvstore.redis.route_cache import ASK_SERVER, POOL_CONNECTIONS, RouteCache, RouteWatch
from kvstore.redis.scripts import (
    DELETE_PACKAGE,
    LIBRARY,
    PUT_PACKAGE,
    PUT_ROUTE,
    is_missing_function,
    load_library,
)
from kvstore.redis.urls import client_from_url
from kvstore.redis.wire import SLICE, Command, PrePacked, flatten

_log = logging.getLogger(__name__)

_HMGET_ROW = PrePacked("HMGET")
_ROW_FIELDS = PrePacked(b"archive", b"deployed_at")
_HGET_STAMP = PrePacked("HGET")
_STAMP_FIELD = PrePacked(b"deployed_at")
_HSTRLEN = PrePacked("HSTRLEN")
_ARCHIVE_FIELD = PrePacked(b"archive")

# An archive larger than this is checked against the server's proto-max-bulk-len before
# it is sent, so that a server that would refuse it never drops a connection carrying
# other calls. Below it, no server's limit can be in the way (Redis and Valkey refuse
# to set the limit under 1 MiB).
LARGE_ARGUMENT = 512 << 10
# What ``iter_packages`` holds of archives at a time, those being handed out and those
# under way together (unless one archive alone is larger): the client's memory for a
# listing, whatever the archives' sizes.
LISTING_BYTES = 64 << 20
# The most archive bytes one round trip of a listing reads (a larger archive comes alone).
LISTING_GROUP = 8 << 20


@dataclass(frozen=True)
class StoreHealth:
    """What a store knows of its server, without asking it (``RedisPackageStore.health``).

    ``connected``: the last reply the store waited for came (``False`` before any call,
    and after a call whose connection broke, stalled or could not be made, until one
    reaches the server again). ``route_cache_live``: whether route lookups are answered
    from memory (``None``: the store does not cache routes). ``last_error``: the last
    failure to reach the server, password redacted, or ``None`` since the last reply.
    ``library_loaded``: whether the last write found this release's library on the
    server, or could load it (``None``: no write yet).
    """

    connected: bool
    route_cache_live: bool | None
    last_error: str | None
    library_loaded: bool | None


class RedisPackageStore:
    """A ``PackageStore`` over one namespace of a Redis-protocol server.

    ``client`` is a ``redis.asyncio.Redis``, a ``redis.asyncio.cluster.RedisCluster`` or
    a ``fakeredis.FakeAsyncRedis``, made with ``decode_responses=False``. The store
    never closes a client it was given.

    Any number of tasks may share one store: concurrent calls are coalesced into
    pipelines on at most ``lanes`` connections, all made at its first call (which waits
    for one of them; each as it is needed where the pool lacks room for a route cache's
    connections besides) and held until ``aclose()``, so none fails for want of a pooled
    connection, and a burst soon after the first call finds every one ready. The library
    is loaded on them too. Each attempt is bounded by ``timeout`` seconds (``None``: no
    bound). Transient failures (a broken or stalled connection, a loading server, a
    failover) are retried with capped, jittered backoff for ``retry_budget`` seconds;
    then, and on any other failure of the server, the call raises ``BackendError``,
    whose message never carries a password. No call outlives about ``retry_budget +
    timeout`` from when it was made, however many are queued before it; a caller's
    cancellation always ends its call with ``CancelledError``. An archive over the
    server's ``proto-max-bulk-len`` raises ``BackendError`` and fails no other call (see
    ``LARGE_ARGUMENT``). Every operation is idempotent, which is what makes retrying
    safe. Calls still waiting when the store is closed raise ``BackendError``.

    Each write is one ``FCALL`` of the kvstore library (``kvstore.redis.scripts``). A
    call that finds the library missing loads it (on every primary of a cluster; one
    load at a time per store) and is sent once more; when the credential may not load
    it, the call raises ``BackendError`` saying to run ``kvstore setup``. A write over a
    key that holds another type raises ``SerializationError`` naming the key, and writes
    nothing.

    With ``min_replicas=N`` every write also waits for ``N`` replicas to acknowledge it
    (``WAIT``), and raises ``BackendError`` when they do not within ``replica_timeout``
    seconds: the write is then on the primary but could be lost in a failover.

    With ``cache_routes=True`` (on a single node, Sentinel or a cluster), the store keeps every
    route of the namespace in memory, kept true by the changes the write functions publish
    (``kvstore.redis.route_cache``): ``get_package_route`` answers from memory while the
    subscription is healthy and from the server otherwise, a store always sees its own
    acknowledged writes, and another store's write is seen as soon as its message arrives
    (a silently dead subscription is noticed within about ``2 * route_health_interval``
    seconds). When the server's data goes back (a flush, a restart without persistence,
    an older snapshot, a lagging replica promoted), every cache converges on what the
    server holds within about ``2 * route_health_interval`` seconds of reaching it.
    ``watch_routes`` then yields route writes as they happen.

    With ``telemetry=True`` every call is a span and a measurement through OpenTelemetry
    (``kvstore.redis.telemetry``); it logs through ``logging.getLogger("kvstore")``
    either way. ``ping`` and ``health`` tell a readiness probe whether the store can
    reach its server.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        namespace: str = DEFAULTS.namespace,
        timeout: float | None = DEFAULTS.timeout,
        lanes: int = DEFAULTS.lanes,
        retry_budget: float = DEFAULTS.retry_budget,
        min_replicas: int = DEFAULTS.min_replicas,
        replica_timeout: float = DEFAULTS.replica_timeout,
        cache_routes: bool = DEFAULTS.cache_routes,
        route_health_interval: float = DEFAULTS.route_health_interval,
        telemetry: bool = DEFAULTS.telemetry,
    ) -> None:
        self._options = StoreOptions(
            namespace=namespace,
            timeout=timeout,
            lanes=lanes,
            retry_budget=retry_budget,
            min_replicas=min_replicas,
            replica_timeout=replica_timeout,
            cache_routes=cache_routes,
            route_health_interval=route_health_interval,
            telemetry=telemetry,
        )
        if not isinstance(client, (Redis, RedisCluster)):
            raise TypeError(
                f"client must be a redis.asyncio.Redis or RedisCluster, not {type(client).__name__}"
            )
        options = _connection_options(client)
        if options.get("decode_responses"):
            raise ValueError("client must be made with decode_responses=False: archives are bytes")
        if min_replicas and isinstance(client, RedisCluster):
            # WAIT names no key, so a cluster client cannot route it to the shard written.
            raise ValueError("min_replicas needs a single-primary client, not a cluster")
        self._keys = k = Keyspace(namespace)
        # What every call of a kind shares, formatted once (see each lua/ file's header).
        self._put_prefix = PUT_PACKAGE.call_prefix(k.format, k.index, k.routes, k.route_version)
        self._put_shared = PrePacked(FORMAT_VERSION, k.route_changes)
        self._route_prefix = PUT_ROUTE.call_prefix(
            k.format, k.routes, k.route_version, FORMAT_VERSION, k.route_changes
        )
        self._delete_prefix = DELETE_PACKAGE.call_prefix(k.format, k.index)
        self._format_check = (PrePacked("GET", k.format),)
        self._client = client
        self._owns_client = False
        password = options.get("password")
        self._secrets = [password] if isinstance(password, str) and password else []
        self._server = _describe_server(client, options)
        self._pipeliner = Pipeliner(
            client,
            lanes=lanes,
            timeout=timeout,
            retry_budget=retry_budget,
            translate=self._backend_error,
            # What else takes connections of the pool: the route cache, if any (the
            # library is loaded on the lanes).
            spare_connections=POOL_CONNECTIONS if cache_routes else 0,
        )
        # The server's proto-max-bulk-len, read on the first large put (None: unknown).
        self._max_bulk: int | None = None
        self._max_bulk_read = False
        self._max_bulk_lock = asyncio.Lock()
        self._wait: Command | None = None
        if min_replicas:
            self._wait = ("WAIT", min_replicas, round(replica_timeout * 1000))
        self._timeout = timeout
        self._loading: asyncio.Future[list[str]] | None = None
        self._route_cache: RouteCache | None = None
        if cache_routes:
            self._route_cache = RouteCache(
                client, self._keys, timeout=timeout, health_interval=route_health_interval
            )
        # Whether a write found this release's library on the server (None: no write yet).
        self._library_found: bool | None = None
        if telemetry:
            # Imported only here: without telemetry, opentelemetry is never loaded.
            from kvstore.redis import telemetry as observed

            self._pipeliner.observer = observed.instrument(
                self, _telemetry_attributes(client, options, namespace)
            )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = DEFAULTS.namespace,
        timeout: float | None = DEFAULTS.timeout,
        lanes: int = DEFAULTS.lanes,
        retry_budget: float = DEFAULTS.retry_budget,
        min_replicas: int = DEFAULTS.min_replicas,
        replica_timeout: float = DEFAULTS.replica_timeout,
        cache_routes: bool = DEFAULTS.cache_routes,
        route_health_interval: float = DEFAULTS.route_health_interval,
        telemetry: bool = DEFAULTS.telemetry,
        **client_options: Any,
    ) -> RedisPackageStore:
        """A store with a client of its own, which ``aclose`` closes.

        ``url`` is one of the forms ``kvstore.redis.urls`` lists: ``redis://``, ``rediss://``
        (TLS), ``unix://``, ``redis+cluster://`` or ``redis+sentinel://``. The options are
        those of the constructor, checked before the client is made.
        ``client_options`` go to the client (``ssl_ca_certs=...``, ``max_connections=...``).
        Connecting is bounded by ``timeout`` too, and the client's own retries are off,
        so ``retry_budget`` alone decides how long a call keeps trying.
        """
        if not isinstance(url, str):
            raise TypeError(f"url must be str, not {type(url).__name__}")
        checked = StoreOptions(
            namespace=namespace,
            timeout=timeout,
            lanes=lanes,
            retry_budget=retry_budget,
            min_replicas=min_replicas,
            replica_timeout=replica_timeout,
            cache_routes=cache_routes,
            route_health_interval=route_health_interval,
            telemetry=telemetry,
        )
        # No socket timeout: the pipeliner's deadline already bounds every attempt, and
        # redis-py would pay for a second timer on every send and every read.
        options: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "socket_timeout": None,
            "retry": no_client_retries(),
        }
        options.update(client_options)
        options["decode_responses"] = False
        client = client_from_url(url, options)
        store = cls(client, **checked.keywords())
        store._owns_client = True
        return store

    @property
    def namespace(self) -> str:
        return self._keys.namespace

    @property
    def options(self) -> StoreOptions:
        """The options the store was made with."""
        return self._options

    @property
    def client(self) -> Redis | RedisCluster:
        """The redis-py client the store speaks through (given, or made by ``from_url``).

        The operator's tools borrow it for commands beyond the contract (``INFO``,
        ``SCAN``, ``WATCH``): the store sends its own calls on connections it holds, so
        a borrowed command takes another pooled connection and never interleaves with
        the store's pipelines. Closing it is the store's job when it made it.
        """
        return self._client

    def __repr__(self) -> str:
        return f"RedisPackageStore(namespace={self.namespace!r}, server={self._server!r})"

    async def aclose(self) -> None:
        """Stop the store's own work and close the client if the store made it."""
        if self._route_cache is not None:
            await self._route_cache.aclose()
        if self._loading is not None:
            self._loading.cancel()
        await self._pipeliner.aclose()
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> RedisPackageStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Health.

    async def ping(self) -> None:
        """One round trip to the server through the store's own connections, sent as
        the store's calls are; raises ``BackendError`` if no answer comes within
        ``timeout`` seconds, retries included (a probe wants the state now, not after
        the retry budget), or if the server refuses it."""
        run = self._pipeliner.run((("PING",),))
        try:
            if self._timeout is None:
                (reply,) = await run
            else:
                (reply,) = await asyncio.wait_for(run, self._timeout)
        except asyncio.TimeoutError:
            stalled = TimeoutError(f"no answer to PING within {self._timeout} s")
            self._pipeliner.last_failure = f"TimeoutError: {stalled}"  # for health()
            raise self._backend_error(stalled) from None
        self._reply(reply)

    def health(self) -> StoreHealth:
        """What the store knows of its server now, without a round trip; see
        ``StoreHealth``. Cheap enough for every readiness probe."""
        failure = self._pipeliner.last_failure
        return StoreHealth(
            connected=self._pipeliner.reached and failure is None,
            route_cache_live=None if self._route_cache is None else self._route_cache.live,
            last_error=(
                None if failure is None else f"{self._server}: {_redact(failure, self._secrets)}"
            ),
            library_loaded=self._library_found,
        )

    # Writes: one function call each.

    async def put_package(self, record: PackageRecord) -> None:
        command, size = self._put_command(check_record(record))
        alone = size > LARGE_ARGUMENT and await self._refused_or_unknown(size)
        # What _call does, spelled out: every deploy comes this way, and with thousands
        # in flight each coroutine a put holds across its wait is one more object for
        # every garbage collection meanwhile to walk.
        unit = self._with_wait(command)
        replies = await self._pipeliner.run(unit, size, alone=alone)
        if is_missing_function(replies[0]):
            replies = await self._run_with_library(unit, size, alone)
        self._note_put(record, self._result(command, replies))

    async def put_package_with_routes(
        self, record: PackageRecord, route_workflow_types: Iterable[str]
    ) -> None:
        own = check_record(record).workflow_type
        also = dict.fromkeys(check_route_types(route_workflow_types))
        also.pop(own, None)
        command, size = self._put_command(record, tuple(also))
        alone = size > LARGE_ARGUMENT and await self._refused_or_unknown(size)
        self._note_put(record, await self._call(command, size, alone=alone), tuple(also))

    def _put_command(
        self, record: PackageRecord, also: tuple[str, ...] = ()
    ) -> tuple[Command, int]:
        """The call that puts ``record``, re-pointing the routes of its own type and of
        ``also``, and how many bytes it carries."""
        # The record checked its fields when it was made; deployed_at is aware and in range.
        row = row_id(record.workflow_type, record.content_hash)
        command = (
            self._put_prefix,
            self._keys.row(row),
            self._put_shared,
            row,
            encode_stamp(record.deployed_at.astimezone(timezone.utc)),
            record.archive,
            record.content_hash.encode("utf-8"),
            record.workflow_type.encode("utf-8"),
            *[t.encode("utf-8") for t in also],
        )
        return command, len(record.archive)

    def _note_put(self, record: PackageRecord, version: int, also: tuple[str, ...] = ()) -> None:
        if self._route_cache is not None:
            self._route_cache.note_write(
                version, record.content_hash, (record.workflow_type, *also)
            )

    async def _refused_or_unknown(self, size: int) -> bool:
        """Whether a put whose archive is ``size`` bytes must be sent alone, because
        the server's limit is unknown; raises ``BackendError`` if it is over the limit."""
        if not self._max_bulk_read:  # once per store; the lock keeps it one read
            async with self._max_bulk_lock:
                if not self._max_bulk_read:
                    self._max_bulk = await self._read_max_bulk_len()
                    self._max_bulk_read = True
        limit = self._max_bulk
        if limit is not None and size > limit:
            raise BackendError(
                f"{self._server}: the archive is {size} bytes, over the server's "
                f"proto-max-bulk-len of {limit} bytes: the server would refuse it"
            )
        return limit is None

    async def _read_max_bulk_len(self) -> int | None:
        """The server's proto-max-bulk-len, or ``None`` when it will not say (a user
        without ``CONFIG`` rights gets ``NOPERM``; a cluster client asks a node it does
        not choose; fakeredis has no such setting)."""
        if isinstance(self._client, RedisCluster):
            return None
        reply = await self._send_one(("CONFIG", "GET", "proto-max-bulk-len"))
        # A flat list in RESP2, a map in RESP3; empty when the server has no such setting.
        value: Any
        if isinstance(reply, dict):
            value = reply.get(b"proto-max-bulk-len")
        elif isinstance(reply, list) and len(reply) == 2:
            value = reply[1]
        else:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    async def delete_package(self, workflow_type: str, content_hash: str) -> None:
        row = row_id(
            check_text(workflow_type, "workflow_type"), check_text(content_hash, "content_hash")
        )
        await self._call((self._delete_prefix, self._keys.row(row), FORMAT_VERSION, row))

    async def put_package_route(self, workflow_type: str, content_hash: str) -> None:
        route = PackageRouteRecord(workflow_type, content_hash)
        version = await self._call(
            (
                self._route_prefix,
                route.workflow_type.encode("utf-8"),
                route.content_hash.encode("utf-8"),
            ),
        )
        if self._route_cache is not None:
            self._route_cache.note_write(version, route.content_hash, (route.workflow_type,))

    # Reads: plain commands, each unit led by a check of the layout marker.

    async def get_package(self, workflow_type: str, content_hash: str) -> PackageRecord | None:
        row = row_id(
            check_text(workflow_type, "workflow_type"), check_text(content_hash, "content_hash")
        )
        key = self._keys.row(row)
        ((archive, stamp),) = await self._unit([(_HMGET_ROW, key, _ROW_FIELDS)], archives=True)
        if archive is None and stamp is None:
            return None
        return self._record(key, row, archive, stamp)

    async def get_package_route(self, workflow_type: str) -> str | None:
        checked = check_text(workflow_type, "workflow_type")
        if self._route_cache is not None:
            found = self._route_cache.lookup(checked)
            if found is not ASK_SERVER:
                return found
            # Not live yet, recovering, or unsure of this type: the server answers.
        field = checked.encode("utf-8")
        value = await self._read(("HGET", self._keys.routes, field))
        return (
            None if value is None else self._text(value, f"{self._keys.routes!r} field {field!r}")
        )

    def watch_routes(self) -> RouteWatch:
        """An async iterator of route writes to the namespace (needs ``cache_routes``).

        Registered when called (call it inside a running event loop): first every
        route, then each write, in the order the server applied them, including those
        of other stores; see ``kvstore.redis.route_cache.RouteWatch`` for the exact promise.
        """
        if self._route_cache is None:
            raise RuntimeError("watch_routes needs a store made with cache_routes=True")
        return self._route_cache.watch()

    async def route_cache_ready(self, timeout: float = 10.0) -> bool:
        """Whether lookups are answered from memory, waiting up to ``timeout`` seconds.

        ``False`` at once for a store without ``cache_routes``. Lookups are correct
        either way; this only tells whether they cost a round trip.
        """
        if self._route_cache is None:
            return False
        return await self._route_cache.wait_live(timeout)

    async def list_package_routes(self) -> list[PackageRouteRecord]:
        reply = await self._read(("HGETALL", self._keys.routes))
        # A flat list in RESP2 from a single node, a map in RESP3 or through a cluster client.
        pairs = (
            reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
        )
        where = repr(self._keys.routes)
        routes = [
            PackageRouteRecord(
                self._text(t, f"{where} field {t!r}"), self._text(h, f"{where} field {t!r}")
            )
            for t, h in pairs
        ]
        routes.sort(key=lambda r: r.workflow_type)
        return routes

    async def list_packages(self) -> list[PackageRecord]:
        return [record async for record in self.iter_packages()]

    async def iter_packages(
        self, *, chunk: int = 1000, max_bytes: int = LISTING_BYTES
    ) -> AsyncIterator[PackageRecord]:
        """Every record in ``list_packages`` order, fetched ``chunk`` rows at a time.

        The index is walked by member, not by rank, so a row neither put nor deleted
        during the walk is returned exactly once even while others are written or
        deleted; a row put or deleted meanwhile is returned at most once, as it was or as
        it became. Memory: at most ``chunk`` records at a time, and at most ``max_bytes``
        of archives at a time, those being handed out and those under way together (a
        single larger archive comes alone), as sized by an ``HSTRLEN`` of each row one
        round trip before it is read; plus the id of each row already returned (its
        workflow type and content hash, about 100 bytes with Python's overhead; never its
        archive), which is how a row read at its old place and met again at the later
        place a re-put moved it to is not returned twice. Large archives come in round
        trips of at most 8 MiB, several under way on one connection, so the server sends
        the next while the caller reads one; small archives take one round trip per
        chunk, the sizes of the next chunk asked for with the rows of this one.
        ``max_bytes`` must be a positive int.
        """
        check_chunk(max_bytes, "max_bytes")
        async for key, member, ((archive, _),) in self._walk(
            chunk,
            lambda key: [(_HMGET_ROW, key, _ROW_FIELDS)],
            lambda replies: replies[0][1],
            max_bytes=max_bytes,
        ):
            if not isinstance(archive, bytes):
                raise SerializationError(f"{key!r} is missing its archive")
            yield PackageRecord(member.workflow_type, member.content_hash, archive, member.at)

    async def iter_package_heads(self, *, chunk: int = 1000) -> AsyncIterator[PackageHead]:
        """Every package as ``iter_packages`` lists it, without its archive.

        Each head carries the archive's size instead, so listing a catalogue of large
        archives costs a few dozen bytes per package on the wire. Same order, the same
        promise while others write and the same memory bound as ``iter_packages``.
        Beyond the ``PackageStore`` contract: the command line lists with it.
        """
        async for _, member, (_, size) in self._walk(
            chunk,
            lambda key: [(_HGET_STAMP, key, _STAMP_FIELD), (_HSTRLEN, key, _ARCHIVE_FIELD)],
            lambda replies: replies[0],
        ):
            yield PackageHead(member.workflow_type, member.content_hash, member.at, size)

    async def _walk(
        self,
        chunk: int,
        fetch_row: Callable[[bytes], list[Command]],
        stamp_of: Callable[[list[Any]], Any],
        *,
        max_bytes: int | None = None,
    ) -> AsyncIterator[tuple[bytes, _Member, list[Any]]]:
        """``(key, index member, replies to fetch_row(key))`` for each row in index order,
        ``chunk`` rows per round trip, each row at most once.

        ``stamp_of(replies)`` is the row's ``deployed_at`` as read with them. A row whose
        stamp is no longer the one its member carries was deleted or re-put since the
        index was read: it is skipped here, and a re-put row is met again where it now
        belongs unless the walk is past it. A row already yielded (read at its old
        place, then re-put with a later stamp) is skipped where it is met again; the
        set of row ids that remembers them is the walk's only memory beyond one chunk.

        With ``max_bytes``, the rows' archives are sized (``HSTRLEN``) one round trip
        before they are read; a round trip reads rows whose archives add up to at most
        ``LISTING_GROUP`` (or half of ``max_bytes``, if less), or one row alone if its
        archive alone is larger; and round trips are sent ahead while the archives under
        way and those being yielded stay within ``max_bytes``. The sizes of the next
        members go with the rows of the previous ones, so small archives still take one
        round trip per chunk.
        """
        check_chunk(chunk)
        k = self._keys
        listed: set[bytes] = set()
        # With a byte bound, round trips of a few MiB of archives each (LISTING_GROUP, or
        # half the bound if less) are under way together, as many as the bound holds with
        # the round trip whose rows are being handed out: the server sends the next while
        # the rows of one are yielded, and memory is used and given back in small pieces.
        group = None if max_bytes is None else max(1, min(max_bytes // 2, LISTING_GROUP))
        # Members read from the index whose size is still to be asked for, and members
        # with their archive's size (0 for every row without max_bytes), in index order.
        unsized: list[_Member] = []
        sized: deque[tuple[_Member, int]] = deque()
        members: list[Any] = await self._read(self._next_members(b"-", chunk))
        more = len(members) == chunk
        last = members[-1] if members else b""
        if max_bytes is None:
            sized.extend((self._member(m), 0) for m in members)
        else:
            unsized = [self._member(m) for m in members]
        # Round trips under way, in index order: the task that brings their replies, the
        # rows, the members whose sizes they ask, whether they ask for the next members,
        # and the bytes of their archives.
        under_way: deque[tuple[asyncio.Task[list[Any]], list[_Member], list[_Member], bool, int]]
        under_way = deque()
        handing_out = 0  # the bytes of the archives of the rows being yielded
        loop = asyncio.get_running_loop()

        def room() -> bool:
            """Whether the next rows may be asked for now."""
            if not sized:
                return False  # nothing is sent ahead of a round trip asking for sizes
            if not under_way:
                return True
            if max_bytes is None or group is None:
                return False
            held = handing_out + sum(entry[4] for entry in under_way)
            return held + max(group, sized[0][1]) <= max_bytes

        def send() -> None:
            nonlocal unsized, more
            rows, size = self._take_rows(sized, chunk, group)
            fetch = [command for row in rows for command in fetch_row(k.row(row.row))]
            # Once the rows sized are all read (by this round trip), the sizes of the
            # members read next, and the members after them: one chunk ahead, no more.
            asking, unsized = ([], unsized) if sized else (unsized, [])
            fetch.extend((_HSTRLEN, k.row(row.row), _ARCHIVE_FIELD) for row in asking)
            ask_members = more and not sized
            if ask_members:
                fetch.append(self._next_members(b"(" + last, chunk))
                more = False  # until the reply says
            # Archives of a MiB and more follow each other on one connection.
            large = size >= SLICE
            task = loop.create_task(self._unit(fetch, large_reply=large, archives=large))
            under_way.append((task, rows, asking, ask_members, size))

        try:
            while True:
                while room():
                    send()
                if not under_way:
                    if not (unsized or more):
                        return
                    send()
                task, rows, asking, asked_members, handing_out = under_way.popleft()
                replies = await task
                width = (len(replies) - len(asking) - asked_members) // len(rows) if rows else 0
                sizes = replies[len(rows) * width : len(rows) * width + len(asking)]
                sized.extend(zip(asking, sizes, strict=True))
                if asked_members:
                    members = replies[-1]
                    more = len(members) == chunk
                    last = members[-1] if members else last
                    if max_bytes is None:
                        sized.extend((self._member(m), 0) for m in members)
                    else:
                        unsized = [self._member(m) for m in members]
                while room():  # the next round trips go before these rows are handed out
                    send()
                found: list[Any] = []
                for i, row in enumerate(rows):
                    found = replies[i * width : (i + 1) * width]
                    if stamp_of(found) != row.stamp or row.row in listed:
                        continue
                    listed.add(row.row)
                    yield k.row(row.row), row, found
                # Not held while the next round trip is awaited.
                replies = found = []
                handing_out = 0
        finally:
            for task, *_ in under_way:
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: the walk ended with another error, or none

    @staticmethod
    def _take_rows(
        sized: deque[tuple[_Member, int]], chunk: int, max_bytes: int | None
    ) -> tuple[list[_Member], int]:
        """The next rows to read, and their archives' bytes: up to ``chunk`` rows, their
        archives within ``max_bytes`` (at least one row, whatever its size)."""
        rows: list[_Member] = []
        total = 0
        while sized and len(rows) < chunk:
            row, size = sized[0]
            if max_bytes is not None and rows and total + size > max_bytes:
                break
            sized.popleft()
            rows.append(row)
            total += size
        return rows, total

    def _next_members(self, after: bytes, chunk: int) -> Command:
        return ("ZRANGEBYLEX", self._keys.index, after, b"+", b"LIMIT", 0, chunk)

    # The wire.

    async def _call(self, command: Command, size: int = 0, *, alone: bool = False) -> Any:
        """The reply to ``command``, an ``FCALL`` of the library, loading the library
        first if the server lacks it. ``alone``: sent with nothing else in flight."""
        unit = self._with_wait(command)
        replies = await self._pipeliner.run(unit, size, alone=alone)
        if is_missing_function(replies[0]):
            replies = await self._run_with_library(unit, size, alone)
        return self._result(command, replies)

    def _with_wait(self, command: Command) -> tuple[Command, ...]:
        """``command`` as a unit: followed by ``WAIT`` when writes wait for replicas."""
        return (command,) if self._wait is None else (command, self._wait)

    async def _run_with_library(
        self, unit: tuple[Command, ...], size: int, alone: bool
    ) -> list[Any]:
        # A fresh server, one restarted without persistence, or a FUNCTION FLUSH.
        self._library_found = False
        await self._ensure_library()
        return await self._pipeliner.run(unit, size, alone=alone)

    def _result(self, command: Command, replies: list[Any]) -> Any:
        """What the function ``command`` called replied, its refusals raised; and, with
        ``min_replicas``, raises if fewer replicas acknowledged the write."""
        reply = replies[0]
        if isinstance(reply, ResponseError) and str(reply).startswith("KVSTORE_TYPE "):
            raise self._type_error(command, str(reply))
        result = self._reply(reply)
        self._library_found = True  # the function ran
        wait = self._wait
        if wait is not None:
            acked, wanted = self._reply(replies[1]), wait[1]
            if acked < wanted:
                raise BackendError(
                    f"{self._server}: {acked} of {wanted} replicas acknowledged the write in "
                    f"{wait[2]} ms; it is applied on the primary but a failover may lose it"
                )
        return result

    async def load_library(self) -> list[str]:
        """Load this release's kvstore library on the server (on every primary of a
        cluster), and say per server what was done; idempotent.

        A store loads it by itself when a call finds it missing; this is for an operator
        (``kvstore setup``) whose engines' credentials may not ``FUNCTION LOAD``.
        """
        # Retried like any call: a load often follows a restart, whose first attempt may
        # meet a pooled connection the server closed.
        loop = asyncio.get_running_loop()
        budget = Budget(self._options.retry_budget, self._timeout)
        retry_until = budget.retry_until(loop.time())
        backoff = Backoff()
        while True:
            try:
                coro = load_library(self._client, send=self._send_one)
                if self._timeout is None:
                    return await coro
                return await asyncio.wait_for(coro, self._timeout)
            except NoPermissionError as exc:
                raise BackendError(
                    f"the kvstore library {LIBRARY.name} is not loaded on {self._server} and "
                    "this credential may not load it; run `kvstore setup --url URL` with a "
                    "credential that may (FUNCTION LOAD)"
                ) from exc
            except (ResponseError, OSError, asyncio.TimeoutError, RedisError) as exc:
                delay = budget.delay(exc, backoff, retry_until, loop.time())
                if delay is None:
                    raise self._backend_error(exc) from None
            await asyncio.sleep(delay)

    async def _send_one(self, command: Command) -> Any:
        """The reply to ``command``, sent on the store's own connections; a refusal is
        its ``ResponseError`` value."""
        (reply,) = await self._pipeliner.run((command,))
        return reply

    async def _ensure_library(self) -> None:
        # One load in flight per store: the calls that find the library missing together
        # wait for the same one. It is shielded, so a caller cancelled meanwhile does not
        # cancel the others' load.
        loading = self._loading
        if loading is None:
            loading = self._loading = asyncio.ensure_future(self.load_library())
            loading.add_done_callback(self._loaded)
        try:
            await asyncio.shield(loading)
        except asyncio.CancelledError:
            if not loading.cancelled():
                raise  # this caller was cancelled; the load goes on for the others
            # Only aclose() cancels the load: fail as every call the closing cut short.
            raise self._backend_error(ConnectionError("the store is closed")) from None

    def _loaded(self, loading: asyncio.Future[list[str]]) -> None:
        if self._loading is loading:
            self._loading = None
        if not loading.cancelled():
            loading.exception()  # retrieved: the callers that awaited it raised it

    def _type_error(self, command: Command, reply: str) -> SerializationError:
        # "KVSTORE_TYPE <i> <found> <expected>": KEYS[i] of the command, which names
        # the function and the key count before the keys.
        index, found, expected = reply.split()[1:4]
        key = flatten(command)[2 + int(index)]
        return SerializationError(f"{key!r} holds a {found}, not a {expected}; nothing was written")

    async def _read(self, command: Command) -> Any:
        (reply,) = await self._unit([command])
        return reply

    async def _unit(
        self, commands: list[Command], *, large_reply: bool = False, archives: bool = False
    ) -> list[Any]:
        """Replies to ``commands``, sent with a check that the layout is ours.
        ``archives``: the replies may hold archives (read in slices when large)."""
        found, *replies = await self._pipeliner.run(
            [self._format_check, *commands], large_reply=large_reply, streamed=archives
        )
        found = self._reply(found)
        if found is not None and found != FORMAT_VERSION:
            raise self._layout_error(found)
        return [self._reply(r) for r in replies]

    def _reply(self, reply: Any) -> Any:
        if isinstance(reply, ResponseError):
            message = str(reply)
            if message.startswith("KVSTORE_FORMAT "):
                raise self._layout_error(message.removeprefix("KVSTORE_FORMAT ").encode())
            raise self._backend_error(reply)
        return reply

    def _layout_error(self, found: bytes) -> SerializationError:
        error = SerializationError(
            f"{self._keys.format!r} says layout {found!r}; this kvstore reads and writes "
            f"layout {FORMAT_VERSION!r} and will not touch the namespace"
        )
        _log.error("%s", error)
        return error

    def _backend_error(self, exc: BaseException) -> BackendError:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        redacted = _redact(message, self._secrets)
        error = BackendError(f"{self._server}: {redacted}")
        if redacted == message:
            error.__cause__ = exc
        return error

    # Decoding what the server holds.

    def _record(self, key: bytes, row: bytes, archive: Any, stamp: Any) -> PackageRecord:
        if not isinstance(archive, bytes) or not isinstance(stamp, bytes):
            raise SerializationError(f"{key!r} is missing its archive or deployed_at")
        try:
            workflow_type, content_hash = split_row_id(row)
            return PackageRecord(workflow_type, content_hash, archive, decode_stamp(stamp))
        except ValueError as exc:
            raise SerializationError(f"{key!r} cannot be decoded: {exc}") from exc

    def _member(self, member: Any) -> _Member:
        """An index member, decoded; ``SerializationError`` naming the key and the member."""
        where = self._keys.index
        if not isinstance(member, bytes):
            raise SerializationError(f"{where!r} holds a non-bytes member: {member!r}")
        try:
            stamp, row = split_index_member(member)
            workflow_type, content_hash = split_row_id(row)
            at = decode_stamp(stamp)
        except ValueError as exc:  # UnicodeDecodeError included
            raise SerializationError(
                f"{where!r} holds a malformed member {member!r}: {exc}"
            ) from exc
        return _Member(stamp, row, workflow_type, content_hash, at)

    def _text(self, value: Any, where: str) -> str:
        try:
            return bytes(value).decode("utf-8")
        except (TypeError, UnicodeDecodeError) as exc:
            raise SerializationError(f"{where} is not UTF-8 text: {value!r}") from exc


class _Member(NamedTuple):
    """An index member as a listing reads it: ``<stamp> <row id>`` and what they say."""

    stamp: bytes
    row: bytes
    workflow_type: str
    content_hash: str
    at: datetime


def _connection_options(client: Redis | RedisCluster) -> dict[str, Any]:
    if isinstance(client, RedisCluster):
        return dict(client.get_connection_kwargs())
    return dict(client.connection_pool.connection_kwargs)


def _telemetry_attributes(
    client: Redis | RedisCluster, options: dict[str, Any], namespace: str
) -> dict[str, Any]:
    """The attributes every span and measurement of a store carries, by OpenTelemetry's
    conventions: the server, the database index, the namespace (never a secret)."""
    attributes: dict[str, Any] = {"kvstore.namespace": namespace}
    if isinstance(client, RedisCluster):
        nodes = client.nodes_manager.startup_nodes
        if nodes:
            first = next(iter(nodes.values()))
            attributes["server.address"] = first.host
            attributes["server.port"] = first.port
        return attributes
    if "path" in options:
        attributes["server.address"] = options["path"]
    elif "host" in options:
        attributes["server.address"] = options["host"]
        attributes["server.port"] = int(options.get("port", 6379))
    attributes["db.namespace"] = str(options.get("db", 0))
    return attributes


def _describe_server(client: Redis | RedisCluster, options: dict[str, Any]) -> str:
    if isinstance(client, RedisCluster):
        return "redis cluster"
    if "path" in options:
        return f"unix://{options['path']}"
    if "host" in options:
        return f"{options['host']}:{options.get('port', 6379)}"
    service = getattr(client.connection_pool, "service_name", None)
    if isinstance(service, str):
        return f"sentinel service {service}"
    return type(client).__name__


def _redact(text: str, secrets: list[str]) -> str:
    # A secret is replaced where it stands as a whole, not inside a longer word, so a
    # short password does not mangle the message around it ("p" in "password").
    for secret in secrets:
        text = re.sub(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", "***", text)
    return text
