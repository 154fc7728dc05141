"""The embedded server keeps its password off every command line."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvstore.server_process import LocalServer
from kvstore.tools.embedded_server import EmbeddedServer, FolderInUse


def command_lines() -> list[bytes]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append(f.read())
            except OSError:
                pass
    return found


def test_the_password_is_on_no_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[list[str]] = []
    real_popen = subprocess.Popen

    def recording_popen(args: list[str], **kwargs: Any) -> Any:
        launched.append(list(args))
        return real_popen(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    server = EmbeddedServer(tmp_path / "data")
    password = server._password.encode()
    # Watch every process's command line while the server starts (before it rewrites
    # its process title).
    seen: list[bytes] = []
    started = threading.Event()

    def watch() -> None:
        while not started.is_set():
            seen.extend(line for line in command_lines() if password in line)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with server:
            started.set()
            watcher.join()
            pid = server._server.pid if server._server is not None else None
            assert pid is not None
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert password not in f.read()
            # The file that carried it is gone once the server has read it.
            assert not list((tmp_path / "data").glob("secrets-*"))
    finally:
        started.set()
        watcher.join()
    assert launched and all(password.decode() not in " ".join(a) for a in launched)
    assert seen == []


def test_the_secrets_file_is_readable_by_its_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[int] = []
    contents: list[str] = []
    real_popen = subprocess.Popen

    def inspecting_popen(args: list[str], **kwargs: Any) -> Any:
        path = Path(args[args.index("--include") + 1])
        modes.append(stat.S_IMODE(path.stat().st_mode))
        contents.append(path.read_text())
        return real_popen(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", inspecting_popen)
    # A password with quotes, backslashes, spaces and non-ASCII reaches the server whole.
    password = 'p "q" \\ r\tü-' + "x" * 8
    with LocalServer(data_dir=tmp_path / "d", settings={"requirepass": password}) as server:
        assert server._answers_ping()  # AUTH with the password succeeded
    assert modes == [0o600]
    assert "requirepass" in contents[0] and password not in contents[0]
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700


def test_a_stale_pid_file_does_not_block_the_folder(tmp_path: Path) -> None:
    data_dir = (tmp_path / "data").resolve()
    data_dir.mkdir()
    pid_file = data_dir / "server.pid"
    # A pid now used by another process (this one, which runs elsewhere).
    pid_file.write_text(f"{os.getpid()}\n")
    with EmbeddedServer(data_dir) as server:
        assert server._server is not None and server._server.running
    # A server killed outright and never reaped: a zombie, not a server.
    with LocalServer(data_dir=data_dir, settings={"pidfile": "server.pid"}) as stray:
        assert stray._process is not None
        os.kill(stray._process.pid, 9)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{stray._process.pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with EmbeddedServer(data_dir) as server:
            assert server._server is not None and server._server.running


def test_a_live_server_on_the_folder_is_still_refused(tmp_path: Path) -> None:
    data_dir = (tmp_path / "data").resolve()
    with (
        LocalServer(data_dir=data_dir, settings={"pidfile": "server.pid"}) as stray,
        pytest.raises(FolderInUse, match=f"pid {stray.pid}"),
    ):
        EmbeddedServer(data_dir).__enter__()
