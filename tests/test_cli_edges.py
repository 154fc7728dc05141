"""The command line at its edges: signals, closed pipes, unreachable servers, typos.

Whatever happens, no server is left behind, no traceback is printed, and each failure is
one line with its documented exit status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from redis.asyncio import Redis

from kvstore import PackageRecord, RedisPackageStore
from kvstore.redis.keyspace import Keyspace
from kvstore.server_process import LocalServer
from kvstore.tools.cli.common import CliError
from kvstore.tools.cli.deploy import cmd_deploy
from kvstore.tools.cli.parser import build_parser
from kvstore.tools.status import UNREADABLE, describe, read_status
from tests.conftest import fresh_namespace
from tests.test_acl import rule_for
from tests.test_cli import as_json, fails, kv, ok


def command(*args: str) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "kvstore", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean,
    )


def servers_in(folder: Path) -> list[int]:
    """Processes other than ours running in ``folder`` (the embedded server runs there)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if Path(os.readlink(f"/proc/{entry}/cwd")) == folder:
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    folder = (tmp_path / "data").resolve()
    yield folder
    for pid in servers_in(folder):  # never leave a server behind, even when a test fails
        os.kill(pid, signal.SIGKILL)


def test_a_signal_during_start_up_leaves_no_server_behind(data_dir: Path) -> None:
    # The signal goes to the command alone, as `kill PID` sends it, at the moment its
    # server process appears and a few milliseconds after, while the server is loading
    # and the command waits for it to answer.
    kinds = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    for n, delay in enumerate([0.0, 0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08]):
        signum = kinds[n % 3]
        process = command("ls", "--data-dir", str(data_dir))
        deadline = time.monotonic() + 30
        while not servers_in(data_dir) and process.poll() is None:
            assert time.monotonic() < deadline
        time.sleep(delay)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        text = err.decode()
        assert process.returncode in (0, 128 + signum), (delay, process.returncode, text)
        assert "Traceback" not in text and len(text.splitlines()) <= 1, text
        assert servers_in(data_dir) == [], f"a server outlived the command (delay {delay})"
    assert ok("ls", "--data-dir", str(data_dir)).strip() == "no packages"


def test_a_signal_at_any_moment_leaves_no_server_behind(data_dir: Path) -> None:
    # Python starts in about 0.2-0.3 s here: the delays spread the signal over
    # importing, locking, starting the server, the command and the stop. A signal
    # before the command line has loaded ends Python as Python does (exit -signum):
    # no server exists yet then.
    kinds = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    for n, delay in enumerate([0.15, 0.22, 0.25, 0.28, 0.3, 0.32, 0.35, 0.4, 0.45, 0.6]):
        signum = kinds[n % 3]
        process = command("ls", "--data-dir", str(data_dir))
        time.sleep(delay)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        text = err.decode()
        assert process.returncode in (0, 128 + signum, -signum), (delay, process.returncode)
        if process.returncode != -signum:
            assert "Traceback" not in text and len(text.splitlines()) <= 1, text
        assert servers_in(data_dir) == [], f"a server outlived the command (delay {delay})"
    assert ok("ls", "--data-dir", str(data_dir)).strip() == "no packages"


AFTER_A_WRITE = "; each write is all or nothing: `kvstore ls` shows which were made\n"


@pytest.mark.parametrize(
    ("signum", "says"),
    [
        (signal.SIGTERM, "kvstore: terminated (SIGTERM)" + AFTER_A_WRITE),
        (signal.SIGINT, "kvstore: interrupted" + AFTER_A_WRITE),
    ],
)
def test_a_signal_during_a_deploy_says_one_line_and_stops_the_server(
    data_dir: Path, tmp_path: Path, signum: int, says: str
) -> None:
    archive = tmp_path / "big.zip"
    archive.write_bytes(os.urandom(1 << 20) * 48)  # long enough to be caught mid-put
    pid_file = data_dir / "server.pid"
    for wait in (0.0, 0.05, 0.1):
        process = command("deploy", str(archive), "--type", "order", "--data-dir", str(data_dir))
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(wait)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        text = err.decode()
        assert "Traceback" not in text and "never retrieved" not in text, text
        if process.returncode == 0:  # the deploy won the race
            continue
        assert process.returncode == 128 + signum, (process.returncode, text)
        assert text == says
        assert servers_in(data_dir) == []
    ok("ls", "--data-dir", str(data_dir))


