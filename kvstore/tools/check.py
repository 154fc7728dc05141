"""``kvstore check [--repair]``: is the namespace's keyspace what the functions leave?

``check_store(store)`` walks the index (``ZRANGEBYLEX``, a chunk at a time) and the
namespace's keys (``SCAN`` with a ``MATCH`` on the escaped ``{ns}:`` prefix) and reports
each finding of ``KINDS``. A finding about a package row is only reported after it was
seen again in one ``MULTI``/``EXEC`` snapshot of the row and its index members, so
writers that put or delete meanwhile are never mistaken for damage: a row and its
members change together in one script, and one transaction sees them before or after
that script, never half-way. Routes to versions without an archive are reported as
informational: the contract allows them.

With ``repair=True`` it also fixes what needs no guessing, one row at a time, each fix
one ``MULTI``/``EXEC`` under ``WATCH`` of the row and of the layout marker:

* an index member whose row does not exist is removed;
* a row that no index member names at its own ``deployed_at`` is indexed there, and
  members naming it at another stamp are removed.

``WATCH`` on the row alone suffices because every function that changes a row's index
members (put, delete) writes that row in the same step: if any did so after the fix
read the row, ``EXEC`` does nothing and the fix is judged again from fresh reads. No
Lua is involved, so the fix works with whatever scripts or Functions the writers use.
Repair never deletes a row, never touches routes, and never writes to a namespace that
holds another layout. Everything else is reported, not changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import WatchError

from kvstore.records import check_text
from kvstore.redis.keyspace import (
    FORMAT_VERSION,
    Keyspace,
    decode_stamp,
    index_member,
    row_id,
    split_index_member,
    split_row_id,
)
from kvstore.redis.protocol import field_pairs, is_route_counter
from kvstore.redis.store import RedisPackageStore
from kvstore.tools.admin import Admin

# Every kind of finding; those in INFORMATIONAL do not make a namespace unsound.
KINDS = (
    "unknown-layout",  # {ns}:format names another layout: nothing else is read
    "no-layout-marker",  # keys exist but {ns}:format does not
    "wrong-type",  # a key of the namespace holds another type than the table says
    "malformed-member",  # an index member that is not "<stamp> <type>\0<hash>"
    "member-without-row",  # repairable
    "row-without-member",  # repairable
    "stamp-mismatch",  # repairable: a member's stamp is not its row's deployed_at
    "row-missing-field",  # a row without archive or a readable deployed_at
    "malformed-row-key",  # {ns}:pkg:<x> where x is not "<type>\0<hash>"
    "malformed-route",  # a route whose type or hash is not text
    "malformed-route-version",  # {ns}:route-version is not an integer
    "route-without-archive",  # informational
    "route-to-other-type",  # informational: the hash is stored under other types only
    "unknown-key",  # informational
    "unsettled",  # informational: changed on every look while the check ran
)
INFORMATIONAL = frozenset(
    {"route-without-archive", "route-to-other-type", "unknown-key", "unsettled"}
)
REPAIRABLE = frozenset({"member-without-row", "row-without-member", "stamp-mismatch"})

CHUNK = 1000
ATTEMPTS = 20  # looks at one row before it is called unsettled


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


def glob_escape(raw: bytes) -> bytes:
    """``raw`` as a ``MATCH`` pattern that matches exactly it (``*?[]\\`` escaped)."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", raw)


async def check_store(store: RedisPackageStore, *, repair: bool = False) -> CheckReport:
    """Check ``store``'s namespace, and with ``repair`` fix what can be fixed.

    The report lists what remains (after repair, what could not be fixed or changed
    under the check), and each change made. ``BackendError`` if the server fails.
    """
    return await _Checker(store).run(repair)


