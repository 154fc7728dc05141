"""Servers the store is proven against: Sentinel groups, TLS servers, and a checkable workload.

Every process is a ``LocalServer``: data nodes from command-line settings, Sentinels
from a config file they can rewrite, TLS-only servers probed over TLS. Everything binds
127.0.0.1.

``Writer`` is the workload of the failure tests: each writer owns its workflow types and
deploys versions of them in increasing ``deployed_at``, remembering only the puts the
store acknowledged, so that after any failure ``check_outcome`` can tell exactly what
must be stored and where every route must point.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kvstore import BackendError, PackageRecord, PackageStore
from kvstore.server_process import LocalServer, free_port, valkey_binary

from .support import as_map


def server_binary(name: str) -> Path:
    """The binary of server ``name`` (``valkey`` or ``redis``); skips the test if absent."""
    if name == "valkey":
        return valkey_binary()
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip("redis-server is not on the PATH (.ci/run installs it)")
    return Path(found)


# A probe's own I/O is bounded by this.
_PROBE_TIMEOUT = 1.0


def sentinel_process(
    binary: Path, data_dir: Path, *, primary_port: int, service: str, quorum: int
) -> LocalServer:
    """A Sentinel watching ``service`` at 127.0.0.1:``primary_port`` (not started).

    Its config file lives in ``data_dir``, where the Sentinel rewrites it with what it
    learns (peers, replicas, the current primary).
    """
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "sentinel.conf"
    config.write_text(
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                f'dir "{data_dir}"',
                "daemonize no",
                f"sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}",
                f"sentinel down-after-milliseconds {service} 500",
                f"sentinel failover-timeout {service} 5000",
                f"sentinel parallel-syncs {service} 1",
                "",
            ]
        )
    )
    return LocalServer(
        binary, data_dir=data_dir, port=port, config_file=config, sentinel=True, settings={}
    )


async def raw_command(client: Redis, *args: str | bytes) -> Any:
    """The server's reply to ``args``, sent as they are."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def wait_in_sync(replica_port: int, *, within: float) -> None:
    """Return once the replica on ``replica_port`` is connected to its primary."""
    deadline = time.monotonic() + within
    with SyncRedis(port=replica_port, socket_timeout=_PROBE_TIMEOUT) as replica:
        while time.monotonic() < deadline:
            role = replica.execute_command("ROLE")
            if role[0] == b"slave" and role[3] == b"connected":
                return
            time.sleep(0.05)
    raise AssertionError(f"the replica on port {replica_port} did not sync within {within}s")


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, within: float, what: str
) -> None:
    """Return once ``check()`` is true; fail naming ``what`` after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.1)


# A full sync starts at once instead of waiting 5 s for more replicas to join it.
DATA_NODE_SETTINGS = {"repl-diskless-sync-delay": "0"}


def replicated_pair(binary: Path, root: Path) -> tuple[LocalServer, LocalServer]:
    """A primary and a replica of it (not started), with data dirs under ``root``."""
    primary = LocalServer(binary, data_dir=root / "primary", settings=DATA_NODE_SETTINGS)
    replica = LocalServer(
        binary,
        data_dir=root / "replica",
        settings={**DATA_NODE_SETTINGS, "replicaof": f"127.0.0.1 {primary.port}"},
    )
    return primary, replica


class SentinelGroup:
    """A primary, one replica and ``sentinels`` Sentinels watching them as ``service``."""

    def __init__(
        self, binary: Path, root: Path, *, service: str = "svc", sentinels: int = 3
    ) -> None:
        self.service = service
        self.primary, self.replica = replicated_pair(binary, root)
        quorum = sentinels // 2 + 1
        self.sentinels = [
            sentinel_process(
                binary,
                root / f"sentinel-{i}",
                primary_port=self.primary.port,
                service=service,
                quorum=quorum,
            )
            for i in range(sentinels)
        ]

    def url(self, credentials: str = "") -> str:
        nodes = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{credentials}{nodes}/{self.service}"

    def __enter__(self) -> SentinelGroup:
        try:
            self.primary.start()
            self.replica.start()
            # Sentinels started after the first sync see a healthy replica at once.
            wait_in_sync(self.replica.port, within=15.0)
            for sentinel in self.sentinels:
                sentinel.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.kill()
        self.replica.kill()
        self.primary.kill()

    async def _ask_each_sentinel(self, *command: str) -> list[object]:
        replies: list[object] = []
        for port in (sentinel.port for sentinel in self.sentinels):
            async with Redis(port=port, socket_timeout=_PROBE_TIMEOUT) as sentinel:
                replies.append(await raw_command(sentinel, *command))
        return replies

    async def primary_ports(self) -> list[int | None]:
        """Where each Sentinel says the primary is (``None``: it cannot say)."""
        ports: list[int | None] = []
        try:
            replies = await self._ask_each_sentinel(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
            )
        except (OSError, RedisError):
            return [None] * len(self.sentinels)
        for reply in replies:
            ports.append(int(reply[1]) if isinstance(reply, list | tuple) else None)
        return ports

    async def watching(self) -> bool:
        """Whether every Sentinel knows every other and sees the replica in sync."""
        try:
            peers = await self._ask_each_sentinel("SENTINEL", "SENTINELS", self.service)
            replicas = await self._ask_each_sentinel("SENTINEL", "REPLICAS", self.service)
        except (OSError, RedisError):
            return False
        others = len(self.sentinels) - 1
        if not all(isinstance(p, list) and len(p) == others for p in peers):
            return False
        for seen in replicas:
            if not isinstance(seen, list) or len(seen) != 1:
                return False
            fields = as_map(seen[0])  # a Sentinel's description of an instance
            if fields.get(b"flags") != b"slave" or fields.get(b"master-link-status") != b"ok":
                return False
        return True

    async def wait_watching(self, within: float) -> None:
        await eventually(self.watching, within=within, what="sentinels watching the group")

    async def wait_promoted(self, old_port: int, within: float) -> int:
        """The port of the new primary, once every Sentinel names it and it is one."""
        found: list[int] = []

        async def promoted() -> bool:
            ports = set(await self.primary_ports())
            if len(ports) != 1 or None in ports or old_port in ports:
                return False
            (port,) = ports
            assert port is not None
            async with Redis(port=port, socket_timeout=_PROBE_TIMEOUT) as node:
                role = await raw_command(node, "ROLE")
            if role[0] != b"master":
                return False
            found.append(port)
            return True

        await eventually(promoted, within=within, what=f"a primary other than port {old_port}")
        return found[-1]


# TLS.


@dataclass(frozen=True)
class Certificates:
    """A throw-away CA and a server certificate it signed for IP address 127.0.0.1."""

    ca: Path
    server_cert: Path
    server_key: Path


_SERVER_EXTENSIONS = """\
subjectAltName = IP:127.0.0.1
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash
"""


def make_certificates(directory: Path) -> Certificates:
    """Certificates made with the ``openssl`` command; skips the test if it is absent."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not on the PATH; it makes the test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, request = (
        directory / "server.crt",
        directory / "server.key",
        directory / "server.csr",
    )
    extensions = directory / "server.ext"
    extensions.write_text(_SERVER_EXTENSIONS)
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_extensions = "basicConstraints=critical,CA:TRUE keyUsage=critical,keyCertSign,cRLSign"

    def run(*args: str | Path) -> None:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=60)

    ca_subject = ["-subj", "/CN=kvstore-test-ca", "-days", "2"]
    for extension in ca_extensions.split():
        ca_subject += ["-addext", extension]
    run("req", "-x509", *new_key, *ca_subject, "-keyout", ca_key, "-out", ca)
    run("req", *new_key, "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", request)
    signing: list[str | Path] = ["-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2"]
    run("x509", "-req", *signing, "-in", request, "-extfile", extensions, "-out", cert)
    return Certificates(ca, cert, key)