def piped(args: list[str], reader: str) -> tuple[list[str], bytes]:
    """Run the command line into ``reader``; its output lines, then ``status=N``."""
    result = subprocess.run(
        f"{shlex.join([sys.executable, '-m', 'kvstore', *args])} | {reader}; "
        "status=${PIPESTATUS[0]}; echo; echo status=$status",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        timeout=60,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")},
    )
    return result.stdout.decode().splitlines(), result.stderr


async def test_ls_into_head_ends_quietly_with_exit_141(valkey_server: LocalServer) -> None:
    namespace = fresh_namespace()
    async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as store:
        at = datetime.now(timezone.utc)
        # A listing far longer than a pipe holds, so the pipe always breaks.
        await asyncio.gather(
            *(
                store.put_package(PackageRecord(f"type-{n:05}", "h" * 64, b"", at))
                for n in range(3000)
            )
        )
    lines, err = piped(["ls", "--url", valkey_server.url, "--namespace", namespace], "head -1")
    assert lines[0].split()[:2] == ["TYPE", "HASH"]
    assert lines[-1] == "status=141"
    assert err == b""


def test_show_into_head_ends_quietly_with_exit_141(data_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"x" * (32 << 20))  # far more than a pipe holds
    ok("deploy", str(archive), "--type", "order", "--hash", "h1", "--data-dir", str(data_dir))
    lines, err = piped(["show", "order", "h1", "--data-dir", str(data_dir)], "head -c 10")
    assert lines == ["x" * 10, "status=141"]
    assert err == b""
    assert servers_in(data_dir) == []


