"""``kvstore gc``: blobs no row refers to are collected once older than the grace period,
and no blob a row needs is ever removed, even while writers put and delete packages
that share archives.

On fakeredis and real servers through ``collect_garbage``; on a three-primary cluster;
and through the command line.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import random
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from kvstore import BackendError, PackageRecord, RedisPackageStore, SerializationError
from kvstore.redis.keyspace import Keyspace, archive_digest
from kvstore.redis.scripts import LIBRARY, PUT_BLOB
from kvstore.server_process import LocalServer, cluster_url, start_cluster
from kvstore.tools import gc as gc_module
from kvstore.tools.check import check_store
from kvstore.tools.gc import collect_garbage

from .conftest import Backend, fresh_namespace
from .support import T0, large, pkg
from .test_cli import fails, kv, ok
from .test_store_library import impostor_text, replace_library


async def blob_keys(raw: Redis, namespace: str) -> set[bytes]:
    return {key async for key in raw.scan_iter(match=Keyspace(namespace).blob_pattern)}


async def settle() -> None:
    """Let the server's clock pass the last write, so a grace of ~0 finds it older."""
    await asyncio.sleep(0.01)


async def test_a_shared_archive_stays_while_any_row_refers_to_it(backend: Backend) -> None:
    raw = backend.raw
    async with backend.store() as store:
        k = Keyspace(store.namespace)
        await store.put_package(pkg("a", "h1", large(b"shared")))
        await store.put_package(pkg("b", "h2", large(b"shared")))
        await store.put_package(pkg("c", "h3", large(b"alone")))
        assert len(await blob_keys(raw, store.namespace)) == 2  # the same bytes: one blob
        await store.delete_package("a", "h1")
        await settle()
        report = await collect_garbage(store, grace=0)
        assert (report.seen, report.referenced, report.collected) == (2, 2, 0)
        assert (await store.get_package("b", "h2")) == pkg("b", "h2", large(b"shared"))

        await store.delete_package("b", "h2")
        await settle()
        report = await collect_garbage(store, grace=0)
        assert (report.seen, report.referenced, report.collected) == (2, 1, 1)
        assert report.bytes_freed == len(large(b"shared"))
        assert await blob_keys(raw, store.namespace) == {k.blob(archive_digest(large(b"alone")))}
        assert await store.list_packages() == [pkg("c", "h3", large(b"alone"))]
        assert (await check_store(store)).problems == []


async def test_a_young_orphan_is_spared_and_a_dry_run_removes_nothing(backend: Backend) -> None:
    raw = backend.raw
    async with backend.store() as store:
        await store.put_package(pkg("a", "h1", large(b"gone soon")))
        await store.delete_package("a", "h1")
        await settle()
        young = await collect_garbage(store)  # an hour's grace
        assert (young.seen, young.collected, young.spared) == (1, 0, 1)

        dry = await collect_garbage(store, grace=0, dry_run=True)
        assert (dry.collected, dry.spared, dry.bytes_freed) == (1, 0, len(large(b"gone soon")))
        orphan = await blob_keys(raw, store.namespace)
        assert len(orphan) == 1 and set(dry.collected_keys) == orphan

        done = await collect_garbage(store, grace=0)
        assert (done.collected, done.bytes_freed) == (1, len(large(b"gone soon")))
        assert set(done.collected_keys) == orphan
        assert await blob_keys(raw, store.namespace) == set()
        assert (await collect_garbage(store, grace=0)).seen == 0


async def test_a_blob_a_put_wrote_but_did_not_refer_to_yet_is_spared(backend: Backend) -> None:
    """A put on a cluster writes its blob, then its row: between the two, the blob has no
    row. Written here as that first step alone, then the row's put."""
    raw = backend.raw
    async with backend.store() as store:
        k = Keyspace(store.namespace)
        digest = archive_digest(large(b"in flight"))
        await store.load_library()
        await raw.fcall(PUT_BLOB.name, 1, k.blob(digest), digest, b"in flight")
        report = await collect_garbage(store, grace=60)
        assert (report.collected, report.spared) == (0, 1)
        await store.put_package(pkg("a", "h1", large(b"in flight")))
        await settle()
        report = await collect_garbage(store, grace=0)
        assert (report.referenced, report.collected) == (1, 0)
        assert (await store.get_package("a", "h1")) == pkg("a", "h1", large(b"in flight"))


