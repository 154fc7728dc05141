"""What the commands print: tables, sizes, times, JSON, a progress line, and the one
line of an error.

Tables and the progress line are for people; ``--json`` is for scripts. An error is
one line on stderr, never a traceback, cut at ``MAX_MESSAGE`` characters.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

SHORT = 12  # hash characters shown in tables and messages
MAX_MESSAGE = 300  # characters of one error line; a longer one is cut


def short_hash(content_hash: str) -> str:
    return content_hash if len(content_hash) <= SHORT else content_hash[:SHORT] + "…"


def size_text(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


def time_text(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in [headers, *rows])


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


class ProgressLine:
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
            text = f"{phase} {items} packages, {size_text(done)}"
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


def say_error(message: str) -> None:
    """``message`` as one ``kvstore: …`` line on stderr, its white space folded."""
    line = " ".join(message.split())
    if len(line) > MAX_MESSAGE:
        line = line[: MAX_MESSAGE - 1] + "…"
    print(f"kvstore: {line}", file=sys.stderr)
