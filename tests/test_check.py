"""``kvstore check [--repair]``: damage made by hand is found, repaired when that needs no
guessing, and a sound namespace is never called broken or changed, even while writers run.

The namespace is damaged with raw redis-py commands, as a bug, a careless operator or a
half-restored backup would, on fakeredis (through ``check_store``) and on real servers
(through ``check_store`` and the command line).
"""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime, timedelta
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from kvstore import PackageRecord, RedisPackageStore
from kvstore.redis.keyspace import Keyspace, encode_stamp, index_member, row_id
from kvstore.server_process import LocalServer
from kvstore.tools.check import INFORMATIONAL, REPAIRABLE, check_store, glob_escape

from .conftest import Backend, fresh_namespace
from .support import T0, large
from .test_acl import Users
from .test_cli import kv
from .topology import raw_command


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def check(
    backend: Backend, namespace: str, *, repair: bool = False, grace: float = 3600.0
) -> Any:
    async with backend.store(namespace) as store:
        return await check_store(store, repair=repair, grace=grace)


async def contents(raw: Redis, namespace: str) -> dict[bytes, Any]:
    """Every key of the namespace with its value, to show what a check changed."""
    found: dict[bytes, Any] = {}
    async for key in raw.scan_iter(match=glob_escape(b"{" + namespace.encode() + b"}:") + b"*"):
        kind = await raw.type(key)
        if kind == b"string":
            found[key] = await raw.get(key)
        elif kind == b"hash":
            found[key] = await raw.hgetall(key)
        elif kind == b"zset":
            found[key] = await raw.zrange(key, 0, -1, withscores=True)
        else:
            found[key] = kind
    return found


# Archives kept as blobs in layout 2 (a small one stays inside its row).
A = PackageRecord("order", "h1", large(b"one"), at(1))
B = PackageRecord("order", "h2", large(b"two"), at(2))
C = PackageRecord("bill", "h3", large(b"three"), at(3))
D = PackageRecord("ship", "h4", large(b"four"), at(4))


async def damage_repairably(backend: Backend, namespace: str, layout: int = 1) -> None:
    """A: row deleted; B: index member removed; C: member at the wrong stamp; D: a second,
    stale member. Plus a route to no archive and one to an archive of another type. In
    ``layout`` 2, A's blob is left with no row to refer to it."""
    async with backend.store(namespace, layout=layout) as store:
        for record in (A, B, D):
            await store.put_package(record)
        await store.put_package_with_routes(C, ["other"])
        await store.put_package_route("gone", "nowhere")
    k, raw = Keyspace(namespace), backend.raw

    def member(record: PackageRecord, when: datetime) -> bytes:
        return index_member(encode_stamp(when), row_id(record.workflow_type, record.content_hash))

    await raw.delete(k.row(row_id("order", "h1")))
    await raw.zrem(k.index, member(B, B.deployed_at))
    await raw.zrem(k.index, member(C, C.deployed_at))
    await raw.zadd(k.index, {member(C, at(0.5)): 0})
    await raw.zadd(k.index, {member(D, at(9)): 0})


