"""``python -m bench.cluster``, small: it runs to the end on a cluster of its own and
reports every figure. Only what it reports is checked, never how fast anything was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A cluster and engines, in processes of their own.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    "spread_puts",
    "spread_listed_whole",
    "spread_busiest_share",
    "spread_busiest_used_memory",
    "layout1_held",
    "list_engines_median",
    "list_engines_max",
    "list_busiest_server_cpu",
    "list_busiest_net_share",
    "list_whole",
}
ARCHIVES = 40
ENGINES = 2


def test_the_cluster_bench_runs_small_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    # 40 archives of 256 KiB (10 MiB) on primaries of 8 MiB: more than one primary holds.
    args = ["--archives", str(ARCHIVES), "--size", "262144", "--engines", str(ENGINES)]
    args += ["--maxmemory", "8", "--rounds", "2", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.cluster", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout
    assert all(name in said for name in FIGURES), said
    assert "The physical limit here: " in said
    assert "targets missed" in said.rstrip().splitlines()[-1]  # ran to the end

    report = json.loads(out.read_text())
    figures = report["figures"]
    assert set(figures) == FIGURES
    # Layout 2: every put went in and every archive came back, byte for byte.
    spread = report["spread"]
    assert spread["fill"]["put"] == ARCHIVES and spread["fill"]["error"] is None
    assert spread["listing"]["listed"] == spread["listing"]["matched"] == ARCHIVES
    assert sum(n["archives"] for n in spread["nodes"]) == ARCHIVES
    assert sum(n["archive_bytes"] for n in spread["nodes"]) == ARCHIVES * 262144
    # Spread over the primaries: loose, as 40 digests may fall unevenly.
    assert figures["spread_busiest_share"]["store"] <= 60
    assert all(n["archives"] > 0 for n in spread["nodes"])
    # Layout 1 keeps the namespace on one primary, which fills, and says so.
    layout1 = report["layout1"]
    assert 0 < layout1["fill"]["put"] < ARCHIVES
    assert "OutOfMemoryError" in layout1["fill"]["error"]
    assert "maxmemory" in layout1["fill"]["error"]
    assert sum(n["archives"] > 0 for n in layout1["nodes"]) == 1
    # Both listings: every engine held the whole catalogue; layout 1's bytes from one node.
    for layout in ("1", "2"):
        listing = report["lists"][layout]
        assert listing["whole_listings"] == ENGINES
        assert listing["listed"] == [report["listing_archives"]] * ENGINES
    assert report["lists"]["1"]["busiest_net_share"] > 99
    assert figures["list_busiest_net_share"]["store"] < 99
    for name in ("list_engines_median", "list_engines_max"):
        assert figures[name]["store"] > 0 and figures[name]["floor"] > 0
