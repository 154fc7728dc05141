"""The listing walk: every row of a namespace in index order, a chunk per round trip.

``Walk`` reads the index (``{ns}:packages``) by member, never by rank, and the rows it
names, through one function it is given, ``send(commands, large=...)``: the replies to
``commands``, each refusal raised. The store gives it its pipeliner (every unit led by
the check of the layout marker); a test can give it anything that answers, and count
or delay the round trips it sees.

The walk's promise (``RedisPackageStore.iter_packages`` states it to the caller):

- a row neither put nor deleted during the walk is returned exactly once, even while
  others are written or deleted; a row put or deleted meanwhile at most once, as it
  was or as it became. A row whose stamp is no longer the one its member carries was
  deleted or re-put since the index was read: it is skipped where it is met, and a
  re-put row is met again where it now belongs unless the walk is past it. A row
  already returned (read at its old place, then re-put later) is skipped where it is
  met again; the set of row ids that remembers them is the walk's only memory beyond
  one chunk.
- with a byte bound, the rows' archives are sized one round trip before they are read
  (``HSTRLEN`` of an archive inside its row, the ``size`` of one stored as a blob, whose
  ``digest`` is read then too, so that its blob is read with the row: a row of either
  layout takes the same round trips); a round trip reads rows whose archives add up to at most
  ``LISTING_GROUP`` (or half the bound, if less), or one row alone if its archive alone
  is larger; and round trips are sent ahead while the archives under way and those
  being handed out stay within the bound. The sizes of the next members go with the
  rows of the previous ones, so small archives still take one round trip per chunk.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from kvstore.errors import SerializationError
from kvstore.records import check_chunk
from kvstore.redis.keyspace import (
    INLINE_LAYOUT,
    INLINE_LIMIT,
    Keyspace,
    decode_stamp,
    is_digest,
    split_index_member,
    split_row_id,
)
from kvstore.redis.wire import SLICE, Command, PrePacked

# What ``iter_packages`` holds of archives at a time, those being handed out and those
# under way together (unless one archive alone is larger): the client's memory for a
# listing, whatever the archives' sizes.
LISTING_BYTES = 64 << 20
# The most archive bytes one round trip of a listing reads (a larger archive comes alone).
LISTING_GROUP = 8 << 20


class Send(Protocol):
    """The replies to ``commands``; ``large``: they may hold archives of a MiB or more."""

    def __call__(
        self, commands: list[Command], *, large: bool
    ) -> Coroutine[Any, Any, list[Any]]: ...


_HMGET = PrePacked("HMGET")
_ROW_FIELDS = PrePacked(b"archive", b"deployed_at", b"digest", b"size")
_INLINE_FIELDS = PrePacked(b"deployed_at", b"archive")
_HEAD_FIELDS = PrePacked(b"deployed_at", b"size")
_BLOB_FIELDS = PrePacked(b"digest", b"size")
_HGET = PrePacked("HGET")
_STAMP_FIELD = PrePacked(b"deployed_at")
_HSTRLEN = PrePacked("HSTRLEN")
_ARCHIVE_FIELD = PrePacked(b"archive")
_DIGEST_FIELD = PrePacked(b"digest")


def read_row(key: bytes) -> Command:
    """The command that reads a row of either layout: its reply is ``[archive,
    deployed_at, digest, size]``, the archive ``None`` where a blob holds it."""
    return (_HMGET, key, _ROW_FIELDS)


def read_blob(blob: bytes) -> Command:
    """The command that reads the archive of the blob whose key is ``blob``."""
    return (_HGET, blob, _ARCHIVE_FIELD)


def read_head(key: bytes) -> list[Command]:
    """The commands that read a row of either layout without its archive: ``[deployed_at,
    size]`` (a blob's size; ``None`` for an archive inside the row), then the size of an
    archive inside the row (0 for a blob's)."""
    return [(_HMGET, key, _HEAD_FIELDS), (_HSTRLEN, key, _ARCHIVE_FIELD)]


def head_size(key: bytes, stored: Any, inline: Any) -> int:
    """The archive's size from what ``read_head`` read: a blob's ``size`` field if the
    row has one, else the length of the archive inside it."""
    if stored is None:
        return int(inline)
    return decimal_size(key, stored)


def decimal_size(key: bytes, stored: Any) -> int:
    """A row's ``size`` field as an int; ``SerializationError`` naming the row if it is not
    a size a put writes."""
    if not isinstance(stored, bytes) or not stored.isdigit() or len(stored) > 20:
        raise SerializationError(f"{key!r} holds a size that is not one: {stored!r:.60}")
    return int(stored)


def read_archive(
    keys: Keyspace, key: bytes, digest: bytes | None, *, held: bool = False
) -> list[Command]:
    """The commands that read a row's archive in a listing (``fetched`` reads their
    replies): ``deployed_at`` and the archive inside the row, in one command; or, with the
    ``digest`` of the blob that holds it, ``deployed_at``, then the blob's archive.
    ``held``: the blob's archive is held elsewhere (a local cache), and is not read: the
    second reply is then ``[digest]``, the digest the row names now, a list, never taken
    for an archive."""
    if digest is None:
        return [(_HMGET, key, _INLINE_FIELDS)]
    if held:
        return [(_HGET, key, _STAMP_FIELD), (_HMGET, key, _DIGEST_FIELD)]
    return [(_HGET, key, _STAMP_FIELD), read_blob(keys.blob(digest))]


def fetched(replies: Sequence[Any]) -> tuple[Any, Any]:
    """``(deployed_at, archive)`` from the replies to ``read_archive``."""
    if len(replies) == 1:
        pair = replies[0]
        return (pair[0], pair[1]) if isinstance(pair, list) and len(pair) == 2 else (None, None)
    return replies[0], replies[1]


def archive_size(key: bytes, layout: bytes | None) -> Command:
    """The command that sizes a row's archive ahead of reading it, in a namespace of
    ``layout``: the length of the archive inside a row of layout 1; a row of layout 2's
    ``[digest, size]``."""
    if layout == INLINE_LAYOUT:
        return (_HSTRLEN, key, _ARCHIVE_FIELD)
    return (_HMGET, key, _BLOB_FIELDS)


def read_size(
    key: bytes, reply: Any, layout: bytes | None
) -> tuple[int | None, bytes | None, bool]:
    """``(size, digest, in a blob)`` from the reply to ``archive_size(key, layout)``: the
    archive's size (``None``: not known, a row of layout 1 in a namespace of layout 2,
    not migrated yet, or a row gone), the digest it is verified against (``None`` for a
    row of layout 1), and whether a blob holds it rather than the row."""
    if layout == INLINE_LAYOUT:
        return int(reply), None, False
    digest, stored = reply if isinstance(reply, list) and len(reply) == 2 else (None, None)
    if digest is None:
        return None, None, False
    if not is_digest(digest):
        raise SerializationError(f"{key!r} holds a digest that is not one: {digest!r:.80}")
    size = decimal_size(key, stored)
    # Layout 2 keeps an archive of at most INLINE_LIMIT inside its row, a larger one in
    # its blob. A row that is not as its size says (another release's limit, damage) is
    # read again as get_package reads it, when its archive is not where it was looked for.
    return size, digest, size > INLINE_LIMIT


class Member(NamedTuple):
    """An index member as a listing reads it: ``<stamp> <row id>`` and what they say."""

    stamp: bytes
    row: bytes
    workflow_type: str
    content_hash: str
    at: datetime


def decode_member(keys: Keyspace, member: Any) -> Member:
    """An index member, decoded; ``SerializationError`` naming the key and the member."""
    where = keys.index
    if not isinstance(member, bytes):
        raise SerializationError(f"{where!r} holds a non-bytes member: {member!r}")
    try:
        stamp, row = split_index_member(member)
        workflow_type, content_hash = split_row_id(row)
        at = decode_stamp(stamp)
    except ValueError as exc:  # UnicodeDecodeError included
        raise SerializationError(f"{where!r} holds a malformed member {member!r}: {exc}") from exc
    return Member(stamp, row, workflow_type, content_hash, at)


@dataclass(eq=False, slots=True)
class RoundTrip:
    """One round trip of a walk under way: what it reads, and what brings its replies.

    Its replies are, in order: ``widths[i]`` for each of ``rows`` (those of
    ``fetch_row``), one for each of ``sizing`` (``archive_size`` in a namespace of
    ``layout``), and the next members of the index if ``asks_members``.
    """

    replies: asyncio.Task[list[Any]]
    rows: list[Member]
    widths: list[int]
    digests: list[bytes | None]  # each of ``rows`` was sized with, if it has one
    sizing: list[Member]
    layout: bytes | None
    asks_members: bool
    size: int  # the bytes of the archives of ``rows``


class Walk:
    """One walk of the index; ``rows()`` is the walk itself (see the module's promise).

    ``fetch_row(key, digest)`` is the commands that read a row (``digest``: of the blob
    sizing found holds its archive, or ``None``), ``stamp_of(replies)`` the row's
    ``deployed_at`` as read by them. ``layout()``: the namespace's layout as last seen
    (``None``: not known), which says how a round trip sizes its rows. ``max_bytes``: the
    bound on archives held, or ``None`` for a walk that reads no archives (and sizes
    none: ``digest`` is then ``None``). ``settle``: awaited once the rows of a round trip
    are handed out, before the walk stops counting their archives (the store waits
    there for the writes of those archives to its archive cache, so that they are held
    within the bound).
    """

    def __init__(
        self,
        keys: Keyspace,
        send: Send,
        chunk: int,
        fetch_row: Callable[[bytes, bytes | None], list[Command]],
        stamp_of: Callable[[Sequence[Any]], Any],
        *,
        max_bytes: int | None = None,
        settle: Callable[[], Awaitable[None]] | None = None,
        layout: Callable[[], bytes | None] = lambda: None,
    ) -> None:
        self._keys = keys
        self._layout = layout
        self._settle = settle
        self._send = send
        self._chunk = check_chunk(chunk)
        self._fetch_row = fetch_row
        self._stamp_of = stamp_of
        self._max_bytes = max_bytes
        # Round trips of a few MiB of archives each (LISTING_GROUP, or half the bound if
        # less) are under way together, as many as the bound holds with the round trip
        # whose rows are being handed out: the server sends the next while the rows of
        # one are handed out, and memory is used and given back in small pieces.
        self._group = None if max_bytes is None else max(1, min(max_bytes // 2, LISTING_GROUP))
        # Members read from the index whose size is still to be asked for, and members
        # with their archive's size (0 for every row without max_bytes), its digest if
        # the row has one, and whether a blob holds it, in index order.
        self._unsized: list[Member] = []
        self._sized: deque[tuple[Member, int, bytes | None, bool]] = deque()
        self._more = True  # the index may hold members after ``_last``
        self._last = b""
        self._under_way: deque[RoundTrip] = deque()
        self._handing_out = 0  # the bytes of the archives of the rows being handed out
        self._listed: set[bytes] = set()

    async def rows(self) -> AsyncIterator[tuple[bytes, Member, list[Any], bytes | None]]:
        """``(key, index member, replies to fetch_row(key, ...), digest)`` for each row in
        index order, each row at most once; ``digest`` is the one the row's archive is to
        be verified against (``None``: a row of layout 1, or a walk that sizes nothing)."""
        (members,) = await self._send([self._next_members(b"-")], large=False)
        self._take_members(members)
        try:
            while True:
                self._send_ahead()
                if not self._under_way:
                    if not (self._unsized or self._more):
                        return
                    self._send_round_trip()
                trip = self._under_way.popleft()
                self._handing_out = trip.size
                replies = await trip.replies
                self._read_sizes_and_members(trip, replies)
                self._send_ahead()  # the next round trips go before these rows are handed out
                found: list[Any] = []
                start = 0
                for row, width, digest in zip(trip.rows, trip.widths, trip.digests, strict=True):
                    found, start = replies[start : start + width], start + width
                    if self._stamp_of(found) != row.stamp or row.row in self._listed:
                        continue
                    self._listed.add(row.row)
                    yield self._keys.row(row.row), row, found, digest
                # Not held while the next round trip is awaited.
                replies = found = []
                if self._settle is not None:
                    await self._settle()
                self._handing_out = 0
        finally:
            for trip in self._under_way:
                trip.replies.cancel()
                if trip.replies.done() and not trip.replies.cancelled():
                    trip.replies.exception()  # retrieved: the walk ended otherwise

    def _take_members(self, members: list[Any]) -> None:
        self._more = len(members) == self._chunk
        self._last = members[-1] if members else self._last
        decoded = [decode_member(self._keys, m) for m in members]
        if self._max_bytes is None:
            self._sized.extend((m, 0, None, False) for m in decoded)
        else:
            self._unsized = decoded

    def _room(self) -> bool:
        """Whether the next rows may be asked for now."""
        if not self._sized:
            return False  # nothing is sent ahead of a round trip asking for sizes
        if not self._under_way:
            return True
        if self._max_bytes is None or self._group is None:
            return False
        held = self._handing_out + sum(trip.size for trip in self._under_way)
        return held + max(self._group, self._sized[0][1]) <= self._max_bytes

    def _size_held(self, size: int | None) -> int:
        """What a row's archive counts for under the bound: its size, or, not known,
        all of the bound, so that it is read alone with nothing else under way."""
        return size if size is not None else (self._max_bytes or 0)

    def _send_ahead(self) -> None:
        while self._room():
            self._send_round_trip()

    def _send_round_trip(self) -> None:
        rows, sources, size = self._take_rows()
        row_key = self._keys.row
        commands: list[Command] = []
        widths = []
        for row, (digest, in_blob) in zip(rows, sources, strict=True):
            reads = self._fetch_row(row_key(row.row), digest if in_blob else None)
            commands += reads
            widths.append(len(reads))
        # Once the rows sized are all read (by this round trip), the sizes of the
        # members read next, and the members after them: one chunk ahead, no more.
        sizing, self._unsized = ([], self._unsized) if self._sized else (self._unsized, [])
        layout = self._layout()
        commands.extend(archive_size(row_key(row.row), layout) for row in sizing)
        asks_members = self._more and not self._sized
        if asks_members:
            commands.append(self._next_members(b"(" + self._last))
            self._more = False  # until the reply says
        # Archives of a MiB and more follow each other on one connection.
        task = asyncio.get_running_loop().create_task(self._send(commands, large=size >= SLICE))
        digests = [digest for digest, _ in sources]
        self._under_way.append(
            RoundTrip(task, rows, widths, digests, sizing, layout, asks_members, size)
        )

    def _read_sizes_and_members(self, trip: RoundTrip, replies: list[Any]) -> None:
        start = sum(trip.widths)
        for i, member in enumerate(trip.sizing):
            key = self._keys.row(member.row)
            size, digest, in_blob = read_size(key, replies[start + i], trip.layout)
            self._sized.append((member, self._size_held(size), digest, in_blob))
        if trip.asks_members:
            self._take_members(replies[-1])

    def _take_rows(self) -> tuple[list[Member], list[tuple[bytes | None, bool]], int]:
        """The next rows to read, the digest of each and whether a blob holds its
        archive, and their archives' bytes: up to ``chunk`` rows, their archives within a
        group (at least one row, whatever its size)."""
        rows: list[Member] = []
        sources: list[tuple[bytes | None, bool]] = []
        total = 0
        sized, group = self._sized, self._group
        while sized and len(rows) < self._chunk:
            row, size, digest, in_blob = sized[0]
            if group is not None and rows and total + size > group:
                break
            sized.popleft()
            rows.append(row)
            sources.append((digest, in_blob))
            total += size
        return rows, sources, total

    def _next_members(self, after: bytes) -> Command:
        return ("ZRANGEBYLEX", self._keys.index, after, b"+", b"LIMIT", 0, self._chunk)