@pytest.mark.parametrize("layout", [1, 2])
async def test_repairable_damage_is_reported_repaired_and_then_gone(
    backend: Backend, layout: int
) -> None:
    namespace = fresh_namespace()
    neighbour = namespace + "-x"  # its keys share the text prefix, not the hash tag
    await damage_repairably(backend, namespace, layout)
    await damage_repairably(backend, neighbour, layout)
    orphan = ["orphan-blob"] if layout == 2 else []  # A's archive
    k = Keyspace(namespace)
    rows_before = {
        key: v for key, v in (await contents(backend.raw, namespace)).items() if b":pkg:" in key
    }
    routes_before = await backend.raw.hgetall(k.routes)

    report = await check(backend, namespace)
    assert not report.sound
    assert sorted(f.kind for f in report.problems) == [
        "member-without-row",
        "row-without-member",
        "stamp-mismatch",
        "stamp-mismatch",
    ]
    assert sorted(f.kind for f in report.findings if f.informational) == [
        *orphan,
        "route-to-other-type",
        "route-without-archive",
    ]
    assert all(neighbour not in f.key for f in report.findings)
    assert report.repairs == []  # checking alone changes nothing

    # Within the grace period, the orphan blob is kept.
    repaired = await check(backend, namespace, repair=True)
    assert repaired.sound and repaired.problems == []
    assert sorted(r.kind for r in repaired.repairs) == [
        "member-without-row",
        "row-without-member",
        "stamp-mismatch",
        "stamp-mismatch",
    ]
    assert [f.kind for f in repaired.findings if f.kind == "orphan-blob"] == orphan
    # Past it, collected; the blobs rows refer to are kept.
    await asyncio.sleep(0.01)
    collected = await check(backend, namespace, repair=True, grace=0.005)
    assert [r.kind for r in collected.repairs] == orphan

    again = await check(backend, namespace)
    assert again.sound and again.repairs == []
    assert {f.kind for f in again.findings} <= INFORMATIONAL
    async with backend.store(namespace) as store:
        assert await store.list_packages() == [B, C, D]
    # Rows and routes are exactly as they were; the neighbour is still damaged.
    after = await contents(backend.raw, namespace)
    assert {key: v for key, v in after.items() if b":pkg:" in key} == rows_before
    assert await backend.raw.hgetall(k.routes) == routes_before
    assert not (await check(backend, neighbour)).sound


async def test_damage_that_needs_a_guess_is_reported_and_left_alone(backend: Backend) -> None:
    namespace = fresh_namespace()
    k, raw = Keyspace(namespace), backend.raw
    async with backend.store(namespace, layout=1) as store:  # damages a row's archive
        await store.put_package(A)
        await store.put_package(B)
    await raw.hdel(k.row(row_id("order", "h2")), "archive")
    await raw.zadd(k.index, {b"garbage \xff": 0})
    await raw.set(k.row(row_id("x", "y")), b"a string")
    await raw.hset(
        k.row(b"no-separator"), mapping={"archive": b"x", "deployed_at": encode_stamp(T0)}
    )
    await raw.hset(k.routes, b"bad\xfftype", b"h1")
    await raw.set(k.route_version, b"abc")
    await raw.set(k.prefix + b"extra", b"1")
    before = await contents(raw, namespace)

    for repair in (False, True):
        report = await check(backend, namespace, repair=repair)
        assert sorted(f.kind for f in report.problems) == [
            "malformed-member",
            "malformed-route",
            "malformed-route-version",
            "malformed-row-key",
            "row-missing-field",
            "wrong-type",
        ]
        assert [f.kind for f in report.findings if f.informational] == ["unknown-key"]
        assert report.repairs == []
        assert not set(f.kind for f in report.problems) & REPAIRABLE
    assert await contents(raw, namespace) == before


async def test_an_unknown_layout_is_reported_and_nothing_else_is_read_or_changed(
    backend: Backend,
) -> None:
    namespace = fresh_namespace()
    await damage_repairably(backend, namespace)
    k = Keyspace(namespace)
    await backend.raw.set(k.format, b"9")
    before = await contents(backend.raw, namespace)
    report = await check(backend, namespace, repair=True)
    assert [f.kind for f in report.findings] == ["unknown-layout"]
    assert report.repairs == [] and not report.sound
    assert await contents(backend.raw, namespace) == before


async def test_keys_of_the_wrong_type_are_reported_without_failing(backend: Backend) -> None:
    namespace = fresh_namespace()
    k = Keyspace(namespace)
    await backend.raw.set(k.format, b"1")
    await backend.raw.set(k.index, b"not a zset")
    await backend.raw.rpush(k.routes, b"not a hash")
    await backend.raw.hset(
        k.row(row_id("t", "h")), mapping={"archive": b"x", "deployed_at": encode_stamp(T0)}
    )
    report = await check(backend, namespace, repair=True)
    assert sorted(f.key for f in report.problems if f.kind == "wrong-type") == [
        f"{{{namespace}}}:packages",
        f"{{{namespace}}}:routes",
    ]
    assert report.repairs == []


