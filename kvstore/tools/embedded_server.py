"""The command line's own server: Valkey on loopback, its data in one folder.

Guarantees:

* One command at a time per folder: ``EmbeddedServer`` takes an exclusive, non-blocking
  ``flock`` on ``kvstore.lock`` in the folder before the server starts, and holds it until
  the server has stopped. A second command gets ``FolderInUse`` at once, never a wait.
* A server left running by a command that was killed outright (it holds no lock, but
  still writes to the folder) is detected through its pid file and refused, so two
  servers never append to the same files. A stale pid file (its server dead, its pid
  now another process's) does not block the folder.
* The append-only file is on with ``appendfsync always``: once a command has said a
  write is done, it is on disk, even if the machine fails before the clean stop.
* ``start`` returns only once the server has loaded its files and serves commands.
* The server listens on 127.0.0.1 only and requires a password made fresh for each run,
  so other local users cannot reach the catalogue while a command runs. The password
  is never on the server's command line (``LocalServer`` hands secret settings over in
  a file of mode 0600, removed once the server has read it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from pathlib import Path
from types import TracebackType

from kvstore.server_process import LocalServer, LocalServerError

LOCK_NAME = "kvstore.lock"
PID_NAME = "server.pid"
LOAD_TIMEOUT = 300.0  # seconds a large catalogue may take to load from disk

__all__ = ["EmbeddedServer", "FolderInUse", "LocalServerError", "default_data_dir"]


class FolderInUse(Exception):
    """Another command holds the data folder, or a stray server still writes to it."""


def default_data_dir() -> Path:
    """``$KVSTORE_DATA_DIR``, else ``$XDG_DATA_HOME/kvstore``, else ``~/.local/share/kvstore``."""
    explicit = os.environ.get("KVSTORE_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "kvstore"


def _server_alive(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` may be a server still running in ``data_dir``.

    A pid file can outlive its server: a server killed outright and not yet reaped is a
    zombie, and its pid may since belong to another process. Where ``/proc`` tells, a
    zombie, or a process whose working folder is not ``data_dir`` (the server runs in
    it), is no server; where it cannot tell, any live pid counts.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] == "Z":
            return False
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir
    except (OSError, IndexError):
        return True


class EmbeddedServer:
    """A locked, persistent server over ``data_dir``; use it as a context manager.

    ``url`` carries the run's password: hand it to the store, never print it.
    ``stop`` and ``start`` may be called inside the block (the lock stays held).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self._lock_fd: int | None = None
        self._password = secrets.token_hex(16)
        self._server: LocalServer | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the embedded server is not started")
        return f"redis://:{self._password}@127.0.0.1:{self._server.port}"

    @property
    def address(self) -> str:
        """Where the server listens, without the password: safe to print."""
        return "not started" if self._server is None else f"127.0.0.1:{self._server.port}"

    def _lock(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.data_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise FolderInUse(
                f"{self.data_dir} is in use by another kvstore command{by}; wait for it to finish"
            ) from None
        # The holder's pid, only to name it in the refusal above.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = None

    def _refuse_stray_server(self) -> None:
        # The server removes its pid file on a clean stop; one naming a live process
        # means a server outlived a killed command and still owns the files.
        try:
            text = (self.data_dir / PID_NAME).read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return
        if text.isdigit() and _server_alive(int(text), self.data_dir):
            raise FolderInUse(
                f"a server left by an interrupted command (pid {text}) still runs on "
                f"{self.data_dir}; stop it (kill {text}) and retry"
            )

    def start(self) -> None:
        """Start (or restart) the server; the folder must be locked already."""
        if self._server is None:
            self._refuse_stray_server()
            self._server = LocalServer(
                data_dir=self.data_dir,
                settings={
                    "appendonly": "yes",
                    "appendfsync": "always",
                    "requirepass": self._password,
                    "pidfile": PID_NAME,  # relative: the server runs in data_dir
                },
            )
        # start() returns once the server has loaded its files and answers commands.
        self._server.start(timeout=LOAD_TIMEOUT)

    def stop(self) -> None:
        """Stop cleanly (SIGTERM): the server flushes its append-only file first."""
        if self._server is not None:
            self._server.stop()

    def __enter__(self) -> EmbeddedServer:
        self._lock()
        try:
            self.start()
        except BaseException:
            # Interrupted (a signal) or failed: no server may outlive the command.
            try:
                self.stop()
            finally:
                self._unlock()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self._unlock()
