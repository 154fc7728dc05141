"""``kvstore check [--repair]``: is the namespace's keyspace what the functions leave?

``check_store(store)`` walks the index (``ZRANGEBYLEX``, a chunk at a time), the
namespace's keys (``SCAN`` with a ``MATCH`` on the escaped ``{ns}:`` prefix) and its
blobs (layout 2: ``SCAN`` of ``<ns>/blob/*``), and reports each finding of ``KINDS``.
Both layouts are checked, and rows of both shapes in a namespace of layout 2 (one
``kvstore migrate`` has not finished). Every blob is read and hashed: a blob whose bytes
are not its digest's, or whose length is not the ``size`` its rows say, is reported with
the rows that refer to it; a row whose blob is missing is reported once one snapshot
(``MULTI``/``EXEC``) saw the row refer to it and the blob absent. A finding about a
package row is only reported after it was seen again in one ``MULTI``/``EXEC`` snapshot
of the row and its index members, so writers that put or delete meanwhile are never
mistaken for damage: a row and its members change together in one script, and one
transaction sees them before or after that script, never half-way. Routes to versions
without an archive are reported as informational: the contract allows them.

With ``repair=True`` it also fixes what needs no guessing, one row at a time, each fix
one ``MULTI``/``EXEC`` under ``WATCH`` of the row and of the layout marker:

* an index member whose row does not exist is removed;
* a row that no index member names at its own ``deployed_at`` is indexed there, and
  members naming it at another stamp are removed;
* blobs no row refers to are collected by ``kvstore gc``'s mark and sweep
  (``kvstore.tools.gc``), those written within ``grace`` seconds spared.

``WATCH`` on the row alone suffices because every function that changes a row's index
members (put, delete) writes that row in the same step: if any did so after the fix
read the row, ``EXEC`` does nothing and the fix is judged again from fresh reads. No
Lua is involved, so the fix works with whatever scripts or Functions the writers use.
Repair never deletes a row, never touches routes, never removes a blob a row refers to,
and never writes to a namespace that holds a layout it does not know. Everything else is
reported, not changed: a missing or damaged blob is mended only by deploying its
package again.

Blobs are read after they are listed, and rows after the blobs: a blob listed with no
row seen to refer to it (``orphan-blob``) had none when the rows were read, since a put
writes a blob's row with or after the blob. Hashing every blob takes time; that is what
a check is for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import WatchError

from kvstore.records import check_text
from kvstore.redis.keyspace import (
    INLINE_LAYOUT,
    LAYOUTS,
    Keyspace,
    archive_digest,
    decode_stamp,
    index_member,
    is_digest,
    row_id,
    split_index_member,
    split_row_id,
)
from kvstore.redis.protocol import field_pairs, is_route_counter
from kvstore.redis.store import RedisPackageStore
from kvstore.tools.admin import Admin, glob_escape
from kvstore.tools.gc import DEFAULT_GRACE, check_grace, collect_garbage

# Every kind of finding; those in INFORMATIONAL do not make a namespace unsound.
KINDS = (
    "unknown-layout",  # {ns}:format names another layout: nothing else is read
    "no-layout-marker",  # keys exist but {ns}:format does not
    "wrong-type",  # a key of the namespace holds another type than the table says
    "malformed-member",  # an index member that is not "<stamp> <type>\0<hash>"
    "member-without-row",  # repairable
    "row-without-member",  # repairable
    "stamp-mismatch",  # repairable: a member's stamp is not its row's deployed_at
    # a row without a readable deployed_at, without both archive and digest, or with a
    # digest and no size
    "row-missing-field",
    # a row of neither layout's shape: a digest that is not 64 lowercase hex digits, a
    # size that is not decimal, or a digest in a namespace of layout 1
    "malformed-row",
    # an archive kept inside its row (layout 2, a small one) that does not hash to the
    # row's digest, or whose length is not the row's size
    "damaged-archive",
    "missing-blob",  # a row refers to a blob that does not exist: deploy the package again
    # a blob whose archive does not hash to its digest, that lacks its archive or its
    # written stamp, or whose length is not the size a row referring to it says
    "damaged-blob",
    "orphan-blob",  # informational: no row refers to the blob; repairable by collecting it
    "malformed-blob-key",  # a key under <ns>/blob/ that is not <ns>/blob/{<64 hex>}
    "malformed-row-key",  # {ns}:pkg:<x> where x is not "<type>\0<hash>"
    "malformed-route",  # a route whose type or hash is not text
    "malformed-route-version",  # {ns}:route-version is not an integer
    "route-without-archive",  # informational
    "route-to-other-type",  # informational: the hash is stored under other types only
    "unknown-key",  # informational
    "unsettled",  # informational: changed on every look while the check ran
)
INFORMATIONAL = frozenset(
    {"route-without-archive", "route-to-other-type", "unknown-key", "unsettled", "orphan-blob"}
)
REPAIRABLE = frozenset(
    {"member-without-row", "row-without-member", "stamp-mismatch", "orphan-blob"}
)

CHUNK = 1000
ATTEMPTS = 20  # looks at one row before it is called unsettled
# Archive bytes read from the server at a time when blobs are verified (a larger blob
# is read alone).
VERIFY_BYTES = 32 << 20
# Blobs from this size on are hashed on a thread, so a check shares its event loop.
HASH_ON_A_THREAD = 1 << 20
NAMED_ROWS = 5  # rows a finding about a blob names; the rest are counted


@dataclass(frozen=True)
class Finding:
    kind: str
    key: str  # the key concerned, as text (bytes that are not UTF-8 escaped)
    message: str

    @property
    def informational(self) -> bool:
        return self.kind in INFORMATIONAL


@dataclass
class CheckReport:
    namespace: str
    findings: list[Finding] = field(default_factory=list)
    repairs: list[Finding] = field(default_factory=list)  # what was changed, one per fix

    @property
    def sound(self) -> bool:
        """No finding but informational ones (after repair, if repair ran)."""
        return not self.problems

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.informational]

    def as_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "sound": self.sound,
            "findings": [{**asdict(f), "informational": f.informational} for f in self.findings],
            "repairs": [asdict(r) for r in self.repairs],
        }


def shown(raw: bytes) -> str:
    """Key bytes as text: UTF-8 with NUL written ``\\0`` and other bytes escaped."""
    return raw.decode("utf-8", "backslashreplace").replace("\x00", "\\0")


async def check_store(
    store: RedisPackageStore, *, repair: bool = False, grace: float = DEFAULT_GRACE
) -> CheckReport:
    """Check ``store``'s namespace, and with ``repair`` fix what can be fixed: blobs no
    row refers to are collected unless written within the last ``grace`` seconds (see
    ``kvstore.tools.gc`` for what ``grace`` must exceed).

    The report lists what remains (after repair, what could not be fixed or changed
    under the check), and each change made. ``BackendError`` if the server fails;
    ``TypeError`` for a cluster's store (check speaks to one server).
    """
    grace = check_grace(grace)
    return await _Checker(store).run(repair, grace)


class _Checker:
    def __init__(self, store: RedisPackageStore) -> None:
        self.admin = Admin(store)
        self.keys = Keyspace(store.namespace)
        self.report = CheckReport(store.namespace)
        # row id -> stamps its index members carry (as read; confirmed later)
        self.members: dict[bytes, set[bytes]] = {}
        self.rows: set[bytes] = set()  # row ids of {ns}:pkg:* keys met by SCAN
        self.layout: bytes | None = None
        # Blobs met by SCAN, by digest: the key of each that is a hash.
        self.blobs: dict[bytes, bytes] = {}
        # What each row refers to, as last seen: row key -> (digest, size it says, or
        # None when it says none that is decimal).
        self.refers: dict[bytes, tuple[bytes, int | None]] = {}
        self.judged = False  # whether rows were judged (with a usable index)

    def find(self, kind: str, key: bytes, message: str) -> None:
        self.report.findings.append(Finding(kind, shown(key), message))

    def expected(self, key: bytes) -> bytes:
        """The type ``key`` of the namespace holds, as ``TYPE`` replies it."""
        expected = self.keys.expected_type(key)
        assert expected is not None, f"{key!r} is a key of the namespace"
        return expected.encode()

    async def run(self, repair: bool, grace: float) -> CheckReport:
        k = self.keys
        kind = await self.admin.command("TYPE", k.format)
        if kind not in (b"none", self.expected(k.format)):
            self.find(
                "wrong-type",
                k.format,
                f"is a {kind.decode()}, not a {k.expected_type(k.format)}: the layout cannot "
                "be told, so nothing else is checked",
            )
            return self.report
        layout = await self._layout()
        if layout is not None and layout not in LAYOUTS:
            self.find(
                "unknown-layout",
                k.format,
                f"the namespace holds layout {shown(layout)!r}; this kvstore reads layouts "
                f"{b', '.join(LAYOUTS).decode()} and checks nothing else",
            )
            return self.report
        self.layout = layout
        await self._scan_blobs()  # before the rows: see the module's docstring
        types = await self._scan()

        def usable(key: bytes) -> bool:  # absent, or of its type
            return types.get(key) in (None, self.expected(key))

        # Rows are judged against the index; without a usable index they cannot be.
        if usable(k.index):
            await self._walk_index()
            for row in sorted(set(self.members) | self.rows):
                await self._judge_row(row, repair)
            self.judged = True
        else:
            await self._read_references()
        if usable(k.routes):
            await self._routes()
        if usable(k.route_version):
            version = await self.admin.command("GET", k.route_version)
            if version is not None and not is_route_counter(version):
                self.find(
                    "malformed-route-version",
                    k.route_version,
                    f"the routes' version counter holds {shown(version)!r}, not an integer "
                    "the next write can raise: every route write will fail (remove the key; "
                    "the next write starts it again at the server's clock)",
                )
        await self._check_blobs(repair, grace)
        if types and await self._layout() is None:  # the marker is never deleted by writers
            self.find(
                "no-layout-marker",
                k.format,
                "the namespace has keys but no layout marker; the next write sets it to "
                "the layout its store is made with, which may not be the one its rows have",
            )
        return self.report

    async def _layout(self) -> bytes | None:
        found: bytes | None = await self.admin.command("GET", self.keys.format)
        return found

    async def _scan(self) -> dict[bytes, bytes]:
        """The type of each key of the namespace other than rows; rows go to ``rows``."""
        k = self.keys
        pattern = glob_escape(k.prefix) + b"*"
        types: dict[bytes, bytes] = {}
        async for batch in self.admin.scan(pattern):
            for key in batch:
                row = k.row_of(key)
                if row is not None:
                    try:
                        split_row_id(row)
                    except ValueError:
                        self.find(
                            "malformed-row-key",
                            key,
                            "a row key that names no package (not <type>\\0<hash> in UTF-8); "
                            "no listing reads it",
                        )
                    else:
                        self.rows.add(row)
                    continue
                kind = await self.admin.command("TYPE", key)
                if kind == b"none":
                    continue  # deleted since the scan met it
                types[key] = kind
                expected = k.expected_type(key)
                if expected is None:
                    self.find("unknown-key", key, "a key that kvstore does not write")
                elif kind != expected.encode():
                    self.find(
                        "wrong-type",
                        key,
                        f"is a {kind.decode()}, not a {expected}: calls on the namespace will fail",
                    )
        return types

    async def _walk_index(self) -> None:
        index = self.keys.index
        after = b"-"
        while True:
            batch = await self.admin.command("ZRANGEBYLEX", index, after, b"+", b"LIMIT", 0, CHUNK)
            for member in batch:
                try:
                    stamp, row = split_index_member(member)
                    split_row_id(row)
                    decode_stamp(stamp)
                except ValueError:  # UnicodeDecodeError included
                    if await self.admin.command("ZSCORE", index, member) is not None:
                        self.find(
                            "malformed-member",
                            index,
                            f"holds {shown(member)!r}, which is not <stamp> <type>\\0<hash>: "
                            f"every listing fails on it; remove it with ZREM once looked at",
                        )
                    continue
                self.members.setdefault(row, set()).add(stamp)
            if len(batch) < CHUNK:
                return
            after = b"(" + batch[-1]

    async def _snapshot(
        self, row: bytes, stamps: Iterable[bytes]
    ) -> tuple[Any, Any, dict[bytes, bool]]:
        """In one transaction: the row's type, its ``(archive present, deployed_at,
        digest, size)``, and which of the members ``<stamp> <row>`` for ``stamps`` the
        index holds."""
        k = self.keys
        stamps = sorted(set(stamps))
        async with self.admin.client.pipeline(transaction=True) as pipe:
            pipe.type(k.row(row))
            pipe.hexists(k.row(row), b"archive")
            pipe.hmget(k.row(row), [b"deployed_at", b"digest", b"size"])
            for stamp in stamps:
                pipe.zscore(k.index, index_member(stamp, row))
            replies = await self.admin.bounded(pipe.execute(raise_on_error=False))
        # The row's own replies may be WRONGTYPE, which its TYPE explains; others may not.
        for reply in [replies[0], *replies[3:]]:
            if isinstance(reply, Exception):
                raise self.admin.error(reply)
        fields = replies[2] if isinstance(replies[2], list) else [None, None, None]
        return (
            replies[0],
            (replies[1], *fields),
            {s: r is not None for s, r in zip(stamps, replies[3:], strict=True)},
        )

    async def _judge_row(self, row: bytes, repair: bool) -> None:
        """Report (and with ``repair`` fix) what is wrong with one row and its members."""
        k = self.keys
        key = k.row(row)
        stamps = set(self.members.get(row, ()))
        for _ in range(ATTEMPTS):
            self.refers.pop(key, None)  # as this look sees it
            kind, (has_archive, stamp, digest, size), present = await self._snapshot(row, stamps)
            held = {s for s, there in present.items() if there}
            if kind == b"none":
                if held and repair and await self._fix(row, None, held):
                    continue  # judged again from fresh reads
                for s in sorted(held):
                    self.find(
                        "member-without-row",
                        k.index,
                        f"index member {shown(index_member(s, row))!r} names a row that does "
                        f"not exist ({shown(key)!r}): listings skip it",
                    )
                return
            if kind != self.expected(key):
                self.find(
                    "wrong-type",
                    key,
                    f"is a {kind.decode()}, not a {k.expected_type(key)}: a package row",
                )
                return
            if is_digest(digest) and not has_archive:
                # Whatever else is wrong with the row, a read takes its archive there.
                self.refers[key] = (digest, _decimal(size))
            good_stamp = isinstance(stamp, bytes) and _is_stamp(stamp)
            archived = has_archive or digest is not None
            if not archived or not good_stamp or (digest is not None and size is None):
                missing = []
                if not archived:
                    missing.append(
                        "no archive"
                        if self.layout == INLINE_LAYOUT
                        else "neither an archive nor a digest"
                    )
                elif digest is not None and size is None:
                    missing.append("a digest but no size")
                if not good_stamp:
                    missing.append(
                        "no deployed_at" if stamp is None else f"deployed_at {shown(stamp)!r}"
                    )
                self.find(
                    "row-missing-field",
                    key,
                    f"the row has {' and '.join(missing)}: listings "
                    + ("skip it" if missing[0].startswith(("no dep", "dep")) else "fail on it")
                    + "; put the package again or delete it",
                )
                return
            malformed = self._malformed(has_archive, digest, size)
            if malformed is not None:
                self.find("malformed-row", key, malformed)
                return
            if has_archive and digest is not None:
                damage = await self._inline_damage(key)
                if damage is not None:
                    self.find("damaged-archive", key, damage)
                    return
            if stamp not in present:
                stamps.add(stamp)  # look for its member in the same snapshot as the row
                continue
            stale = held - {stamp}
            if held == {stamp}:
                return  # sound
            if repair and await self._fix(row, stamp, stale):
                continue
            if stamp not in held:
                if stale:
                    for s in sorted(stale):
                        self.find(
                            "stamp-mismatch",
                            k.index,
                            f"index member {shown(index_member(s, row))!r} disagrees with its "
                            f"row's deployed_at {shown(stamp)!r}: listings skip the package",
                        )
                else:
                    self.find(
                        "row-without-member",
                        key,
                        f"no index member names this row (deployed_at {shown(stamp)!r}): "
                        "listings never show the package",
                    )
            else:
                for s in sorted(stale):
                    self.find(
                        "stamp-mismatch",
                        k.index,
                        f"index member {shown(index_member(s, row))!r} disagrees with its "
                        f"row's deployed_at {shown(stamp)!r}; the row is also indexed at its "
                        "own stamp",
                    )
            return
        self.find(
            "unsettled",
            key,
            f"the row changed on each of {ATTEMPTS} looks while the check ran; check again",
        )

    def _malformed(self, has_archive: Any, digest: Any, size: Any) -> str | None:
        """What makes a row with all its fields of neither layout's shape, or None."""
        if digest is None:
            return None
        if not is_digest(digest):
            return (
                f"the row's digest {shown(digest)!r} is not 64 lowercase hex digits: every "
                "read of it fails; put the package again or delete it"
            )
        if _decimal(size) is None:
            return (
                f"the row's size {shown(size)!r} is not a decimal number: reads and "
                "listings fail on it; put the package again or delete it"
            )
        if self.layout == INLINE_LAYOUT:
            return (
                "the row holds a digest, but the namespace's layout is 1, whose rows hold "
                "their archives: no write of layout 1 leaves such a row, and releases before "
                "layout 2 cannot read it; put the package again"
            )
        return None

    async def _inline_damage(self, key: bytes) -> str | None:
        """What is wrong with the archive a row of layout 2 keeps inside it (a small one),
        or None: its bytes must hash to the row's digest, and be the row's size long. The
        three are read in one command, so a put landing meanwhile is never damage."""
        fields = [b"archive", b"digest", b"size"]
        archive, digest, size = await self.admin.bounded(self.admin.client.hmget(key, fields))
        if not isinstance(archive, bytes) or not isinstance(digest, bytes) or not is_digest(digest):
            return None  # changed since the snapshot: the row is judged by its next look
        if archive_digest(archive) != digest or len(archive) != _decimal(size):
            return (
                f"the archive inside the row ({len(archive)} bytes) does not hash to the "
                f"row's digest {shown(digest)!r} or is not its size {size!r}: reads "
                "of it fail; put the package again"
            )
        return None

    async def _fix(self, row: bytes, stamp: bytes | None, stale: set[bytes]) -> bool:
        """Make the row's members exactly ``<stamp> <row>`` (none if ``stamp`` is None),
        removing ``stale`` ones, if the row still reads as it did; ``True`` if anything
        may have changed (made or refused), so the caller judges again."""
        k = self.keys
        key = k.row(row)
        async with self.admin.client.pipeline(transaction=True) as pipe:
            try:
                await self.admin.bounded(pipe.watch(k.format, key))
                layout = await self.admin.bounded(pipe.get(k.format))
                now = await self.admin.bounded(pipe.hget(key, b"deployed_at"))
                exists = await self.admin.bounded(pipe.exists(key))
                archived = await self.admin.bounded(pipe.hexists(key, b"archive"))
                digested = await self.admin.bounded(pipe.hexists(key, b"digest"))
                if (
                    (layout is not None and layout not in LAYOUTS)
                    or now != stamp
                    or bool(exists) != (stamp is not None)
                    or bool(archived or digested) != (stamp is not None)
                ):
                    return True  # changed since the snapshot: judge again
                pipe.multi()  # type: ignore[no-untyped-call]
                for s in sorted(stale):
                    pipe.zrem(k.index, index_member(s, row))
                if stamp is not None:
                    pipe.zadd(k.index, {index_member(stamp, row): 0})
                replies = await self.admin.bounded(pipe.execute())
            except WatchError:
                return True
        removed = [
            shown(index_member(s, row)) for s, n in zip(sorted(stale), replies, strict=False) if n
        ]
        added = stamp is not None and bool(replies[-1])
        if stamp is None:
            for member in removed:
                self._repaired(
                    "member-without-row", k.index, f"removed index member {member!r}: no row"
                )
        elif removed:
            also = (
                f", and indexed the row at its own deployed_at {shown(stamp)!r}"
                if added
                else f" (the row is indexed at its deployed_at {shown(stamp)!r})"
            )
            self._repaired(
                "stamp-mismatch",
                k.index,
                f"removed index member {', '.join(repr(m) for m in removed)}, whose stamp "
                f"disagreed with the row's{also}",
            )
        elif added:
            self._repaired(
                "row-without-member",
                key,
                f"indexed the row at its own deployed_at {shown(stamp)!r}",
            )
        return True

    # Blobs (layout 2).

    async def _scan_blobs(self) -> None:
        """The namespace's blob keys into ``blobs``; those that are no blob key, or no
        hash, reported."""
        k = self.keys
        async for batch in self.admin.scan(glob_escape(k.blob_prefix) + b"*"):
            for key in batch:
                digest = k.digest_of(key)
                if digest is None:
                    self.find(
                        "malformed-blob-key",
                        key,
                        "a key under the namespace's blob prefix that is not "
                        f"{shown(k.blob_prefix)}{{<64 lowercase hex digits>}}: no call reads it "
                        "and gc leaves it; remove it once looked at",
                    )
                    continue
                kind = await self.admin.command("TYPE", key)
                if kind == b"none":
                    continue  # collected since the scan met it
                if kind != b"hash":
                    self.find(
                        "wrong-type",
                        key,
                        f"is a {kind.decode()}, not a hash: a put of that archive fails, and "
                        "so does every read of a row that refers to it",
                    )
                    continue
                self.blobs[digest] = key

    async def _read_references(self) -> None:
        """What each row refers to, read directly: rows are not judged without an index."""
        rows = sorted(self.rows)
        for start in range(0, len(rows), CHUNK):
            chunk = [self.keys.row(row) for row in rows[start : start + CHUNK]]
            async with self.admin.client.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.hmget(key, [b"digest", b"size"])
                replies = await self.admin.bounded(pipe.execute(raise_on_error=False))
            for key, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, list) and is_digest(reply[0]):
                    self.refers[key] = (reply[0], _decimal(reply[1]))

    async def _check_blobs(self, repair: bool, grace: float) -> None:
        """Report rows whose blob is missing, blobs that are damaged, and blobs no row
        refers to; with ``repair``, collect those (``kvstore gc``)."""
        rows_of: dict[bytes, dict[bytes, int | None]] = {}
        for key, (digest, size) in self.refers.items():
            rows_of.setdefault(digest, {})[key] = size
        for digest in sorted(set(rows_of) - set(self.blobs)):
            await self._confirm_missing(digest, sorted(rows_of[digest]))
        stamps = await self._verify_blobs(rows_of)
        orphans = sorted(
            (key, digest) for digest, key in self.blobs.items() if digest not in rows_of
        )
        if not orphans:
            return
        seconds, micros = await self.admin.command("TIME")
        now = int(seconds) * 1_000_000 + int(micros)
        collected: set[bytes] = set()
        if repair:
            gc = await collect_garbage(self.admin.store, grace=grace)
            collected = set(gc.collected_keys)
            orphan_keys = {key for key, _ in orphans}
            for key in gc.collected_keys:
                if key not in orphan_keys:
                    self._repaired(
                        "orphan-blob", key, "collected a blob no row referred to any more"
                    )
            # A damaged blob no row refers to is gone with it.
            self.report.findings = [
                f
                for f in self.report.findings
                if not (f.kind == "damaged-blob" and f.key in {shown(c) for c in collected})
            ]
        for key, _ in orphans:
            written = stamps.get(key)
            age = "" if written is None else f", written {max(now - written, 0) / 1e6:.0f} s ago"
            if key in collected:
                self._repaired("orphan-blob", key, f"collected: no row referred to the blob{age}")
                continue
            kept = (
                f"; kept: written within the last {grace:g} s, or referred to since"
                if repair
                else "; kvstore gc (or check --repair) collects it once older than its grace period"
            )
            self.find("orphan-blob", key, f"no row refers to this blob{age}{kept}")

    async def _confirm_missing(self, digest: bytes, rows: list[bytes]) -> None:
        """Report each of ``rows`` that, in one snapshot with the blob of ``digest``,
        still refers to it while the blob does not exist."""
        blob = self.keys.blob(digest)
        async with self.admin.client.pipeline(transaction=True) as pipe:
            pipe.exists(blob)
            for key in rows:
                pipe.hget(key, b"digest")
            replies = await self.admin.bounded(pipe.execute(raise_on_error=False))
        if replies[0]:
            return  # written since the scan
        for key, now in zip(rows, replies[1:], strict=True):
            if now == digest:
                self.find(
                    "missing-blob",
                    key,
                    f"the row refers to the archive {shown(blob)!r}, which does not exist: "
                    "every read of the package fails; the package must be deployed again "
                    "(deploying the same archive writes its blob again)",
                )

    async def _verify_blobs(
        self, rows_of: dict[bytes, dict[bytes, int | None]]
    ) -> dict[bytes, int]:
        """Read and hash every blob met, reporting those that are damaged; the
        ``written`` stamp of each, by key."""
        stamps: dict[bytes, int] = {}
        blobs = sorted(self.blobs.items())
        for start in range(0, len(blobs), CHUNK):
            chunk = blobs[start : start + CHUNK]
            async with self.admin.client.pipeline(transaction=False) as pipe:
                for _, key in chunk:
                    pipe.hstrlen(key, b"archive")
                    pipe.hget(key, b"written")
                replies = await self.admin.bounded(pipe.execute(raise_on_error=False))
            group: list[tuple[bytes, bytes]] = []
            total = 0
            for (digest, key), length, written in zip(
                chunk, replies[::2], replies[1::2], strict=True
            ):
                if isinstance(length, Exception) or isinstance(written, Exception):
                    continue  # of another type since the scan: the next check says so
                if isinstance(written, bytes) and written.isdigit():
                    stamps[key] = int(written)
                if group and total + length > VERIFY_BYTES:
                    await self._verify_group(group, rows_of, stamps)
                    group, total = [], 0
                group.append((digest, key))
                total += length
            if group:
                await self._verify_group(group, rows_of, stamps)
        return stamps

    async def _verify_group(
        self,
        group: list[tuple[bytes, bytes]],
        rows_of: dict[bytes, dict[bytes, int | None]],
        stamps: dict[bytes, int],
    ) -> None:
        archives = await self._read_archives([key for _, key in group])
        for (digest, key), archive in zip(group, archives, strict=True):
            rows = rows_of.get(digest, {})
            if isinstance(archive, Exception):
                continue  # of another type since the scan: the next check says so
            if archive is None or await _hash(archive) != digest:
                # A put may have written it again meanwhile (same digest, right bytes),
                # or gc collected it: judged again from a fresh read.
                (archive,) = await self._read_archives([key])
                if isinstance(archive, Exception):
                    continue
                if archive is None:
                    if await self.admin.command("EXISTS", key):
                        self.find(
                            "damaged-blob",
                            key,
                            "the blob has no archive: " + _readers(rows) + _redeploy(rows),
                        )
                    continue
                if await _hash(archive) != digest:
                    self.find(
                        "damaged-blob",
                        key,
                        "the blob's bytes do not hash to its digest: "
                        + _readers(rows)
                        + _redeploy(rows),
                    )
                    continue
            length = len(archive)
            wrong = sorted(r for r, n in rows.items() if n is not None and n != length)
            if wrong:
                sizes = sorted({n for r, n in rows.items() if r in wrong and n is not None})
                self.find(
                    "damaged-blob",
                    key,
                    f"the blob's archive is {length} bytes, but {_named(wrong)} referring "
                    f"to it {'says' if len(wrong) == 1 else 'say'} "
                    f"{', '.join(str(n) for n in sizes)}: listings show the wrong size; "
                    "deploy the package again",
                )
            if key not in stamps and await self.admin.command("EXISTS", key):
                self.find(
                    "damaged-blob",
                    key,
                    "the blob has no written stamp (or one that is no number): reads are "
                    "served, but kvstore gc never collects it; a put of the same archive "
                    "writes it again",
                )

    async def _read_archives(self, keys: list[bytes]) -> list[Any]:
        async with self.admin.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, b"archive")
            replies: list[Any] = await self.admin.bounded(pipe.execute(raise_on_error=False))
        return replies

    def _repaired(self, kind: str, key: bytes, message: str) -> None:
        self.report.repairs.append(Finding(kind, shown(key), message))

    async def _routes(self) -> None:
        k = self.keys
        reply = await self.admin.command("HGETALL", k.routes)
        by_hash: dict[str, set[str]] = {}
        for row in set(self.members) | self.rows:  # each split once already, when met
            holder, stored = split_row_id(row)
            by_hash.setdefault(stored, set()).add(holder)
        for raw_type, raw_hash in sorted(field_pairs(reply)):
            try:
                workflow_type = check_text(raw_type.decode("utf-8"), "workflow type")
                content_hash = check_text(raw_hash.decode("utf-8"), "content hash")
            except ValueError:  # UnicodeDecodeError included
                self.find(
                    "malformed-route",
                    k.routes,
                    f"route {shown(raw_type)!r} -> {shown(raw_hash)!r} is not text "
                    "without NUL: listing routes fails on it",
                )
                continue
            if await self.admin.command("EXISTS", k.row(row_id(workflow_type, content_hash))):
                continue
            holders = sorted(by_hash.get(content_hash, ()))
            if holders:
                self.find(
                    "route-to-other-type",
                    k.routes,
                    f"route {workflow_type} points at {content_hash}, stored "
                    f"under {', '.join(holders)} only (as deploy --also "
                    "stores it); informational",
                )
            else:
                self.find(
                    "route-without-archive",
                    k.routes,
                    f"route {workflow_type} points at {content_hash}, which has "
                    "no stored archive; informational (the contract allows it)",
                )