async def test_an_empty_namespace_is_sound(backend: Backend) -> None:
    report = await check(backend, fresh_namespace(), repair=True)
    assert report.sound and report.findings == [] and report.repairs == []


async def test_glob_escape_matches_exactly_the_text(backend: Backend) -> None:
    prefix = b"{" + fresh_namespace().encode() + b"}:"
    literal = prefix + b"a*b?[c]\\d"
    for key in (literal, prefix + b"aXXb?[c]\\d", prefix + b"a*bQcd", prefix + b"a*b?c\\d"):
        await backend.raw.set(key, b"1")
    matched = [key async for key in backend.raw.scan_iter(match=glob_escape(literal))]
    assert matched == [literal]


@pytest.mark.slow
async def test_a_sound_namespace_under_concurrent_writes_is_never_called_broken_or_changed(
    backend: Backend,
) -> None:
    namespace = fresh_namespace()
    rng = random.Random(7)
    ids = [(f"type-{i % 4}", f"hash-{i}") for i in range(24)]
    latest: dict[tuple[str, str], PackageRecord | None] = {}
    tick = iter(range(1_000_000))
    done = asyncio.Event()
    checks = 0

    async def writer(store: RedisPackageStore, mine: list[tuple[str, str]]) -> None:
        # Each writer owns its rows, so the last put acknowledged is the one stored.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        n = 0
        while (n < 600 or checks < 3) and loop.time() < deadline:
            n += 1
            workflow_type, content_hash = rng.choice(mine)
            roll = rng.random()
            if roll < 0.15:
                await store.delete_package(workflow_type, content_hash)
                latest[(workflow_type, content_hash)] = None
            elif roll < 0.25:
                await store.put_package_route(workflow_type, rng.choice(ids)[1])
            else:
                # Re-puts move a row's member to a later (or, sometimes, earlier) stamp.
                when = at(next(tick) if roll < 0.9 else -next(tick))
                record = PackageRecord(workflow_type, content_hash, b"x" * rng.randrange(50), when)
                await store.put_package_with_routes(record, [rng.choice(ids)[0]])
                latest[(workflow_type, content_hash)] = record
        done.set()

    async with (
        backend.store(namespace) as w1,
        backend.store(namespace) as w2,
        backend.store(namespace) as checker,
    ):
        writing = asyncio.gather(writer(w1, ids[::2]), writer(w2, ids[1::2]))
        seen: list[Any] = []  # every problem or repair any check reported
        while not done.is_set():
            # Checking alone, then repairing, by turns.
            report = await check_store(checker, repair=checks % 2 == 1)
            seen += report.problems + report.repairs
            checks += 1
        await writing
        final = await check_store(checker, repair=True)
        seen += final.problems + final.repairs
        listed = await checker.list_packages()
    assert seen == []
    assert {(r.workflow_type, r.content_hash): r for r in listed} == {
        key: record for key, record in latest.items() if record is not None
    }


