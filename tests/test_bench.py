"""``python -m bench --small`` runs end to end and reports all five figures.

Only the shape of the report is checked: speed is the bench's business, not the tests'.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"put_one", "put_concurrent", "list_packages", "route_lookup", "memory"}


def test_small_bench_reports_every_figure(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--small", "--json", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(report.read_text())["figures"]
    assert set(figures) == FIGURES
    for name, figure in figures.items():
        assert figure["store"] > 0 and figure["floor"] > 0, name
        assert figure["ratio"] > 0, name
        assert figure["met"] in (True, False, None), name
        assert name in done.stdout, "the table names every figure"
    staleness = figures["route_lookup"]["extra"]
    assert staleness["staleness_samples"] > 0
    assert staleness["staleness_p99_ms"] >= 0
    assert figures["list_packages"]["extra"]["iter_packages_peak_bytes"] > 0
