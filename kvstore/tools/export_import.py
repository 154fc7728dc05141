"""Export a namespace to one file and import it back, streamed both ways.

The file is a msgpack stream of maps, version 1:

1. a header ``{"format": "kvstore-export", "version": 1, "namespace": str,
   "exported_at": timestamp}``;
2. one ``{"kind": "package", "workflow_type": str, "content_hash": str,
   "deployed_at": timestamp, "archive": bin}`` per package, in deploy order;
3. one ``{"kind": "route", "workflow_type": str, "content_hash": str}`` per route;
4. a trailer ``{"kind": "end", "packages": int, "routes": int}``.

Instants are msgpack timestamps (extension -1), exact to the microsecond in any year.
The trailer makes a cut-off file detectable: ``import_file`` reads the whole file once
to check it before writing anything, so a damaged file changes nothing. Memory is
bounded by one package (plus the routes, which are small) in both directions.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]

from kvstore import PackageRecord, PackageRouteRecord, RedisPackageStore

FORMAT = "kvstore-export"
VERSION = 1

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
    try:
        with open(partial, "wb") as out:
            header = {
                "format": FORMAT,
                "version": VERSION,
                "namespace": store.namespace,
                "exported_at": datetime.now(timezone.utc),
            }
            written += out.write(packer.pack(header))
            async for record in store.iter_packages(chunk=100):
                item = {
                    "kind": "package",
                    "workflow_type": record.workflow_type,
                    "content_hash": record.content_hash,
                    "deployed_at": record.deployed_at,
                    "archive": record.archive,
                }
                written += out.write(packer.pack(item))
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
                written += out.write(packer.pack(item))
            trailer = {"kind": "end", "packages": packages, "routes": len(routes)}
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


def _decode(item: object) -> PackageRecord | PackageRouteRecord | Counts:
    if not isinstance(item, dict):
        raise ExportFormatError("an item is not a map")
    kind = item.get("kind")
    try:
        if kind == "package":
            archive, deployed_at = item.get("archive"), item.get("deployed_at")
            if not isinstance(archive, bytes) or not isinstance(deployed_at, datetime):
                raise ExportFormatError("a package lacks its archive or deployed_at")
            return PackageRecord(
                _text(item, "workflow_type"), _text(item, "content_hash"), archive, deployed_at
            )
        if kind == "route":
            return PackageRouteRecord(_text(item, "workflow_type"), _text(item, "content_hash"))
    except (TypeError, ValueError) as exc:
        raise ExportFormatError(str(exc)) from None
    if kind == "end":
        packages, routes = item.get("packages"), item.get("routes")
        if isinstance(packages, int) and isinstance(routes, int):
            return Counts(packages, routes)
    raise ExportFormatError(f"unknown item {kind!r}")


def _items(
    path: Path, phase: str, progress: Progress
) -> Iterator[PackageRecord | PackageRouteRecord | Counts]:
    """Every item after the header, checked; raises ``ExportFormatError`` on any flaw."""
    total = path.stat().st_size
    with open(path, "rb") as source:
        unpacker = msgpack.Unpacker(
            source,
            raw=False,
            timestamp=3,  # timestamps as aware UTC datetimes
            max_buffer_size=2**31 - 1,  # the default (100 MiB) would refuse large archives
        )
        try:
            header = next(unpacker, None)
            if (
                not isinstance(header, dict)
                or header.get("format") != FORMAT
                or not isinstance(header.get("version"), int)
            ):
                raise ExportFormatError("no kvstore export header")
            if header["version"] != VERSION:
                raise ExportFormatError(
                    f"export version {header['version']}; this kvstore reads version {VERSION}"
                )
            for count, item in enumerate(unpacker, 1):
                progress(phase, unpacker.tell(), total, count)
                yield _decode(item)
        except (ValueError, OverflowError, msgpack.UnpackException) as exc:
            # Bad msgpack, bad UTF-8, an item over the size limit, an instant out of range.
            raise ExportFormatError(str(exc) or type(exc).__name__) from None


def check_file(path: Path, progress: Progress = _no_progress) -> Counts:
    """Read all of ``path`` and return its counts if it is a complete, valid export."""
    packages = routes = 0
    end: Counts | None = None
    for item in _items(path, "checking", progress):
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
    ``deployed_at``. Routes of types the file does not name are left alone. The file
    is checked whole first (``check_file``), so a damaged file changes nothing; if the
    server fails part-way, running the import again completes it.
    """
    counts = check_file(path, progress)
    routes: list[PackageRouteRecord] = []
    batch: list[PackageRecord] = []
    for item in _items(path, "importing", progress):
        if isinstance(item, PackageRecord):
            batch.append(item)
            if len(batch) == BATCH:
                await asyncio.gather(*(store.put_package(r) for r in batch))
                batch.clear()
        elif isinstance(item, PackageRouteRecord):
            routes.append(item)
    await asyncio.gather(*(store.put_package(r) for r in batch))
    # put_package re-pointed each type at its newest package; set them as exported.
    for route in routes:
        await store.put_package_route(route.workflow_type, route.content_hash)
    return counts
