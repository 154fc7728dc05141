"""The command line, end to end: each test runs ``python -m kvstore`` in a subprocess.

Targets are the embedded server (a fresh ``--data-dir``, a server started per command)
and the real servers of ``conftest`` (``--url`` with a fresh namespace).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from kvstore import PackageRecord, RedisPackageStore
from kvstore.server_process import LocalServer
from tests.conftest import fresh_namespace

Result = subprocess.CompletedProcess[bytes]


def kv(*args: str, env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE) -> Result:
    """Run the command line; none of the caller's KVSTORE_* settings leak in."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
    )


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    result = kv(*args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def fails(result: Result, says: str, code: int = 1) -> str:
    """The failure is one line on stderr, names ``says``, and exits ``code``."""
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert says in err, err
    return err


def as_json(*args: str) -> Any:
    return json.loads(ok(*args, "--json"))


@pytest.fixture(params=["embedded", "valkey", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """Options selecting the embedded server or one of the real servers."""
    if request.param == "embedded":
        return ["--data-dir", str(tmp_path / "data")]
    running: LocalServer = request.getfixturevalue(f"{request.param}_server")
    return ["--url", running.url, "--namespace", fresh_namespace()]


def test_deploy_ls_routes_route_show_rm(target: list[str], tmp_path: Path) -> None:
    first, second = tmp_path / "first.zip", tmp_path / "second.zip"
    first.write_bytes(b"PK first \x00\xff archive")
    second.write_bytes(b"PK second archive")
    sha = hashlib.sha256(first.read_bytes()).hexdigest()

    assert sha in ok("deploy", str(first), "--type", "order", *target)
    # Options are accepted before the command too.
    ok(*target, "deploy", str(second), "--type", "order", "--also", "invoice", "--hash", "v2")

    listed = as_json("ls", *target)
    assert [(p["workflow_type"], p["content_hash"], p["size"]) for p in listed] == [
        ("order", sha, first.stat().st_size),
        ("order", "v2", second.stat().st_size),
    ]
    assert [p["routed_by"] for p in listed] == [[], ["invoice", "order"]]
    assert all(datetime.fromisoformat(p["deployed_at"]).utcoffset() is not None for p in listed)
    assert as_json("routes", *target) == [
        {"workflow_type": "invoice", "content_hash": "v2", "stored": True},
        {"workflow_type": "order", "content_hash": "v2", "stored": True},
    ]

    # Roll back by a prefix of the hash, as `ls` shows it.
    assert f"-> {sha}" in ok("route", "order", sha[:10], *target)
    table = ok("ls", "--type", "order", *target)
    assert table.splitlines()[0].split()[:2] == ["TYPE", "HASH"]
    assert [line.split()[-1] for line in table.splitlines()[1:]] == ["order", "invoice"]

    out = tmp_path / "out.zip"
    ok("show", "order", "v2", "-o", str(out), *target)
    assert out.read_bytes() == second.read_bytes()
    assert kv("show", "order", sha, *target).stdout == first.read_bytes()

    # v2 still serves invoice: removing it is refused unless forced.
    fails(kv("rm", "order", "v2", *target), "route of invoice points at v2")
    forced = kv("rm", "order", "v2", "--force", *target)
    assert forced.returncode == 0 and "warning" in forced.stderr.decode()
    assert [p["content_hash"] for p in as_json("ls", *target)] == [sha]
    assert {"workflow_type": "invoice", "content_hash": "v2", "stored": False} in as_json(
        "routes", *target
    )


def test_refusals_are_one_line(valkey_server: LocalServer, tmp_path: Path) -> None:
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"archive")
    ok("deploy", str(archive), "--type", "order", "--hash", "h1", *target)

    fails(kv("route", "order", "nowhere", *target), "no package order 'nowhere'")
    fails(kv("show", "nosuchtype", "h1", *target), "no package of type 'nosuchtype'")
    fails(kv("rm", "order", "h2", *target), "no package order 'h2'")
    fails(kv("deploy", str(tmp_path / "missing.zip"), "--type", "t", *target), "missing.zip")
    fails(kv("deploy", str(archive), "--type", "t", "--hash", "", *target), "content_hash", 2)
    fails(kv("route", "order", "a\x01b", "--bogus", *target), "--bogus", 2)
    # The hash must be given in full once two stored hashes share the prefix.
    ok("deploy", str(archive), "--type", "order", "--hash", "h2", *target)
    fails(kv("show", "order", "h", *target), "matches 2 stored hashes")

    ok("route", "order", "nowhere", "--force", *target)
    assert {"workflow_type": "order", "content_hash": "nowhere", "stored": False} in as_json(
        "routes", *target
    )

    # Raw bytes are not sent to a terminal.
    leader, follower = pty.openpty()
    try:
        fails(kv("show", "order", "h1", *target, stdout=follower), "terminal")
    finally:
        os.close(leader)
        os.close(follower)


def test_unreachable_server_says_one_line_without_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = fails(kv("ls", "--url", f"redis://:secret@127.0.0.1:{port}", "--timeout", "2"), "")
    assert "secret" not in err
    err = fails(kv("ls", "--url", "http://:secret@127.0.0.1:1"), "url", 2)
    assert "secret" not in err


def test_environment_and_default_data_dir(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"archive")
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg"), "KVSTORE_NAMESPACE": "ops"}
    ok("deploy", str(archive), "--type", "order", env=env)
    assert (tmp_path / "xdg" / "kvstore" / "appendonlydir").is_dir()
    # A second command finds it: same folder, same namespace.
    data_dir = str(tmp_path / "xdg" / "kvstore")
    assert len(as_json("ls", "--data-dir", data_dir, "--namespace", "ops")) == 1
    assert as_json("ls", "--data-dir", data_dir) == []  # the default namespace is aion


def test_a_second_command_on_the_folder_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    fd = os.open(data_dir / "kvstore.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        fails(kv("ls", "--data-dir", str(data_dir)), "in use by another kvstore command (pid 4242)")
    finally:
        os.close(fd)
    assert ok("ls", "--data-dir", str(data_dir)).strip() == "no packages"


def test_a_stray_server_on_the_folder_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with LocalServer(data_dir=data_dir, settings={"pidfile": "server.pid"}) as stray:
        fails(kv("ls", "--data-dir", str(data_dir)), f"(pid {stray.pid}) still runs")
    ok("ls", "--data-dir", str(data_dir))


def test_export_import_through_the_embedded_server(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    for n, workflow_type in enumerate(["order", "order", "invoice"]):
        archive = tmp_path / f"{n}.zip"
        archive.write_bytes(bytes(range(256)) * n)
        ok("deploy", str(archive), "--type", workflow_type, "--hash", f"h{n}", *data)
    ok("route", "order", "h0", *data)  # a rollback: not where the newest deploy points
    ok("route", "audit", "gone", "--force", *data)  # a route without an archive
    dump = tmp_path / "dump.kvx"
    result = kv("export", str(dump), *data)
    assert result.returncode == 0 and b"\r" not in result.stderr  # no progress off a tty
    assert "3 packages and 3 routes" in result.stdout.decode()

    copy = [*data, "--namespace", "copy"]
    expected = (as_json("ls", *data), as_json("routes", *data))
    assert [r["content_hash"] for r in expected[1]] == ["gone", "h2", "h0"]
    for _ in range(2):  # idempotent
        ok("import", str(dump), *copy)
        assert (as_json("ls", *copy), as_json("routes", *copy)) == expected

    # A cut-off file is refused whole: nothing is written.
    cut = tmp_path / "cut.kvx"
    cut.write_bytes(dump.read_bytes()[:-20])
    fails(kv("import", str(cut), *data, "--namespace", "cut"), "cut off")
    assert as_json("ls", *data, "--namespace", "cut") == []


async def test_export_import_keeps_every_record_exactly(
    server: LocalServer, tmp_path: Path
) -> None:
    source, copy = fresh_namespace(), fresh_namespace()
    records = [
        PackageRecord("order", "h1", b"", datetime(1, 1, 1, tzinfo=timezone.utc)),
        PackageRecord("order", "h2", bytes(range(256)), datetime.now(timezone.utc)),
        PackageRecord(
            "invoice",
            "h3",
            b"\x00" * 5000,
            datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
        ),
    ]
    async with RedisPackageStore.from_url(server.url, namespace=source) as store:
        for record in records:
            await store.put_package(record)
        await store.put_package_route("order", "h1")
        await store.put_package_route("audit", "none")
        expected = (await store.list_packages(), await store.list_package_routes())

    dump = tmp_path / "dump.kvx"
    ok("export", str(dump), "--url", server.url, "--namespace", source)
    for _ in range(2):
        ok("import", str(dump), "--url", server.url, "--namespace", copy)
        async with RedisPackageStore.from_url(server.url, namespace=copy) as store:
            assert (await store.list_packages(), await store.list_package_routes()) == expected


def test_demo_runs_to_the_end(tmp_path: Path, valkey_server: LocalServer) -> None:
    out = ok("demo")
    assert "stopping the server and starting it again" in out
    assert "exactly as before" in out
    out = ok("demo", "--url", valkey_server.url)
    assert "exactly as before" in out