async def test_a_row_written_after_the_mark_keeps_its_blob(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark reads the rows; a put lands after it, before the sweep. Its blob is
    unmarked, but written after the cut-off (``t0``, with no grace): the sweep keeps it."""
    async with backend.store() as store, backend.store(store.namespace) as writer:
        await store.put_package(pkg("a", "h0", large(b"old")))
        await store.delete_package("a", "h0")
        await settle()
        mark = gc_module._Collector._mark

        async def mark_then_put(self: Any, home: Any) -> set[bytes]:
            marked: set[bytes] = await mark(self, home)
            await writer.put_package(pkg("a", "h1", large(b"after the mark")))
            return marked

        monkeypatch.setattr(gc_module._Collector, "_mark", mark_then_put)
        report = await collect_garbage(store, grace=0)
        assert (report.seen, report.referenced, report.collected, report.spared) == (2, 0, 1, 1)
        assert (await store.get_package("a", "h1")) == pkg("a", "h1", large(b"after the mark"))


async def test_keys_that_are_no_blobs_are_left_alone(backend: Backend) -> None:
    raw = backend.raw
    async with backend.store() as store:
        k = Keyspace(store.namespace)
        odd = [k.blob_prefix + b"nothex", k.blob(b"0" * 64)]
        await raw.set(odd[0], b"x")
        await raw.set(odd[1], b"a string")
        await settle()
        for dry_run in (True, False):
            report = await collect_garbage(store, grace=0, dry_run=dry_run)
            assert (report.seen, report.ignored, report.collected) == (1, 2, 0)
        assert await raw.exists(*odd) == 2


async def test_a_layout_1_namespace_has_nothing_to_collect(backend: Backend) -> None:
    async with backend.store(layout=1) as store:
        await store.put_package(pkg("a", "h1", large(b"zip")))
        await store.delete_package("a", "h1")
        await store.put_package(pkg("a", "h2", large(b"zip")))
        report = await collect_garbage(store, grace=0)
        assert (report.rows, report.seen, report.collected) == (1, 0, 0)


async def test_an_unknown_layout_or_grace_is_refused(backend: Backend) -> None:
    async with backend.store() as store:
        await store.put_package(pkg("a", "h1", large(b"zip")))
        await store.delete_package("a", "h1")
        for grace in (-1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="grace"):
                await collect_garbage(store, grace=grace)
        await backend.raw.set(Keyspace(store.namespace).format, b"9")
        with pytest.raises(SerializationError, match="layout"):
            await collect_garbage(store, grace=0)
        assert len(await blob_keys(backend.raw, store.namespace)) == 1


async def test_a_missing_library_is_loaded(backend: Backend) -> None:
    async with backend.store() as store:
        await store.put_package(pkg("a", "h1", large(b"zip")))
        await store.delete_package("a", "h1")
        await backend.raw.function_flush()
        await settle()
        report = await collect_garbage(store, grace=0)
        assert report.collected == 1


async def test_a_library_of_this_release_s_name_with_other_code_is_refused(
    backend: Backend,
) -> None:
    async with backend.store() as store:
        await store.put_package(pkg("a", "h1", large(b"zip")))
        await store.delete_package("a", "h1")
        await replace_library(backend.raw, impostor_text(("drop_blob",)))
        try:
            await settle()
            with pytest.raises(BackendError, match="FUNCTION DELETE"):
                await collect_garbage(store, grace=0)
            assert len(await blob_keys(backend.raw, store.namespace)) == 1
            assert (await collect_garbage(store, grace=0, dry_run=True)).collected == 1
        finally:  # the server is shared with the tests after this one
            await replace_library(backend.raw, LIBRARY.text)


# gc racing writers.

# Writers whose calls end within this (retry_budget + timeout), gc with a grace above it.
WRITER_TIMEOUT, WRITER_BUDGET, RACE_GRACE = 0.5, 0.5, 2.0
SHARED = [b"shared archive %d " % i * 400 for i in range(3)]  # blobs, not inside rows


async def _write(url: str, namespace: str, name: str, seconds: float) -> dict[str, Any]:
    """Put and delete packages of the writer's own type, half of them of archives every
    writer shares; after each, read back every package it holds."""
    rng = random.Random(name)
    held: dict[str, bytes] = {}
    counts = {"puts": 0, "deletes": 0, "reads": 0}
    failures: list[str] = []
    async with RedisPackageStore.from_url(
        url, namespace=namespace, timeout=WRITER_TIMEOUT, retry_budget=WRITER_BUDGET
    ) as store:
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
            if held and rng.random() < 0.3:
                content_hash = rng.choice(sorted(held))
                await store.delete_package(name, content_hash)
                del held[content_hash]
                counts["deletes"] += 1
            else:
                content_hash = f"h{rng.randrange(10)}"
                archive = rng.choice(SHARED) if rng.random() < 0.5 else os.urandom(5000)
                at = T0 + timedelta(microseconds=n)
                await store.put_package(PackageRecord(name, content_hash, archive, at))
                held[content_hash] = archive
                counts["puts"] += 1
            for content_hash, archive in held.items():
                try:
                    got = await store.get_package(name, content_hash)
                except SerializationError as exc:
                    failures.append(str(exc))
                    continue
                counts["reads"] += 1
                if got is None or got.archive != archive:
                    failures.append(f"{name} {content_hash}: {got!r:.80}")
    return {**counts, "failures": failures}


def _writer_process(url: str, namespace: str, name: str, seconds: float, out: Any) -> None:
    out.put((name, asyncio.run(_write(url, namespace, name, seconds))))


@pytest.mark.slow
async def test_gc_racing_writers_never_removes_a_blob_a_row_needs(
    valkey_server: LocalServer,
) -> None:
    namespace = fresh_namespace()
    url = valkey_server.url
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    writers = [
        context.Process(target=_writer_process, args=(url, namespace, f"w{i}", 12.0, results))
        for i in range(3)
    ]
    for process in writers:
        process.start()
    collected = runs = 0
    try:
        async with RedisPackageStore.from_url(url, namespace=namespace) as store:
            deadline = time.monotonic() + 40
            while any(p.is_alive() for p in writers):
                assert time.monotonic() < deadline, "the writers did not end in 40 s"
                report = await collect_garbage(store, grace=RACE_GRACE)
                collected, runs = collected + report.collected, runs + 1
                await asyncio.sleep(0.05)
            done = dict(results.get(timeout=10) for _ in writers)
            for process in writers:
                process.join(timeout=10)
            await asyncio.sleep(RACE_GRACE + 0.1)
            final = await collect_garbage(store, grace=RACE_GRACE)
            report_after = await check_store(store)
            listed = await store.list_packages()  # every archive read and verified
    finally:
        for process in writers:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    assert {name: d["failures"] for name, d in done.items()} == {w: [] for w in done}
    assert all(d["puts"] > 50 and d["deletes"] > 10 for d in done.values()), done
    assert runs > 10 and collected > 0
    assert report_after.problems == []  # no missing or damaged blob, nor anything else
    # Every blob left is referred to: the final collection took every orphan.
    assert final.seen - final.collected == len({archive_digest(r.archive) for r in listed})


# A cluster.


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[LocalServer]]:
    with ExitStack() as stack:
        yield start_cluster(stack)


@pytest.mark.slow
async def test_gc_on_a_cluster_collects_orphans_on_every_primary(
    cluster: list[LocalServer],
) -> None:
    namespace = fresh_namespace()
    k = Keyspace(namespace)
    async with RedisPackageStore.from_url(cluster_url(cluster), namespace=namespace) as store:
        for n in range(30):
            await store.put_package(pkg("a", f"h{n}", large(b"archive %d" % n)))
        for n in range(0, 30, 2):
            await store.delete_package("a", f"h{n}")
        orphans = {k.blob(archive_digest(large(b"archive %d" % n))) for n in range(0, 30, 2)}
        client: Any = store.client
        holders = {client.get_node_from_key(key.decode()).name for key in orphans}
        assert len(holders) == 3  # every primary holds some
        await settle()
        dry = await collect_garbage(store, grace=0, dry_run=True)
        assert (dry.seen, dry.referenced, dry.collected) == (30, 15, 15)
        report = await collect_garbage(store, grace=0)
        assert (report.seen, report.referenced, report.collected) == (30, 15, 15)
        assert set(report.collected_keys) == orphans
        listed = await store.list_packages()  # every archive read and verified
        assert sorted(r.content_hash for r in listed) == sorted(f"h{n}" for n in range(1, 30, 2))
        again = await collect_garbage(store, grace=0)
        assert (again.seen, again.collected) == (15, 0)


# The command line.


@pytest.mark.slow
def test_the_command_line_collects_counts_and_refuses(valkey_server: LocalServer) -> None:
    namespace = fresh_namespace()
    target = ["--url", valkey_server.url, "--namespace", namespace]
    help_text = ok("gc", "--help")
    assert "--grace SECONDS" in help_text and "--dry-run" in help_text
    assert "retry_budget" in help_text  # this checkout's command line
    fails(kv("gc", "--grace", "-1", *target), "must be a number of seconds, 0 or more", 2)
    fails(kv("gc", "--grace", "nan", *target), "must be a number of seconds, 0 or more", 2)

    async def deploy_and_delete() -> None:
        async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as store:
            await store.put_package(pkg("a", "h1", large(b"kept")))
            await store.put_package(pkg("a", "h2", large(b"orphan")))
            await store.delete_package("a", "h2")

    asyncio.run(deploy_and_delete())
    time.sleep(0.01)
    young = json.loads(ok("gc", "--json", *target))
    assert (young["collected"], young["spared"], young["dry_run"]) == (0, 1, False)
    dry = ok("gc", "--dry-run", "--grace", "0", *target).splitlines()
    assert dry[1].startswith(f"would collect 1 unreferenced blobs ({len(large(b'orphan'))} bytes")
    assert dry[-1] == "dry run: nothing was removed"
    found = json.loads(ok("gc", "--grace", "0", "--json", *target))
    assert (found["blobs_seen"], found["referenced"], found["collected"]) == (2, 1, 1)
    assert found["bytes_freed"] == len(large(b"orphan"))
    lines = ok("gc", "--grace", "0", *target).splitlines()
    assert lines[0] == f"namespace {namespace!r}: 1 rows read, 1 blobs seen, 1 referenced"

    async def mark_unknown() -> None:
        async with Redis.from_url(valkey_server.url) as raw:
            await raw.set(Keyspace(namespace).format, b"9")

    asyncio.run(mark_unknown())
    fails(kv("gc", *target), "collects nothing in another", 1)


@pytest.mark.slow
def test_check_repair_on_the_command_line_takes_a_grace(valkey_server: LocalServer) -> None:
    namespace = fresh_namespace()
    target = ["--url", valkey_server.url, "--namespace", namespace]

    async def orphan() -> None:
        async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as store:
            await store.put_package(pkg("a", "h1", large(b"orphan")))
            await store.delete_package("a", "h1")

    asyncio.run(orphan())
    route = "route-without-archive"  # a's route, left by the delete
    kept = json.loads(ok("check", "--repair", "--json", *target))
    assert sorted(f["kind"] for f in kept["findings"]) == ["orphan-blob", route]
    assert kept["repairs"] == []
    time.sleep(0.01)
    gone = json.loads(ok("check", "--repair", "--grace", "0", "--json", *target))
    assert [f["kind"] for f in gone["findings"]] == [route]
    assert [r["kind"] for r in gone["repairs"]] == ["orphan-blob"]
    assert ok("check", *target).splitlines()[-1] == f"namespace {namespace!r} is sound"
