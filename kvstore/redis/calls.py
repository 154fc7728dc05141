"""Every call a store sends, and how its replies become results or the library's errors.

Two kinds of call go through here, and nothing else speaks to the server for a store:

- **Reads** (``read``, ``unit``): plain commands, each unit led by a ``GET`` of the
  layout marker, so a namespace of another layout is refused before anything is read
  from it. A key of another type (``WRONGTYPE``) is damage: ``SerializationError``
  naming the key. With ``read_from_replicas``, the units of a read that began with
  ``read_mark()`` go to a replica that has applied every write acknowledged before it,
  where one has (on a cluster, each shard's part of a unit to a replica of that shard;
  ``kvstore.redis.replicas``).
- **Writes** (``call``): one ``FCALL`` of the library (``kvstore.redis.scripts``); when
  writes wait for replicas or for the fsync, its batch is followed by one ``WAIT`` or
  ``WAITAOF`` (the pipeliner's trailer), shared by the writes of the batch. The first
  write checks that the library under this release's name is this release's, byte for
  byte, and every load checks it again; another library of that name fails every
  write. A call that finds the library missing loads it (one load at a time per store)
  and is sent again, as often as the library goes away again within ``retry_budget``.
  Its refusals
  (``KVSTORE_TYPE``, ``KVSTORE_FORMAT``) become ``SerializationError`` naming the key;
  ``KVSTORE_ARGS`` (a call of a shape kvstore never sends) ``BackendError`` naming the
  argument. Every step of a call, shared loads and checks included, ends by its hard
  end, ``retry_budget + timeout`` after it was made. A large archive is first checked
  against the server's ``proto-max-bulk-len`` (``sends_alone``).

Every failure of the server becomes ``BackendError`` naming it, password redacted
(``backend_error``), here and for the pipeliner.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import ConnectionError, NoPermissionError, ResponseError

from kvstore.errors import BackendError, SerializationError
from kvstore.redis.failures import backend_error, client_secrets, redact
from kvstore.redis.keyspace import LAYOUTS, Keyspace
from kvstore.redis.options import StoreOptions
from kvstore.redis.pipeline import Pipeliner
from kvstore.redis.protocol import (
    args_refusal,
    field_pairs,
    fits,
    format_refusal,
    type_refusal,
)
from kvstore.redis.replicas import FROM_PRIMARY, Mark, ReplicaReads
from kvstore.redis.retry import Budget, call_with_retry
from kvstore.redis.scripts import (
    LIBRARY,
    Held,
    check_library,
    is_missing_function,
    load_on_servers,
    mismatch_error,
)
from kvstore.redis.target import Target
from kvstore.redis.wire import Command, PrePacked, flatten

_log = logging.getLogger("kvstore.redis.store")

# An archive larger than this is checked against the server's proto-max-bulk-len before
# it is sent, so that a server that would refuse it never drops a connection carrying
# other calls. Below it, no server's limit can be in the way (Redis and Valkey refuse
# to set the limit under 1 MiB).
LARGE_ARGUMENT = 512 << 10


class _OneAtATime:
    """``work`` run once at a time: the callers that come while it runs wait for the same
    run (the calls that find the library missing together wait for one load). The run
    is shielded, so a caller cancelled meanwhile does not cancel it for the others; only
    ``cancel()`` does (the store closing), and its callers then raise ``closed()``."""

    def __init__(
        self, work: Callable[[], Awaitable[Any]], closed: Callable[[], BackendError]
    ) -> None:
        self._work = work
        self._closed = closed
        self._running: asyncio.Future[Any] | None = None

    async def __call__(self) -> None:
        running = self._running
        if running is None:
            running = self._running = asyncio.ensure_future(self._work())
            running.add_done_callback(self._done)
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            if not running.cancelled():
                raise  # this caller was cancelled; the run goes on for the others
            error = self._closed()
            raise error from error.__cause__

    def cancel(self) -> None:
        if self._running is not None:
            self._running.cancel()

    def _done(self, running: asyncio.Future[Any]) -> None:
        if self._running is running:
            self._running = None
        if not running.cancelled():
            running.exception()  # retrieved: the callers that awaited it raised it


class LayoutChanged(Exception):
    """A write was refused because the namespace's layout is not the one it was made for
    (``KVSTORE_FORMAT`` naming a layout this release writes): nothing was written, and
    ``Calls.layout`` is now the one found."""


class Calls:
    """The calls of one store to its ``target``, over one namespace's ``keys``."""

    def __init__(
        self,
        target: Target,
        keys: Keyspace,
        options: StoreOptions,
        *,
        spare_connections: int,
    ) -> None:
        self._target = target
        self._keys = keys
        self._timeout = options.timeout
        self._budget = Budget(options.retry_budget, options.timeout)
        self._secrets = client_secrets(target.client)
        # What every batch of writes ends with when they wait to be replicated or
        # fsynced: one wait for the batch (a group commit), not one per write.
        self._wait: Command | None = None
        wait_ms = round(options.replica_timeout * 1000)
        if options.durability == "fsync":
            self._wait = ("WAITAOF", 1, options.min_replicas, wait_ms)
        elif options.min_replicas:
            self._wait = ("WAIT", options.min_replicas, wait_ms)
        self.pipeliner = Pipeliner(
            target.transport(),
            lanes=options.lanes,
            timeout=options.timeout,
            retry_budget=options.retry_budget,
            translate=self.backend_error,
            spare_connections=spare_connections,
            trailer=self._wait,
        )
        self._format_check = (PrePacked("GET", keys.format),)
        self.replicas: ReplicaReads | None = None
        if options.read_from_replicas:
            self.replicas = ReplicaReads(
                target,
                self.pipeliner.run,
                lanes=options.lanes,
                timeout=options.replica_read_timeout,
                # As long as the store's own calls may take: retry_budget + timeout.
                hard_bound=self._budget.hard_end(0.0),
                translate=lambda exc, where: backend_error(exc, where, self._secrets),
            )
        # The namespace's layout as the last call found it (None: not seen yet), and the
        # one a write gives a namespace it is the first to write.
        self.layout: bytes | None = None
        self._new_layout = b"%d" % options.layout
        # The server's proto-max-bulk-len, read on the first large put (None: unknown).
        self._max_bulk: int | None = None
        self._max_bulk_read = False
        self._max_bulk_lock = asyncio.Lock()
        # Whether a write found this release's library on the server (None: no write yet).
        self.library_found: bool | None = None
        # Whether the library under this release's name was checked to be this
        # release's, byte for byte, or cannot be (the credential may not FUNCTION LIST):
        # checked by the first write, and by every load. The only cost a write pays
        # after the first is the test of this flag.
        self._library_checked = False
        self._check = _OneAtATime(self._check_library, self._closed_error)
        # The servers the last load found holding another library of its name.
        self._other_library: list[str] = []
        # What a call that finds the library missing runs: the store's public method,
        # so a load that a call needs is seen (and observed) as one.
        self.load_hook: Callable[[], Awaitable[list[str]]] = self.load_library
        self._load = _OneAtATime(lambda: self.load_hook(), self._closed_error)

    @property
    def server(self) -> str:
        return self._target.description

    async def aclose(self) -> None:
        self._check.cancel()
        self._load.cancel()
        if self.replicas is not None:
            await self.replicas.aclose()
        await self.pipeliner.aclose()

    # Health.

    @property
    def connected(self) -> bool:
        """Whether the last reply waited for came, and no failure since."""
        return self.pipeliner.reached and self.pipeliner.last_failure is None

    @property
    def last_error(self) -> str | None:
        failure = self.pipeliner.last_failure
        return None if failure is None else f"{self.server}: {redact(failure, self._secrets)}"

    async def ping(self) -> None:
        """One ``PING`` through the store's connections within ``timeout``, retries
        included: a probe wants the state now, not after the retry budget. If the
        attempts failed meanwhile (a refused connection, retried until now), the
        failure is the error, as every other call would say it."""
        run = self.pipeliner.run((("PING",),))
        try:
            if self._timeout is None:
                (reply,) = await run
            else:
                (reply,) = await asyncio.wait_for(run, self._timeout)
        except asyncio.TimeoutError:
            failure = self.pipeliner.last_failure
            if failure is not None and not failure.startswith("TimeoutError"):
                raise BackendError(f"{self.server}: {redact(failure, self._secrets)}") from None
            stalled = TimeoutError(f"no answer to PING within {self._timeout} s")
            self.pipeliner.last_failure = f"TimeoutError: {stalled}"  # for health()
            error = self.backend_error(stalled)
            raise error from error.__cause__
        self.reply(reply)

    # Writes: one function call each.

    async def call(
        self, command: Command, size: int = 0, *, alone: bool = False, made: float | None = None
    ) -> Any:
        """The reply to ``command``, an ``FCALL`` of the library, loading the library
        first if the server lacks it. ``alone``: sent with nothing else in flight.
        ``made``: when the write this call is a step of was made (the loop's time; now,
        if not given), from which its hard end counts. Every write of the store comes
        this way.

        The first call checks the library the server holds under this release's name
        (``_check_library``); while it is another library, every call raises
        ``BackendError`` saying so and sends nothing. With ``min_replicas`` or
        ``durability="fsync"`` the unit is durable: the wait that follows its batch ends
        its replies."""
        if made is None:
            made = asyncio.get_running_loop().time()  # every step of the call counts from here
        if not self._library_checked:
            await self._by_hard_end(self._check(), made)
        unit = (command,)
        durable = self._wait is not None
        replies = await self.pipeliner.run(unit, size, alone=alone, durable=durable, made=made)
        if is_missing_function(replies[0]):
            replies = await self._load_and_send(command, unit, size, alone, made)
        return self._result(command, replies)

    async def _by_hard_end(self, work: Awaitable[None], made: float) -> None:
        """``work``, a step of a call made at ``made`` shared with other calls (a load, a
        check), waited for no later than the call's hard end: no call outlives about
        ``retry_budget + timeout``, whatever it waits on."""
        remaining = self._budget.hard_end(made) - asyncio.get_running_loop().time()
        if remaining == math.inf:
            await work
            return
        try:
            await asyncio.wait_for(work, max(remaining, 0.0))
        except asyncio.TimeoutError:
            spent = self._budget.retry_budget + (self._budget.timeout or 0.0)
            stalled = TimeoutError(f"no reply within {spent:g} s, retries included")
            error = self.backend_error(stalled)
            raise error from error.__cause__

    async def _load_and_send(
        self, command: Command, unit: Sequence[Command], size: int, alone: bool, made: float
    ) -> list[Any]:
        """The replies to ``unit``, whose function the server lacked (a fresh server, one
        restarted without persistence, a FUNCTION FLUSH or DELETE): the library loaded
        and ``unit`` sent again, as often as the function is missing again, until
        ``retry_budget`` seconds after the call was made; the same backoff curve as every
        retry between loads after the first. Then ``BackendError`` naming the function."""
        function = flatten(command)[1]
        loop = asyncio.get_running_loop()
        retry_until = self._budget.retry_until(made)
        loads = 0
        while True:
            self.library_found = False
            try:
                await self._by_hard_end(self._load(), made)
            except BackendError:
                if self._other_library:  # another library of the name, this call's cause
                    raise mismatch_error(LIBRARY, self._other_library, function) from None
                raise
            loads += 1
            durable = self._wait is not None
            replies: list[Any] = await self.pipeliner.run(
                unit, size, alone=alone, durable=durable, made=made
            )
            if not is_missing_function(replies[0]):
                return replies
            now = loop.time()
            if now >= retry_until:
                raise BackendError(
                    f"{self.server}: the function {function} of the kvstore library "
                    f"{LIBRARY.name} was missing again after each of {loads} loads in "
                    f"{self._budget.retry_budget:g} s: something removes the library "
                    "(FUNCTION FLUSH or FUNCTION DELETE) as often as it is loaded, or "
                    "another library of its name without that function is loaded where "
                    "this credential may not check its code (FUNCTION LIST); nothing was "
                    "written"
                )
            await asyncio.sleep(min(self._budget.curve.delay(loads), retry_until - now))

    def _result(self, command: Command, replies: list[Any]) -> Any:
        """What the function ``command`` called replied, its refusals raised; and, with
        ``min_replicas`` or ``durability``, raises if the wait after it fell short."""
        reply = replies[0]
        if isinstance(reply, ResponseError):
            found = format_refusal(reply)
            if found in LAYOUTS:
                # Migrated since this store last looked (or made anew by another release):
                # the caller builds the call again for the layout found.
                self.layout = found
                raise LayoutChanged(found)
            self._refused(command, reply)
        result = self.fitting(command, self.reply(reply))
        self.library_found = True  # the function ran
        if self._wait is not None:
            self._waited(replies[1])
        return result

    def _waited(self, reply: Any) -> None:
        """Raise unless the wait that ended the write's batch (``WAIT`` or ``WAITAOF``)
        says the write is where ``min_replicas`` and ``durability`` want it."""
        wait = self._wait
        assert wait is not None
        applied = "the write is applied on the primary"
        if wait[0] == "WAIT":
            acked, wanted = self.fitting(wait, self.reply(reply)), wait[1]
            if acked < wanted:
                raise BackendError(
                    f"{self.server}: {acked} of {wanted} replicas acknowledged the write in "
                    f"{wait[2]} ms; {applied} but a failover may lose it"
                )
            return
        if isinstance(reply, ResponseError):
            text = str(reply)
            if "unknown command" in text.lower():
                why = "this server has no WAITAOF: durability='fsync' needs Redis or Valkey 7.2+"
            elif "appendonly" in text.lower():
                why = "the server's appendonly is off: durability='fsync' needs appendonly yes"
            else:
                raise self.backend_error(reply)
            raise BackendError(f"{self.server}: {why}; {applied} but is not known to be on disk")
        local, replicas = self.fitting(wait, reply)
        if local < 1 or replicas < wait[2]:
            raise BackendError(
                f"{self.server}: the write was fsynced on {local} of 1 primary and {replicas} "
                f"of {wait[2]} replicas in {wait[3]} ms; {applied} but a crash may lose it"
            )

    def _refused(self, command: Command, reply: ResponseError) -> None:
        """Raises the library's error for the refusals of its own (``lua/library.lua``)
        that need the call to say; returns for any other."""
        refusal = type_refusal(reply)
        if refusal is not None:
            key = refusal.key_of(flatten(command))
            raise SerializationError(
                f"{key!r} holds a {refusal.found}, not a {refusal.expected}; nothing was written"
            )
        misuse = args_refusal(reply)
        if misuse is not None:
            function = flatten(command)[1]
            raise BackendError(
                f"{self.server}: {function} refused the call: {misuse.argument} {misuse.why}; "
                "nothing was written (no call kvstore makes has this shape)"
            )

    async def write_layout(self) -> bytes:
        """The layout a write is to be made in: the namespace's, as the last call found
        it, read first if no call has yet; a namespace without a marker gets the store's
        ``layout``. A write refused because the namespace has changed layout since
        raises ``LayoutChanged``, and the next ``write_layout`` is the one found."""
        if self.layout is None:
            await self.unit([])
            if self.layout is None:  # the write makes the namespace, in this layout
                self.layout = self._new_layout
        return self.layout

    async def sends_alone(self, size: int) -> bool:
        """Whether a put whose archive is ``size`` bytes must be sent alone, because
        the server's limit is unknown; raises ``BackendError`` if it is over the limit."""
        if size <= LARGE_ARGUMENT:
            return False
        if not self._max_bulk_read:  # once per store; the lock keeps it one read
            async with self._max_bulk_lock:
                if not self._max_bulk_read:
                    self._max_bulk = await self._read_max_bulk_len()
                    self._max_bulk_read = True
        limit = self._max_bulk
        if limit is not None and size > limit:
            raise BackendError(
                f"{self.server}: the archive is {size} bytes, over the server's "
                f"proto-max-bulk-len of {limit} bytes: the server would refuse it"
            )
        return limit is None

    async def _read_max_bulk_len(self) -> int | None:
        """The server's proto-max-bulk-len, or ``None`` when it will not say (a user
        without ``CONFIG`` rights gets ``NOPERM``; a cluster client asks a node it does
        not choose; fakeredis has no such setting)."""
        if not self._target.reads_server_config:
            return None
        reply = await self.send_one(("CONFIG", "GET", "proto-max-bulk-len"))
        # Empty when the server has no such setting; a refusal when it will not say.
        try:
            return int(dict(field_pairs(reply))[b"proto-max-bulk-len"])
        except (KeyError, TypeError, ValueError):
            return None

    # The library.

    async def load_library(self) -> list[str]:
        """Load this release's library wherever the target needs it; see
        ``RedisPackageStore.load_library``. A load checks what it finds under the
        library's name (``kvstore.redis.scripts.load_library``)."""
        # Retried like any call: a load often follows a restart, whose first attempt may
        # meet a pooled connection the server closed.
        self._other_library = []
        said = await call_with_retry(
            lambda: load_on_servers(self._target, send=self.send_one),
            self._budget,
            self._load_error,
        )
        self._other_library = [server for server, found, _ in said if found is Held.OTHER]
        if self._other_library:
            self.library_found = False
            self._library_checked = False
            raise mismatch_error(LIBRARY, self._other_library)
        self._library_checked = True
        return [f"{server}: {line}" for server, _, line in said]

    async def _check_library(self) -> None:
        """Check what the server holds under this release's library name; raises
        ``BackendError`` (``mismatch_error``) if it is another library.

        Absent, the library stays unchecked: the call finds it missing and loads it,
        which checks it. Where the credential may not ``FUNCTION LIST``, the library is
        trusted by its name (``kvstore setup`` checks it with an operator's credential)."""
        said = await call_with_retry(
            lambda: check_library(self._target, send=self.send_one),
            self._budget,
            self.backend_error,
        )
        other = [server for server, found in said if found is Held.OTHER]
        if other:
            self.library_found = False
            raise mismatch_error(LIBRARY, other)
        self._library_checked = all(found is not Held.ABSENT for _, found in said)

    def _load_error(self, exc: BaseException) -> Exception:
        if isinstance(exc, NoPermissionError):
            error = BackendError(
                f"the kvstore library {LIBRARY.name} is not loaded on {self.server} and "
                "this credential may not load it; run `kvstore setup --url URL` with a "
                "credential that may (FUNCTION LOAD)"
            )
            error.__cause__ = exc
            return error
        return self.backend_error(exc)

    async def send_one(self, command: Command) -> Any:
        """The reply to ``command``, sent on the store's own connections; a refusal is
        its ``ResponseError`` value."""
        (reply,) = await self.pipeliner.run((command,))
        return reply

    def _closed_error(self) -> BackendError:
        return self.backend_error(ConnectionError("the store is closed"))

    # Reads: plain commands, each unit led by a check of the layout marker.

    def read_mark(self) -> Mark | None:
        """The start of a read whose units may go to replicas (``None``: they go to the
        primary): made when the read begins, given to each of its units."""
        return None if self.replicas is None else self.replicas.mark()

    async def read(self, command: Command, *, mark: Mark | None = None) -> Any:
        (reply,) = await self.unit([command], mark=mark)
        return reply

    async def unit(
        self,
        commands: list[Command],
        *,
        large: bool = False,
        archives: bool = False,
        mark: Mark | None = None,
    ) -> list[Any]:
        """Replies to ``commands``, sent with a check that the layout is ours.
        ``archives``: the replies may hold archives (read in slices when large);
        ``large``: they are of a MiB or more, sent behind each other on one connection.
        ``mark``: of the read they are part of, so a replica may send them."""
        unit = [self._format_check, *commands]
        sent = None
        if mark is not None and self.replicas is not None:
            sent = await self.replicas.run(mark, unit, large=large, archives=archives)
        if sent is None:
            sent = await self.pipeliner.run(unit, large_reply=large, streamed=archives)
        else:
            # On a cluster, the part of the unit no replica of its shard could send.
            rest = [i for i, reply in enumerate(sent) if reply is FROM_PRIMARY]
            if rest:
                again = await self.pipeliner.run(
                    [unit[i] for i in rest], large_reply=large, streamed=archives
                )
                for i, reply in zip(rest, again, strict=True):
                    sent[i] = reply
        found, *replies = sent
        found = self.fitting(self._format_check, self.reply(found, self._format_check))
        if found is not None:
            if found not in LAYOUTS:
                raise self._layout_error(found)
            self.layout = found
        return [self.fitting(c, self.reply(r, c)) for c, r in zip(commands, replies, strict=True)]

    def fitting(self, command: Command, reply: Any) -> Any:
        """``reply``, if it is a shape the server may give to ``command``; else
        ``BackendError``: the server is not what it says it is."""
        if fits(command, reply):
            return reply
        name = flatten(command)[0]
        raise self.backend_error(
            ResponseError(f"{name} had an answer no Redis gives: {reply!r:.100}")
        )

    def reply(self, reply: Any, read: Command | None = None) -> Any:
        """``reply``, or the library's error for a refusal. ``read``: the command of one
        key (at its first argument) that ``reply`` answers; its key holding another type
        is damage, and the ``SerializationError`` names the key."""
        if isinstance(reply, ResponseError):
            found = format_refusal(reply)
            if found is not None:
                raise self._layout_error(found)
            if read is not None and str(reply).startswith("WRONGTYPE"):
                raise self._wrong_type(read) from reply
            raise self.backend_error(reply)
        return reply

    def _wrong_type(self, read: Command) -> SerializationError:
        name, key = flatten(read)[:2]
        name = name.decode() if isinstance(name, bytes) else str(name)
        expected = self._keys.expected_type(key) if isinstance(key, bytes) else None
        held = f"is not a {expected}" if expected else "holds another type"
        return SerializationError(f"{key!r} {held}: the server refused {name} (WRONGTYPE)")

    def _layout_error(self, found: bytes) -> SerializationError:
        error = SerializationError(
            f"{self._keys.format!r} says layout {found!r}; this kvstore reads and writes "
            f"layouts {b', '.join(LAYOUTS).decode()} and will not touch the namespace"
        )
        _log.error("%s", error)
        return error

    def backend_error(self, exc: BaseException) -> BackendError:
        """``exc`` as the library's error, naming the server, password redacted."""
        return backend_error(exc, self.server, self._secrets)
