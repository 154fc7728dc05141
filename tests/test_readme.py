"""The README's examples run as written, against a real server, and say what they do."""

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

README = Path(__file__).resolve().parent.parent / "README.md"
# deployed_at as a row stores it.
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
# A checkout's extras (the Quick start), or the distribution by its own name.
INSTALL = r"pip install (-e '\.\[\w+\]'|'?kvstore-redis[\[ '`]|kvstore-redis$)"


def section(heading: str, language: str) -> str:
    """The first ``language`` code block after ``heading`` in the README."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"{re.escape(heading)}.*?```{language}\n(.*?)```", text, re.S)
    assert found is not None, heading
    return found.group(1)


def run_example(url: str, namespace: str) -> str:
    code = section("## Example", "python")
    assert 'from_url("redis://127.0.0.1:6379", namespace="aion")' in code
    code = code.replace("redis://127.0.0.1:6379", url).replace('"aion"', repr(namespace))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout


def test_the_example_rolls_back_to_a_stored_version(valkey_server: LocalServer) -> None:
    out = run_example(valkey_server.url, fresh_namespace())
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
    lines = section("To look with `redis-cli`:", "sh").splitlines()
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
    snippet = section("**Health.**", "python")
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
    for doc in (README, README.with_name("CONTRIBUTING.md")):
        for line in re.findall(r"pip install [^`\n]*", doc.read_text(encoding="utf-8")):
            assert re.match(INSTALL, line), (doc.name, line)