def tls_only_server(binary: Path, data_dir: Path, certificates: Certificates) -> LocalServer:
    """A server that speaks TLS only, without client certificates (not started)."""
    return LocalServer(
        binary,
        data_dir=data_dir,
        tls_ca=certificates.ca,
        settings={
            "tls-cert-file": str(certificates.server_cert),
            "tls-key-file": str(certificates.server_key),
            "tls-ca-cert-file": str(certificates.ca),
            "tls-auth-clients": "no",
        },
    )


# The workload.

T0 = datetime(2026, 5, 1, tzinfo=timezone.utc)


def archive_of(workflow_type: str, content_hash: str) -> bytes:
    """The archive deployed as ``(workflow_type, content_hash)``: 32 B to 64 KiB."""
    seed = hashlib.sha256(f"{workflow_type}|{content_hash}".encode()).digest()
    return seed * (1 + int.from_bytes(seed[:2], "big") % 2048)


def deployed_at_of(content_hash: str) -> datetime:
    """Version ``v<n>`` is deployed ``n`` milliseconds after ``T0``."""
    return T0 + timedelta(milliseconds=int(content_hash.removeprefix("v")))


@dataclass
class Writer:
    """Deploys versions ``v0, v1, ...`` of its own types, round robin, through ``store``."""

    name: str
    store: PackageStore
    type_count: int = 3
    acked: dict[tuple[str, str], PackageRecord] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    attempts: int = 0

    @property
    def types(self) -> list[str]:
        return [f"{self.name}-type-{i}" for i in range(self.type_count)]

    def record(self, n: int) -> PackageRecord:
        workflow_type, content_hash = self.types[n % self.type_count], f"v{n}"
        archive = archive_of(workflow_type, content_hash)
        return PackageRecord(workflow_type, content_hash, archive, deployed_at_of(content_hash))

    async def run(self, stop: asyncio.Event, *, limit: int = 100_000) -> None:
        """Put one version after another until ``stop`` is set or ``limit`` are tried.

        A put that raised ``BackendError`` may or may not have been applied; it is not
        remembered, and the next version follows it.
        """
        while not stop.is_set() and self.attempts < limit:
            record = self.record(self.attempts)
            self.attempts += 1
            try:
                await self.store.put_package(record)
            except BackendError as exc:
                self.failures.append(str(exc))
                await asyncio.sleep(0.02)
                continue
            self.acked[(record.workflow_type, record.content_hash)] = record