class _Checker:
    def __init__(self, store: RedisPackageStore) -> None:
        self.admin = Admin(store)
        self.keys = Keyspace(store.namespace)
        self.report = CheckReport(store.namespace)
        # row id -> stamps its index members carry (as read; confirmed later)
        self.members: dict[bytes, set[bytes]] = {}
        self.rows: set[bytes] = set()  # row ids of {ns}:pkg:* keys met by SCAN

    def find(self, kind: str, key: bytes, message: str) -> None:
        self.report.findings.append(Finding(kind, shown(key), message))

    def expected(self, key: bytes) -> bytes:
        """The type ``key`` of the namespace holds, as ``TYPE`` replies it."""
        expected = self.keys.expected_type(key)
        assert expected is not None, f"{key!r} is a key of the namespace"
        return expected.encode()

    async def run(self, repair: bool) -> CheckReport:
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
        if layout not in (None, FORMAT_VERSION):
            self.find(
                "unknown-layout",
                k.format,
                f"the namespace holds layout {shown(layout)!r}; this kvstore reads layout "
                f"{FORMAT_VERSION.decode()} and checks nothing else",
            )
            return self.report
        types = await self._scan()

        def usable(key: bytes) -> bool:  # absent, or of its type
            return types.get(key) in (None, self.expected(key))

        # Rows are judged against the index; without a usable index they cannot be.
        if usable(k.index):
            await self._walk_index()
            for row in sorted(set(self.members) | self.rows):
                await self._judge_row(row, repair)
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
        if types and await self._layout() is None:  # the marker is never deleted by writers
            self.find(
                "no-layout-marker",
                k.format,
                "the namespace has keys but no layout marker; writers will set it to "
                f"{FORMAT_VERSION.decode()} on their next write",
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
        cursor: Any = 0
        seen: set[bytes] = set()
        while True:
            cursor, batch = await self.admin.command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", CHUNK
            )
            for key in batch:
                if key in seen:  # SCAN may return a key twice
                    continue
                seen.add(key)
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
            if int(cursor) == 0:
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
        """In one transaction: the row's type, its ``(archive present, deployed_at)``, and
        which of the members ``<stamp> <row>`` for ``stamps`` the index holds."""
        k = self.keys
        stamps = sorted(set(stamps))
        async with self.admin.client.pipeline(transaction=True) as pipe:
            pipe.type(k.row(row))
            pipe.hexists(k.row(row), b"archive")
            pipe.hget(k.row(row), b"deployed_at")
            for stamp in stamps:
                pipe.zscore(k.index, index_member(stamp, row))
            replies = await self.admin.bounded(pipe.execute(raise_on_error=False))
        # The row's own replies may be WRONGTYPE, which its TYPE explains; others may not.
        for reply in [replies[0], *replies[3:]]:
            if isinstance(reply, Exception):
                raise self.admin.error(reply)
        return (
            replies[0],
            (replies[1], replies[2]),
            {s: r is not None for s, r in zip(stamps, replies[3:], strict=True)},
        )

    async def _judge_row(self, row: bytes, repair: bool) -> None:
        """Report (and with ``repair`` fix) what is wrong with one row and its members."""
        k = self.keys
        key = k.row(row)
        stamps = set(self.members.get(row, ()))
        for _ in range(ATTEMPTS):
            kind, (has_archive, stamp), present = await self._snapshot(row, stamps)
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
            good_stamp = isinstance(stamp, bytes) and _is_stamp(stamp)
            if not has_archive or not good_stamp:
                what = "no archive" if not has_archive else ""
                if not good_stamp:
                    what += (" and " if what else "") + (
                        "no deployed_at" if stamp is None else f"deployed_at {shown(stamp)!r}"
                    )
                self.find(
                    "row-missing-field",
                    key,
                    f"the row has {what}: listings "
                    + ("fail on it" if not has_archive else "skip it")
                    + "; put the package again or delete it",
                )
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
                if (
                    layout not in (None, FORMAT_VERSION)
                    or now != stamp
                    or bool(exists) != (stamp is not None)
                    or bool(archived) != (stamp is not None)
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
]
