"""``kvstore status``: each server setting under which acknowledged packages can be lost
is named, on real servers configured each way, through the command line.

Every test runs ``python -m kvstore status`` against a server started for it with the
settings under test, on Valkey and on Redis 7 when it is installed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from kvstore import PackageRecord, RedisPackageStore
from kvstore.redis.scripts import LIBRARY
from kvstore.server_process import LocalServer
from kvstore.tools.check import check_store
from kvstore.tools.status import UNREADABLE, read_status

from .conftest import fresh_namespace
from .test_acl import rule_for
from .test_cli import kv
from .test_store_library import impostor_text, replace_library
from .topology import raw_command, replicated_pair, wait_in_sync


def status(url: str, namespace: str = "aion") -> tuple[dict[str, Any], list[str]]:
    """What ``status --json`` and ``status`` say; both exit 0, warnings or not."""
    both = []
    for extra in (["--json"], []):
        result = kv("status", "--url", url, "--namespace", namespace, *extra)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stderr == b""
        both.append(result.stdout.decode())
    return json.loads(both[0]), both[1].splitlines()


def warnings_in(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("warning: ")]


@pytest.fixture
def started(binary: Path) -> Iterator[Any]:
    """Start a server of ``binary`` with the given settings; stopped after the test."""
    running: list[LocalServer] = []

    def start(**settings: str) -> LocalServer:
        server = LocalServer(binary, settings=settings).start()
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()
        server.remove_data()


@pytest.mark.slow
def test_no_persistence_warns_that_a_restart_loses_everything(started: Any) -> None:
    found, lines = status(started(appendonly="no", save="").url)
    assert (found["appendonly"], found["save"]) == (False, "")
    (warning,) = warnings_in(lines)
    assert "a restart of the server loses every package" in warning
    assert "set appendonly yes" in warning


@pytest.mark.slow
def test_rdb_snapshots_alone_warn_about_writes_since_the_last_one(started: Any) -> None:
    found, lines = status(started(appendonly="no", save="3600 1").url)
    assert found["save"] == "3600 1"
    (warning,) = warnings_in(lines)
    assert "written since the last snapshot" in warning


def test_appendfsync_always_gives_no_warning(started: Any, binary: Path) -> None:
    found, lines = status(started(appendonly="yes", appendfsync="always").url)
    assert found["server"] == ("valkey" if "valkey" in binary.name else "redis")
    assert found["version"] and found["version"][0].isdigit()
    assert (found["appendonly"], found["appendfsync"]) == (True, "always")
    assert found["warnings"] == [] and warnings_in(lines) == []
    assert "no warnings: these settings lose no acknowledged package" in lines


@pytest.mark.slow
def test_appendfsync_everysec_warns_about_the_last_second(started: Any) -> None:
    _, lines = status(started(appendonly="yes", appendfsync="everysec").url)
    (warning,) = warnings_in(lines)
    assert "a crash of the machine can lose about the last second" in warning
    assert "appendfsync always" in warning


@pytest.mark.slow
def test_appendfsync_no_warns_about_more_than_a_second(started: Any) -> None:
    _, lines = status(started(appendonly="yes", appendfsync="no").url)
    (warning,) = warnings_in(lines)
    assert "more than the last second" in warning


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
def test_an_allkeys_policy_warns_that_packages_can_be_evicted(started: Any, policy: str) -> None:
    server = started(appendonly="yes", appendfsync="always", **{"maxmemory-policy": policy})
    found, lines = status(server.url)
    assert found["maxmemory_policy"] == policy
    (warning,) = warnings_in(lines)
    assert f"maxmemory-policy {policy} evicts any key" in warning
    assert "packages, the index and routes can silently disappear" in warning
    assert "it is 0, no limit, now" in warning

    limited = started(
        appendonly="yes", appendfsync="always", maxmemory="100mb", **{"maxmemory-policy": policy}
    )
    (warning,) = warnings_in(status(limited.url)[1])
    assert "when the server reaches maxmemory" in warning


@pytest.mark.slow
def test_a_volatile_policy_cannot_evict_packages_which_have_no_expiry(started: Any) -> None:
    server = started(
        appendonly="yes",
        appendfsync="always",
        maxmemory="100mb",
        **{"maxmemory-policy": "volatile-lru"},
    )
    found, lines = status(server.url)
    assert (found["maxmemory"], found["maxmemory_policy"]) == (100 * 1024 * 1024, "volatile-lru")
    assert warnings_in(lines) == []


@pytest.mark.slow
def test_replication_shows_role_and_connected_replicas(binary: Path, tmp_path: Path) -> None:
    primary, replica = replicated_pair(binary, tmp_path)
    with primary, replica:
        wait_in_sync(replica.port, within=15)
        on_primary, lines = status(primary.url)
        on_replica, _ = status(replica.url)
    assert (on_primary["role"], on_primary["connected_replicas"]) == ("master", 1)
    assert "replication: role master, 1 connected replicas" in lines
    assert on_replica["role"] == "slave"


@pytest.mark.slow
def test_counts_layout_and_functions_of_the_namespace(started: Any) -> None:
    server = started(appendonly="yes", appendfsync="always")
    namespace = fresh_namespace()
    empty, lines = status(server.url, namespace)
    assert (empty["layout"], empty["packages"], empty["functions"]) == (None, 0, [])
    assert (
        f"namespace {namespace!r}: nothing written yet, 0 packages, 0 routes, 0 B of archives"
        in lines
    )

    async def fill() -> None:
        at = datetime(2026, 5, 1, tzinfo=timezone.utc)
        async with RedisPackageStore.from_url(server.url, namespace=namespace) as store:
            await store.put_package(PackageRecord("order", "h1", b"abc", at))
            await store.put_package_with_routes(
                PackageRecord("order", "h2", b"defgh", at), ["bill"]
            )
        admin = Redis.from_url(server.url)
        for name in ("kvstore_probe", "other"):
            body = f"redis.register_function('{name}', function() return 1 end)"
            await raw_command(admin, "FUNCTION", "LOAD", f"#!lua name={name}\n{body}")
        await admin.aclose()

    asyncio.run(fill())
    found, lines = status(server.url, namespace)
    assert (found["layout"], found["packages"], found["routes"], found["archive_bytes"]) == (
        "2",  # a store's default layout
        2,
        2,
        8,
    )
    # The store loaded this release's library with its first write.
    assert found["functions"] == sorted([LIBRARY.name, "kvstore_probe"])
    assert (
        f"functions: kvstore_* libraries: {LIBRARY.name} (this release's), kvstore_probe" in lines
    )


@pytest.mark.slow
def test_a_library_of_this_release_s_name_with_other_code_is_a_warning(started: Any) -> None:
    server = started(appendonly="yes", appendfsync="always")

    async def load(text: bytes) -> None:
        async with Redis.from_url(server.url) as admin:
            await replace_library(admin, text)

    asyncio.run(load(impostor_text()))
    found, lines = status(server.url)
    assert found["library_matches"] is False
    assert f"functions: kvstore_* libraries: {LIBRARY.name} (another's code)" in lines
    assert [w for w in warnings_in(lines) if f"FUNCTION DELETE {LIBRARY.name}" in w]
    asyncio.run(load(LIBRARY.text))
    found, lines = status(server.url)
    assert found["library_matches"] is True and warnings_in(lines) == []


@pytest.mark.slow
def test_a_credential_without_config_info_or_function_says_so_and_exits_0(
    started: Any,
) -> None:
    server = started(appendonly="yes", appendfsync="always")
    namespace, password = fresh_namespace(), secrets.token_hex(8)

    async def make_user() -> None:
        admin = Redis.from_url(server.url)
        await raw_command(
            admin,
            "ACL",
            "SETUSER",
            "ops",
            "on",
            f">{password}",
            "~*",
            "&*",
            "+@all",
            "-config",
            "-info",
            "-function",
        )
        await admin.aclose()

    asyncio.run(make_user())
    url = f"redis://ops:{password}@127.0.0.1:{server.port}"
    found, lines = status(url, namespace)
    assert found["appendonly"] is None and found["maxmemory_policy"] is None
    assert found["functions"] is None
    assert found["packages"] == 0  # the namespace itself is still readable
    assert f"persistence: {UNREADABLE}" in lines
    assert f"functions: FUNCTION LIST is {UNREADABLE}" in lines
    assert any("the persistence settings are not readable" in w for w in warnings_in(lines))
    assert password not in "\n".join(lines)


@pytest.mark.slow
def test_another_layout_is_a_warning_and_nothing_is_counted(started: Any) -> None:
    server = started(appendonly="yes", appendfsync="always")
    namespace = fresh_namespace()

    async def mark() -> None:
        admin = Redis.from_url(server.url)
        await admin.set(f"{{{namespace}}}:format", b"3")
        await admin.aclose()

    asyncio.run(mark())
    found, lines = status(server.url, namespace)
    assert (found["layout"], found["packages"]) == ("3", None)
    (warning,) = warnings_in(lines)
    assert "holds layout '3', which this kvstore neither reads nor writes" in warning


@pytest.mark.slow
def test_the_embedded_server_loses_no_acknowledged_package(tmp_path: Path) -> None:
    result = kv("status", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert "persistence: appendonly yes, appendfsync always, RDB snapshots off" in lines
    assert "no warnings: these settings lose no acknowledged package" in lines
    checked = kv("check", "--data-dir", str(tmp_path / "data"))
    assert checked.returncode == 0 and checked.stdout.decode().endswith("is sound\n")


async def test_status_and_check_refuse_a_cluster_client_before_sending_anything() -> None:
    store = RedisPackageStore(RedisCluster(host="127.0.0.1", port=1))
    with pytest.raises(TypeError, match="not to a Redis Cluster"):
        await read_status(store)
    with pytest.raises(TypeError, match="not to a Redis Cluster"):
        await check_store(store)


@pytest.mark.slow
def test_the_store_rule_alone_reads_its_namespace_and_nothing_else(started: Any) -> None:
    server = started(appendonly="yes", appendfsync="always")
    namespace, password = fresh_namespace(), secrets.token_hex(8)

    async def make_user() -> None:
        admin = Redis.from_url(server.url)
        await raw_command(admin, "ACL", "SETUSER", "engine", "on", f">{password}")
        await raw_command(admin, "ACL", "SETUSER", "engine", *rule_for(namespace))
        await admin.aclose()

    asyncio.run(make_user())
    url = f"redis://engine:{password}@127.0.0.1:{server.port}"
    own, lines = status(url, namespace)
    assert own["packages"] == 0 and own["server"] is None
    assert f"server: {UNREADABLE}" in lines
    other, lines = status(url, fresh_namespace())
    assert other["packages"] is None
    assert f"note: the namespace's keys are {UNREADABLE}" in lines
