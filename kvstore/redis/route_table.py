"""The version rules of a route cache, as a table that does no I/O.

The functions that write routes raise ``{ns}:route-version`` and publish each change with
that version, in the same atomic step; a counter made anew (after ``FLUSHDB``, or a
restart without the data) starts at the server's clock in microseconds, above any version
a lost counter reached. A ``RouteCache`` feeds a ``RouteTable`` what it reads (snapshots,
messages, the version on its own, the replies to its store's writes) and does what the
table answers; every decision about versions is made here, so it can be tested as a
table of cases without a server.

The rules:

- A snapshot ``(V, routes)`` replaces the table; the lookups answer from it.
- A message above the stream's version by exactly one is applied, and so is the first
  message after a snapshot that found no counter, if it is above every version ever
  seen (the write that made the counter anew, at the server's clock), or is at the
  version of a write this store noted (its reply came first), above every version the
  server showed otherwise: the versions of own writes are forgotten when the server is
  found to have gone back, so a version noted is one of the counter that is. Any other
  message further ahead means one was lost (or the counter was made anew meanwhile):
  reload.
- A message at or below the stream's version is one published before the snapshot was
  read, and is skipped, while that is possible: until a message above the snapshot has
  been applied, or the subscription has answered a ``PING`` sent after the snapshot
  (``settled``). After that, such a message means the server's version went backwards
  (a restore of an older snapshot, a failover to a lagging replica): reload.
- A snapshot, or a version read on its own, below the highest version this table has
  seen from the server (snapshots, messages, own writes' replies) also means the server
  went backwards. The comparison is with the highest version seen *before the read was
  sent* (``mark``), since a write of this store may commit after the read and be noted
  before the read's answer comes back.
- When the server went backwards, every version the table knew is forgotten, this
  store's own writes newer than the snapshot are dropped (the server may have lost
  them), the highest version seen becomes the lower one, and the table does not answer
  until a fresh snapshot is applied.
- A write of this store (``note_write``, from its script's reply) above the stream's
  version (its message still to come) is answered for each of its types, over the
  stream's table, until the stream reaches it (its message, or a newer write of the type,
  or a snapshot at or above it), unless a newer own write of the type is answered
  already. One that is not newer than what is answered, and names another hash, is
  either a concurrent write that lost to a newer one, or a write to a server whose
  version went backwards and that nothing has shown yet; the type is then answered by the
  server (``ASK_SERVER``) until a snapshot, or a version read that shows the server did
  not go back past that write. So a store always sees its own acknowledged writes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Final


class AskServer(enum.Enum):
    ASK_SERVER = "ask the server"


ASK_SERVER: Final = AskServer.ASK_SERVER
"""What ``lookup`` returns when the table cannot answer: the server must be asked."""


class Message(enum.Enum):
    """What ``apply_message`` did with a message."""

    APPLIED = "applied"  # the table moved on by one version
    SKIPPED = "skipped"  # already in the snapshot
    RELOAD = "reload"  # the table stopped answering: a fresh snapshot is needed


class RouteTable:
    """The routes of one namespace and the versions that keep them true.

    Pure: no I/O, no clock, no event loop. ``answering`` is true from an applied
    snapshot until something shows the table may be wrong (``go_down``, a lost or
    backward message, a backward version).
    """

    def __init__(self) -> None:
        # The table exactly as of ``stream_version``: what watches are told about, and
        # what lookups answer, but for this store's own newer writes.
        self._stream_routes: dict[str, str] = {}
        # This store's own writes the stream has not reached: type -> (version, hash).
        # Lookups answer these over the stream's table. Every message writes the
        # stream's table and nothing else, unless it reaches one of these.
        self._own: dict[str, tuple[int, str]] = {}
        self.stream_version = 0
        # Whether messages at or below the stream's version may still be ones published
        # before the snapshot was read.
        self._settling = False
        self.highest_seen = 0
        # The highest version seen of any counter, kept across a reset; and the same
        # without this store's own writes' replies.
        self._ever_seen = 0
        self._ever_read = 0
        # The versions of this store's own writes whose messages are still to come,
        # since the server last went back (which forgets them).
        self._own_versions: set[int] = set()
        # Own writes not shown to be current: type -> the write's version.
        self._unsure: dict[str, int] = {}
        self.answering = False

    # Reads.

    def lookup(self, workflow_type: str) -> str | AskServer | None:
        """The route's hash, ``None`` if there is none, or ``ASK_SERVER``."""
        if not self.answering or workflow_type in self._unsure:
            return ASK_SERVER
        if self._own:
            mine = self._own.get(workflow_type)
            if mine is not None:
                return mine[1]
        return self._stream_routes.get(workflow_type)

    def stream_table(self) -> list[tuple[str, str]]:
        """Every route as of the stream's version, in code-point order of type."""
        return sorted(self._stream_routes.items())

    def mark(self) -> int:
        """The floor for a snapshot or version about to be read: pass it back with it."""
        return self.highest_seen

    # What the cache reads.

    def apply_snapshot(
        self, version: int, routes: Mapping[str, str], floor: int, *, changes: bool = True
    ) -> list[tuple[str, str]] | None:
        """Take the server's table at ``version``, read after ``mark()`` gave ``floor``.

        Returns the routes whose value differs from the stream's previous table (for
        watches; an empty list without ``changes``, when no one watches: a pair per
        route of a large table is garbage every collection then walks), or ``None`` if
        the server went backwards: the table was reset and does not answer; take
        another snapshot.
        """
        if version < floor:
            self._went_backwards(version)
            return None
        changed = (
            sorted((t, h) for t, h in routes.items() if self._stream_routes.get(t) != h)
            if changes
            else []
        )
        # This store's writes newer than the snapshot are still answered.
        self._own = {t: mine for t, mine in self._own.items() if mine[0] > version}
        self._stream_routes = dict(routes)
        self.stream_version = version
        self._saw(version)
        self._own_versions = {v for v in self._own_versions if v > version}
        self._unsure.clear()
        self._settling = True
        self.answering = True
        return changed

    def apply_message(self, version: int, content_hash: str, types: Sequence[str]) -> Message:
        """Apply a message of the subscription: ``content_hash`` now routes ``types``."""
        # Called for every write of the namespace: the rules are spelled out here, not
        # called as helpers.
        stream = self.stream_version
        if version <= stream and types:
            if self._settling:
                return Message.SKIPPED
            self._went_backwards(version)
            return Message.RELOAD
        # A snapshot without a counter is followed by the write that makes one, at
        # the server's clock: above every version of any earlier counter, or this
        # store's own write, whose reply was noted before its message came.
        made_anew = stream == 0 and (
            version > self._ever_seen
            or (version > self._ever_read and version in self._own_versions)
        )
        if not types or (version != stream + 1 and not made_anew):
            # A version never announced (a lost message, a counter made anew, a script
            # stopped midway): only a fresh snapshot is sure to be right.
            self.answering = False
            return Message.RELOAD
        self.stream_version = version
        self._saw(version)
        if self._own_versions:
            self._own_versions.discard(version)
        self._settling = False
        stream_routes, own = self._stream_routes, self._own
        for workflow_type in types:
            stream_routes[workflow_type] = content_hash
            if own:
                mine = own.get(workflow_type)
                if mine is not None:
                    if version < mine[0]:
                        continue  # this store's newer write is still answered
                    del own[workflow_type]
                    if version == mine[0]:
                        continue  # its own message: nothing newer is known
            if self._unsure:
                self._unsure.pop(workflow_type, None)
        return Message.APPLIED

    def settled(self) -> None:
        """The subscription answered a ``PING`` sent after the snapshot was applied:
        every message published before the snapshot was read has been delivered."""
        self._settling = False

    def version_read(self, version: int, floor: int) -> bool:
        """The server's version, read on its own after ``mark()`` gave ``floor``.

        Returns whether a reload is needed (the server went backwards; the table was
        reset). Otherwise own writes at or below ``version`` are shown current.
        """
        if version < floor:
            self._went_backwards(version)
            return True
        for workflow_type, own in list(self._unsure.items()):
            if own <= version:
                del self._unsure[workflow_type]
        return False

    def note_write(self, version: int, content_hash: str, types: Sequence[str]) -> None:
        """Apply a route write this store made, from its script's reply."""
        stream = self.stream_version
        if version > stream:
            self._own_versions.add(version)
        self._saw(version, own=True)
        own = self._own
        for workflow_type in types:
            mine = own.get(workflow_type)
            if version > (stream if mine is None else mine[0]):  # newer than what is answered
                own[workflow_type] = (version, content_hash)
                if self._unsure:
                    self._unsure.pop(workflow_type, None)
            elif (mine is None or version != mine[0]) and content_hash != (
                self._stream_routes.get(workflow_type) if mine is None else mine[1]
            ):
                # What is answered is as new or newer, with another hash: which is current
                # is unknown.
                self._unsure[workflow_type] = version

    def go_down(self) -> None:
        """Stop answering (the subscription is lost or being re-established)."""
        self.answering = False

    # The rules' building blocks.

    def _saw(self, version: int, *, own: bool = False) -> None:
        if version > self.highest_seen:
            self.highest_seen = version
        if version > self._ever_seen:
            self._ever_seen = version
        if not own and version > self._ever_read:
            self._ever_read = version

    def _went_backwards(self, version: int) -> None:
        # Every known version is of the lost timeline: the next snapshot replaces all.
        self._own.clear()
        self._unsure.clear()
        self._own_versions.clear()
        self.stream_version = version
        self.highest_seen = version
        self.answering = False
