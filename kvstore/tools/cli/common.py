"""What every command shares: the exit codes, the expected failure, the shape of a
command, and where its server and store come from."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from kvstore import BackendError, RedisPackageStore
from kvstore.tools.cli.explain import is_final
from kvstore.tools.embedded_server import default_data_dir

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141, as a shell reports a tool killed by SIGPIPE

# A command, its arguments checked: what to do with a store once one is open.
Action = Callable[[RedisPackageStore], Awaitable[None]]


class CliError(Exception):
    """An expected failure: its message is the one line the operator sees."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def given_url(args: argparse.Namespace) -> str | None:
    """The server URL the operator gave, or ``None`` for the embedded server."""
    return args.url or os.environ.get("KVSTORE_URL") or None


def data_dir(given: str | None) -> Path:
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


def open_store(
    url: str, namespace: str, timeout: float, retry_budget: float | None = None
) -> RedisPackageStore:
    """A store on ``url`` in ``namespace``: each attempt waits at most ``timeout`` seconds,
    and transient failures are retried for as long (``--timeout``), or ``retry_budget``."""
    try:
        return RedisPackageStore.from_url(
            url,
            namespace=namespace,
            timeout=timeout,
            retry_budget=timeout if retry_budget is None else retry_budget,
        )
    except ValueError as exc:  # a bad URL or namespace; the message never shows a password
        raise CliError(str(exc), EXIT_USAGE) from None


async def first_contact(url: str, namespace: str, timeout: float) -> None:
    """Fail at once where retrying would only make the operator wait: a store that
    retries nothing sends one ``PING``, and a refused connection, a host that does not
    resolve, or no reply within ``timeout`` is the command's failure. Anything else (a
    server still loading, a missing password) is left to the command's own store, which
    retries what may pass and says the rest. The library's retry policy is unchanged: an
    engine's store keeps retrying a server that is restarting."""
    async with open_store(url, namespace, timeout, retry_budget=0) as probe:
        try:
            await probe.ping()
        except BackendError as exc:
            if is_final(str(exc)):
                raise
