"""The command line's grammar: every command, its arguments and their help.

A wrong command line is one line on stderr and exit 2, like every other failure.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, NoReturn

from kvstore.tools.cli.common import EXIT_USAGE
from kvstore.tools.embedded_server import default_data_dir


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


def _grace(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more: {text!r}")
    return value


GRACE_HELP = (
    "spare blobs written within this many seconds (default 3600); it must exceed the "
    "writers' retry_budget + timeout"
)


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
    """The ``kvstore`` parser; the server options are accepted before and after a command."""
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
    sub.add_argument(
        "--grace",
        type=_grace,
        default=3600.0,
        metavar="SECONDS",
        help="with --repair: " + GRACE_HELP,
    )
    sub.add_argument("--json", action="store_true", help="JSON for scripts")

    sub = command(
        "gc",
        "remove the archives (blobs, layout 2) no package refers to, but those written "
        "within the grace period; on every primary of a cluster",
    )
    sub.add_argument("--grace", type=_grace, default=3600.0, metavar="SECONDS", help=GRACE_HELP)
    sub.add_argument("--dry-run", action="store_true", help="count what would go; remove nothing")
    sub.add_argument("--json", action="store_true", help="JSON for scripts")

    sub = command(
        "migrate",
        "move the namespace from layout 1 (archives inside rows) to layout 2 (archives as "
        "blobs), online; every engine must first run a release that reads layout 2",
    )
    sub.add_argument(
        "--dry-run", action="store_true", help="count what would be migrated; change nothing"
    )
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
