"""Reads from replicas: served by a replica that has every acknowledged write, by the
primary otherwise, and never held up past the bound by a replica that lags, stalls, dies
or restarts empty.

Every server here is a real process on 127.0.0.1 that the test starts: a primary and a
replica, the replica following the primary directly or through a ``Relay`` the test can
hold, so that the replica is behind the primary, link up and serving clients, for as long
as the test wants. That a read was served by the replica is read from the replica's own
command counters, not taken from the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

from kvstore import PackageRecord, RedisPackageStore
from kvstore.redis.replicas import (
    Position,
    is_caught_up,
    primary_position,
    replica_position,
)
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import large, pkg
from .topology import DATA_NODE_SETTINGS, LoopbackServer, Relay, caught_up, raw_command

# ---------------------------------------------------------------------------------------
# What INFO replication says, read by the rules the promise rests on.

PRIMARY_INFO = (
    b"# Replication\r\nrole:master\r\nconnected_slaves:2\r\n"
    b"slave0:ip=127.0.0.1,port=7001,state=online,offset=90,lag=0,type=replica\r\n"
    b"slave1:ip=10.0.0.2,port=7002,state=wait_bgsave,offset=0,lag=0\r\n"
    b"master_replid:" + b"a" * 40 + b"\r\nmaster_repl_offset:100\r\n"
)
REPLICA_INFO = (
    b"# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\nmaster_link_status:up\r\n"
    b"slave_repl_offset:100\r\nmaster_replid:" + b"a" * 40 + b"\r\nmaster_repl_offset:100\r\n"
)


def test_the_primary_says_its_position_and_only_its_online_replicas() -> None:
    assert primary_position(PRIMARY_INFO) == (Position(b"a" * 40, 100), [("127.0.0.1", 7001)])


def test_a_replica_at_or_past_the_position_of_the_same_history_is_caught_up() -> None:
    primary = Position(b"a" * 40, 100)
    assert replica_position(REPLICA_INFO) == primary
    assert is_caught_up(Position(b"a" * 40, 101), primary)
    assert not is_caught_up(Position(b"a" * 40, 99), primary)
    # A primary that restarted empty began a new history at a small offset: a replica
    # far along the old one holds none of its writes.
    assert not is_caught_up(Position(b"b" * 40, 10**9), primary)
    assert not is_caught_up(None, primary)


@pytest.mark.parametrize(
    "info",
    [
        None,
        b"",
        b"role:master\r\nmaster_repl_offset:5\r\n",  # no history
        b"role:master\r\nmaster_replid:x\r\nmaster_repl_offset:-5\r\n",
        b"role:master\r\nmaster_replid:x\r\nmaster_repl_offset:1" + b"0" * 30 + b"\r\n",
        b"role:slave\r\nmaster_replid:x\r\nmaster_repl_offset:5\r\n",  # a replica
        "role:master\r\nmaster_replid:x\r\nmaster_repl_offset:5\r\n",  # not bytes
        [b"role:master"],
    ],
)
def test_what_no_primary_says_gives_no_position(info: Any) -> None:
    assert primary_position(info) is None
    assert replica_position(info) is None


def test_a_replica_line_without_a_usable_address_is_left_out() -> None:
    lines = [
        b"slave0:ip=,port=7001,state=online",
        b"slave1:ip=127.0.0.1,port=99999,state=online",
        b"slave2:ip=127.0.0.1,port=x,state=online",
        b"slave3:garbage",
        b"slavex:ip=127.0.0.1,port=7003,state=online",
    ]
    info = b"role:master\r\nmaster_replid:a\r\nmaster_repl_offset:1\r\n" + b"\r\n".join(lines)
    assert primary_position(info) == (Position(b"a", 1), [])


# ---------------------------------------------------------------------------------------
# Options.


def test_the_options_are_checked() -> None:
    client = fakeredis.FakeAsyncRedis()
    with pytest.raises(TypeError, match="read_from_replicas must be a bool"):
        RedisPackageStore(client, read_from_replicas=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replica_read_timeout"):
        RedisPackageStore(client, read_from_replicas=True, replica_read_timeout=0)
    with pytest.raises(ValueError, match="replica_read_timeout"):
        RedisPackageStore(client, replica_read_timeout=float("inf"))


async def test_on_fakeredis_every_read_goes_to_the_one_server() -> None:
    store = RedisPackageStore(fakeredis.FakeAsyncRedis(), read_from_replicas=True)
    try:
        await store.put_package(pkg(archive=large(b"x")))
        assert (await store.get_package("wf", "h1")) == pkg(archive=large(b"x"))
        assert [p.content_hash for p in await store.list_packages()] == ["h1"]
        served, to_primary = store.health().replica_reads or (-1, -1)
        assert served == 0 and to_primary > 0
    finally:
        await store.aclose()


# ---------------------------------------------------------------------------------------
# A primary and a replica of the test's own.


@dataclass
class Pair:
    primary: LocalServer
    replica: LocalServer
    relay: Relay

    async def follow(self) -> None:
        """The replica follows the primary through the relay, and has caught up."""
        async with Redis(port=self.replica.port) as replica:
            await raw_command(replica, "REPLICAOF", "127.0.0.1", str(self.relay.port))
        await caught_up(self.primary.port, self.replica.port)

    async def replica_reads(self) -> int:
        """The reads of archives and rows the replica has served, by its own counters."""
        async with Redis(port=self.replica.port) as replica:
            stats = await replica.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("hmget", "hget"))


@pytest.fixture
async def pair(binary: Path, tmp_path: Path) -> AsyncIterator[Pair]:
    primary = LocalServer(binary, data_dir=tmp_path / "primary", settings=DATA_NODE_SETTINGS)
    replica = LocalServer(binary, data_dir=tmp_path / "replica", settings=DATA_NODE_SETTINGS)
    with primary, replica:
        relay = await Relay(primary.port).start()
        made = Pair(primary, replica, relay)
        try:
            await made.follow()
            yield made
        finally:
            relay.release()
            if replica.pid is not None:
                os.kill(replica.pid, signal.SIGCONT)
            await relay.aclose()


@pytest.fixture
async def stores(pair: Pair) -> AsyncIterator[tuple[RedisPackageStore, RedisPackageStore]]:
    """A store that writes (through the primary alone) and one that reads from replicas,
    on one namespace."""
    namespace = fresh_namespace()
    writer = RedisPackageStore.from_url(pair.primary.url, namespace=namespace)
    reader = RedisPackageStore.from_url(
        pair.primary.url,
        namespace=namespace,
        read_from_replicas=True,
        replica_read_timeout=0.5,
        timeout=30.0,
    )
    try:
        yield writer, reader
    finally:
        await writer.aclose()
        await reader.aclose()


# Archives inside rows and in blobs, of odd sizes, one large enough to come in slices.
ARCHIVES = [b"", b"z", bytes(range(256)) * 16, large(b"blob"), os.urandom(2 << 20)]


def packages(tag: str) -> list[PackageRecord]:
    return [
        pkg(f"wf-{i}", f"{tag}-{i}", archive + tag.encode(), n=i)
        for i, archive in enumerate(ARCHIVES)
    ]


async def everything(store: RedisPackageStore) -> tuple[Any, ...]:
    """What every read of the store says, of the packages ``packages`` puts."""
    packages_listed = await store.list_packages()
    heads = [h async for h in store.iter_package_heads()]
    gets = [await store.get_package(p.workflow_type, p.content_hash) for p in packages_listed]
    return packages_listed, heads, gets, await store.list_package_routes()


async def test_a_caught_up_replica_serves_every_read_and_says_what_the_primary_says(
    pair: Pair, stores: tuple[RedisPackageStore, RedisPackageStore]
) -> None:
    writer, reader = stores
    for record in packages("a"):
        await writer.put_package(record)
    await caught_up(pair.primary.port, pair.replica.port)
    before = await pair.replica_reads()

    assert await everything(reader) == await everything(writer)
    assert await pair.replica_reads() > before
    served, _ = reader.health().replica_reads or (0, 0)
    assert served > 0


async def test_a_replica_behind_the_primary_never_serves_an_older_read(
    pair: Pair, stores: tuple[RedisPackageStore, RedisPackageStore]
) -> None:
    writer, reader = stores
    first, second = packages("old"), packages("new")
    for record in first:
        await writer.put_package(record)
    await caught_up(pair.primary.port, pair.replica.port)
    await reader.list_packages()  # the replica is known and answers

    _, declined = reader.health().replica_reads or (0, 0)
    pair.relay.hold()  # the replica stays up, serving clients, and gets no more writes
    for record in second:
        await writer.put_package(record)
    await writer.delete_package(first[0].workflow_type, first[0].content_hash)
    await writer.put_package_route(first[1].workflow_type, first[1].content_hash)

    # Every read begins after those writes were acknowledged: each sees every one.
    for _ in range(3):
        assert await everything(reader) == await everything(writer)
        assert await reader.get_package(first[0].workflow_type, first[0].content_hash) is None
        for record in second:
            assert await reader.get_package(record.workflow_type, record.content_hash) == record
        assert await reader.get_package_route(first[1].workflow_type) == first[1].content_hash
    async with Redis(port=pair.replica.port) as replica:  # it would have said otherwise
        assert await replica.exists(reader._keys.row(b"wf-0\0old-0")) == 1
        assert await replica.exists(reader._keys.row(b"wf-0\0new-0")) == 0
        assert await replica.hget(reader._keys.routes, "wf-2") == b"old-2"
    _, to_primary = reader.health().replica_reads or (0, 0)
    assert to_primary > declined  # asked, found behind, and passed over

    pair.relay.release()
    await caught_up(pair.primary.port, pair.replica.port)
    before = await pair.replica_reads()
    assert await everything(reader) == await everything(writer)
    assert await pair.replica_reads() > before  # caught up, it serves again


async def reads_follow_writes(
    writer: RedisPackageStore, reader: RedisPackageStore, count: int
) -> list[PackageRecord]:
    """``count`` puts (every third deleted again) by ``writer``, each acknowledged and
    at once read by ``reader``, which must see it; then ``reader``'s listing."""
    for i in range(count):
        record = pkg("race", f"h{i}", large(b"%d" % i) if i % 2 else b"%d" % i, n=i)
        await writer.put_package(record)
        assert await reader.get_package("race", f"h{i}") == record
        assert await reader.get_package_route("race") == f"h{i}"
        if i % 3 == 0:
            await writer.delete_package("race", f"h{i}")
            assert await reader.get_package("race", f"h{i}") is None
    listed = await reader.list_packages()
    assert [p.content_hash for p in listed] == [f"h{i}" for i in range(count) if i % 3]
    return listed


