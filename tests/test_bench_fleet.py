"""``python -m bench.fleet``, tiny: it runs to the end on servers of its own, reports
every figure, every engine of every fleet lists the whole catalogue, a warm cache spares
the primary the archives, and so do replicas. How fast anything was is never checked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A server and engines, in processes of their own.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    "fleet_warm_sent",
    "fleet_warm_time",
    "fleet_warm_time_max",
    "fleet_cold_time",
    "fleet_cold_sent",
    "fleet_whole",
    "fleet_replicas_primary_sent",
    "fleet_replicas_time",
    "fleet_replicas_whole",
}
CONFIGS = ("none", "cold", "warm", "replicas")
REPLICAS = 2
ENGINES = (1, 2)
ARCHIVES = 20
SIZE = 65536


def test_the_fleet_bench_runs_tiny_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    args = ["--engines", ",".join(map(str, ENGINES)), "--archives", str(ARCHIVES)]
    args += ["--sizes", str(SIZE), "--rounds", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.fleet", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout
    assert all(name in said for name in FIGURES), said
    assert "2 cores" in said or f"{os.cpu_count()} cores" in said
    assert "The physical limit here: " in said
    assert "targets missed" in said.rstrip().splitlines()[-1]  # ran to the end

    report = json.loads(out.read_text())
    assert report["kind"] == "fleet"
    assert set(report["figures"]) == FIGURES
    assert report["replicas"] == REPLICAS
    # The server reports its replication stream apart, so its clients' bytes are exact.
    assert report["repl_counted"] is True
    # Judged where the run allows: its only size, its most engines up to 8.
    assert report["judged"] == {"size": SIZE, "engines": max(ENGINES)}
    (catalogue,) = report["catalogues"]
    assert catalogue["archives"] == ARCHIVES and catalogue["archive_bytes"] == ARCHIVES * SIZE
    assert [f["engines"] for f in catalogue["fleets"]] == list(ENGINES)
    for found in catalogue["fleets"]:
        k = found["engines"]
        for config in CONFIGS:
            fleet = found[config]
            # Every engine listed the whole catalogue, byte for byte, and the routes.
            assert fleet["whole"] == fleet["listings"] == k, (k, config)
            assert fleet["listed"] == [ARCHIVES] and fleet["routes"] == [1]
            assert fleet["median_s"] > 0 and fleet["max_s"] >= fleet["median_s"]
            assert len(fleet["replica_sent_bytes"]) == REPLICAS
        # Without a cache or with a cold one, every engine is sent every archive ...
        for config in ("none", "cold"):
            assert found[config]["sent_bytes"] >= k * ARCHIVES * SIZE
        # ... which the cold fleet leaves in the host's directory, and the warm one finds.
        assert found["cold"]["cached_files"] == [ARCHIVES]
        assert found["warm"]["sent_bytes"] < 0.1 * found["none"]["sent_bytes"]
        # Reading from replicas, the replicas sent the archives, not the primary; reading
        # from the primary, the replicas sent next to nothing.
        replicas = found["replicas"]
        assert replicas["replica_units"] > 0
        assert replicas["sent_bytes"] < found["none"]["sent_bytes"]
        assert sum(replicas["replica_sent_bytes"]) >= k * ARCHIVES * SIZE - replicas["sent_bytes"]
        assert sum(found["none"]["replica_sent_bytes"]) < 0.1 * ARCHIVES * SIZE
    figures = report["figures"]
    assert figures["fleet_whole"]["met"] is True
    assert figures["fleet_replicas_whole"]["met"] is True
    assert figures["fleet_warm_sent"]["ratio"] < 0.1
    assert figures["fleet_replicas_primary_sent"]["ratio"] < 1


def test_the_fleet_chart_draws_from_a_fleet_json(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: pip install -e '.[docs]'")
    fleets = [
        {
            "engines": k,
            **{
                config: {"median_s": t * k, "max_s": t * k * 1.1, "sent_bytes": b * k, "rounds": 1}
                for config, t, b in (("none", 1.0, 2e8), ("cold", 1.2, 2e8), ("warm", 0.5, 4e5))
            },
            "replicas": {
                "median_s": 0.8 * k,
                "max_s": 0.9 * k,
                "sent_bytes": 3e4 * k,
                "replica_sent_bytes": [1e8 * k, 1e8 * k],
                "rounds": 1,
            },
        }
        for k in (1, 4, 8)
    ]
    results = {
        "kind": "fleet",
        "server_version": "valkey 9",
        "python": "3.11",
        "cores": 2,
        "replicas": 2,
        "catalogues": [{"size": 1 << 20, "archives": 200, "fleets": fleets}],
    }
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(results))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for how in (["--fleet", str(path)], [str(path)]):
        done = subprocess.run(
            [sys.executable, "-m", "bench.charts", *how, "--out", str(tmp_path / "out")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(tmp_path / "out" / "bench-fleet.svg")]
        svg = (tmp_path / "out" / "bench-fleet.svg").read_text(encoding="utf-8")
        assert svg.startswith("<?xml") and "<svg" in svg