async def test_repair_stands_back_when_a_put_lands_between_its_read_and_its_write(
    valkey_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orphan member is made legitimate again by a put (done here by hand, as the
    put script does it) after the repair read the row as absent and before it writes:
    WATCH on the row makes the repair's transaction do nothing, and it judges again."""
    namespace = fresh_namespace()
    k = Keyspace(namespace)
    row, stamp = row_id("order", "h1"), encode_stamp(A.deployed_at)
    async with RedisPackageStore.from_url(
        valkey_server.url, namespace=namespace, layout=1
    ) as store:  # the put by hand writes a row of layout 1
        await store.put_package(A)
        sync = SyncRedis.from_url(valkey_server.url)
        sync.delete(k.row(row))  # the member is now an orphan
        original = Pipeline.multi
        puts: list[int] = []

        def put_first(self: Pipeline) -> None:
            if not puts:
                puts.append(1)
                sync.hset(k.row(row), mapping={"archive": A.archive, "deployed_at": stamp})
                sync.zadd(k.index, {index_member(stamp, row): 0})
            original(self)  # type: ignore[no-untyped-call]

        monkeypatch.setattr(Pipeline, "multi", put_first)
        report = await check_store(store, repair=True)
        sync.close()
        assert puts and report.repairs == [] and report.sound
        assert await store.list_packages() == [A]


@pytest.mark.slow
def test_the_command_line_reports_repairs_and_exits_by_what_remains(server: LocalServer) -> None:
    namespace = fresh_namespace()
    target = ["--url", server.url, "--namespace", namespace]

    async def damage() -> None:
        on_server = Backend("server", server.url)
        await damage_repairably(on_server, namespace)
        await on_server.aclose()

    asyncio.run(damage())
    found = kv("check", *target)
    assert found.returncode == 1, found.stderr.decode()
    lines = found.stdout.decode().splitlines()
    assert sum(line.startswith("problem: ") for line in lines) == 4
    assert sum(line.startswith("note: ") for line in lines) == 2
    assert (
        lines[-1]
        == f"namespace {namespace!r} has 4 problem(s); kvstore check --repair fixes those it can"
    )

    as_json = kv("check", "--json", *target)
    assert as_json.returncode == 1
    parsed = json.loads(as_json.stdout)
    assert parsed["sound"] is False and len(parsed["findings"]) == 6

    repaired = kv("check", "--repair", *target)
    assert repaired.returncode == 0, repaired.stdout.decode()
    lines = repaired.stdout.decode().splitlines()
    assert sum(line.startswith("repaired: ") for line in lines) == 4
    assert any("removed index member" in line and ": no row" in line for line in lines)
    assert any("indexed the row at its own deployed_at" in line for line in lines)

    clean = kv("check", *target)
    assert clean.returncode == 0
    lines = clean.stdout.decode().splitlines()
    assert lines[-1] == f"namespace {namespace!r} is sound"
    assert [line.split(":")[0] for line in lines[:-1]] == ["note", "note"]


# What check and repair send beyond the store's own rule (tests/test_acl.py).
CHECK_EXTRA_RULE = "+scan +type +zscore +hexists +exists +watch +unwatch"


async def test_check_and_repair_need_only_the_store_rule_and_a_few_reads(
    server: LocalServer,
) -> None:
    namespace = fresh_namespace()
    async with Redis(port=server.port) as admin:
        await raw_command(admin, "ACL", "LOG", "RESET")
        maker = Backend("server", server.url)
        await damage_repairably(maker, namespace, layout=2)  # and an orphan blob
        await maker.aclose()
        users = Users(server, admin)
        try:
            url = await users.add(namespace)
            name = users.names[-1]
            await raw_command(admin, "ACL", "SETUSER", name, *CHECK_EXTRA_RULE.split())
            async with RedisPackageStore.from_url(url, namespace=namespace) as store:
                repaired = await check_store(store, repair=True, grace=0)
                again = await check_store(store)
            refused = await users.refusals()
        finally:
            for name in users.names:
                await raw_command(admin, "ACL", "DELUSER", name)
    assert len(repaired.repairs) == 5 and again.sound and again.findings != []
    assert [f.kind for f in again.findings if f.kind == "orphan-blob"] == []
    assert refused == []


async def test_a_missing_or_mistyped_layout_marker_is_reported(backend: Backend) -> None:
    namespace = fresh_namespace()
    k = Keyspace(namespace)
    async with backend.store(namespace) as store:
        await store.put_package(A)
    await backend.raw.delete(k.format)
    report = await check(backend, namespace, repair=True)
    assert [f.kind for f in report.problems] == ["no-layout-marker"]
    assert report.repairs == []

    await backend.raw.rpush(k.format, b"1")
    report = await check(backend, namespace, repair=True)
    assert [(f.kind, f.key) for f in report.problems] == [("wrong-type", f"{{{namespace}}}:format")]