async def test_reads_racing_writes_always_see_every_acknowledged_write(
    pair: Pair, stores: tuple[RedisPackageStore, RedisPackageStore]
) -> None:
    """A write, acknowledged, then at once a read of another store: the replica is
    sometimes behind by that write, and the read must not tell."""
    writer, reader = stores
    listed = await reads_follow_writes(writer, reader, 200)
    # Read at once, the replica is often behind by the write just made, and passed over;
    # caught up, it serves.
    await caught_up(pair.primary.port, pair.replica.port)
    before = await pair.replica_reads()
    assert await reader.list_packages() == listed
    assert await pair.replica_reads() > before


async def listing_meets(
    pair: Pair,
    stores: tuple[RedisPackageStore, RedisPackageStore],
    event: str,
) -> None:
    writer, reader = stores
    catalogue = [pkg("big", f"h{i:03}", os.urandom(1 << 20), n=i) for i in range(24)]
    for record in catalogue:
        await writer.put_package(record)
    await caught_up(pair.primary.port, pair.replica.port)
    assert pair.replica.pid is not None
    loop = asyncio.get_running_loop()
    listed: list[PackageRecord] = []
    started = loop.time()
    # Small round trips, so the replica meets its end with most of the listing to go.
    async for record in reader.iter_packages(max_bytes=2 << 20):
        listed.append(record)
        if len(listed) == 3:
            if event == "paused":
                os.kill(pair.replica.pid, signal.SIGSTOP)
            else:
                pair.replica.kill()
    elapsed = loop.time() - started
    assert listed == catalogue
    # Within the bound: one replica_read_timeout (0.5 s) lost, then the primary; a
    # listing that waited for the replica would take the store's timeout (30 s).
    assert elapsed < 15.0, elapsed
    # The next read does not try the failed replica again: it rests.
    started = loop.time()
    assert await reader.get_package("big", "h000") == catalogue[0]
    assert loop.time() - started < 5.0


