"""The examples of the README and of the documentation's pages run as written, against a
real server, and say what they do; every example they show is run by a test."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvstore.server_process import LocalServer

from .conftest import fresh_namespace

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Every page an example may be shown on: the front page and the site's.
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
GETTING_STARTED = DOCS / "getting-started.md"
KEYSPACE = DOCS / "keyspace.md"
OBSERVABILITY = DOCS / "engines" / "observability.md"
# deployed_at as a row stores it.
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
# A checkout's extras (the Quick start), or the distribution by its own name.
INSTALL = r"pip install (-e '\.\[\w+\]'|'?kvstore-redis[\[ '`]|kvstore-redis$)"

# Every shell and Python block shown, by page, the heading it is under and its language,
# and what runs it as it is written.
RUN = {
    ("README.md", "## Quick start", "sh"): ".ci/run: its second line, the whole suite",
    ("README.md", "## Example", "python"): "test_the_example_rolls_back_to_a_stored_version",
    ("docs/getting-started.md", "## A first store", "python"): (
        "test_the_example_rolls_back_to_a_stored_version"
    ),
    ("docs/keyspace.md", "## Looking with redis-cli", "sh"): (
        "test_the_redis_cli_lines_read_what_the_example_stored"
    ),
    ("docs/engines/observability.md", "## Health", "python"): (
        "test_the_health_snippet_prints_what_its_comments_say"
    ),
    ("docs/engines/testing.md", "# Testing your engine", "python"): (
        "tests/test_testing_plugin.py: test_the_testing_example_runs_in_strict_mode"
    ),
    ("docs/benchmarks.md", "## Charts", "sh"): (
        "tests/test_docs.py: test_the_charts_command_draws_every_chart_the_page_shows"
    ),
}


def section(page: Path, heading: str, language: str) -> str:
    """The first ``language`` code block after ``heading`` on ``page``."""
    text = page.read_text(encoding="utf-8")
    found = re.search(rf"{re.escape(heading)}.*?```{language}\n(.*?)```", text, re.S)
    assert found is not None, (page.name, heading)
    return found.group(1)


def fenced(page: Path) -> list[tuple[str, str]]:
    """Each fenced block on ``page``: the heading it is under, and its language."""
    blocks = []
    heading = ""
    fence: str | None = None
    for line in page.read_text(encoding="utf-8").splitlines():
        if fence is not None:
            if line.strip() == "```":
                fence = None
        elif line.startswith("```"):
            fence = line[3:].strip()
            blocks.append((heading, fence))
        elif line.startswith("#"):
            heading = line
    return blocks


def test_every_example_shown_is_run_by_a_test() -> None:
    shown = {
        (page.relative_to(ROOT).as_posix(), heading, language)
        for page in PAGES
        for heading, language in fenced(page)
        if language in ("sh", "python")
    }
    assert shown == set(RUN)


def test_every_link_of_the_readme_names_a_file() -> None:
    # The front page's links are read on GitHub, where no site build checks them.
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8"))
    assert "docs/index.md" in links
    for link in links:
        assert (ROOT / link).is_file(), link


def run_example(url: str, namespace: str, page: Path = README, heading: str = "## Example") -> str:
    code = section(page, heading, "python")
    assert 'from_url("redis://127.0.0.1:6379", namespace="aion")' in code
    code = code.replace("redis://127.0.0.1:6379", url).replace('"aion"', repr(namespace))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout


@pytest.mark.parametrize(
    ("page", "heading"), [(README, "## Example"), (GETTING_STARTED, "## A first store")]
)
def test_the_example_rolls_back_to_a_stored_version(
    valkey_server: LocalServer, page: Path, heading: str
) -> None:
    out = run_example(valkey_server.url, fresh_namespace(), page, heading)
    records, routes = out.rstrip("\n").split("] [")
    # Deployed twice, rolled back to the first, the second unloaded: the route has its archive.
    assert records.count("PackageRecord(") == 1
    assert "PackageRecord(workflow_type='order', content_hash='19c7'" in records
    assert routes == "PackageRouteRecord(workflow_type='order', content_hash='19c7')]"


def test_the_redis_cli_lines_read_what_the_example_stored(valkey_server: LocalServer) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not on the PATH (.ci/run installs it)")
    namespace = fresh_namespace()
    run_example(valkey_server.url, namespace)
    lines = section(KEYSPACE, "To look with `redis-cli`:", "sh").splitlines()
    assert "SSUBSCRIBE" in lines[-1]  # waits for messages: not run here
    said = []
    for line in lines[:-1]:
        line = line.replace("{aion}", f"{{{namespace}}}")
        line = line.replace("redis-cli", f"redis-cli -u {shlex.quote(valkey_server.url)}")
        done = subprocess.run(["bash", "-c", line], capture_output=True, timeout=30, check=True)
        said.append(done.stdout.decode(errors="replace").strip())
    listed, routes, stamp = said
    assert re.fullmatch(rf"{STAMP} order\x0019c7", listed), listed  # the NUL as it is
    assert routes.splitlines() == ["order", "19c7"]
    assert re.fullmatch(STAMP, stamp), stamp


def test_the_health_snippet_prints_what_its_comments_say(valkey_server: LocalServer) -> None:
    snippet = section(OBSERVABILITY, "## Health", "python")
    said = re.findall(r"^# (StoreHealth\(.*\))$", snippet, re.M)
    assert len(said) == 2
    body = snippet + (
        'await store.put_package_route("order", "19c7")\n'
        "assert await store.route_cache_ready()\n"
        "print(store.health())\n"
    )
    code = (
        "import asyncio\n"
        "from kvstore import BackendError, RedisPackageStore\n\n\n"
        "async def main() -> None:\n"
        f"    async with RedisPackageStore.from_url({valkey_server.url!r}, "
        f"namespace={fresh_namespace()!r}, cache_routes=True) as store:\n"
        + textwrap.indent(body, " " * 8)
        + "\n\nasyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == said


def test_every_install_line_names_the_projects_own_distribution() -> None:
    # PyPI's "kvstore" is another project: "pip install kvstore" would install it.
    for doc in (*PAGES, ROOT / "CONTRIBUTING.md"):
        for line in re.findall(r"pip install [^`\n]*", doc.read_text(encoding="utf-8")):
            assert re.match(INSTALL, line), (doc.name, line)
