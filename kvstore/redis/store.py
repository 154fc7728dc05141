"""The package store over Redis, Valkey, a Redis Cluster or fakeredis.

Writes are single Lua script calls (``lua/``), so a deploy's row, index entry and
routes change together or not at all. The keys are laid out in ``kvstore.redis.keyspace``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from datetime import timezone
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError

from kvstore.errors import BackendError, SerializationError
from kvstore.records import (
    PackageHead,
    PackageRecord,
    PackageRouteRecord,
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
from kvstore.redis.pipeline import Pipeliner
from kvstore.redis.route_cache import ASK_SERVER, RouteCache, RouteWatch
from kvstore.redis.scripts import DELETE_PACKAGE, PUT_PACKAGE, PUT_ROUTE, Script
from kvstore.redis.urls import client_from_url
from kvstore.redis.wire import Command, Recurring

_HMGET_ROW = Recurring("HMGET")
_ROW_FIELDS = Recurring(b"archive", b"deployed_at")
_HGET_STAMP = Recurring("HGET")
_STAMP_FIELD = Recurring(b"deployed_at")
_HSTRLEN = Recurring("HSTRLEN")
_ARCHIVE_FIELD = Recurring(b"archive")


class RedisPackageStore:
    """A ``PackageStore`` over one namespace of a Redis-protocol server.

    ``client`` is a ``redis.asyncio.Redis``, a ``redis.asyncio.cluster.RedisCluster`` or
    a ``fakeredis.FakeAsyncRedis``, made with ``decode_responses=False``. The store
    never closes a client it was given.

    Any number of tasks may share one store: concurrent calls are coalesced into
    pipelines on at most ``lanes`` connections, which the store holds from its first
    call until ``aclose()``, so none fails for want of a pooled connection. Each
    attempt is bounded by ``timeout`` seconds (``None``: no bound). Transient failures
    (a broken or stalled connection, a loading server, a failover) are retried with
    capped, jittered backoff for ``retry_budget`` seconds; then, and on any other
    failure of the server, the call raises ``BackendError``, whose message never
    carries a password. Every operation is idempotent, which is what makes retrying
    safe. Calls still waiting when the store is closed raise ``BackendError``.

    With ``min_replicas=N`` every write also waits for ``N`` replicas to acknowledge it
    (``WAIT``), and raises ``BackendError`` when they do not within ``replica_timeout``
    seconds: the write is then on the primary but could be lost in a failover.

    With ``cache_routes=True`` (on a single node, Sentinel or a cluster), the store keeps every
    route of the namespace in memory, kept true by the changes the write scripts publish
    (``kvstore.redis.route_cache``): ``get_package_route`` answers from memory while the
    subscription is healthy and from the server otherwise, a store always sees its own
    writes, and another store's write is seen as soon as its message arrives (a
    silently dead subscription is noticed within about ``2 * route_health_interval``
    seconds). ``watch_routes`` then yields route writes as they happen.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        namespace: str = "aion",
        timeout: float | None = 10.0,
        lanes: int = 2,
        retry_budget: float = 5.0,
        min_replicas: int = 0,
        replica_timeout: float = 1.0,
        cache_routes: bool = False,
        route_health_interval: float = 1.0,
    ) -> None:
        if not isinstance(client, (Redis, RedisCluster)):
            raise TypeError(
                f"client must be a redis.asyncio.Redis or RedisCluster, not {type(client).__name__}"
            )
        options = _connection_options(client)
        if options.get("decode_responses"):
            raise ValueError("client must be made with decode_responses=False: archives are bytes")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, not {timeout!r}")
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, not {lanes!r}")
        if retry_budget < 0:
            raise ValueError(f"retry_budget must not be negative, not {retry_budget!r}")
        if min_replicas < 0 or replica_timeout <= 0:
            raise ValueError(
                "min_replicas must not be negative and replica_timeout must be positive, not "
                f"{min_replicas!r} and {replica_timeout!r}"
            )
        if min_replicas and isinstance(client, RedisCluster):
            # WAIT names no key, so a cluster client cannot route it to the shard written.
            raise ValueError("min_replicas needs a single-primary client, not a cluster")
        self._keys = k = Keyspace(namespace)
        # What every call of a kind shares, formatted once (see each script's header).
        self._put_head = PUT_PACKAGE.head(k.format, k.index, k.routes, k.route_version)
        self._put_shared = Recurring(FORMAT_VERSION, k.route_changes)
        self._route_head = PUT_ROUTE.head(
            k.format, k.routes, k.route_version, FORMAT_VERSION, k.route_changes
        )
        self._delete_head = DELETE_PACKAGE.head(k.format, k.index)
        self._format_check = (Recurring("GET", k.format),)
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
        )
        self._wait: Command | None = None
        if min_replicas:
            self._wait = ("WAIT", min_replicas, round(replica_timeout * 1000))
        self._route_cache: RouteCache | None = None
        if cache_routes:
            self._route_cache = RouteCache(
                client, self._keys, timeout=timeout, health_interval=route_health_interval
            )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "aion",
        timeout: float | None = 10.0,
        lanes: int = 2,
        retry_budget: float = 5.0,
        min_replicas: int = 0,
        replica_timeout: float = 1.0,
        cache_routes: bool = False,
        route_health_interval: float = 1.0,
        **client_options: Any,
    ) -> RedisPackageStore:
        """A store with a client of its own, which ``aclose`` closes.

        ``url`` is one of the forms ``kvstore.redis.urls`` lists: ``redis://``, ``rediss://``
        (TLS), ``unix://``, ``redis+cluster://`` or ``redis+sentinel://``.
        ``client_options`` go to the client (``ssl_ca_certs=...``, ``max_connections=...``).
        Connecting is bounded by ``timeout`` too, and the client's own retries are off,
        so ``retry_budget`` alone decides how long a call keeps trying.
        """
        if not isinstance(url, str):
            raise TypeError(f"url must be str, not {type(url).__name__}")
        # No socket timeout: the pipeliner's deadline already bounds every attempt, and
        # redis-py would pay for a second timer on every send and every read.
        options: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "socket_timeout": None,
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(client_options)
        options["decode_responses"] = False
        client = client_from_url(url, options)
        store = cls(
            client,
            namespace=namespace,
            timeout=timeout,
            lanes=lanes,
            retry_budget=retry_budget,
            min_replicas=min_replicas,
            replica_timeout=replica_timeout,
            cache_routes=cache_routes,
            route_health_interval=route_health_interval,
        )
        store._owns_client = True
        return store

    @property
    def namespace(self) -> str:
        return self._keys.namespace

    def __repr__(self) -> str:
        return f"RedisPackageStore(namespace={self.namespace!r}, server={self._server!r})"

    async def aclose(self) -> None:
        """Stop the store's own work and close the client if the store made it."""
        if self._route_cache is not None:
            await self._route_cache.aclose()
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

    # Writes: one script call each.

    async def put_package(self, record: PackageRecord) -> None:
        await self._put(record, (_checked(record).workflow_type,))

    async def put_package_with_routes(
        self, record: PackageRecord, route_workflow_types: Iterable[str]
    ) -> None:
        types = [_checked(record).workflow_type, *check_route_types(route_workflow_types)]
        await self._put(record, tuple(dict.fromkeys(types)))

    async def _put(self, record: PackageRecord, types: tuple[str, ...]) -> None:
        # The record checked its fields when it was made; deployed_at is aware and in range.
        stamp = encode_stamp(record.deployed_at.astimezone(timezone.utc))
        row = row_id(record.workflow_type, record.content_hash)
        version = await self._script(
            PUT_PACKAGE,
            (
                self._put_head,
                self._keys.row(row),
                self._put_shared,
                row,
                stamp,
                record.archive,
                record.content_hash.encode("utf-8"),
                *[t.encode("utf-8") for t in types],
            ),
            len(record.archive),  # what makes a pipeline heavy
        )
        if self._route_cache is not None:
            self._route_cache.note_write(version, record.content_hash, types)

    async def delete_package(self, workflow_type: str, content_hash: str) -> None:
        row = row_id(
            check_text(workflow_type, "workflow_type"), check_text(content_hash, "content_hash")
        )
        await self._script(
            DELETE_PACKAGE, (self._delete_head, self._keys.row(row), FORMAT_VERSION, row)
        )

    async def put_package_route(self, workflow_type: str, content_hash: str) -> None:
        route = PackageRouteRecord(workflow_type, content_hash)
        version = await self._script(
            PUT_ROUTE,
            (
                self._route_head,
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
        archive, stamp = await self._read((_HMGET_ROW, key, _ROW_FIELDS))
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

    async def iter_packages(self, *, chunk: int = 1000) -> AsyncIterator[PackageRecord]:
        """Every record in ``list_packages`` order, fetched ``chunk`` rows at a time.

        Memory is bounded by a chunk, not by the catalogue. The index is walked by
        member, not by rank, so a row that exists from start to end is returned exactly
        once even while others are written or deleted; a row written meanwhile may or
        may not appear.
        """
        async for key, row, listed, ((archive, stamp),) in self._walk(
            chunk, lambda key: [(_HMGET_ROW, key, _ROW_FIELDS)]
        ):
            # Gone, or re-put under another stamp since the index was read: it is listed
            # where it now belongs, or not at all, but never twice.
            if stamp == listed:
                yield self._record(key, row, archive, stamp)

    async def iter_package_heads(self, *, chunk: int = 1000) -> AsyncIterator[PackageHead]:
        """Every package as ``iter_packages`` lists it, without its archive.

        Each head carries the archive's size instead, so listing a catalogue of large
        archives costs a few dozen bytes per package on the wire. Same order and the same
        promise while others write as ``iter_packages``. Beyond the ``PackageStore``
        contract: the command line lists with it.
        """
        async for key, row, listed, (stamp, size) in self._walk(
            chunk,
            lambda key: [(_HGET_STAMP, key, _STAMP_FIELD), (_HSTRLEN, key, _ARCHIVE_FIELD)],
        ):
            if stamp == listed:
                record = self._record(key, row, b"", stamp)
                yield PackageHead(
                    record.workflow_type, record.content_hash, record.deployed_at, size
                )

    async def _walk(
        self, chunk: int, fetch_row: Callable[[bytes], list[Command]]
    ) -> AsyncIterator[tuple[bytes, bytes, bytes, list[Any]]]:
        """``(key, row id, stamp in the index, replies to fetch_row(key))`` for each row
        in index order, ``chunk`` rows per round trip."""
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, not {chunk!r}")
        k = self._keys
        members: list[bytes] = await self._read(self._next_members(b"-", chunk))
        while members:
            rows = [split_index_member(self._member(m)) for m in members]
            fetch = [command for _, row in rows for command in fetch_row(k.row(row))]
            width = len(fetch) // len(rows)
            last = len(members) == chunk
            if last:
                fetch.append(self._next_members(b"(" + members[-1], chunk))
            replies = await self._unit(fetch)
            for i, (stamp, row) in enumerate(rows):
                yield k.row(row), row, stamp, replies[i * width : (i + 1) * width]
            members = replies[-1] if last else []

    def _next_members(self, after: bytes, chunk: int) -> Command:
        return ("ZRANGEBYLEX", self._keys.index, after, b"+", b"LIMIT", 0, chunk)

    # The wire.

    async def _script(self, script: Script, command: Command, size: int = 0) -> Any:
        wait = self._wait
        replies = await self._pipeliner.run((command,) if wait is None else (command, wait), size)
        if isinstance(replies[0], NoScriptError):
            # The server lost its script cache (restart, failover, SCRIPT FLUSH):
            # EVAL sends the body and caches it again.
            command = script.eval_instead(command)
            replies = await self._pipeliner.run(
                (command,) if wait is None else (command, wait), size
            )
        result = self._reply(replies[0])
        if wait is not None:
            acked, wanted = self._reply(replies[1]), wait[1]
            if acked < wanted:
                raise BackendError(
                    f"{self._server}: {acked} of {wanted} replicas acknowledged the write in "
                    f"{wait[2]} ms; it is applied on the primary but a failover may lose it"
                )
        return result

    async def _read(self, command: Command) -> Any:
        (reply,) = await self._unit([command])
        return reply

    async def _unit(self, commands: list[Command]) -> list[Any]:
        """Replies to ``commands``, sent with a check that the layout is ours."""
        found, *replies = await self._pipeliner.run([self._format_check, *commands])
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
        return SerializationError(
            f"{self._keys.format!r} says layout {found!r}; this kvstore reads and writes "
            f"layout {FORMAT_VERSION!r} and will not touch the namespace"
        )

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

    def _member(self, member: Any) -> bytes:
        if not isinstance(member, bytes):
            raise SerializationError(f"{self._keys.index!r} holds a non-bytes member")
        return member

    def _text(self, value: Any, where: str) -> str:
        try:
            return bytes(value).decode("utf-8")
        except (TypeError, UnicodeDecodeError) as exc:
            raise SerializationError(f"{where} is not UTF-8 text: {value!r}") from exc


def _checked(record: PackageRecord) -> PackageRecord:
    if not isinstance(record, PackageRecord):
        raise TypeError(f"record must be PackageRecord, not {type(record).__name__}")
    return record


def _connection_options(client: Redis | RedisCluster) -> dict[str, Any]:
    if isinstance(client, RedisCluster):
        return dict(client.get_connection_kwargs())
    return dict(client.connection_pool.connection_kwargs)


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
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
