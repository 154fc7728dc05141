"""Reads served by replicas, never older than the read.

With ``read_from_replicas=True`` a store sends its reads (gets, heads, routes read from
the server, listings) to the primary's replicas, and keeps this promise: **a read that
starts after a write was acknowledged, by any store, returns that write**, as a read of
the primary would. How:

1. A read begins by asking the primary for its replication position (``INFO
   replication``): the history it writes (``master_replid``) and how far
   (``master_repl_offset``). A write is in that stream, counted in the offset, before
   its reply is sent, so the position covers every write acknowledged before the read
   began. The same answer names the replicas the primary has (``slaveN:ip=…,port=…,
   state=online``): they are found there, and followed as they come and go (a
   Sentinel's failover included: the store's client follows the primary).
2. Each round trip of the read goes to a replica led by the same question, on the same
   connection, so the answer is the replica's as it was just before it read the
   round trip's keys. The replies are used only if the replica follows the primary's history
   (the same ``master_replid``: a primary that restarted empty begins a new one) and
   has applied it up to the primary's offset (``slave_repl_offset``, which counts a
   transaction or a function's writes once all of them are applied). A replica only
   moves forward, so what it read then holds every write the position covers.
3. Otherwise the round trip goes to the primary, as every read does without replicas.

The bound a replica can cost: a replica behind the position costs its round trip one
more (to the primary), and is not asked again during that read; one that fails to
answer within ``replica_read_timeout`` (dead, paused, unreachable, not a Redis) costs
that once, after which the rest of the read goes to the primary, and the replica rests
``REPLICA_REST`` seconds before any read of the store tries it again. A primary that will
not say its position (a credential without ``+info``) sends every read to the primary,
and says so in the log once a minute. Replica reads never change what a read returns,
only which server sends it.

On a Redis Cluster each shard is its own primary with its own replicas and its own
history: a round trip's commands are grouped by the primary that serves their keys
(a listing reads rows on the namespace's shard and blobs on every shard), each group
goes to a replica of its shard, led by ``READONLY``, and is checked against that
primary's position, asked for (on a connection of the store's own to it) when the read
first needs it; a group no replica could send goes to the primaries with the others.
A write acknowledged before the read began is in the position of the shard it wrote
to, so the promise holds shard by shard: a put's blob and row both.

Replicas are reached with the primary's credentials and TLS settings, at the address
the primary gives (``replica-announce-ip`` and ``replica-announce-port`` set it where
the replica's own is not reachable).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.exceptions import ResponseError

from kvstore.errors import BackendError
from kvstore.redis.pipeline import Pipeliner
from kvstore.redis.protocol import fits
from kvstore.redis.target import Target
from kvstore.redis.transports import PooledTransport
from kvstore.redis.wire import Command, PrePacked, flatten

_log = logging.getLogger("kvstore.redis.store")

# How long a replica that failed to answer is left alone, in seconds.
REPLICA_REST: Final = 10.0
# The most often the log says that replicas cannot be used, in seconds.
_SAY_EVERY: Final = 60.0

POSITION: Final[Command] = (PrePacked("INFO", "replication"),)

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Position:
    """Where a server stands in a replication history: its id, and the offset applied."""

    history: bytes
    offset: int


def _fields(info: Any) -> dict[bytes, bytes]:
    """The ``name:value`` lines of an ``INFO`` reply (empty for anything else)."""
    if not isinstance(info, bytes):
        return {}
    found: dict[bytes, bytes] = {}
    for line in info.splitlines():
        name, colon, value = line.partition(b":")
        if colon:
            found[name.strip()] = value.strip()
    return found


def _offset(value: bytes | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 19:
        return None
    return int(value)


def primary_position(info: Any) -> tuple[Position, list[Address]] | None:
    """The primary's position and the addresses of its online replicas, from its
    ``INFO replication``; ``None`` if the server does not say it is a primary."""
    fields = _fields(info)
    history, offset = fields.get(b"master_replid"), _offset(fields.get(b"master_repl_offset"))
    if fields.get(b"role") != b"master" or not history or offset is None:
        return None
    replicas: list[Address] = []
    for name, value in fields.items():
        if not (name.startswith(b"slave") and name[5:].isdigit()):
            continue
        said = dict(part.partition(b"=")[::2] for part in value.split(b","))
        port = _offset(said.get(b"port"))
        host = said.get(b"ip", b"")
        if said.get(b"state") == b"online" and host and port and port < 65536:
            replicas.append((host.decode("ascii", "replace"), port))
    return Position(history, offset), replicas


def replica_position(info: Any) -> Position | None:
    """The position a replica has applied, from its ``INFO replication``; ``None`` if
    the server does not say it is a replica."""
    fields = _fields(info)
    history, offset = fields.get(b"master_replid"), _offset(fields.get(b"slave_repl_offset"))
    if fields.get(b"role") != b"slave" or not history or offset is None:
        return None
    return Position(history, offset)


def is_caught_up(replica: Position | None, primary: Position) -> bool:
    """Whether a replica at ``replica`` holds every write of the primary at ``primary``."""
    return (
        replica is not None
        and replica.history == primary.history
        and replica.offset >= primary.offset
    )


# In the replies ``ReplicaReads.run`` gives: this command is to be sent to the primary.
FROM_PRIMARY: Final = object()

# A shard: the primary that serves a command's key, by name (``None``: the one server).
Shard = str | None


@dataclass(eq=False)
class Mark:
    """One read's start: each primary's position, asked for when the read first needs
    it (a cluster's, when a round trip first reads a key of its slots), and what the
    read learned of replicas since."""

    positions: dict[Shard, asyncio.Task[Position | None]] = field(default_factory=dict)
    behind: set[Address] = field(default_factory=set)  # replicas not to ask again
    primary_only: bool = False  # a replica failed this read: the rest goes to the primary


@dataclass(eq=False)
class _Replica:
    pipeliner: Pipeliner
    pool: Any
    resting_until: float = -math.inf


@dataclass(eq=False)
class _Shard:
    """A primary's replicas as its last answer named them, and the next to ask."""

    online: list[Address] = field(default_factory=list)
    next: int = field(default_factory=lambda: random.randrange(1 << 16))


class ReplicaReads:
    """The replicas of one store's primaries (a cluster's, each shard's), and the reads
    they serve.

    ``primary(commands)``: the replies to ``commands`` from the primary, on the store's
    own connections (one server; a cluster's primaries are asked their position on
    connections of their own). The replicas' connections are made with the target's
    options, each round trip led by the target's ``replica_lead`` (``READONLY`` on a
    cluster); ``lanes`` per replica, each attempt bounded by ``timeout`` seconds and
    never retried (the primary is the retry). A round trip may wait behind others on its
    replica's connection (large replies follow each other) for ``hard_bound`` seconds,
    the store's own bound: its ``timeout`` runs from the moment its replies are next.
    """

    def __init__(
        self,
        target: Target,
        primary: Callable[[Sequence[Command]], Any],
        *,
        lanes: int,
        timeout: float,
        hard_bound: float,
        translate: Callable[[BaseException, str], BackendError],
    ) -> None:
        self._target = target
        self._hard_bound = hard_bound
        self._primary = primary
        self._lanes = lanes
        self._timeout = timeout
        self._translate = translate
        self._lead = target.replica_lead
        self._shards: dict[Shard, _Shard] = {}
        # The servers' connections: replicas by address, a cluster's primaries by name.
        self._replicas: dict[Address, _Replica] = {}
        self._primaries: dict[Shard, _Replica] = {}
        self._said_at = -math.inf
        self._closed = False
        # Round trips (a shard's part of one) a replica served, and those sent to the
        # primary instead (behind, failed, or no replica).
        self.served = 0
        self.to_primary = 0

    def mark(self) -> Mark:
        """The start of a read: its round trips may go to replicas once the positions
        of their primaries, asked for from here on, are known."""
        return Mark()

    def _position(self, mark: Mark, shard: Shard, node: Any) -> asyncio.Task[Position | None]:
        """The position of ``shard``'s primary for ``mark``'s read, asked for once."""
        task = mark.positions.get(shard)
        if task is None:
            task = asyncio.ensure_future(self._ask_position(shard, node))
            # Retrieved here: a read that ends first never awaits it.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            mark.positions[shard] = task
        return task

    async def _ask_position(self, shard: Shard, node: Any) -> Position | None:
        if node is None:
            (info,) = await self._primary([POSITION])
        else:
            primary = self._primaries.get(shard)
            if primary is None:
                address = (node.host, node.port)
                primary = self._primaries[shard] = self._connect(address, "primary")
            (info,) = await primary.pipeliner.run([POSITION])
        found = primary_position(info)
        if found is None:
            self._say(
                "the primary does not say its replication position"
                + (f" ({info})" if isinstance(info, ResponseError) else "")
                + "; reads go to the primary"
            )
            return None
        position, self._shard(shard).online = found
        return position

    def _shard(self, shard: Shard) -> _Shard:
        found = self._shards.get(shard)
        if found is None:
            found = self._shards[shard] = _Shard()
        return found

    async def run(
        self, mark: Mark, commands: Sequence[Command], *, large: bool, archives: bool
    ) -> list[Any] | None:
        """The replies to ``commands``, each from a replica that has applied every write
        of its primary that ``mark`` covers, or ``FROM_PRIMARY`` where none did (it is to
        be sent to the primary); ``None`` when no replica served any."""
        if mark.primary_only or self._closed:
            self.to_primary += 1
            return None
        groups = await self._by_shard(commands)
        if groups is None:
            self.to_primary += 1
            return None
        served = await asyncio.gather(
            *(
                self._from_replica(mark, shard, node, [commands[i] for i in at], large, archives)
                for shard, (node, at) in groups.items()
            )
        )
        replies: list[Any] = [FROM_PRIMARY] * len(commands)
        for (_, at), got in zip(groups.values(), served, strict=True):
            if got is None:
                self.to_primary += 1
                continue
            self.served += 1
            for i, reply in zip(at, got, strict=True):
                replies[i] = reply
        return None if all(r is FROM_PRIMARY for r in replies) else replies

    async def _by_shard(
        self, commands: Sequence[Command]
    ) -> dict[Shard, tuple[Any, list[int]]] | None:
        """The commands' places, by the primary that serves the key each reads (its
        first argument); ``None`` if one cannot be placed (the slot table renewing)."""
        target = self._target
        if await target.primaries() == [None]:  # one server: one shard, nothing to place
            return {None: (None, list(range(len(commands))))}
        groups: dict[Shard, tuple[Any, list[int]]] = {}
        for i, command in enumerate(commands):
            key = flatten(command)[1]
            try:
                node = target.node_of(key) if isinstance(key, bytes) else None
            except LookupError:
                return None
            shard = None if node is None else node.name
            groups.setdefault(shard, (node, []))[1].append(i)
        return groups

    async def _from_replica(
        self,
        mark: Mark,
        shard: Shard,
        node: Any,
        commands: Sequence[Command],
        large: bool,
        archives: bool,
    ) -> list[Any] | None:
        asked = self._position(mark, shard, node)
        # Among the replicas the primary's last answer named, the round trip goes
        # together with the question to the primary, not after it: the replica's answer
        # is checked against the primary's whichever comes first, since the primary's
        # is read after the read began and the replica only moves forward.
        address = self._choose(mark, shard)
        if address is None:  # none named yet (the store's first read): this answer will
            address = None if await _answer(asked) is None else self._choose(mark, shard)
            if address is None:
                return None
        replica = self._replicas.get(address)
        if replica is None:
            replica = self._replicas[address] = self._connect(address, "replica")
        lead = len(self._lead)
        try:
            sent = await replica.pipeliner.run(
                [*self._lead, POSITION, *commands], large_reply=large, streamed=archives
            )
        except BackendError as exc:
            self._failed(mark, address, replica, str(exc))
            return None
        position = await _answer(asked)
        if position is None:
            return None
        info, replies = sent[lead], sent[lead + 1 :]
        if not is_caught_up(replica_position(info), position):
            mark.behind.add(address)
            return None
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ResponseError):
                # MASTERDOWN, LOADING, MOVED, WRONGTYPE: the primary's answer is the one
                # given.
                mark.behind.add(address)
                return None
            if not fits(command, reply):
                self._failed(mark, address, replica, f"an answer no Redis gives: {reply!r:.60}")
                return None
        return replies

    def _failed(self, mark: Mark, address: Address, replica: _Replica, why: str) -> None:
        """The replica at ``address`` failed ``mark``'s read: it rests, and the rest of
        the read goes to the primary."""
        replica.resting_until = asyncio.get_running_loop().time() + REPLICA_REST
        mark.primary_only = True
        _log.warning(
            "replica %s:%d failed a read (%s); reads go to the primary and the other "
            "replicas for %g s",
            *address,
            why,
            REPLICA_REST,
        )

    def _choose(self, mark: Mark, shard: Shard) -> Address | None:
        """The next online replica of ``shard``, round robin, that neither rests nor
        was found behind during this read."""
        now = asyncio.get_running_loop().time()
        state = self._shard(shard)
        online = state.online
        for i in range(len(online)):
            address = online[(state.next + i) % len(online)]
            if address in mark.behind:
                continue
            replica = self._replicas.get(address)
            if replica is not None and replica.resting_until > now:
                continue
            state.next = (state.next + i + 1) % (1 << 16)
            return address
        return None

    def _connect(self, address: Address, role: str) -> _Replica:
        """Connections of the store's own to the server at ``address``, a ``role``."""
        pool = self._target.replica_pool(*address)
        where = f"{role} {address[0]}:{address[1]}"
        pipeliner = Pipeliner(
            PooledTransport(pool),
            lanes=self._lanes,
            timeout=self._timeout,
            hard_bound=self._hard_bound,
            translate=lambda exc: self._translate(exc, where),
        )
        return _Replica(pipeliner, pool)

    def _say(self, message: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._said_at >= _SAY_EVERY:
            self._said_at = now
            _log.warning("%s", message)

    async def aclose(self) -> None:
        self._closed = True
        servers = [*self._replicas.values(), *self._primaries.values()]
        self._replicas, self._primaries = {}, {}
        for server in servers:
            await server.pipeliner.aclose()
            await server.pool.disconnect()


async def _answer(asked: asyncio.Task[Position | None]) -> Position | None:
    """The primary's position, or ``None`` if it could not be read (the read's round
    trip to the primary then says why, if it fails too)."""
    try:
        return await asyncio.shield(asked)
    except BackendError:
        return None
