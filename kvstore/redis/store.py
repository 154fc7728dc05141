"""The package store over Redis, Valkey, a Redis Cluster or fakeredis.

A thin facade over the contract: each method checks its arguments, builds its commands
and hands them to the parts that do the work, each in a module of its own:

- ``kvstore.redis.target``: the deployment (one server, Sentinel, a cluster), decided once;
- ``kvstore.redis.calls``: every call sent, reads led by the layout check, writes as one
  ``FCALL`` of the library (``lua/``, loaded by ``kvstore.redis.scripts``), so a deploy's
  row, index entry and routes change together or not at all;
- ``kvstore.redis.listing``: the listing walk;
- ``kvstore.redis.route_cache``: the routes kept in memory;
- ``kvstore.redis.telemetry``: with ``telemetry=True``, the store is its
  ``ObservedPackageStore``, whose methods observe each call and then make it here.

The keys are laid out in ``kvstore.redis.keyspace``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from kvstore.errors import SerializationError
from kvstore.records import (
    PackageHead,
    PackageRecord,
    PackageRouteRecord,
    check_chunk,
    check_record,
    check_route_types,
    check_text,
)
from kvstore.redis.archive_cache import ArchiveCache
from kvstore.redis.calls import LARGE_ARGUMENT, Calls, LayoutChanged
from kvstore.redis.keyspace import (
    BLOB_LAYOUT,
    INLINE_LAYOUT,
    INLINE_LIMIT,
    Keyspace,
    archive_digest,
    decode_stamp,
    encode_stamp,
    is_digest,
    row_id,
    split_row_id,
)
from kvstore.redis.listing import (
    LISTING_BYTES,
    Send,
    Walk,
    decimal_size,
    fetched,
    head_size,
    read_archive,
    read_blob,
    read_head,
    read_row,
)
from kvstore.redis.options import DEFAULTS, StoreOptions
from kvstore.redis.protocol import field_pairs, stored_text
from kvstore.redis.replicas import Mark
from kvstore.redis.retry import no_client_retries
from kvstore.redis.route_cache import ASK_SERVER, POOL_CONNECTIONS, RouteCache
from kvstore.redis.route_watch import RouteWatch
from kvstore.redis.scripts import (
    DELETE_PACKAGE,
    PUT_BLOB,
    PUT_PACKAGE,
    PUT_PACKAGE_BLOB,
    PUT_PACKAGE_DIGEST,
    PUT_PACKAGE_INLINE,
    PUT_ROUTE,
)
from kvstore.redis.target import target_for
from kvstore.redis.urls import client_from_url
from kvstore.redis.wire import SLICE, Command, PrePacked

if TYPE_CHECKING:
    from kvstore.redis.telemetry import Observer

__all__ = ["RedisPackageStore", "StoreHealth"]


@dataclass(frozen=True)
class StoreHealth:
    """What a store knows of its server, without asking it (``RedisPackageStore.health``).

    ``connected``: the last reply the store waited for came (``False`` before any call,
    and after a call whose connection broke, stalled or could not be made, until one
    reaches the server again). ``route_cache_live``: whether route lookups are answered
    from memory (``None``: the store does not cache routes). ``last_error``: the last
    failure to reach the server, password redacted, or ``None`` since the last reply.
    ``library_loaded``: whether the last write found this release's library on the
    server, or could load it (``None``: no write yet). ``replica_reads``: with
    ``read_from_replicas``, how many round trips of reads a replica answered, and how
    many the primary answered instead (a replica behind the read, failing or resting,
    or none known), since the store was made; ``None`` without.
    """

    connected: bool
    route_cache_live: bool | None
    last_error: str | None
    library_loaded: bool | None
    replica_reads: tuple[int, int] | None = None


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
    server's ``proto-max-bulk-len`` raises ``BackendError`` and fails no other call
    (see ``kvstore.redis.calls.LARGE_ARGUMENT``). Every operation is idempotent, which
    is what makes retrying safe. Calls still waiting when the store is closed raise
    ``BackendError``.

    Each write is one ``FCALL`` of the kvstore library (``kvstore.redis.scripts``). A
    call that finds the library missing loads it (on every primary of a cluster; one
    load at a time per store) and is sent again, as often as the library goes missing
    within the call's budget; when the credential may not load it, the call raises
    ``BackendError`` saying to run ``kvstore setup``. The first write checks that the
    library under this release's name is this release's, byte for byte, where the
    credential may read it (``FUNCTION LIST``); while it is not, every write raises
    ``BackendError`` saying so. A write over a key that holds another type raises
    ``SerializationError`` naming the key, and writes nothing.

    With ``min_replicas=N`` every write also waits for ``N`` replicas to acknowledge it
    (``WAIT``), and raises ``BackendError`` when they do not within ``replica_timeout``
    seconds: the write is then on the primary but could be lost in a failover. With
    ``durability="fsync"`` it waits until it is fsynced to the primary's append-only
    file (and that of ``N`` replicas) instead (``WAITAOF``). Writes in flight together
    share one wait per batch.

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

    A namespace is of one of two layouts (``kvstore.redis.keyspace``), and the store
    reads both and writes the one its namespace has. In layout 2, what a namespace gets
    when this store writes it first (``layout``), each archive larger than 4 KiB is a
    blob named by its SHA-256, computed by the put, stored once however many packages
    refer to it, in a key whose cluster slot follows its digest; a smaller one stays
    inside its row with its digest. On one server a put writes blob and row in one call;
    on a cluster the blob first, then the row, both within the put's hard end, so no
    reader finds a row before its blob. Every archive a read returns was verified against
    its digest: one damaged or missing on the server raises ``SerializationError`` naming
    the row. A write refused because the namespace changed layout under the store (a
    migration) wrote nothing and is sent again in the layout found.

    With ``archive_cache=DIR`` the store keeps the archives it reads from blobs in files
    of ``DIR``, named by their digest, at most about ``archive_cache_bytes`` of them, the
    least recently used removed past it; every engine of a host may share the directory
    (``kvstore.redis.archive_cache``). ``get_package`` of an archive the cache holds reads
    the row alone, and ``iter_packages`` reads no blob the cache holds; every file is
    verified against its digest when it is read, and one that is not the archive (or a
    failing disk) only sends the store to the server, as if there were no cache.

    With ``read_from_replicas=True`` (one server or a Sentinel's primary with replicas,
    or a cluster whose shards have them) reads go to the replicas each primary names,
    and keep the primary's promise: a read that begins after a write was acknowledged, by any store,
    returns it. Each read first asks the primary its replication position (``INFO
    replication``), and a replica's replies are taken only if that replica has applied
    the primary's history that far; otherwise the primary answers. A replica that lags
    costs a read one more round trip; one that fails to answer within
    ``replica_read_timeout`` costs that once, and rests (``kvstore.redis.replicas``):
    such a read takes at most about ``replica_read_timeout + retry_budget + timeout``,
    and a replica's failure never changes what it returns or raises.

    With ``telemetry=True`` every call is a span and a measurement through OpenTelemetry
    (``kvstore.redis.telemetry``); it logs through ``logging.getLogger("kvstore")``
    either way. ``ping`` and ``health`` tell a readiness probe whether the store can
    reach its server.
    """

    def __new__(cls, *args: Any, telemetry: bool = False, **options: Any) -> RedisPackageStore:
        # With telemetry, the store is the subclass whose methods observe each call: the
        # class's own methods stay free of it (a cached route lookup costs under 1 µs,
        # and a check of an observer would add a third to that).
        if telemetry is True and cls is RedisPackageStore:
            try:
                from kvstore.redis.telemetry import ObservedPackageStore
            except ImportError:
                pass  # __init__ refuses telemetry=True, saying what to install
            else:
                cls = ObservedPackageStore
        return super().__new__(cls)

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
        durability: str = DEFAULTS.durability,
        cache_routes: bool = DEFAULTS.cache_routes,
        route_health_interval: float = DEFAULTS.route_health_interval,
        telemetry: bool = DEFAULTS.telemetry,
        layout: int = DEFAULTS.layout,
        archive_cache: str | os.PathLike[str] | None = DEFAULTS.archive_cache,
        archive_cache_bytes: int = DEFAULTS.archive_cache_bytes,
        read_from_replicas: bool = DEFAULTS.read_from_replicas,
        replica_read_timeout: float = DEFAULTS.replica_read_timeout,
    ) -> None:
        self._options = options = StoreOptions(
            namespace=namespace,
            timeout=timeout,
            lanes=lanes,
            retry_budget=retry_budget,
            min_replicas=min_replicas,
            replica_timeout=replica_timeout,
            durability=durability,
            cache_routes=cache_routes,
            route_health_interval=route_health_interval,
            telemetry=telemetry,
            layout=layout,
            archive_cache=archive_cache,
            archive_cache_bytes=archive_cache_bytes,
            read_from_replicas=read_from_replicas,
            replica_read_timeout=replica_read_timeout,
        )
        self._target = target = target_for(client)
        if target.connection_options().get("decode_responses"):
            raise ValueError("client must be made with decode_responses=False: archives are bytes")
        if (min_replicas or durability != "memory") and not target.waits_for_replicas:
            # WAIT and WAITAOF name no key and wait for the writes of their own connection,
            # so a cluster client cannot send them where the writes went.
            raise ValueError(
                "min_replicas and durability need a single-primary client, not a cluster"
            )
        self._keys = k = Keyspace(namespace)
        # What every call of a kind shares, formatted once (see each lua/ file's header).
        put_keys = (k.format, k.index, k.routes, k.route_version)
        self._put_prefix = {
            INLINE_LAYOUT: PUT_PACKAGE.call_prefix(*put_keys),
            BLOB_LAYOUT: PUT_PACKAGE_BLOB.call_prefix(*put_keys),
        }
        self._put_row_prefix = PUT_PACKAGE_DIGEST.call_prefix(*put_keys)
        self._put_inline_prefix = PUT_PACKAGE_INLINE.call_prefix(*put_keys)
        # The layout a write names and the channel it announces on: every write that
        # re-points routes takes them after its keys.
        self._put_shared = {
            layout: PrePacked(layout, k.route_changes) for layout in (INLINE_LAYOUT, BLOB_LAYOUT)
        }
        self._route_prefix = PUT_ROUTE.call_prefix(k.format, k.routes, k.route_version)
        self._delete_prefix = DELETE_PACKAGE.call_prefix(k.format, k.index)
        self._owns_client = False
        # What else takes connections of the pool: the route cache, if any (the library
        # is loaded on the lanes).
        self._calls = Calls(
            target, k, options, spare_connections=POOL_CONNECTIONS if cache_routes else 0
        )
        self._calls.load_hook = lambda: self.load_library()
        self._route_cache: RouteCache | None = None
        if cache_routes:
            self._route_cache = RouteCache(
                target, k, timeout=timeout, health_interval=route_health_interval
            )
        self._archive_cache: ArchiveCache | None = None
        if archive_cache is not None:
            self._archive_cache = ArchiveCache(archive_cache, archive_cache_bytes)
        self._observer: Observer | None = None
        if telemetry:
            # Imported only here: without telemetry, opentelemetry is never loaded.
            from kvstore.redis.telemetry import Observer as TelemetryObserver

            observer = TelemetryObserver(target.telemetry_attributes(namespace), self._route_cache)
            self._observer = observer
            self._calls.pipeliner.observer = observer

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
        durability: str = DEFAULTS.durability,
        cache_routes: bool = DEFAULTS.cache_routes,
        route_health_interval: float = DEFAULTS.route_health_interval,
        telemetry: bool = DEFAULTS.telemetry,
        layout: int = DEFAULTS.layout,
        archive_cache: str | os.PathLike[str] | None = DEFAULTS.archive_cache,
        archive_cache_bytes: int = DEFAULTS.archive_cache_bytes,
        read_from_replicas: bool = DEFAULTS.read_from_replicas,
        replica_read_timeout: float = DEFAULTS.replica_read_timeout,
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
            durability=durability,
            cache_routes=cache_routes,
            route_health_interval=route_health_interval,
            telemetry=telemetry,
            layout=layout,
            archive_cache=archive_cache,
            archive_cache_bytes=archive_cache_bytes,
            read_from_replicas=read_from_replicas,
            replica_read_timeout=replica_read_timeout,
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
        return self._target.client

    @property
    def server(self) -> str:
        """The server as the store's messages name it (``host:port``, ``unix://…``,
        ``sentinel service <name>``, ``redis cluster``); never a secret."""
        return self._calls.server

    @property
    def observer(self) -> Observer | None:
        """What observes the store's calls: ``None`` unless made with ``telemetry=True``."""
        return self._observer

    @property
    def archive_cache(self) -> ArchiveCache | None:
        """The store's archive cache: ``None`` unless made with ``archive_cache``."""
        return self._archive_cache

    @property
    def route_cache(self) -> RouteCache | None:
        """The store's route cache: ``None`` unless made with ``cache_routes=True``."""
        return self._route_cache

    def __repr__(self) -> str:
        return f"RedisPackageStore(namespace={self.namespace!r}, server={self.server!r})"

    async def aclose(self) -> None:
        """Stop the store's own work and close the client if the store made it."""
        if self._route_cache is not None:
            await self._route_cache.aclose()
        await self._calls.aclose()
        if self._archive_cache is not None:
            await self._archive_cache.settle()  # the writes under way, each on a thread
        if self._owns_client:
            await self._target.client.aclose()

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
        await self._calls.ping()

    def health(self) -> StoreHealth:
        """What the store knows of its server now, without a round trip; see
        ``StoreHealth``. Cheap enough for every readiness probe."""
        calls = self._calls
        return StoreHealth(
            connected=calls.connected,
            route_cache_live=None if self._route_cache is None else self._route_cache.live,
            last_error=calls.last_error,
            library_loaded=calls.library_found,
            replica_reads=(
                None
                if calls.replicas is None
                else (calls.replicas.served, calls.replicas.to_primary)
            ),
        )

    async def load_library(self) -> list[str]:
        """Load this release's kvstore library on the server (on every primary of a
        cluster), and say per server what was done; idempotent.

        A store loads it by itself when a call finds it missing; this is for an operator
        (``kvstore setup``) whose engines' credentials may not ``FUNCTION LOAD``.
        """
        return await self._calls.load_library()

    # Writes: one function call each.

    async def put_package(self, record: PackageRecord) -> None:
        record = check_record(record)
        await self._put(record, (record.workflow_type,))

    async def put_package_with_routes(
        self, record: PackageRecord, route_workflow_types: Iterable[str]
    ) -> None:
        own = check_record(record).workflow_type
        also = dict.fromkeys(check_route_types(route_workflow_types))
        also.pop(own, None)
        await self._put(record, (own, *also))

    async def _put(self, record: PackageRecord, types: tuple[str, ...]) -> None:
        """Put ``record`` and re-point the routes of ``types`` (its own first) at it, in
        the namespace's layout."""
        # The record checked its fields when it was made; deployed_at is aware and in range.
        row = row_id(record.workflow_type, record.content_hash)
        stamp = encode_stamp(record.deployed_at.astimezone(timezone.utc))
        routed = (record.content_hash.encode("utf-8"), *[t.encode("utf-8") for t in types])
        archive = record.archive
        size = len(archive)
        # Each step of the put (the blob, then the row, on a cluster) ends by one hard end.
        made = asyncio.get_running_loop().time()
        alone = size > LARGE_ARGUMENT and await self._calls.sends_alone(size)
        digest: bytes | None = None
        for attempt in _LAYOUT_ATTEMPTS:
            # Known after the store's first call: no coroutine on a put's common path.
            layout = self._calls.layout or await self._calls.write_layout()
            if layout != INLINE_LAYOUT and digest is None:
                digest = (
                    archive_digest(archive) if size < HASH_ON_A_THREAD else await _digest(archive)
                )
            try:
                for command, carries in self._put_calls(
                    layout, row, stamp, archive, digest, routed
                ):
                    # The archive's call is sent alone when it must be; the row's after it not.
                    version = await self._calls.call(
                        command, size if carries else 0, alone=alone and carries, made=made
                    )
                break
            except LayoutChanged:
                if attempt == _LAYOUT_ATTEMPTS[-1]:
                    raise self._unsettled_layout() from None
                # Nothing was written: again, in the layout found.
        self._note_routes(version, record.content_hash, types)

    def _put_calls(
        self,
        layout: bytes,
        row: bytes,
        stamp: bytes,
        archive: bytes,
        digest: bytes | None,
        routed: tuple[bytes, ...],
    ) -> list[tuple[Command, bool]]:
        """The calls a put makes, in order, each with whether it carries the archive: in
        layout 1, one; in layout 2, a small archive inside its row, a larger one as a
        blob, written with its row in one call where one call may write both (one
        server), else first, on its own node, then the row. The last call's reply is the
        routes table's new version."""
        keys, size = self._keys, len(archive)
        if layout == INLINE_LAYOUT:
            shared = (self._put_shared[layout], row, stamp, archive, *routed)
            return [((self._put_prefix[layout], keys.row(row), *shared), True)]
        assert digest is not None
        shared = (self._put_shared[BLOB_LAYOUT], row, stamp, digest, b"%d" % size)
        tail = (routed[0], archive, *routed[1:])
        if size <= INLINE_LIMIT:
            return [((self._put_inline_prefix, keys.row(row), *shared, *tail), True)]
        blob = keys.blob(digest)
        if self._target.writes_across_slots:
            return [((self._put_prefix[BLOB_LAYOUT], keys.row(row), blob, *shared, *tail), True)]
        return [
            ((PUT_BLOB.call_prefix(blob), digest, archive), True),
            ((self._put_row_prefix, keys.row(row), *shared, *routed), False),
        ]

    def _note_routes(self, version: int, content_hash: str, types: tuple[str, ...]) -> None:
        # A store reads its own acknowledged writes, whatever its subscription has seen.
        if self._route_cache is not None:
            self._route_cache.note_write(version, content_hash, types)

    async def _write(self, build: Callable[[bytes], Command]) -> Any:
        """The reply to the call ``build(layout)`` makes for the namespace's layout (a
        call whose shape is the same in both: only the layout it names differs)."""
        for _ in _LAYOUT_ATTEMPTS:
            layout = await self._calls.write_layout()
            try:
                return await self._calls.call(build(layout))
            except LayoutChanged:
                continue
        raise self._unsettled_layout()

    def _unsettled_layout(self) -> SerializationError:
        return SerializationError(
            f"{self._keys.format!r} changed layout on each of {len(_LAYOUT_ATTEMPTS)} "
            "attempts of one write; nothing was written"
        )

    async def delete_package(self, workflow_type: str, content_hash: str) -> None:
        row = row_id(
            check_text(workflow_type, "workflow_type"), check_text(content_hash, "content_hash")
        )
        key = self._keys.row(row)
        await self._write(lambda layout: (self._delete_prefix, key, layout, row))

    async def put_package_route(self, workflow_type: str, content_hash: str) -> None:
        route = PackageRouteRecord(workflow_type, content_hash)
        fields = (route.workflow_type.encode("utf-8"), route.content_hash.encode("utf-8"))
        version = await self._write(
            lambda layout: (self._route_prefix, self._put_shared[layout], *fields)
        )
        self._note_routes(version, route.content_hash, (route.workflow_type,))

    # Reads: plain commands, each unit led by a check of the layout marker.

    async def get_package(self, workflow_type: str, content_hash: str) -> PackageRecord | None:
        row = row_id(
            check_text(workflow_type, "workflow_type"), check_text(content_hash, "content_hash")
        )
        return await self._read_package(self._keys.row(row), row)

    async def _read_package(
        self, key: bytes, row: bytes, mark: Mark | None = None
    ) -> PackageRecord | None:
        """The package in the row at ``key`` of id ``row``, of either layout, its archive
        verified against its digest when a blob holds it; ``None`` if there is no row.
        ``mark``: of the read this is part of (a listing's), if not a read of its own."""
        if mark is None:
            mark = self._calls.read_mark()
        ((archive, stamp, digest, size),) = await self._calls.unit(
            [read_row(key)], archives=True, mark=mark
        )
        if archive is None and stamp is None and digest is None:
            return None
        if digest is not None:
            if not is_digest(digest):
                raise SerializationError(f"{key!r} holds a digest that is not one: {digest!r:.80}")
            expected = decimal_size(key, size)
            cache = self._archive_cache
            if archive is None:  # in a blob
                if cache is not None:
                    cached = await cache.read(digest, expected)
                    if cached is not None:  # verified against its digest
                        return self._record(key, row, cached, stamp)
                big = expected >= SLICE  # read in slices, behind the others
                (archive,) = await self._calls.unit(
                    [read_blob(self._keys.blob(digest))], large=big, archives=True, mark=mark
                )
                await _verify(self._keys, key, digest, archive)
                if cache is not None:
                    cache.write_soon(digest, archive)
            else:
                await _verify(self._keys, key, digest, archive)
        return self._record(key, row, archive, stamp)

    async def get_package_head(self, workflow_type: str, content_hash: str) -> PackageHead | None:
        """The stored package's head (``deployed_at`` and the archive's size), or ``None``.

        What ``get_package`` would return, without its archive: one round trip that reads
        a few dozen bytes however large the archive, for "is this version stored?" (an
        engine refusing a rollback to a version it cannot load). Beyond the
        ``PackageStore`` contract, like ``iter_package_heads``. Arguments are checked as
        ``get_package`` checks them; a row missing its ``deployed_at`` raises
        ``SerializationError`` naming its key.
        """
        checked = (
            check_text(workflow_type, "workflow_type"),
            check_text(content_hash, "content_hash"),
        )
        key = self._keys.row(row_id(*checked))
        (stamp, stored), inline = await self._calls.unit(
            read_head(key), mark=self._calls.read_mark()
        )
        if stamp is None:
            if inline or stored is not None:
                raise SerializationError(f"{key!r} is missing its deployed_at")
            return None
        try:
            return PackageHead(*checked, decode_stamp(stamp), head_size(key, stored, inline))
        except ValueError as exc:
            raise SerializationError(f"{key!r} cannot be decoded: {exc}") from exc

    async def get_package_route(self, workflow_type: str) -> str | None:
        checked = check_text(workflow_type, "workflow_type")
        if self._route_cache is not None:
            found = self._route_cache.lookup(checked)
            if found is not ASK_SERVER:
                return found
            # Not live yet, recovering, or unsure of this type: the server answers.
        field = checked.encode("utf-8")
        value = await self._calls.read(
            ("HGET", self._keys.routes, field), mark=self._calls.read_mark()
        )
        return (
            None if value is None else stored_text(value, f"{self._keys.routes!r} field {field!r}")
        )

    def watch_routes(self) -> RouteWatch:
        """An async iterator of route writes to the namespace (needs ``cache_routes``).

        Registered when called (call it inside a running event loop): first every
        route, then each write, in the order the server applied them, including those
        of other stores; see ``kvstore.redis.route_watch.RouteWatch`` for the exact promise.
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
        read = ("HGETALL", self._keys.routes)
        pairs = field_pairs(await self._calls.read(read, mark=self._calls.read_mark()))
        where = repr(self._keys.routes)
        routes = [
            PackageRouteRecord(
                stored_text(t, f"{where} field {t!r}"), stored_text(h, f"{where} field {t!r}")
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

        With an archive cache, a row whose blob the cache holds is read without its
        archive, which comes from the cache instead and counts within ``max_bytes`` as
        if it had been read (a file gone or damaged by then: the row is read again, as
        ``get_package`` reads it); an archive read from its blob is written to the cache
        on a thread, and the walk lets go of a round trip's room under ``max_bytes``
        only once the writes of its archives are done.
        """
        check_chunk(max_bytes, "max_bytes")
        keys, cache = self._keys, self._archive_cache

        def fetch_row(key: bytes, digest: bytes | None) -> list[Command]:
            # A blob the cache holds is not fetched: the row's digest is, to check that
            # the row still names it.
            held = digest is not None and cache is not None and cache.holds(digest)
            return read_archive(keys, key, digest, held=held)

        # The writes to the cache of the archives of the round trip being handed out:
        # the walk waits for them before it lets go of their room under max_bytes.
        writes: list[asyncio.Task[None]] = []

        async def settle() -> None:
            while writes:
                await asyncio.gather(*writes, return_exceptions=True)
                writes.clear()

        mark = self._calls.read_mark()
        walk = Walk(
            keys,
            self._listing_send(mark),
            chunk,
            fetch_row,
            lambda replies: fetched(replies)[0],
            max_bytes=max_bytes,
            settle=None if cache is None else settle,
            layout=lambda: self._calls.layout,
        )
        async for key, member, replies, digest in walk.rows():
            _, archive = fetched(replies)
            if isinstance(archive, list):  # a row whose blob the cache held when it was read
                assert cache is not None and digest is not None
                # The file may have gone since (evicted, damaged): then, or if the row
                # names another archive now, the row is read again as a get reads it.
                archive = await cache.read(digest) if archive == [digest] else None
                if archive is not None:
                    yield PackageRecord(
                        member.workflow_type, member.content_hash, archive, member.at
                    )
                    continue
            if archive is None:
                # The row changed shape since it was sized (migrated), or its blob is
                # missing: read as get_package reads it, which says which.
                record = await self._read_package(key, member.row, mark)
                if record is not None and record.deployed_at == member.at:
                    yield record
                continue
            if digest is not None:
                if len(archive) >= HASH_ON_A_THREAD or archive_digest(archive) != digest:
                    await _verify(keys, key, digest, archive)  # raises, or hashes on a thread
                if cache is not None and len(archive) > INLINE_LIMIT:  # read from its blob
                    write = await cache.write(digest, archive)
                    if write is not None:
                        writes.append(write)
            yield PackageRecord(member.workflow_type, member.content_hash, archive, member.at)

    async def iter_package_heads(self, *, chunk: int = 1000) -> AsyncIterator[PackageHead]:
        """Every package as ``iter_packages`` lists it, without its archive.

        Each head carries the archive's size instead, so listing a catalogue of large
        archives costs a few dozen bytes per package on the wire. Same order, the same
        promise while others write and the same memory bound as ``iter_packages``.
        Beyond the ``PackageStore`` contract: the command line lists with it.
        """
        send = self._listing_send(self._calls.read_mark())
        walk = Walk(self._keys, send, chunk, lambda key, _: read_head(key), lambda r: r[0][0])
        async for key, member, ((_, stored), inline), _ in walk.rows():
            size = head_size(key, stored, inline)
            yield PackageHead(member.workflow_type, member.content_hash, member.at, size)

    def _listing_send(self, mark: Mark | None) -> Send:
        """How the round trips of a listing that began at ``mark`` are sent."""
        calls = self._calls

        async def send(commands: list[Command], *, large: bool) -> list[Any]:
            # Archives of a MiB and more follow each other on one connection, in slices.
            return await calls.unit(commands, large=large, archives=large, mark=mark)

        return send

    # Decoding what the server holds.

    def _record(self, key: bytes, row: bytes, archive: Any, stamp: Any) -> PackageRecord:
        if not isinstance(archive, bytes) or not isinstance(stamp, bytes):
            raise SerializationError(f"{key!r} is missing its archive or deployed_at")
        try:
            workflow_type, content_hash = split_row_id(row)
            return PackageRecord(workflow_type, content_hash, archive, decode_stamp(stamp))
        except ValueError as exc:
            raise SerializationError(f"{key!r} cannot be decoded: {exc}") from exc


