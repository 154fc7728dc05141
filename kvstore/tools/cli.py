"""The operator's command line: ``kvstore deploy | ls | routes | route | rm | show |
export | import | setup | demo``.

With ``--url`` (or ``KVSTORE_URL``) every command talks to that server; without, it
starts the embedded server (``kvstore.tools.embedded_server``) over its data folder,
locked, and stops it before exiting. Expected failures print one line to stderr, never a
traceback, and exit 1 (2 for a wrong command line); SIGINT, SIGTERM and SIGHUP stop the
server and exit 128 + the signal's number; a closed output pipe exits 141 quietly. No
message carries a password.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
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

from kvstore import PackageRecord, PackageRouteRecord, RedisPackageStore, StoreError
from kvstore.tools.embedded_server import (
    EmbeddedServer,
    FolderInUse,
    LocalServerError,
    default_data_dir,
)
from kvstore.tools.export_import import ExportFormatError, export_file, import_file

EXIT_ERROR = 1
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

    def close(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


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


def cmd_deploy(args: argparse.Namespace) -> Action:
    data = Path(args.file).read_bytes()
    content_hash = args.hash if args.hash is not None else hashlib.sha256(data).hexdigest()
    also: list[str] = args.also or []
    try:
        record = PackageRecord(args.type, content_hash, data, datetime.now(timezone.utc))
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    for extra in also:
        _route_arg(extra, content_hash)

    async def run(store: RedisPackageStore) -> None:
        if also:
            await store.put_package_with_routes(record, also)
        else:
            await store.put_package(record)
        print(f"deployed {record.workflow_type} {content_hash} ({_size(len(data))})")
        for workflow_type in dict.fromkeys([record.workflow_type, *also]):
            print(f"route {workflow_type} -> {_short(content_hash)}")

    return run


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
                f"the route of {', '.join(stranded)} points at {_short(target)}; route it "
                "elsewhere first, or pass --force to leave the route without an archive"
            )
        await store.delete_package(record.workflow_type, target)
        print(f"removed {record.workflow_type} {target}")
        if stranded:
            print(
                f"kvstore: warning: the route of {', '.join(stranded)} still points at "
                f"{_short(target)}, which has no archive now",
                file=sys.stderr,
            )

    return run


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

    async def run(store: RedisPackageStore) -> None:
        record = await _find(store, wanted.workflow_type, wanted.content_hash)
        if to_stdout:
            _write_all(sys.stdout.buffer, record.archive)
        else:
            Path(args.output).write_bytes(record.archive)
            print(f"wrote {_size(len(record.archive))} to {args.output}", file=sys.stderr)

    return run


def cmd_export(args: argparse.Namespace) -> Action:
    path = Path(args.file)
    if not path.parent.is_dir():
        raise CliError(f"{path.parent}: no such folder")
    if path.is_dir():
        raise CliError(f"{path} is a folder; name the file to write")

    async def run(store: RedisPackageStore) -> None:
        progress = _ProgressLine(sys.stderr)
        try:
            counts = await export_file(store, path, progress)
        finally:
            progress.close()
        print(f"exported {counts.packages} packages and {counts.routes} routes to {path}")

    return run


def cmd_import(args: argparse.Namespace) -> Action:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path}: no such file")

    async def run(store: RedisPackageStore) -> None:
        progress = _ProgressLine(sys.stderr)
        try:
            counts = await import_file(store, path, progress)
        except ExportFormatError as exc:
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
    connect: Callable[[], RedisPackageStore], namespace: str, restart: Callable[[], None] | None
) -> None:
    def say(text: str) -> None:
        print(text, flush=True)

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

    if restart is None:
        say("the server is not ours to restart (--url): the engines reconnect instead")
    else:
        say("stopping the server and starting it again")
        restart()
    async with connect() as again:
        after = (await again.list_packages(), await again.list_package_routes())
    if after != before:
        raise CliError("the catalogue differs after the restart")
    say(
        f"after the restart: {len(after[0])} packages and {len(after[1])} routes, exactly as before"
    )


def run_demo(args: argparse.Namespace) -> None:
    # Never the operator's own namespace: the tour writes made-up packages.
    namespace = args.namespace or f"demo-{secrets.token_hex(4)}"
    url = args.url or os.environ.get("KVSTORE_URL")
    if url:
        run_async(_tour(lambda: _open(url, namespace, args.timeout), namespace, None))
        return
    with contextlib.ExitStack() as stack:
        if args.data_dir:
            folder = Path(args.data_dir)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvstore-demo-")))
        server = stack.enter_context(EmbeddedServer(folder))
        print(f"embedded server on {server.address}, data in {server.data_dir}", flush=True)

        def restart() -> None:
            server.stop()
            server.start()

        run_async(_tour(lambda: _open(server.url, namespace, args.timeout), namespace, restart))
        print("stopping the server", flush=True)


# Wiring.


@contextlib.contextmanager
def _server_url(args: argparse.Namespace) -> Iterator[str]:
    url = args.url or os.environ.get("KVSTORE_URL")
    if url:
        if args.data_dir:
            raise CliError("--data-dir is for the embedded server; drop it or --url", EXIT_USAGE)
        yield url
        return
    folder = Path(args.data_dir) if args.data_dir else default_data_dir()
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvstore", description="Deploy, inspect and move workflow packages in a kvstore."
    )
    _add_connection(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_connection(sub, top=False)
        return sub

    sub = command("deploy", "store a package archive and route its type(s) to it")
    sub.add_argument("file", metavar="FILE")
    sub.add_argument("--type", required=True, help="workflow type")
    sub.add_argument(
        "--also", action="append", metavar="TYPE", help="another type to route (repeatable)"
    )
    sub.add_argument("--hash", help="content hash (default: SHA-256 of FILE, lowercase hex)")

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
        "namespace unless --url, --data-dir or --namespace say otherwise)",
    )
    return parser


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
    except (StoreError, FolderInUse) as exc:
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
        name = signal.Signals(signum).name
        _say_error("interrupted" if signum == signal.SIGINT else f"terminated ({name})")
        return 128 + signum
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
    args = build_parser().parse_args(argv)
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
