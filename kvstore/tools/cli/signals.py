"""Stopping on a signal: the first SIGINT, SIGTERM or SIGHUP unwinds the command like an
error, so the embedded server is stopped and the lock released; later ones are ignored,
so that the clean-up itself is not cut short. Exit status 128 + the signal's number
(130, 143, 129).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from types import FrameType

from kvstore.tools.cli.output import say_error

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A SIGINT, SIGTERM or SIGHUP arrived: unwind, stop the server, exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def catch_signals() -> None:
    """From now on, the first of ``SIGNALS`` raises ``Interrupted`` where the program is."""
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)


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


def interrupted(signum: int, command: str | None = None) -> int:
    """Say that ``signum`` stopped ``command``; the exit status, 128 + ``signum``."""
    name = signal.Signals(signum).name
    said = "interrupted" if signum == signal.SIGINT else f"terminated ({name})"
    if command in WRITES:
        said += "; each write is all or nothing: `kvstore ls` shows which were made"
    say_error(said)
    return 128 + signum
