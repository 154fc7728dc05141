"""What a figure is, how it is judged, and how the report prints it.

Every number prints with three significant digits, in one unit per kind of quantity:
time per call in microseconds (``us``), a listing in milliseconds (``ms``), throughput in
calls per second (``/s``), client memory in MiB, server memory in bytes per package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def sig3(value: float) -> str:
    """``value`` with three significant digits and no exponent: 0.00123, 1.50, 12300."""
    if not math.isfinite(value) or value == 0:
        return "0" if value == 0 else str(value)
    for _ in range(2):  # a second pass when rounding carried into the next decade
        decimals = 2 - math.floor(math.log10(abs(value)))
        value = round(value, decimals)
    if decimals <= 0:
        return str(int(value))
    return f"{value:.{decimals}f}"


@dataclass
class Figure:
    """One line of the table.

    ``store`` is what the store reached, ``floor`` what raw redis-py (or another
    reference, as ``what`` says) reached doing the same work in the same run; ``ratio``
    is ``store / floor``, or ``floor / store`` where ``what`` says so (a speed-up).
    ``judged`` names the number that is compared with ``target`` as ``sense`` says:
    ``"ratio"``, or ``"store"`` for a bound on the store's own figure in ``unit``.
    Without a target a figure is reported only.
    """

    name: str
    what: str
    store: float
    floor: float | None
    unit: str
    ratio: float | None
    target: float | None = None
    sense: str = "report"  # "<=", ">=", or "report"
    judged: str = "ratio"  # "ratio" or "store"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        value = self.ratio if self.judged == "ratio" else self.store
        if value is None:
            return False
        return value <= self.target if self.sense == "<=" else value >= self.target

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        unit = "" if self.judged == "ratio" else f" {self.unit}"
        return f"{self.sense} {sig3(self.target)}{unit}"


def missed(figures: list[Figure]) -> list[Figure]:
    """The figures whose target was not met (figures without a target never are)."""
    return [f for f in figures if f.met is False]


def shown(value: Any) -> str:
    # Counts are exact; measured quantities get three significant digits.
    if isinstance(value, float):
        return sig3(value)
    return str(value)


def table(figures: list[Figure]) -> str:
    header = ("figure", "store", "floor", "unit", "ratio", "target", "result")
    rows = [header]
    for f in figures:
        result = {True: "met", False: "MISSED", None: "reported"}[f.met]
        rows.append(
            (
                f.name,
                sig3(f.store),
                "-" if f.floor is None else sig3(f.floor),
                f.unit,
                "-" if f.ratio is None else sig3(f.ratio),
                f.target_text(),
                result,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:6], widths[1:6], strict=True)]
        cells.append(row[6])
        lines.append("  ".join(cells))
    lines.append("")
    for f in figures:
        lines.append(f"{f.name}: {f.what}")
        for key, value in f.extra.items():
            lines.append(f"    {key} = {shown(value)}")
    return "\n".join(lines)


def grid(title: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A small table of numbers under ``title``, every number to three digits."""
    cells = [header] + [tuple(shown(v) for v in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title]
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]))
    return "\n".join(lines)
