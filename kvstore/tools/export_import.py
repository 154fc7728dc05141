"""Export a namespace to one file and import it back, streamed both ways.

The file is a msgpack stream of maps, version 2:

1. a header ``{"format": "kvstore-export", "version": 2, "namespace": str,
   "exported_at": timestamp}``;
2. one ``{"kind": "package", "workflow_type": str, "content_hash": str,
   "deployed_at": timestamp, "archive": bin, "sha256": bin}`` per package, in deploy
   order, ``sha256`` being the SHA-256 of ``archive``;
3. one ``{"kind": "route", "workflow_type": str, "content_hash": str}`` per route;
4. a trailer ``{"kind": "end", "packages": int, "routes": int, "sha256": bin}``, its
   ``sha256`` that of every byte of the file before the trailer.

Version 1 is the same without the two ``sha256`` fields; it is still read.
Instants are msgpack timestamps (extension -1), exact to the microsecond in any year.
The trailer makes a cut-off file detectable and the checksums a damaged one (a byte
flipped anywhere: in an archive, in a name, in the trailer): ``import_file`` reads the
file once, checking it whole into a private copy before writing anything, and writes
from that copy, so a damaged file changes nothing and one changed meanwhile cannot
change what was checked. Memory is bounded by one package (two copies of it while it
is read and checked, plus the routes, which are small) in both directions, and an
import's copy by ``SPOOL`` bytes: past that it is a temporary file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import msgpack  # type: ignore[import-untyped]

from kvstore import PackageRecord, PackageRouteRecord, RedisPackageStore

FORMAT = "kvstore-export"
VERSION = 2  # written; READABLE are read
READABLE = (1, 2)
CHUNK = 1 << 20  # bytes read from the file at a time
# An import's private copy of its file stays in memory up to this size, then spills to
# a temporary file: an export may be far larger than memory.
SPOOL = 64 << 20

# Called with (phase, bytes done, bytes in all or 0 when unknown, items done).
Progress = Callable[[str, int, int, int], None]

# Puts in flight at once during an import: enough to fill the store's pipelines,
# few enough that memory stays bounded by a handful of archives.
BATCH = 32


class ExportFormatError(Exception):
    """The file is not a complete kvstore export this version can read."""


@dataclass(frozen=True)
class Counts:
    packages: int
    routes: int


class ImportStopped(Exception):
    """An import failed after it began to write: its message says how far it got, and
    ``cause`` is the failure. Importing the same file again completes it."""

    def __init__(self, cause: Exception, counts: Counts, packages: int, routes: int) -> None:
        done = (
            f"{packages} of {counts.packages} packages and {routes} of {counts.routes} "
            "routes were imported"
            if packages or routes
            else "nothing was imported"
        )
        super().__init__(f"{done} (importing the file again completes it)")
        self.cause = cause


def _no_progress(phase: str, done: int, total: int, items: int) -> None:
    pass


async def export_file(
    store: RedisPackageStore, path: Path, progress: Progress = _no_progress
) -> Counts:
    """Write ``store``'s namespace to ``path``; the file appears only once complete.

    It is written beside ``path`` and renamed over it at the end, so a failed export
    leaves no file that looks whole.
    """
    packer = msgpack.Packer(datetime=True, use_bin_type=True)
    partial = path.with_name(path.name + ".part")
    packages = written = 0
    stream = hashlib.sha256()
    try:
        with open(partial, "wb") as out:

            def emit(item: dict[str, Any]) -> int:
                data = packer.pack(item)
                stream.update(data)
                return out.write(data)

            header = {
                "format": FORMAT,
                "version": VERSION,
                "namespace": store.namespace,
                "exported_at": datetime.now(timezone.utc),
            }
            written += emit(header)
            async for record in store.iter_packages(chunk=100):
                item = {
                    "kind": "package",
                    "workflow_type": record.workflow_type,
                    "content_hash": record.content_hash,
                    "deployed_at": record.deployed_at,
                    "archive": record.archive,
                    "sha256": hashlib.sha256(record.archive).digest(),
                }
                written += emit(item)
                packages += 1
                progress("exporting", written, 0, packages)
            # Routes last, read after the packages: a deploy made meanwhile then has
            # its route in the file whenever its package is.
            routes = await store.list_package_routes()
            for route in routes:
                item = {
                    "kind": "route",
                    "workflow_type": route.workflow_type,
                    "content_hash": route.content_hash,
                }
                written += emit(item)
            trailer = {
                "kind": "end",
                "packages": packages,
                "routes": len(routes),
                "sha256": stream.digest(),
            }
            written += out.write(packer.pack(trailer))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return Counts(packages, len(routes))


def _text(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ExportFormatError(f"{key} is not text")
    return value


def _digest(item: dict[str, Any]) -> bytes:
    value = item.get("sha256")
    if not isinstance(value, bytes) or len(value) != 32:
        raise ExportFormatError(f"a {item.get('kind')} item lacks its sha256")
    return value


def _decode(
    item: object, version: int, before: bytes
) -> PackageRecord | PackageRouteRecord | Counts:
    """The record ``item`` holds, its checksum verified (version 2); ``before`` is the
    SHA-256 of every byte of the file before ``item``."""
    if not isinstance(item, dict):
        raise ExportFormatError("an item is not a map")
    kind = item.get("kind")
    try:
        if kind == "package":
            archive, deployed_at = item.get("archive"), item.get("deployed_at")
            if not isinstance(archive, bytes) or not isinstance(deployed_at, datetime):
                raise ExportFormatError("a package lacks its archive or deployed_at")
            record = PackageRecord(
                _text(item, "workflow_type"), _text(item, "content_hash"), archive, deployed_at
            )
            if version >= 2 and hashlib.sha256(archive).digest() != _digest(item):
                raise ExportFormatError(
                    f"the archive of {record.workflow_type} {record.content_hash} is damaged "
                    "(its SHA-256 does not match)"
                )
            return record
        if kind == "route":
            return PackageRouteRecord(_text(item, "workflow_type"), _text(item, "content_hash"))
    except (TypeError, ValueError) as exc:
        raise ExportFormatError(str(exc)) from None
    if kind == "end":
        if version >= 2 and _digest(item) != before:
            raise ExportFormatError(
                "the file is damaged: its SHA-256 does not match the one its end marker holds"
            )
        return Counts(_count(item, "packages"), _count(item, "routes"))
    raise ExportFormatError(f"unknown item {kind!r}")


def _count(item: dict[str, Any], key: str) -> int:
    value = item.get(key)
    # bool is an int to Python: True would count as 1 package, and be printed as True.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ExportFormatError(f"the end marker's {key} is not a count: {value!r:.40}")
    return value


def _raw_items(source: IO[bytes], copy: IO[bytes] | None) -> Iterator[tuple[object, bytes, int]]:
    """Every msgpack object of ``source``, with the SHA-256 of the bytes before it and
    the offset where it ends; a cut-off last object raises ``ExportFormatError``. Every
    byte read is also written to ``copy``, if given."""
    unpacker = msgpack.Unpacker(
        raw=False,
        timestamp=3,  # timestamps as aware UTC datetimes
        max_buffer_size=2**31 - 1,  # the default (100 MiB) would refuse large archives
    )
    stream = hashlib.sha256()
    unhashed = bytearray()  # read, not yet in ``stream``: the object being decoded
    hashed = 0  # offset of unhashed[0]
    while chunk := source.read(CHUNK):
        if copy is not None:
            copy.write(chunk)
        unpacker.feed(chunk)
        unhashed += chunk
        for item in unpacker:
            end = unpacker.tell()
            yield item, stream.digest(), end
            stream.update(unhashed[: end - hashed])
            del unhashed[: end - hashed]
            hashed = end
    if unhashed:
        raise ExportFormatError("the file ends inside an item: it was cut off")


def _items(
    source: IO[bytes],
    total: int,
    phase: str,
    progress: Progress,
    copy: IO[bytes] | None = None,
) -> Iterator[PackageRecord | PackageRouteRecord | Counts]:
    """Every item of ``source`` (``total`` bytes) after the header, checked; raises
    ``ExportFormatError`` on any flaw. Every byte read is also written to ``copy``."""
    raw = _raw_items(source, copy)
    try:
        header = next(raw, (None, b"", 0))[0]
        if (
            not isinstance(header, dict)
            or header.get("format") != FORMAT
            or not isinstance(header.get("version"), int)
        ):
            raise ExportFormatError("no kvstore export header")
        version = header["version"]
        if version not in READABLE:
            raise ExportFormatError(
                f"export version {version}; this kvstore reads versions "
                + " and ".join(map(str, READABLE))
            )
        for count, (item, before, end) in enumerate(raw, 1):
            progress(phase, end, total, count)
            yield _decode(item, version, before)
    except (ValueError, OverflowError, msgpack.UnpackException) as exc:
        # Bad msgpack, bad UTF-8, an item over the size limit, an instant out of range.
        raise ExportFormatError(str(exc) or f"malformed data ({type(exc).__name__})") from None


def check_file(path: Path, progress: Progress = _no_progress) -> Counts:
    """Read all of ``path`` and return its counts if it is a complete, valid export."""
    with open(path, "rb") as source:
        return _check(source, progress, None)


def _check(source: IO[bytes], progress: Progress, copy: IO[bytes] | None) -> Counts:
    """The counts of the export ``source`` holds, all of it read and checked, and
    copied to ``copy`` if given; ``ExportFormatError`` if it is not a complete, valid
    export."""
    total = os.fstat(source.fileno()).st_size
    packages = routes = 0
    end: Counts | None = None
    for item in _items(source, total, "checking", progress, copy):
        if end is not None:
            raise ExportFormatError("data after the end marker")
        if isinstance(item, PackageRecord):
            packages += 1
        elif isinstance(item, PackageRouteRecord):
            routes += 1
        else:
            end = item
    if end is None:
        raise ExportFormatError("the file ends early (no end marker): it was cut off")
    if end != Counts(packages, routes):
        raise ExportFormatError(
            f"the end marker counts {end.packages} packages and {end.routes} routes, "
            f"the file holds {packages} and {routes}"
        )
    return end


async def import_file(
    store: RedisPackageStore, path: Path, progress: Progress = _no_progress
) -> Counts:
    """Put every package of the export into ``store``, then set every route as exported.

    Idempotent: importing the same file again changes nothing. Each package keeps its
    ``deployed_at``. Routes of types the file does not name are left alone. The file is
    read once, checked whole into a private copy, and written from that copy: a damaged
    file changes nothing (``ExportFormatError``), and one changed or cut meanwhile does
    not change what is written. A failure once writing began raises ``ImportStopped``,
    saying how many packages and routes were written; running the import again
    completes it.
    """
    with open(path, "rb") as source, tempfile.SpooledTemporaryFile(SPOOL) as copy:
        counts = _check(source, progress, copy)
        source.close()  # all is in the copy now
        copy.seek(0)
        await _write(store, copy, counts, progress)
    return counts


async def _write(
    store: RedisPackageStore, copy: IO[bytes], counts: Counts, progress: Progress
) -> None:
    """Put the packages of the checked ``copy``, then set its routes; ``ImportStopped``
    on a failure, counting what was written."""
    size = copy.seek(0, os.SEEK_END)
    copy.seek(0)
    packages = routes = 0
    pending: list[PackageRecord] = []
    found: list[PackageRouteRecord] = []

    async def put(batch: list[PackageRecord]) -> int:
        outcomes = await asyncio.gather(
            *(store.put_package(r) for r in batch), return_exceptions=True
        )
        failures: list[Exception] = []
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                failures.append(outcome)
            elif outcome is not None:
                raise outcome  # a cancellation: the signal is the message
        if failures:
            landed = packages + len(batch) - len(failures)
            raise ImportStopped(failures[0], counts, landed, 0) from failures[0]
        return len(batch)

    try:
        for item in _items(copy, size, "importing", progress):
            if isinstance(item, PackageRecord):
                pending.append(item)
                if len(pending) == BATCH:
                    packages += await put(pending)
                    pending.clear()
            elif isinstance(item, PackageRouteRecord):
                found.append(item)
        packages += await put(pending)
        # put_package re-pointed each type at its newest package; set them as exported.
        for route in found:
            await store.put_package_route(route.workflow_type, route.content_hash)
            routes += 1
    except ImportStopped:
        raise
    except Exception as exc:  # the server, or the copy's temporary file
        raise ImportStopped(exc, counts, packages, routes) from exc
