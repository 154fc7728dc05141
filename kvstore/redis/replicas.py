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
2. Each unit of the read goes to a replica led by the same question, on the same
   connection, so the answer is the replica's as it was just before it read the
   unit's keys. The replies are used only if the replica follows the primary's history
   (the same ``master_replid``: a primary that restarted empty begins a new one) and
   has applied it up to the primary's offset (``slave_repl_offset``, which counts a
   transaction or a function's writes once all of them are applied). A replica only
   moves forward, so what it read then holds every write the position covers.
3. Otherwise the unit goes to the primary, as every read does without replicas.

The bound a replica can cost: a replica behind the position costs its unit one more
round trip (to the primary), and is not asked again during that read; one that fails to
answer within ``replica_read_timeout`` (dead, paused, unreachable, not a Redis) costs
that once, after which the rest of the read goes to the primary, and the replica rests
``REPLICA_REST`` seconds before any read of the store tries it again. A primary that will
not say its position (a credential without ``+info``) sends every read to the primary,
and says so in the log once a minute. Replica reads never change what a read returns,
only which server sends it.

Replicas are reached with the primary's credentials and TLS settings, at the address
the primary gives (``replica-announce-ip`` and ``replica-announce-port`` set it where
the replica's own is not reachable). One server or a Sentinel's primary: a cluster's
replicas are not read (``kvstore.redis.target``).
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
from kvstore.redis.wire import Command, PrePacked

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


@dataclass(eq=False)
class Mark:
    """One read's start: the primary's position, asked for when the read began, and
    what the read learned of replicas since."""

    position: asyncio.Task[Position | None]
    behind: set[Address] = field(default_factory=set)  # replicas not to ask again
    primary_only: bool = False  # a replica failed this read: the rest goes to the primary


@dataclass(eq=False)
class _Replica:
    pipeliner: Pipeliner
    pool: Any
    resting_until: float = -math.inf


class ReplicaReads:
    """The replicas of one store's primary, and the reads they serve.

    ``primary(commands)``: the replies to ``commands`` from the primary, on the store's
    own connections. The replicas' connections are made with the target's options;
    ``lanes`` per replica, each attempt bounded by ``timeout`` seconds and never
    retried (the primary is the retry). A round trip may wait behind others on its
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
        self._online: list[Address] = []
        self._replicas: dict[Address, _Replica] = {}
        self._next = random.randrange(1 << 16)  # engines start on different replicas
        self._said_at = -math.inf
        self._closed = False
        # Units served by a replica, and sent to the primary instead (behind, failed).
        self.served = 0
        self.to_primary = 0

    def mark(self) -> Mark:
        """The start of a read: its units may go to replicas once the position asked
        for here is known."""
        position = asyncio.ensure_future(self._position())
        # Retrieved here: a read that ends before it needs the position never awaits it.
        position.add_done_callback(lambda task: task.cancelled() or task.exception())
        return Mark(position)

    async def _position(self) -> Position | None:
        (info,) = await self._primary([POSITION])
        found = primary_position(info)
        if found is None:
            self._say(
                "the primary does not say its replication position"
                + (f" ({info})" if isinstance(info, ResponseError) else "")
                + "; reads go to the primary"
            )
            return None
        position, self._online = found
        return position

    async def run(
        self, mark: Mark, commands: Sequence[Command], *, large: bool, archives: bool
    ) -> list[Any] | None:
        """The replies to ``commands`` from a replica that has applied every write
        ``mark`` covers, or ``None``: they are to be read from the primary."""
        replies = await self._from_replica(mark, commands, large, archives)
        if replies is None:
            self.to_primary += 1
        else:
            self.served += 1
        return replies

    async def _from_replica(
        self, mark: Mark, commands: Sequence[Command], large: bool, archives: bool
    ) -> list[Any] | None:
        if mark.primary_only or self._closed:
            return None
        position = await _position_of(mark)
        address = None if position is None else self._choose(mark)
        if position is None or address is None:
            return None
        replica = self._replica(address)
        try:
            info, *replies = await replica.pipeliner.run(
                [POSITION, *commands], large_reply=large, streamed=archives
            )
        except BackendError as exc:
            self._failed(mark, address, replica, str(exc))
            return None
        if not is_caught_up(replica_position(info), position):
            mark.behind.add(address)
            return None
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ResponseError):
                # MASTERDOWN, LOADING, WRONGTYPE: the primary's answer is the one given.
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

    def _choose(self, mark: Mark) -> Address | None:
        """The next online replica, round robin, that neither rests nor was found behind
        during this read."""
        now = asyncio.get_running_loop().time()
        online = self._online
        for i in range(len(online)):
            address = online[(self._next + i) % len(online)]
            if address in mark.behind:
                continue
            replica = self._replicas.get(address)
            if replica is not None and replica.resting_until > now:
                continue
            self._next = (self._next + i + 1) % (1 << 16)
            return address
        return None

    def _replica(self, address: Address) -> _Replica:
        replica = self._replicas.get(address)
        if replica is None:
            pool = self._target.replica_pool(*address)
            where = f"replica {address[0]}:{address[1]}"
            pipeliner = Pipeliner(
                PooledTransport(pool),
                lanes=self._lanes,
                timeout=self._timeout,
                hard_bound=self._hard_bound,
                translate=lambda exc: self._translate(exc, where),
            )
            replica = self._replicas[address] = _Replica(pipeliner, pool)
        return replica

    def _say(self, message: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._said_at >= _SAY_EVERY:
            self._said_at = now
            _log.warning("%s", message)

    async def aclose(self) -> None:
        self._closed = True
        replicas, self._replicas = list(self._replicas.values()), {}
        for replica in replicas:
            await replica.pipeliner.aclose()
            await replica.pool.disconnect()


async def _position_of(mark: Mark) -> Position | None:
    """The primary's position the read began at; ``None`` if it could not be read (the
    read's unit to the primary then says why, if it fails too)."""
    try:
        return await asyncio.shield(mark.position)
    except BackendError:
        return None