async def test_a_replica_paused_mid_listing_costs_the_bound_once_and_the_listing_is_whole(
    pair: Pair, stores: tuple[RedisPackageStore, RedisPackageStore]
) -> None:
    await listing_meets(pair, stores, "paused")


async def test_a_replica_killed_mid_listing_and_the_listing_is_whole(
    pair: Pair, stores: tuple[RedisPackageStore, RedisPackageStore]
) -> None:
    await listing_meets(pair, stores, "killed")


async def test_a_primary_restarted_empty_is_not_answered_from_the_old_history(
    pair: Pair, stores: tuple[RedisPackageStore, RedisPackageStore]
) -> None:
    writer, reader = stores
    old = packages("old")
    for record in old:
        await writer.put_package(record)
    await caught_up(pair.primary.port, pair.replica.port)
    pair.relay.hold()  # the replica keeps the old history for as long as the test reads

    pair.primary.kill()
    pair.primary.remove_data()
    pair.primary.start()
    fresh = pkg("wf-0", "after-restart", b"new")
    await writer.put_package(fresh)  # acknowledged by the primary, in a new history

    for _ in range(3):
        assert await reader.get_package("wf-0", "after-restart") == fresh
        assert await reader.get_package(old[1].workflow_type, old[1].content_hash) is None
        assert await reader.list_packages() == [fresh]
        assert await reader.get_package_route("wf-0") == "after-restart"