def silent_listener() -> socket.socket:
    """A port that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_sentinels_fail_within_the_timeout_in_one_short_line() -> None:
    silent = [silent_listener() for _ in range(2)]
    try:
        shapes = [
            ",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in silent),
            f"127.0.0.1:{closed_port()},127.0.0.1:{closed_port()}",
            f"127.0.0.1:{silent[0].getsockname()[1]},127.0.0.1:{closed_port()}",
        ]
        for hosts in shapes:
            # What starting the command costs on this machine now, measured beside it,
            # so a busy machine does not pass for a command that waits too long.
            started = time.monotonic()
            ok("--version")
            start_up = time.monotonic() - started
            started = time.monotonic()
            result = kv("ls", "--url", f"redis+sentinel://:pw-9c1@{hosts}/svc", "--timeout", "2")
            took = time.monotonic() - started
            err = fails(result, "svc")
            assert len(err) < 200 and "pw-9c1" not in err, err
            # One 2 s timeout for the whole command, not one per Sentinel (4 s and more).
            assert took < 2 + start_up + 0.9, (took, start_up)
    finally:
        for sock in silent:
            sock.close()


def test_route_to_a_hash_stored_under_another_type_needs_force(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"archive")
    ok("deploy", str(archive), "--type", "order-flow", "--hash", "h1", *target)
    ok("deploy", str(archive), "--type", "billing", "--also", "audit", "--hash", "h2", *target)

    # A typo in the type: refused, naming where the hash is stored and --force.
    err = fails(kv("route", "odrer-flow", "h1", *target), "stored under order-flow")
    assert "--force" in err
    err = fails(kv("route", "billing", "h1", *target), "stored under order-flow")
    assert "--force" in err
    fails(kv("route", "order-flow", "nowhere", *target), "--force")
    assert {r["workflow_type"]: r["content_hash"] for r in as_json("routes", *target)} == {
        "audit": "h2",
        "billing": "h2",
        "order-flow": "h1",
    }

    # A type routed by an --also deploy may be routed there again without --force.
    ok("route", "audit", "h2", *target)
    ok("route", "odrer-flow", "h1", "--force", *target)
    assert {"workflow_type": "odrer-flow", "content_hash": "h1", "stored": True} in as_json(
        "routes", *target
    )


def test_wrong_urls_are_usage_errors(tmp_path: Path) -> None:
    fails(kv("ls", "--url", "redis://127.0.0.1:1/abc"), "database (its path) must be a number", 2)
    fails(kv("ls", "--url", "redis://127.0.0.1:1?foo=bar"), "unknown option 'foo'", 2)
    fails(kv("ls", "--url", "redis://127.0.0.1:0"), "port must be a number from 1 to 65535", 2)
    for user in ("%ff", "\udcff"):  # percent-encoded, and a raw byte 0xff in the argument
        url = f"redis://{user}:pw-secret-1@127.0.0.1:{closed_port()}"
        err = fails(kv("ls", "--url", url), "url is not UTF-8 (as typed or %-encoded)", 2)
        assert "pw-secret-1" not in err


def test_export_and_import_refuse_what_they_cannot_use(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    fails(kv("export", str(tmp_path), *data), "is a folder")
    fails(kv("export", str(tmp_path / "no" / "x.kvx"), *data), "no such folder")
    garbage = tmp_path / "garbage.kvx"
    garbage.write_bytes(b"\xc1")  # a byte msgpack never uses
    fails(kv("import", str(garbage), *data), "malformed data")
    fails(kv("import", str(tmp_path), *data), "is a folder; name the export file")
    fifo = tmp_path / "pipe.kvx"
    os.mkfifo(fifo)
    for special in (fifo, Path("/dev/zero")):
        says = f"{special} is not a regular file; name the export file to read"
        fails(at_once("import", str(special), *data), says)


def at_once(*args: str) -> subprocess.CompletedProcess[bytes]:
    """The command line, given 20 s and 1 GiB of memory, so a command that would wait
    or read for ever fails its test rather than the machine."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args],
        capture_output=True,
        timeout=20,
        check=False,
        preexec_fn=limited,
        env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")},
    )


def test_deploy_refuses_what_is_not_a_regular_file_before_writing(tmp_path: Path) -> None:
    fifo, archive = tmp_path / "pipe.zip", tmp_path / "a.zip"
    os.mkfifo(fifo)
    archive.write_bytes(b"archive")
    # Nothing listens at the URL: a refusal that came after connecting would say so.
    url = ["--url", f"redis://127.0.0.1:{closed_port()}"]
    for files in ([fifo], [Path("/dev/zero")], [archive, fifo]):
        result = at_once("deploy", *map(str, files), "--type", "order", *url)
        fails(result, f"{files[-1]} is not a regular file; name the archive files to deploy")