def _decimal(value: Any) -> int | None:
    """A row's ``size``, or None when it is not a decimal number."""
    if isinstance(value, bytes) and value.isdigit() and value.isascii():
        return int(value)
    return None


async def _hash(archive: bytes) -> bytes:
    """The archive's digest, hashed on a thread when it is large."""
    if len(archive) < HASH_ON_A_THREAD:
        return archive_digest(archive)
    return await asyncio.to_thread(archive_digest, archive)


def _named(rows: list[bytes]) -> str:
    """``rows`` (row keys) named, the first few shown and the rest counted."""
    names = ", ".join(f"'{shown(r)}'" for r in rows[:NAMED_ROWS])
    more = f" and {len(rows) - NAMED_ROWS} more" if len(rows) > NAMED_ROWS else ""
    return f"row{'s' if len(rows) > 1 else ''} {names}{more}"


def _readers(rows: dict[bytes, int | None]) -> str:
    if not rows:
        return "no row refers to it now"
    return f"every read of {_named(sorted(rows))} fails"


def _redeploy(rows: dict[bytes, int | None]) -> str:
    if not rows:
        return "; kvstore gc collects it once older than its grace period"
    what = "the package must" if len(rows) == 1 else "the packages must"
    return f"; {what} be deployed again (a put of the same archive writes the blob again)"


def _is_stamp(stamp: bytes) -> bool:
    try:
        decode_stamp(stamp)
    except ValueError:
        return False
    return True


def describe(report: CheckReport) -> list[str]:
    """The report as plain lines: each change, each finding, then a verdict."""
    lines = [f"repaired: {r.key}: {r.message}" for r in report.repairs]
    for f in report.findings:
        label = "note" if f.informational else "problem"
        lines.append(f"{label}: {f.key}: {f.message}")
    if report.sound:
        lines.append(f"namespace {report.namespace!r} is sound")
    else:
        lines.append(
            f"namespace {report.namespace!r} has {len(report.problems)} problem(s)"
            + ("" if report.repairs else "; kvstore check --repair fixes those it can")
        )
    return lines


__all__ = [
    "INFORMATIONAL",
    "KINDS",
    "REPAIRABLE",
    "CheckReport",
    "Finding",
    "check_store",
    "describe",
    "glob_escape",
]
