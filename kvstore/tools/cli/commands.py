"""The commands besides deploy and demo: ``ls``, ``routes``, ``route``, ``rm``, ``show``,
``export``, ``import``, ``setup``, ``status``, ``check``, ``gc`` and ``migrate``.

Each ``cmd_*`` checks its arguments at once, before any server is started, and returns
what to do with a store (an ``Action``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from redis.exceptions import NoPermissionError

from kvstore import BackendError, RedisPackageStore
from kvstore.tools.cli.common import EXIT_ERROR, Action, CliError, given_url
from kvstore.tools.cli.explain import explain_failure
from kvstore.tools.cli.lookup import (
    AmbiguousHash,
    find_package,
    holders_of,
    route_arg,
    routes_on,
)
from kvstore.tools.cli.output import (
    ProgressLine,
    print_json,
    short_hash,
    size_text,
    table,
    time_text,
)


def cmd_ls(args: argparse.Namespace) -> Action:
    wanted: str | None = args.type

    async def run(store: RedisPackageStore) -> None:
        routes = await store.list_package_routes()
        heads = [h async for h in store.iter_package_heads()]  # archives stay on the server
        routed_by = routes_on(heads, routes)
        rows: list[tuple[str, str, int, datetime, list[str]]] = []
        for h in heads:
            by = routed_by.get((h.workflow_type, h.content_hash), [])
            # --type T: T's packages, and the one T's route points at wherever it is stored.
            if wanted is None or h.workflow_type == wanted or wanted in by:
                rows.append((h.workflow_type, h.content_hash, h.size, h.deployed_at, by))
        if args.json:
            keys = ("workflow_type", "content_hash", "size", "deployed_at", "routed_by")
            print_json(
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
            cells = [
                [t, short_hash(h), size_text(n), time_text(at), ",".join(by)]
                for t, h, n, at, by in rows
            ]
            print(table(["TYPE", "HASH", "SIZE", "DEPLOYED (UTC)", "ROUTED BY"], cells, {2}))

    return run


def cmd_routes(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        routes = await store.list_package_routes()
        held = await holders_of(store, {r.content_hash for r in routes})
        if args.json:
            print_json(
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
            print(table(["TYPE", "HASH", "NOTE"], cells, set()))

    return run


def cmd_route(args: argparse.Namespace) -> Action:
    wanted = route_arg(args.type, args.hash)

    async def run(store: RedisPackageStore) -> None:
        content_hash = wanted.content_hash
        before = await store.get_package_route(wanted.workflow_type)
        if not args.force:
            content_hash = await _routable(store, wanted.workflow_type, content_hash, before)
        await store.put_package_route(wanted.workflow_type, content_hash)
        was = "(none)" if before is None else short_hash(before)
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
        found = await find_package(store, workflow_type, text, any_type=True)
    except AmbiguousHash:
        raise  # --force would route to the prefix itself, as text
    except CliError as exc:
        raise CliError(f"{exc}; {force}") from None
    content_hash = found.content_hash
    if found.workflow_type == workflow_type or content_hash == current:
        return content_hash
    holders = sorted((await holders_of(store, {content_hash})).get(content_hash, set()))
    raise CliError(
        f"no package {workflow_type} {short_hash(content_hash)} is stored (that hash is stored "
        f"under {', '.join(holders) or found.workflow_type}); {force}"
    )


def cmd_rm(args: argparse.Namespace) -> Action:
    wanted = route_arg(args.type, args.hash)

    async def run(store: RedisPackageStore) -> None:
        record = await find_package(store, wanted.workflow_type, wanted.content_hash)
        target = record.content_hash
        routing = [
            r.workflow_type for r in await store.list_package_routes() if r.content_hash == target
        ]
        # Routes stay served if the same archive is also stored under another type.
        held = await holders_of(store, {target}) if routing else {}
        others = held.get(target, set()) - {record.workflow_type}
        stranded = routing if not others else []
        if stranded and not args.force:
            raise CliError(
                f"{_routes_of(stranded)} at {short_hash(target)}; route "
                f"{'them' if len(stranded) > 1 else 'it'} elsewhere first, or pass --force "
                f"to leave {'them' if len(stranded) > 1 else 'it'} without an archive"
            )
        await store.delete_package(record.workflow_type, target)
        print(f"removed {record.workflow_type} {target}")
        if stranded:
            print(
                f"kvstore: warning: {_routes_of(stranded, still=True)} at "
                f"{short_hash(target)}, which has no archive now",
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
    wanted = route_arg(args.type, args.hash)
    to_stdout = args.output in (None, "-")
    if to_stdout and sys.stdout.isatty():
        raise CliError("refusing to write an archive to a terminal; use -o FILE or redirect")
    if not to_stdout:
        _output_file(args.output)

    async def run(store: RedisPackageStore) -> None:
        record = await find_package(store, wanted.workflow_type, wanted.content_hash)
        if to_stdout:
            _write_all(sys.stdout.buffer, record.archive)
        else:
            Path(args.output).write_bytes(record.archive)
            print(f"wrote {size_text(len(record.archive))} to {args.output}", file=sys.stderr)

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
        progress = ProgressLine(sys.stderr)
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
    if not path.exists():
        raise CliError(f"{path}: no such file")
    if not path.is_file():  # a FIFO or a device: reading it may wait or go on for ever
        raise CliError(f"{path} is not a regular file; name the export file to read")
    from kvstore.tools import export_import  # needs msgpack, of the cli extra

    url, timeout = given_url(args), args.timeout

    async def run(store: RedisPackageStore) -> None:
        progress = ProgressLine(sys.stderr)
        try:
            counts = await export_import.import_file(store, path, progress)
        except export_import.ExportFormatError as exc:
            raise CliError(f"{path} is not a usable kvstore export: {exc}") from None
        except export_import.ImportStopped as exc:
            cause = str(exc.cause) or type(exc.cause).__name__
            raise CliError(f"{explain_failure(cause, url, timeout)}; {exc}") from None
        finally:
            progress.close()
        print(f"imported {counts.packages} packages and {counts.routes} routes from {path}")

    return run


def cmd_setup(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        # Loading is the store's: one line per server (every primary of a cluster).
        try:
            lines = await store.load_library()
        except BackendError as exc:
            if not isinstance(exc.__cause__, NoPermissionError):
                raise
            # The store's message tells an engine to run setup, which this is.
            raise CliError(
                f"{store.server}: this credential may not FUNCTION LOAD, so it cannot load "
                "the kvstore library; run setup again with a credential that may "
                "(--url redis://USER:PASSWORD@host:port)"
            ) from None
        for line in lines:
            print(line)

    return run


def cmd_status(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        from kvstore.tools import status

        await _print_report(status.read_status(store), status.describe, args.json)

    return run


def cmd_check(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        from kvstore.tools import check

        reading = check.check_store(store, repair=args.repair, grace=args.grace)
        report = await _print_report(reading, check.describe, args.json)
        if not report.sound:
            sys.stdout.flush()
            raise SystemExit(EXIT_ERROR)  # the report is the message

    return run


def cmd_gc(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        from kvstore.tools import gc

        collecting = gc.collect_garbage(store, grace=args.grace, dry_run=args.dry_run)
        await _print_report(collecting, gc.describe, args.json)

    return run


def cmd_migrate(args: argparse.Namespace) -> Action:
    async def run(store: RedisPackageStore) -> None:
        from kvstore.tools import migrate

        progress = ProgressLine(sys.stderr)
        try:
            report = await migrate.migrate_namespace(store, dry_run=args.dry_run, progress=progress)
        except migrate.MigrationRefused as exc:
            raise CliError(f"namespace {store.namespace!r}: {exc}") from None
        finally:
            progress.close()
        if args.json:
            print_json(report.as_json())
        else:
            print("\n".join(migrate.describe(report)))
        if report.damaged:
            sys.stdout.flush()
            raise SystemExit(EXIT_ERROR)  # the report names them

    return run


class _Report(Protocol):
    def as_json(self) -> dict[str, Any]: ...


_R = TypeVar("_R", bound=_Report)


async def _print_report(
    reading: Awaitable[_R], describe: Callable[[_R], list[str]], json: bool
) -> _R:
    """What ``reading`` (of status or check, which speak to one server, or of gc) found,
    printed as JSON or as the lines ``describe`` makes of it."""
    try:
        found = await reading
    except TypeError as exc:  # a cluster URL
        raise CliError(str(exc)) from None
    if json:
        print_json(found.as_json())
    else:
        print("\n".join(describe(found)))
    return found