async def check_outcome(store: PackageStore, writers: Iterable[Writer]) -> int:
    """Assert what the writers leave behind; return how many records are stored.

    Every acknowledged put is stored, byte for byte; every stored record is one a writer
    put, whole; and each type's route points at the newest stored version of the type,
    which a put that stored its row without its route (or the reverse) would break.
    """
    writers = list(writers)
    stored = {(r.workflow_type, r.content_hash): r for r in await store.list_packages()}
    for writer in writers:
        missing = [key for key in writer.acked if key not in stored]
        assert not missing, f"{writer.name}: acknowledged puts lost: {missing[:5]}"
        changed = [key for key, record in writer.acked.items() if stored[key] != record]
        assert not changed, f"{writer.name}: acknowledged puts changed: {changed[:5]}"
    for (workflow_type, content_hash), record in stored.items():
        assert record.archive == archive_of(workflow_type, content_hash), "a torn archive"
        assert record.deployed_at == deployed_at_of(content_hash), "a torn deployed_at"
    newest: dict[str, PackageRecord] = {}
    for record in stored.values():
        current = newest.get(record.workflow_type)
        if current is None or record.deployed_at > current.deployed_at:
            newest[record.workflow_type] = record
    routes = {r.workflow_type: r.content_hash for r in await store.list_package_routes()}
    expected = {t: r.content_hash for t, r in newest.items()}
    assert routes == expected, "every route points at the newest stored version of its type"
    owned = {t for w in writers for t in w.types}
    assert set(routes) <= owned, "no route of a type nobody wrote"
    return len(stored)


class LoopbackServer:
    """A TCP server of the test's own on 127.0.0.1, in the test's event loop, and the
    tasks it runs; ``aclose()`` ends them all."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def _listen(
        self, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> None:
        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Relay(LoopbackServer):
    """A TCP relay on loopback to ``port``, in the test's own event loop: a replica made
    to follow its primary through it (``REPLICAOF 127.0.0.1 <relay.port>``) is held
    behind the primary at will, its link up and its clients served, by ``hold()``ing
    what flows from the primary until ``release()``. ``rate``: the bytes per second
    that flow from ``port`` at most (a slow link)."""

    def __init__(self, port: int, *, rate: float | None = None) -> None:
        super().__init__()
        self._target = port
        self._rate = rate
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> Relay:
        await self._listen(self._serve)
        return self

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._spawn(self._pump(reader, upstream_writer, gated=False))
        self._spawn(self._pump(upstream_reader, writer, gated=True))

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gated: bool
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                if gated:
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
                if gated and self._rate is not None:
                    await asyncio.sleep(len(data) / self._rate)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def caught_up(primary_port: int, replica_port: int, *, within: float = 15.0) -> None:
    """Return once the replica on ``replica_port`` has applied everything the primary on
    ``primary_port`` has written, in the primary's history."""
    async with (
        Redis(port=primary_port, socket_timeout=_PROBE_TIMEOUT) as primary,
        Redis(port=replica_port, socket_timeout=_PROBE_TIMEOUT) as replica,
    ):

        async def check() -> bool:
            wrote = await primary.info("replication")
            applied = await replica.info("replication")
            return bool(
                applied.get("master_link_status") == "up"
                and applied.get("master_replid") == wrote["master_replid"]
                and applied.get("slave_repl_offset", -1) >= wrote["master_repl_offset"]
            )

        await eventually(check, within=within, what=f"replica {replica_port} caught up")