async def test_a_file_removed_mid_deploy_says_how_many_were_deployed(
    valkey_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [tmp_path / f"{n:02}.zip" for n in range(40)]
    for n, path in enumerate(files):
        path.write_bytes(b"archive %d" % n)
    args = build_parser().parse_args(["deploy", *map(str, files), "--type", "order"])
    deploy = cmd_deploy(args)  # every file checked: all are there
    async with RedisPackageStore.from_url(valkey_server.url, namespace=fresh_namespace()) as store:
        put = store.put_package

        async def put_then_remove(record: PackageRecord) -> None:
            await put(record)
            files[35].unlink(missing_ok=True)  # in the second batch, read after the first

        monkeypatch.setattr(store, "put_package", put_then_remove)
        with pytest.raises(CliError) as raised:
            await deploy(store)
        assert str(raised.value) == (
            f"{files[35]}: No such file or directory; the first 32 of 40 files were deployed "
            "(deploying them again is safe)"
        )
        assert len(await store.list_packages()) == 32


async def test_a_key_of_the_wrong_type_is_named_by_the_command(valkey_server: LocalServer) -> None:
    namespace = fresh_namespace()
    async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as store:
        await store.put_package(PackageRecord("order", "h1", b"zip", datetime.now(timezone.utc)))
    keys = Keyspace(namespace)
    row = keys.row(b"order\x00h1")
    target = ["--url", valkey_server.url, "--namespace", namespace]
    async with Redis.from_url(valkey_server.url) as client:
        for key, command in ((row, "ls"), (keys.routes, "routes")):
            await client.delete(key)
            await client.sadd(key, b"someone else's")  # a set, which no key of a namespace is
            fails(kv(command, *target), f"{key!r} is not a hash: the server refused")


async def test_route_to_an_ambiguous_prefix_lists_the_candidates_and_not_force(
    valkey_server: LocalServer,
) -> None:
    namespace = fresh_namespace()
    async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as store:
        at = datetime.now(timezone.utc)
        for content_hash, workflow_type in (("2aaa", "order"), ("2bbb", "order"), ("2c", "bill")):
            await store.put_package(PackageRecord(workflow_type, content_hash, b"zip", at))
    target = ["--url", valkey_server.url, "--namespace", namespace]
    # --force would route order to the text "2", which no package has.
    err = fails(
        kv("route", "order", "2", *target),
        "hash '2' matches 2 stored hashes (order 2aaa, order 2bbb); give more of it",
    )
    assert "--force" not in err
    ok("route", "order", "2a", *target)


async def test_setup_with_a_credential_that_may_not_load_says_to_use_one_that_may(
    valkey_server: LocalServer,
) -> None:
    async with Redis.from_url(valkey_server.url) as admin:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "no-loader", "on", ">pw-secret-1", "~*", "+@all", "-function"
        )
        try:
            url = f"redis://no-loader:pw-secret-1@127.0.0.1:{valkey_server.port}"
            err = fails(
                kv("setup", "--url", url),
                f"kvstore: 127.0.0.1:{valkey_server.port}: this credential may not FUNCTION "
                "LOAD, so it cannot load the kvstore library; run setup again with a "
                "credential that may (--url redis://USER:PASSWORD@host:port)",
            )
            assert "pw-secret-1" not in err
        finally:
            await admin.execute_command("ACL", "DELUSER", "no-loader")  # type: ignore[no-untyped-call]


async def test_status_says_once_what_the_credential_may_not_read(
    valkey_server: LocalServer,
) -> None:
    namespace = fresh_namespace()
    async with Redis.from_url(valkey_server.url) as admin:
        rule = ["on", ">pw-secret-1", *rule_for(namespace)]
        await admin.execute_command("ACL", "SETUSER", "least", *rule)  # type: ignore[no-untyped-call]
        try:
            url = f"redis://least:pw-secret-1@127.0.0.1:{valkey_server.port}"
            lines = ok("status", "--url", url, "--namespace", namespace).splitlines()
        finally:
            await admin.execute_command("ACL", "DELUSER", "least")  # type: ignore[no-untyped-call]
    assert f"replication: {UNREADABLE}" in lines
    assert f"memory: {UNREADABLE}" in lines
    # One fact unreadable among readable ones is named.
    async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as store:
        found = await read_status(store)
    some = describe(dataclasses.replace(found, role=None, used_memory=None))
    assert f"replication: role {UNREADABLE}, 0 connected replicas" in some
    assert any(line.startswith(f"memory: used {UNREADABLE}, maxmemory ") for line in some)


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_a_refused_connection_fails_at_once_not_after_the_timeout(scheme: str) -> None:
    started = time.monotonic()
    result = kv("ls", "--url", f"{scheme}://127.0.0.1:{closed_port()}", "--timeout", "5")
    fails(result, "(connection refused): is it running there?")
    # Python's start-up and the clean-up, not the 5 s a retried connection would wait.
    assert time.monotonic() - started < 3.0