async def test_without_the_right_to_info_every_read_goes_to_the_primary(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = fresh_namespace()
    async with Redis(port=pair.primary.port) as admin:
        await raw_command(
            admin, "ACL", "SETUSER", "engine", "on", ">pw", "~*", "&*", "+@all", "-info"
        )
    await caught_up(pair.primary.port, pair.replica.port)
    url = f"redis://engine:pw@127.0.0.1:{pair.primary.port}"
    writer = RedisPackageStore.from_url(pair.primary.url, namespace=namespace)
    reader = RedisPackageStore.from_url(url, namespace=namespace, read_from_replicas=True)
    try:
        await writer.put_package(pkg(archive=large(b"x")))
        before = await pair.replica_reads()
        with caplog.at_level(logging.WARNING, logger="kvstore"):
            for _ in range(3):
                assert await reader.get_package("wf", "h1") == pkg(archive=large(b"x"))
        assert await pair.replica_reads() == before
        said = [r.getMessage() for r in caplog.records if "replication position" in r.getMessage()]
        assert len(said) == 1, said
        assert "NOPERM" in said[0] or "no permissions" in said[0].lower(), said
    finally:
        await writer.aclose()
        await reader.aclose()


# ---------------------------------------------------------------------------------------
# A replica that is not a Redis: it joins the primary as replicas do, so the primary names
# it, and answers its clients as the test says.


async def _request(reader: asyncio.StreamReader) -> list[bytes]:
    """One command a client sent, as RESP carries it."""
    header = await reader.readline()
    if not header.startswith(b"*"):
        raise ConnectionError("not a RESP command")
    args = []
    for _ in range(int(header[1:])):
        length = int((await reader.readline())[1:])
        args.append((await reader.readexactly(length + 2))[:-2])
    return args


class NotRedis(LoopbackServer):
    """Joins the primary at ``primary_port`` as a replica (``REPLCONF``, ``PSYNC``, then
    an ``ACK`` every 100 ms, whatever the primary sends), and answers each client's
    command with ``answer(command)``: bytes, or ``None`` to answer nothing, ever."""

    def __init__(self, primary_port: int, answer: Answer) -> None:
        super().__init__()
        self._primary_port = primary_port
        self._answer = answer
        self.asked = 0  # commands its clients sent

    async def start(self) -> NotRedis:
        await self._listen(self._serve)
        self._spawn(self._join(self.port))
        return self

    async def _join(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self._primary_port)
        for command in (
            [b"REPLCONF", b"listening-port", str(port).encode()],
            [b"REPLCONF", b"capa", b"eof", b"capa", b"psync2"],
            [b"PSYNC", b"?", b"-1"],
        ):
            writer.write(b"".join(_resp(command)))
            await writer.drain()
            await reader.readline()
        self._spawn(_drain(reader))
        while True:
            writer.write(b"".join(_resp([b"REPLCONF", b"ACK", b"0"])))
            await writer.drain()
            await asyncio.sleep(0.1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                command = await _request(reader)
                self.asked += 1
                answer = self._answer(command)
                if answer is None:
                    await asyncio.Event().wait()  # a server that stalls
                    continue
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()

    async def online(self, primary: LocalServer) -> None:
        async with Redis(port=primary.port) as client:
            for _ in range(200):
                said = await client.info("replication")
                if said.get("slave0", {}).get("state") == "online":
                    return
                await asyncio.sleep(0.05)
        raise AssertionError("the primary never put the fake replica online")


def _resp(command: list[bytes]) -> list[bytes]:
    return [b"*%d\r\n" % len(command)] + [b"$%d\r\n%s\r\n" % (len(a), a) for a in command]


async def _drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def caught_up_info(history: bytes) -> bytes:
    """A replica's INFO replication, far along ``history``."""
    return _bulk(
        b"role:slave\r\nmaster_link_status:up\r\nmaster_replid:"
        + history
        + b"\r\nslave_repl_offset:999999999\r\n"
    )


Answer = Callable[[list[bytes]], "bytes | None"]

HOSTILE: dict[str, Callable[[bytes], Answer]] = {
    # Says it is caught up, then answers a read with what no Redis gives.
    "an integer for a row": lambda info: lambda c: info if c[0] == b"INFO" else b":42\r\n",
    # Says it is caught up, then refuses every read.
    "MASTERDOWN": lambda info: (
        lambda c: info if c[0] == b"INFO" else b"-MASTERDOWN Link with MASTER is down\r\n"
    ),
    # Says it is a primary.
    "a primary": lambda info: lambda c: _bulk(b"role:master\r\nmaster_replid:x\r\n"),
    # Answers nothing at all.
    "silence": lambda info: lambda c: None,
    # Answers garbage that is not RESP.
    "not RESP": lambda info: lambda c: b"HTTP/1.1 400 Bad Request\r\n\r\n",
}


@pytest.mark.parametrize("hostile", list(HOSTILE))
async def test_a_replica_that_is_not_a_redis_never_changes_what_a_read_returns(
    valkey_server_of_own: LocalServer, hostile: str
) -> None:
    primary = valkey_server_of_own
    namespace = fresh_namespace()
    writer = RedisPackageStore.from_url(primary.url, namespace=namespace)
    async with Redis(port=primary.port) as client:
        history = (await client.info("replication"))["master_replid"].encode()
    fake = await NotRedis(primary.port, HOSTILE[hostile](caught_up_info(history))).start()
    reader = RedisPackageStore.from_url(
        primary.url, namespace=namespace, read_from_replicas=True, replica_read_timeout=0.3
    )
    try:
        await fake.online(primary)
        records = [pkg("wf", f"h{i}", large(b"%d" % i), n=i) for i in range(3)]
        for record in records:
            await writer.put_package(record)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await reader.get_package("wf", "h0") == records[0]
        assert await reader.list_packages() == records
        assert await reader.get_package_route("wf") == "h2"
        assert loop.time() - started < 10.0  # one replica_read_timeout at most, not 10 s
        assert reader.health().replica_reads is not None
        served, to_primary = reader.health().replica_reads or (0, 0)
        assert served == 0 and to_primary > 0
        assert fake.asked > 0  # it was asked, and not believed
    finally:
        await reader.aclose()
        await writer.aclose()
        await fake.aclose()


@pytest.fixture
def valkey_server_of_own() -> Any:
    """A Valkey primary of the test's own: a fake replica joins it."""
    with LocalServer(settings=DATA_NODE_SETTINGS) as running:
        yield running


async def test_round_trips_queued_behind_each_other_on_a_slow_replica_link_are_served_by_it(
    tmp_path: Path,
) -> None:
    # Each 2 MiB reply takes 0.4 s over the replica's slow link, within the 0.7 s bound,
    # and the fourth of the gets sent together arrives about 1.6 s after it was sent:
    # a replica that keeps sending is not taken for a dead one.
    primary = LocalServer(data_dir=tmp_path / "primary", settings=DATA_NODE_SETTINGS)
    replica = LocalServer(data_dir=tmp_path / "replica")
    relay = await Relay(replica.port, rate=5 << 20).start()
    replica.settings = {
        **DATA_NODE_SETTINGS,
        "replicaof": f"127.0.0.1 {primary.port}",
        "replica-announce-port": str(relay.port),  # the primary names the slow way in
    }
    try:
        with primary, replica:
            namespace = fresh_namespace()
            records = [pkg("t", f"h{i}", os.urandom(2 << 20), n=i) for i in range(4)]
            async with RedisPackageStore.from_url(primary.url, namespace=namespace) as writer:
                for record in records:
                    await writer.put_package(record)
            await caught_up(primary.port, replica.port)
            async with RedisPackageStore.from_url(
                primary.url,
                namespace=namespace,
                read_from_replicas=True,
                replica_read_timeout=0.7,
            ) as reader:
                got = await asyncio.gather(
                    *(reader.get_package("t", r.content_hash) for r in records)
                )
                assert got == records
                assert reader.health().replica_reads == (2 * len(records), 0)
    finally:
        await relay.aclose()
