"""``kvstore gc``: collect the blobs (layout 2) no package row refers to.

A blob is never removed by deleting a row: rows share blobs (the same archive under
several rows is one blob), so a blob becomes garbage only when no row refers to it any
more, or when a put failed between writing it and writing its row. ``collect_garbage``
finds and removes those, by mark and sweep:

1. ``t0``: the server's ``TIME`` (µs) on the node that holds the namespace's rows, read
   before anything else; the cut-off is ``t0 - grace``.
2. Mark: the digest of every row key of the namespace (``SCAN MATCH {ns}:pkg:*``, rows
   no index member names included), and of every row the index names, each read with
   ``HGET <row> digest``. Any failure to read a row stops the collection before
   anything is removed.
3. Sweep: every key ``SCAN MATCH <ns>/blob/*`` meets, on every primary of a cluster;
   each blob whose digest was not marked is handed to the library's ``drop_blob``, which
   removes it only if its ``written`` stamp is before the cut-off, in one atomic step on
   the blob's node. Keys under ``<ns>/blob/`` that are not ``<ns>/blob/{<digest>}``, or
   not hashes, are left alone (``kvstore check`` reports them).

Why no blob a row needs is removed: a put writes (or re-writes) its blob, stamping
``written`` with the server's clock, before its row (a cluster: two calls, the blob
first) or with it (one server: one call). A row the mark did not see was written after
the mark read the rows, so after ``t0``; the put that wrote it wrote its blob at most one
call's hard end before (``retry_budget + timeout`` of the writer's store, the longest a
call lives, retries included), so the blob's stamp is at or after ``t0`` minus that.
With ``grace`` longer than that, the stamp is at or after the cut-off and ``drop_blob``
keeps the blob. A put that re-uses a blob about to be collected re-writes it first: if
``drop_blob`` runs before, the put writes the blob again; after, the stamp is new.

So ``grace`` must exceed the longest ``retry_budget + timeout`` of every store that
writes the namespace (the default, an hour, is far beyond any sane setting), plus the
clock skew between the nodes of a cluster (blobs are stamped by their own node's clock,
the cut-off is read on the rows' node). A row no index member names is marked only if
``SCAN`` meets it on the namespace's node: run ``gc`` after, not during, a resharding of
the namespace's slot. ``dry_run`` reads the same and removes nothing: it counts what a
collection would remove now.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from kvstore.errors import SerializationError
from kvstore.redis.keyspace import LAYOUTS, Keyspace, is_digest, split_index_member
from kvstore.redis.scripts import DROP_BLOB
from kvstore.redis.store import RedisPackageStore
from kvstore.tools.admin import CHUNK, Node, Servers, glob_escape, library_calls

DEFAULT_GRACE = 3600.0


@dataclass
class GcReport:
    """What one collection found and did (with ``dry_run``, what it would do)."""

    namespace: str
    grace: float  # seconds
    dry_run: bool
    cutoff: int = 0  # µs of the server's clock: blobs written before it may be collected
    rows: int = 0  # row keys read by the mark
    seen: int = 0  # blobs the sweep met
    referenced: int = 0  # of those, blobs a row refers to
    collected: int = 0  # unreferenced blobs removed (dry run: that would be)
    spared: int = 0  # unreferenced blobs kept: written within the grace period
    bytes_freed: int = 0  # archive bytes of the blobs collected
    ignored: int = 0  # keys under <ns>/blob/ that are no blob: left alone
    seconds: float = 0.0
    # The keys of the blobs collected, for ``kvstore check --repair``.
    collected_keys: list[bytes] = field(default_factory=list, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "grace": self.grace,
            "dry_run": self.dry_run,
            "cutoff_us": self.cutoff,
            "rows": self.rows,
            "blobs_seen": self.seen,
            "referenced": self.referenced,
            "collected": self.collected,
            "spared": self.spared,
            "bytes_freed": self.bytes_freed,
            "ignored": self.ignored,
            "seconds": round(self.seconds, 3),
        }


def check_grace(grace: object) -> float:
    """``grace`` as seconds; ``ValueError`` unless it is a finite number, 0 or more."""
    if isinstance(grace, bool) or not isinstance(grace, (int, float)):
        raise TypeError(f"grace must be a number of seconds, not {type(grace).__name__}")
    if not math.isfinite(grace) or grace < 0:
        raise ValueError(f"grace must be a finite number of seconds, 0 or more, not {grace!r}")
    return float(grace)


async def collect_garbage(
    store: RedisPackageStore, *, grace: float = DEFAULT_GRACE, dry_run: bool = False
) -> GcReport:
    """Remove the blobs of ``store``'s namespace that no row refers to and that no put
    wrote within the last ``grace`` seconds (of the server's clock); with ``dry_run``,
    only count them. See the module's docstring for why no blob a row needs, now or
    once a put in flight ends, is removed, and what ``grace`` must exceed.

    Works on one server and on a cluster (every primary is swept). ``SerializationError``
    if the namespace holds a layout this release does not know (nothing is removed);
    ``BackendError`` if a server fails (what was removed before stays removed; run it
    again).
    """
    grace = check_grace(grace)
    return await _Collector(store, grace, dry_run).run()


class _Collector:
    def __init__(self, store: RedisPackageStore, grace: float, dry_run: bool) -> None:
        self.store = store
        self.servers = Servers(store)
        self.keys = Keyspace(store.namespace)
        self.report = GcReport(store.namespace, grace, dry_run)

    async def run(self) -> GcReport:
        # The library's calls go the way every write goes (the library checked before it
        # is trusted, loaded where it is missing, refusals raised as the store raises them).
        self.calls = library_calls(self.store)
        try:
            return await self._run()
        finally:
            await self.calls.aclose()

    async def _run(self) -> GcReport:
        started = time.monotonic()
        servers, k, report = self.servers, self.keys, self.report
        primaries = await servers.primaries()
        home = servers.node_of(k.format)
        seconds, micros = await servers.command("TIME", node=home)
        t0 = int(seconds) * 1_000_000 + int(micros)
        report.cutoff = max(t0 - round(report.grace * 1_000_000), 0)
        layout = await servers.command("GET", k.format)
        if layout is not None and layout not in LAYOUTS:
            raise SerializationError(
                f"{k.format!r} says layout {layout!r}; this kvstore knows layouts "
                f"{b', '.join(LAYOUTS).decode()} and collects nothing in another"
            )
        marked = await self._mark(home)
        for node in primaries:
            await self._sweep(node, marked)
        report.seconds = time.monotonic() - started
        return report

    # The mark.

    async def _mark(self, home: Node) -> set[bytes]:
        """The digest of every row of the namespace: rows ``SCAN`` meets on the
        namespace's node, and rows its index names."""
        k = self.keys
        read: set[bytes] = set()
        marked: set[bytes] = set()
        async for batch in self.servers.scan(glob_escape(k.row(b"")) + b"*", home):
            await self._read_digests([key for key in batch if key not in read], read, marked)
        after = b"-"
        while True:
            (members,) = await self.servers.batch(
                [("ZRANGEBYLEX", k.index, after, b"+", b"LIMIT", 0, CHUNK)]
            )
            if isinstance(members, Exception):
                if _is_wrong_type(members):
                    break  # no index to read: the scan met every row there is
                raise self.servers.error(members)
            rows = []
            for member in members:
                try:
                    rows.append(k.row(split_index_member(member)[1]))
                except ValueError:
                    continue  # names no row (check reports it)
            await self._read_digests([key for key in rows if key not in read], read, marked)
            if len(members) < CHUNK:
                break
            after = b"(" + members[-1]
        return marked

    async def _read_digests(self, rows: list[bytes], read: set[bytes], marked: set[bytes]) -> None:
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            replies = await self.servers.batch([("HGET", key, b"digest") for key in chunk])
            for key, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, Exception):
                    if _is_wrong_type(reply):
                        continue  # not a row: refers to nothing
                    raise self.servers.error(reply)  # an incomplete mark sweeps nothing
                read.add(key)
                if is_digest(reply):
                    marked.add(reply)
        self.report.rows = len(read)

    # The sweep.

    async def _sweep(self, node: Node, marked: set[bytes]) -> None:
        k, report = self.keys, self.report
        async for batch in self.servers.scan(glob_escape(k.blob_prefix) + b"*", node):
            candidates: list[tuple[bytes, bytes]] = []
            for key in batch:
                digest = k.digest_of(key)
                if digest is None:
                    report.ignored += 1
                    continue
                report.seen += 1
                if digest in marked:
                    report.referenced += 1
                else:
                    candidates.append((key, digest))
            if candidates:
                if report.dry_run:
                    await self._judge(candidates, node)
                else:
                    await self._drop(candidates, node)

    async def _judge(self, candidates: Sequence[tuple[bytes, bytes]], node: Node) -> None:
        """What ``drop_blob`` would do with each candidate now, removing nothing."""
        report = self.report
        commands: list[tuple[Any, ...]] = []
        for key, _ in candidates:
            commands += [("HGET", key, b"written"), ("HSTRLEN", key, b"archive")]
        replies = await self.servers.batch(commands, node)
        for (key, _), written, size in zip(candidates, replies[::2], replies[1::2], strict=True):
            if isinstance(written, Exception) or isinstance(size, Exception):
                if _is_wrong_type(written):
                    report.ignored += 1
                    continue
                raise self.servers.error(written if isinstance(written, Exception) else size)
            stamp = _stamp(written)
            if stamp is not None and stamp < report.cutoff:
                self._collected(key, size)
            elif written is not None or size:
                report.spared += 1
            # else: gone since the scan met it

    async def _drop(self, candidates: Sequence[tuple[bytes, bytes]], node: Node) -> None:
        """Each candidate handed to ``drop_blob``, its archive's size read just before;
        the calls in flight together, pipelined."""
        report = self.report
        cutoff = b"%d" % report.cutoff
        sizes = await self.servers.batch(
            [("HSTRLEN", key, b"archive") for key, _ in candidates], node
        )

        async def drop(key: bytes, digest: bytes) -> Any:
            try:
                return await self.calls.call((DROP_BLOB.call_prefix(key), digest, cutoff))
            except SerializationError:
                return None  # another type: kvstore check reports it

        dropped = await asyncio.gather(*(drop(key, digest) for key, digest in candidates))
        for (key, _), size, done in zip(candidates, sizes, dropped, strict=True):
            if done is None:
                report.ignored += 1
            elif done == 1:
                self._collected(key, 0 if isinstance(size, Exception) else size)
            else:
                report.spared += 1  # written since the cut-off (or gone meanwhile)

    def _collected(self, key: bytes, size: Any) -> None:
        report = self.report
        report.collected += 1
        report.bytes_freed += int(size or 0)
        report.collected_keys.append(key)


def _stamp(value: Any) -> int | None:
    """A ``written`` stamp as an int, or ``None`` when there is none or it is no number
    (``drop_blob`` keeps such a blob)."""
    if isinstance(value, bytes) and value.isdigit():
        return int(value)
    return None


def _is_wrong_type(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def describe(report: GcReport) -> list[str]:
    """The report as plain lines."""
    verb = "would collect" if report.dry_run else "collected"
    lines = [
        f"namespace {report.namespace!r}: {report.rows} rows read, {report.seen} blobs seen, "
        f"{report.referenced} referenced",
        f"{verb} {report.collected} unreferenced blobs ({report.bytes_freed} bytes of archives); "
        f"spared {report.spared} written within the last {report.grace:g} s",
    ]
    if report.ignored:
        lines.append(
            f"left {report.ignored} keys under the blob prefix that are not blobs "
            "(kvstore check names them)"
        )
    if report.dry_run:
        lines.append("dry run: nothing was removed")
    return lines


__all__ = ["DEFAULT_GRACE", "GcReport", "check_grace", "collect_garbage", "describe"]