# How often a write is built again for a layout that changed under it: a migration
# changes it once.
_LAYOUT_ATTEMPTS = range(3)

# Archives from this size on are hashed on a thread of their own (hashlib lets go of the
# GIL), so the event loop goes on serving other calls meanwhile; a smaller one costs less
# to hash than to hand to a thread.
HASH_ON_A_THREAD = 1 << 20


async def _digest(archive: bytes) -> bytes:
    """The archive's digest, hashed on a thread when it is large."""
    if len(archive) < HASH_ON_A_THREAD:
        return archive_digest(archive)
    return await asyncio.to_thread(archive_digest, archive)


async def _verify(keys: Keyspace, key: bytes, digest: bytes, archive: Any) -> None:
    """Raise ``SerializationError`` naming the row at ``key`` unless ``archive``, read from
    the row or from the blob of ``digest``, is there and is the bytes that digest names."""
    blob = keys.blob(digest)
    if not isinstance(archive, bytes):
        raise SerializationError(
            f"{key!r} refers to the archive {blob!r}, which is missing; the package must "
            "be deployed again"
        )
    if await _digest(archive) != digest:
        raise SerializationError(
            f"{key!r} holds an archive whose bytes do not match its digest {digest.decode()} "
            "(damaged on the server); the package must be deployed again"
        )
