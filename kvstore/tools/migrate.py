"""``kvstore migrate [--dry-run]``: a namespace of layout 1 made layout 2, online.

``migrate_namespace(store)`` moves ``store``'s namespace from layout 1 (each archive
inside its row) to layout 2 (each archive a blob named by its digest;
``kvstore.redis.keyspace``) while engines go on reading and writing it:

1. The layout marker is set from ``1`` to ``2`` in one step (``lua/set_layout-1.lua``).
   From then on every engine of a release that reads layout 2 writes layout 2: its next
   write is refused with ``KVSTORE_FORMAT 2`` and sent again in layout 2. Engines of
   older releases refuse the namespace, which is why every engine must be upgraded
   first. No write leaves an archive inside a row any more.
2. Every row key of the namespace (``SCAN`` of ``{ns}:pkg:*``, so a row the index does
   not name is migrated too) that still holds an ``archive`` is migrated, several at a
   time: its archive and ``deployed_at`` are read, the archive's blob is written
   (``lua/put_blob-1.lua``, on the blob's own node of a cluster), then the row is made a
   row of that blob (``lua/migrate_row-2.lua``), atomically, only if it still holds an
   archive at the stamp it was read with. Since no one writes an archive inside a row
   after step 1, such a row is unchanged since it was read; one deleted or put again
   meanwhile is left as the writer left it and counted as skipped.
3. The rows are scanned again until a pass finds none holding an archive: a row present
   from the start of a ``SCAN`` to its end is always met, and after step 1 no row with
   an archive can appear, so the second pass finds none unless the first was cut short.

Guarantees: a reader of this release reads every package throughout, from its row or
from its blob (rows of both shapes are read everywhere); no acknowledged write is undone
(a row is only changed where it is exactly as read, and then to the same archive and
stamp); a blob is written before any row refers to it. Resumable: stopped at any point
(killed, cancelled, a server that went away), running it again finds the marker ``2``
already and migrates the rows still holding their archive. A blob written by a step that
was stopped before its row was migrated is referred to by no row (until the rerun writes
it again and refers to it, or a writer puts the same archive): ``kvstore gc`` collects it.

Memory: archives under ``LARGE`` bytes are migrated ``concurrency`` at a time, larger
ones one at a time, so at most about ``concurrency`` MiB and one large archive are held.
Works on one server, through Sentinel and on a cluster (whose ``SCAN`` goes to the node
that serves the namespace's slot), and on fakeredis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvstore.errors import SerializationError
from kvstore.redis.calls import LayoutChanged
from kvstore.redis.keyspace import (
    BLOB_LAYOUT,
    INLINE_LAYOUT,
    INLINE_LIMIT,
    LAYOUTS,
    Keyspace,
    archive_digest,
)
from kvstore.redis.retry import Budget, call_with_retry
from kvstore.redis.scripts import MIGRATE_ROW, PUT_BLOB, SET_LAYOUT
from kvstore.redis.store import RedisPackageStore
from kvstore.redis.target import target_for
from kvstore.redis.wire import Command, PrePacked
from kvstore.tools.admin import library_calls

# Called with (phase, archive bytes migrated, 0, rows migrated), as the export's progress.
Progress = Callable[[str, int, int, int], None]

# Rows migrated at once: enough to keep the connections busy, few enough that the
# archives held stay a handful of MiB.
CONCURRENCY = 16
# An archive from this size on is migrated alone, read in slices and hashed on a thread.
LARGE = 1 << 20
# Keys asked of each SCAN step.
SCAN_COUNT = 500
# Passes over the rows before a namespace that keeps showing rows with archives is
# given up on: the second pass finds none unless something writes layout 1 (an engine
# of another kvstore, or a hand), which the message then says.
PASSES = 4

_ARCHIVE = PrePacked(b"archive")
_ROW_FIELDS = PrePacked(b"archive", b"deployed_at", b"digest")
_DIGEST = PrePacked(b"digest")

# migrate_row-2.lua's replies.
_MIGRATED, _NO_ROW, _NO_ARCHIVE, _OTHER_STAMP, _NO_MARKER = 1, 0, 2, 3, -1
# set_layout-1.lua's replies (and _NO_MARKER).
_SET, _ALREADY = 1, 0


class MigrationRefused(Exception):
    """The namespace cannot be migrated as it is (a layout this release does not know,
    a marker set back or removed meanwhile): the message says why and what was done."""


@dataclass
class MigrationReport:
    """What a migration did (or, with ``dry_run``, would do).

    ``layout_before``: what the marker said when the migration began (``None``: no
    marker). ``layout_set``: whether this run set the marker to ``2`` (``False`` when an
    earlier run had). ``migrated``: rows made rows of a blob, ``bytes`` their archives'
    bytes (with ``dry_run``: the rows holding an archive, and theirs). ``already``: rows
    met that were of layout 2 already (a row that ``SCAN`` returns twice, which it may
    while the server resizes its table, is counted twice). ``skipped``: rows deleted or
    put again between their read and their migration, left as their writer left them.
    ``damaged``: rows holding an archive that cannot be migrated as they are (no
    ``deployed_at``), left as they are: ``kvstore check`` reports them. ``passes``: the
    scans of the rows made.
    """

    namespace: str
    dry_run: bool = False
    layout_before: str | None = None
    layout_set: bool = False
    migrated: int = 0
    bytes: int = 0
    already: int = 0
    skipped: int = 0
    damaged: list[str] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        """The namespace was of layout 2 with no row to migrate, or has no marker."""
        return (
            not self.layout_set
            and not self.migrated
            and not self.skipped
            and (self.layout_before != INLINE_LAYOUT.decode())
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "nothing_to_do": self.nothing_to_do}


def _no_progress(phase: str, done: int, total: int, items: int) -> None:
    pass


async def migrate_namespace(
    store: RedisPackageStore,
    *,
    dry_run: bool = False,
    progress: Progress = _no_progress,
    concurrency: int = CONCURRENCY,
) -> MigrationReport:
    """Migrate ``store``'s namespace from layout 1 to layout 2; see the module's text.

    On a namespace of layout 2 it migrates the rows an earlier, stopped run left (none:
    nothing to do). With ``dry_run`` nothing is written: the report counts the rows that
    hold an archive and their bytes. Raises ``MigrationRefused`` for a namespace of a
    layout this release does not know (nothing written) or whose marker is set back or
    removed while it runs, ``SerializationError`` for a key of the wrong type, and
    ``BackendError`` when the server fails past the store's ``retry_budget``. Its calls
    use the store's client and options (``timeout``, ``retry_budget``, ``min_replicas``,
    ``durability``) on connections of their own, closed before it returns.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an int of at least 1, not {concurrency!r}")
    migration = _Migration(store, progress, concurrency)
    try:
        return await migration.run(dry_run)
    finally:
        await migration.aclose()


