"""The documentation site builds with every warning an error, and the benchmarks page's
charts come from the command it shows. Both need the docs extra, and skip without it."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# A site build and a chart run are processes of their own, of seconds.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "docs" / "assets"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


def needs(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]'")


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    needs("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    # The API reference is rendered from the docstrings, not left as a directive.
    reference = (tmp_path / "reference" / "kvstore" / "index.html").read_text(encoding="utf-8")
    assert 'id="kvstore.RedisPackageStore.from_url"' in reference
    assert ":::" not in reference


def test_the_charts_command_draws_every_chart_the_page_shows(tmp_path: Path) -> None:
    needs("matplotlib")
    page = BENCHMARKS.read_text(encoding="utf-8")
    block = re.search(r"^## Charts$.*?^```sh\n(.*?)^```", page, re.M | re.S)
    assert block is not None
    (line,) = block.group(1).splitlines()
    # Run as written, from a checkout's root, on the committed run's JSON.
    (tmp_path / "docs" / "assets").mkdir(parents=True)
    for committed in ("bench-results.json", "bench-fleet.json"):
        shutil.copy(ASSETS / committed, tmp_path / "docs" / "assets")
    done = subprocess.run(
        ["bash", "-c", line],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    drawn = sorted(Path(path).name for path in done.stdout.split())
    shown = sorted(re.findall(r"\]\(assets/([\w-]+\.svg)\)", page))
    assert drawn == shown == sorted(path.name for path in ASSETS.glob("*.svg"))
    for name in drawn:
        svg = (tmp_path / "docs" / "assets" / name).read_text(encoding="utf-8")
        assert svg.startswith("<?xml") and "<svg" in svg, name


def test_the_charts_command_says_what_to_install_without_matplotlib() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['matplotlib'] = None; import bench.charts"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "python -m bench.charts needs matplotlib, which the docs extra brings: "
        "pip install -e '.[docs]'"
    )
