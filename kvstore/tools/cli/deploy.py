"""``kvstore deploy``: archives stored and their type(s) routed to the last one given.

Several files are read and put in batches, so memory holds one batch at a time; a
failure says how many files were deployed, and deploying them again is safe.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kvstore import PackageRecord, RedisPackageStore
from kvstore.records import check_text
from kvstore.tools.cli.common import EXIT_USAGE, Action, CliError, given_url
from kvstore.tools.cli.explain import explain_failure
from kvstore.tools.cli.lookup import route_arg
from kvstore.tools.cli.output import ProgressLine, short_hash, size_text

# Files read and put together by one deploy: memory holds one batch, at most BATCH
# files and, unless one file alone is larger, BATCH_BYTES of archives.
BATCH = 32
BATCH_BYTES = 64 << 20


def _readable(path: Path) -> None:
    """Refuse, before anything is written, a file that cannot be deployed."""
    if path.is_dir():
        raise CliError(f"{path} is a folder; name the archive files to deploy")
    # Opening a FIFO waits for a writer, and a device may never end: neither is an archive.
    if path.exists() and not path.is_file():
        raise CliError(f"{path} is not a regular file; name the archive files to deploy")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}; nothing was deployed") from None


def cmd_deploy(args: argparse.Namespace) -> Action:
    paths = [Path(name) for name in args.file]
    also: list[str] = args.also or []
    if args.hash is not None and len(paths) > 1:
        raise CliError(
            "--hash names one file's hash; with several files each is hashed (SHA-256)",
            EXIT_USAGE,
        )
    for path in paths:
        _readable(path)
    if len(paths) == 1:
        return _deploy_one(args.type, paths[0], args.hash, also)
    url, timeout = given_url(args), args.timeout
    return _deploy_many(args.type, paths, also, lambda text: explain_failure(text, url, timeout))


def _record(workflow_type: str, data: bytes, content_hash: str, at: datetime) -> PackageRecord:
    try:
        return PackageRecord(workflow_type, content_hash, data, at)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _deploy_one(workflow_type: str, path: Path, given: str | None, also: list[str]) -> Action:
    data = path.read_bytes()
    content_hash = given if given is not None else hashlib.sha256(data).hexdigest()
    record = _record(workflow_type, data, content_hash, datetime.now(timezone.utc))
    for extra in also:
        route_arg(extra, content_hash)

    async def run(store: RedisPackageStore) -> None:
        await _put(store, record, also)
        print(f"deployed {record.workflow_type} {content_hash} ({size_text(len(data))})")
        for routed in dict.fromkeys([record.workflow_type, *also]):
            print(f"route {routed} -> {short_hash(content_hash)}")

    return run


async def _put(store: RedisPackageStore, record: PackageRecord, also: list[str]) -> None:
    if also:
        await store.put_package_with_routes(record, also)
    else:
        await store.put_package(record)


def _deploy_many(
    workflow_type: str, paths: list[Path], also: list[str], explain: Callable[[str], str]
) -> Action:
    """Deploy every file as one deploy each would, in one command.

    Each file is stamped ``now + i`` microseconds, ``i`` its place on the command line,
    so the store lists them in that order; a file whose content repeats an earlier one's
    counts at its last place, as a second deploy of it would. Puts run concurrently,
    ``BATCH`` at a time, each re-pointing the route as any deploy does, so while they run
    the route points at one of them; the last file is put alone, after all the others,
    so the route ends at it.
    """
    for given in [workflow_type, *also]:  # checked now; the hashes once files are read
        try:
            check_text(given, "workflow_type")
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None

    async def run(store: RedisPackageStore) -> None:
        start = datetime.now(timezone.utc)
        *others, final = enumerate(paths)
        # The last file alone, after every other: the route ends at it.
        batches = [*_batches(others), [final]]
        progress = ProgressLine(sys.stderr)
        deployed = total_bytes = 0
        records: list[tuple[PackageRecord, Path]] = []
        reader_here = True
        try:
            for batch in batches:
                records = _read_batch(workflow_type, batch, start, deployed, len(paths))
                await _put_batch(store, records, also, deployed, len(paths), explain)
                deployed += len(records)
                total_bytes += sum(len(r.archive) for r, _ in records)
                if reader_here:
                    reader_here = _report(progress, records, deployed, len(paths))
        finally:
            progress.close()
        if not reader_here:
            raise BrokenPipeError  # every file is deployed; main exits 141 quietly
        last = records[-1][0]
        print(f"deployed {deployed} files ({size_text(total_bytes)}) as {workflow_type}")
        for routed in dict.fromkeys([workflow_type, *also]):
            print(f"route {routed} -> {short_hash(last.content_hash)} (the last file, {paths[-1]})")

    return run


def _batches(places: list[tuple[int, Path]]) -> Iterator[list[tuple[int, Path]]]:
    """``places`` cut into runs of at most ``BATCH`` files and ``BATCH_BYTES`` (by the
    files' sizes now; a file alone may be larger)."""
    batch: list[tuple[int, Path]] = []
    size = 0
    for place in places:
        try:
            grows = place[1].stat().st_size
        except OSError as exc:  # gone since it was checked
            raise _unreadable(place[1], exc) from None
        if batch and (len(batch) == BATCH or size + grows > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(place)
        size += grows
    if batch:
        yield batch


def _read_batch(
    workflow_type: str, batch: list[tuple[int, Path]], start: datetime, before: int, total: int
) -> list[tuple[PackageRecord, Path]]:
    """The records of ``batch``'s files, ``before`` of ``total`` files deployed so far;
    a file that cannot be read now (removed since it was checked) ends the deploy."""
    records = []
    for i, path in batch:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _unreadable(path, exc, before, total) from None
        at = start + timedelta(microseconds=i)
        records.append((_record(workflow_type, data, hashlib.sha256(data).hexdigest(), at), path))
    return records


def _unreadable(path: Path, exc: OSError, deployed: int = 0, total: int = 0) -> CliError:
    """``path`` could not be read once the deploy began: say so, and how far it got
    (batches go in command-line order, so the first ``deployed`` files)."""
    if not deployed:
        return CliError(f"{path}: {exc.strerror or exc}; nothing was deployed")
    return CliError(
        f"{path}: {exc.strerror or exc}; the first {deployed} of {total} files were "
        "deployed (deploying them again is safe)"
    )


async def _put_batch(
    store: RedisPackageStore,
    records: list[tuple[PackageRecord, Path]],
    also: list[str],
    before: int,
    total: int,
    explain: Callable[[str], str],
) -> None:
    """Put ``records`` together; on a failure, say how far the deploy got.

    Of files with the same content in one batch only the last is put: two concurrent
    puts of one row could land in either order, and the later place must win.
    """
    latest = {record.content_hash: (record, path) for record, path in records}
    outcomes = await asyncio.gather(
        *(_put(store, record, also) for record, _ in latest.values()), return_exceptions=True
    )
    failed = [
        (path, exc)
        for (_, path), exc in zip(latest.values(), outcomes, strict=True)
        if exc is not None
    ]
    if not failed:
        return
    path, exc = failed[0]
    if not isinstance(exc, Exception):
        raise exc  # a cancellation: the signal is the message
    landed = before + len(latest) - len(failed)
    if not landed:
        raise CliError(f"{explain(str(exc))}; nothing was deployed") from None
    more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
    raise CliError(
        f"{explain(str(exc))}; {landed} of {total} files were deployed, {path}{more} "
        "perhaps not (deploying them again is safe)"
    ) from None


def _report(
    progress: ProgressLine, records: list[tuple[PackageRecord, Path]], done: int, total: int
) -> bool:
    """Print a batch's lines; ``False`` once the reader of stdout has gone away."""
    progress.clear()
    try:
        for record, path in records:
            size = size_text(len(record.archive))
            print(f"deployed {record.workflow_type} {record.content_hash} ({size}) {path}")
        sys.stdout.flush()
    except BrokenPipeError:
        # Stopping here would leave the route at some file of this batch: finish the
        # deploy with nothing more to say, and exit 141 after.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
    progress("deploying", done, total, done)
    return True