class _Migration:
    def __init__(self, store: RedisPackageStore, progress: Progress, concurrency: int) -> None:
        self.keys = keys = Keyspace(store.namespace)
        self.target = target_for(store.client)
        self.calls = library_calls(store)
        self.budget = Budget(store.options.retry_budget, store.options.timeout)
        self.report = MigrationReport(store.namespace)
        self.progress = progress
        self.concurrency = concurrency
        self.pattern = keys.row(b"*")  # a namespace holds no glob character
        self.set_prefix = SET_LAYOUT.call_prefix(keys.format)
        self.damaged: set[bytes] = set()  # row keys that cannot be migrated as they are

    async def aclose(self) -> None:
        await self.calls.aclose()

    async def run(self, dry_run: bool) -> MigrationReport:
        report = self.report
        report.dry_run = dry_run
        began = time.monotonic()
        found = await self._marker()
        report.layout_before = None if found is None else found.decode()
        if found is None:
            report.seconds = time.monotonic() - began
            return report
        if not dry_run and found == INLINE_LAYOUT:
            report.layout_set = await self._set_layout()
        while True:
            inline = await self._pass(dry_run, first=report.passes == 0)
            report.passes += 1
            # A pass that found rows with archives is followed by one that finds none.
            if dry_run or inline == 0:
                break
            if report.passes >= PASSES:
                raise MigrationRefused(
                    f"rows holding their archive were still found after {PASSES} passes: "
                    "something writes layout 1 to the namespace (an engine of another "
                    "kvstore, or a hand); the rows migrated stay migrated"
                )
        report.seconds = time.monotonic() - began
        return report

    async def _marker(self) -> bytes | None:
        """What the layout marker says; ``MigrationRefused`` for a layout this release
        does not know."""
        read: Command = ("GET", self.keys.format)
        found = self.calls.reply(await self.calls.send_one(read), read)
        if found is not None and found not in LAYOUTS:
            raise MigrationRefused(
                f"its layout marker {_text(self.keys.format)} says {_text(found)!r}, a layout "
                "this kvstore does not know; it migrates layout 1 to layout 2 and changed "
                "nothing"
            )
        return found  # type: ignore[no-any-return]

    async def _set_layout(self) -> bool:
        """Set the marker from 1 to 2; whether this call did (not: it was 2 already)."""
        reply = await self._call((self.set_prefix, INLINE_LAYOUT, BLOB_LAYOUT))
        if reply == _NO_MARKER:
            raise MigrationRefused(
                f"its layout marker {_text(self.keys.format)} was removed as the migration "
                "began; nothing was changed"
            )
        return bool(reply == _SET)

    async def _call(self, command: Command, size: int = 0, *, alone: bool = False) -> Any:
        """The reply to ``command``, a call of the library made for layout 2."""
        # A refusal naming layout 1 then raises LayoutChanged: the marker was set back.
        self.calls.layout = BLOB_LAYOUT
        try:
            return await self.calls.call(command, size, alone=alone)
        except LayoutChanged as exc:
            raise MigrationRefused(
                f"its layout marker {_text(self.keys.format)} says {_text(exc.args[0])!r}: "
                "it was set back "
                "while the migration ran, which stopped; the rows migrated stay migrated "
                "and are read by every engine of this release"
            ) from None

    async def _pass(self, dry_run: bool, *, first: bool) -> int:
        """One scan of every row: each holding an archive is migrated (or, with
        ``dry_run``, counted); returns how many held one."""
        inline = 0
        cursor: Any = 0
        while True:
            cursor, keys = await self._scan(cursor)
            rows = [key for key in keys if self.keys.row_of(key) is not None]
            if rows:
                sizes = await self._sizes(rows)
                held = [
                    (key, size)
                    for key, size in zip(rows, sizes, strict=True)
                    if size >= 0 and key not in self.damaged
                ]
                inline += len(held)
                if first:
                    self.report.already += len(rows) - len(held)
                if dry_run:
                    self.report.migrated += len(held)
                    self.report.bytes += sum(size for _, size in held)
                else:
                    await self._migrate_all(held)
            if int(cursor) == 0:
                return inline

    async def _scan(self, cursor: Any) -> tuple[Any, list[bytes]]:
        """One ``SCAN`` step over the namespace's row keys, on the server that holds them,
        found anew at each step so a failover or a moved slot is followed between steps."""
        target = self.target

        async def step() -> tuple[Any, list[bytes]]:
            await target.primaries()
            node = target.node_of(self.keys.format)
            options: dict[str, Any] = {} if node is None else {"target_nodes": node}
            command = ("SCAN", cursor, "MATCH", self.pattern, "COUNT", SCAN_COUNT)
            found, keys = await target.client.execute_command(*command, **options)
            if isinstance(found, dict):  # a cluster client's reply names the node
                (found,) = found.values()
            return found, list(keys)

        return await call_with_retry(step, self.budget, self.calls.backend_error)

    async def _sizes(self, rows: list[bytes]) -> list[int]:
        """The size of the archive each row holds, -1 for a row without one."""
        commands: list[Command] = []
        for key in rows:
            commands += [
                ("HEXISTS", key, _ARCHIVE),
                ("HSTRLEN", key, _ARCHIVE),
                ("HEXISTS", key, _DIGEST),
            ]
        replies = await self.calls.unit(commands)
        # A row holding a digest is of layout 2 already, a small archive kept inside it.
        return [
            int(size) if has and not digested else -1
            for has, size, digested in zip(replies[::3], replies[1::3], replies[2::3], strict=True)
        ]

    async def _migrate_all(self, held: list[tuple[bytes, int]]) -> None:
        """Migrate the rows ``held`` names (with their archives' sizes): the small ones
        ``concurrency`` at a time, then each large one alone."""
        small = iter([key for key, size in held if size < LARGE])

        async def worker() -> None:
            for key in small:  # shared: each row goes to one worker
                await self._migrate(key, large=False)

        workers = [asyncio.ensure_future(worker()) for _ in range(self.concurrency)]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # the first failure, raised
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        for key, size in held:
            if size >= LARGE:
                await self._migrate(key, large=True)

    async def _migrate(self, key: bytes, *, large: bool) -> None:
        """Migrate the row at ``key`` if it still holds an archive."""
        row = self.keys.row_of(key)
        assert row is not None
        ((archive, stamp, digested),) = await self.calls.unit(
            [(PrePacked("HMGET"), key, _ROW_FIELDS)], large=large, archives=True
        )
        report = self.report
        if archive is None or digested is not None:
            report.skipped += 1  # deleted, or put again in layout 2, since it was sized
            return
        if not isinstance(stamp, bytes):
            # Reported once and left alone: the next passes do not count it as to do.
            self.damaged.add(key)
            report.damaged.append(_text(key))
            return
        digest = (
            await asyncio.to_thread(archive_digest, archive) if large else archive_digest(archive)
        )
        size = len(archive)
        # A small archive stays inside its row, as a put of layout 2 keeps it.
        where = b"inline" if size <= INLINE_LIMIT else b"blob"
        if where == b"blob":
            alone = await self.calls.sends_alone(size)
            # The blob first: a row never refers to a blob that is not written.
            blob = (PUT_BLOB.call_prefix(self.keys.blob(digest)), digest, archive)
            await self._call(blob, size, alone=alone)
            del blob
        del archive
        migrate = (MIGRATE_ROW.call_prefix(self.keys.format, key), BLOB_LAYOUT, row, stamp)
        reply = await self._call((*migrate, digest, b"%d" % size, where))
        if reply == _MIGRATED:
            report.migrated += 1
            report.bytes += size
            self.progress("migrating", report.bytes, 0, report.migrated)
        elif reply == _NO_MARKER:
            raise MigrationRefused(
                f"its layout marker {_text(self.keys.format)} was removed while the migration "
                "ran, which stopped; "
                "the rows migrated stay migrated"
            )
        elif reply in (_NO_ROW, _NO_ARCHIVE, _OTHER_STAMP):
            report.skipped += 1
        else:
            raise SerializationError(f"{MIGRATE_ROW.name} replied {reply!r}, which it never does")


def describe(report: MigrationReport) -> list[str]:
    """The report as plain lines, for people."""
    ns = repr(report.namespace)
    if report.layout_before is None:
        return [
            f"namespace {ns} has no layout marker (nothing was ever written to it): nothing "
            "to migrate; its first write gives it the writing engine's layout"
        ]
    size = _size(report.bytes)
    if report.dry_run:
        if report.layout_before == BLOB_LAYOUT.decode() and not report.migrated:
            return [f"namespace {ns} is of layout 2 already: nothing to migrate"]
        step = (
            "would set its layout to 2, then "
            if report.layout_before == INLINE_LAYOUT.decode()
            else "is of layout 2; a migration "
        )
        return [
            f"namespace {ns} {step}would move {report.migrated} rows ({size}) to blobs; "
            f"{report.already} rows are of layout 2 already; nothing was changed (dry run)"
        ]
    if report.nothing_to_do and not report.damaged:
        return [f"namespace {ns} is of layout 2 already: nothing to migrate"]
    lines = []
    if report.layout_set:
        lines.append(f"namespace {ns}: layout 1 -> 2; every engine now writes layout 2")
    else:
        lines.append(f"namespace {ns}: layout 2 already (an earlier run set it); resuming")
    lines.append(
        f"migrated {report.migrated} rows ({size}) to blobs in {report.seconds:.1f} s; "
        f"{report.already} were of layout 2 already; {report.skipped} changed meanwhile "
        "(deleted or put again by an engine) and were left as written"
    )
    for key in report.damaged:
        lines.append(
            f"problem: {key}: holds an archive but no deployed_at, so it was not migrated; "
            "see kvstore check"
        )
    return lines


def _text(raw: bytes) -> str:
    """Key bytes as text: UTF-8 with NUL written ``\\0`` and other bytes escaped."""
    return raw.decode("utf-8", "backslashreplace").replace("\x00", "\\0")


def _size(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


__all__ = [
    "MigrationRefused",
    "MigrationReport",
    "describe",
    "migrate_namespace",
]
