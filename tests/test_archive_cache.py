"""The archive cache: archives held in blobs kept on local disk, named by their digest,
so that a store started again on the same host fetches from the server only the
archives it lacks; never a byte other than the archive's, whatever the disk holds."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from kvstore import PackageRecord, RedisPackageStore, SerializationError
from kvstore.redis.archive_cache import ON_A_THREAD, ArchiveCache
from kvstore.redis.keyspace import INLINE_LIMIT, Keyspace, archive_digest
from kvstore.redis.wire import Command, flatten
from kvstore.server_process import LocalServer

from .conftest import Backend, StoreFactory, fresh_namespace
from .support import large, pkg

MIB = 1 << 20
LOGGER = "kvstore.redis.archive_cache"


def catalogue() -> list[PackageRecord]:
    """Archives of every kind: blobs (one large enough to be read on a thread, one under
    two rows), and small ones kept inside their rows."""
    shared = large(b"shared")
    return [
        pkg("order", "h1", large(b"order-1"), n=1),
        pkg("order", "h2", bytes(range(256)) * (ON_A_THREAD // 256 + 5), n=2),
        pkg("refund", "r1", shared, n=3),
        pkg("audit", "a1", shared, n=4),
        pkg("tiny", "t1", b"small archive", n=5),
        pkg("empty", "e1", b"", n=6),
    ]


def blob_archives(records: list[PackageRecord]) -> set[bytes]:
    return {r.archive for r in records if len(r.archive) > INLINE_LIMIT}


async def drop_blobs(client: Redis, keys: Keyspace) -> int:
    """Delete every blob of the namespace from the server; how many there were."""
    found = [key async for key in client.scan_iter(match=keys.blob_pattern)]
    if found:
        await client.delete(*found)
    return len(found)


def cached_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if not p.name.startswith(".")}


async def put_all(store: RedisPackageStore, records: list[PackageRecord]) -> None:
    for record in records:
        await store.put_package(record)


def cache_of(store: RedisPackageStore) -> ArchiveCache:
    cache = store.archive_cache
    assert cache is not None
    return cache


# A store started again with the same cache.


async def test_a_second_store_lists_and_gets_every_archive_from_the_cache_with_the_blobs_gone(
    stores: StoreFactory, client: Redis, tmp_path: Path
) -> None:
    records = catalogue()
    first = stores(archive_cache=tmp_path)
    await put_all(first, records)
    assert await first.list_packages() == records
    await cache_of(first).settle()
    # Every archive held in a blob, once, under its digest; none of those kept in rows.
    assert cached_files(tmp_path) == {archive_digest(a).decode(): a for a in blob_archives(records)}
    assert await drop_blobs(client, Keyspace(first.namespace)) == 3

    second = stores(archive_cache=tmp_path)
    assert await second.list_packages() == records
    assert [r async for r in second.iter_packages(chunk=2, max_bytes=1)] == records
    for record in records:
        assert await second.get_package(record.workflow_type, record.content_hash) == record
    # Without the cache, the same store reports the missing blobs.
    bare = stores()
    with pytest.raises(SerializationError, match="missing"):
        await bare.get_package("order", "h1")


async def test_a_get_fills_the_cache_and_a_later_get_reads_the_row_alone(
    stores: StoreFactory, client: Redis, tmp_path: Path
) -> None:
    records = catalogue()
    store = stores(archive_cache=tmp_path)
    await put_all(store, records)
    for record in records:
        assert await store.get_package(record.workflow_type, record.content_hash) == record
    await cache_of(store).settle()
    assert set(cached_files(tmp_path).values()) == blob_archives(records)
    await drop_blobs(client, Keyspace(store.namespace))
    again = stores(archive_cache=tmp_path)
    for record in records:
        assert await again.get_package(record.workflow_type, record.content_hash) == record
    assert await again.get_package("order", "nope") is None


@pytest.mark.parametrize("backend", ["valkey"], indirect=True)
async def test_a_warm_listing_costs_the_server_none_of_the_archives_bytes(
    stores: StoreFactory, client: Redis, tmp_path: Path
) -> None:
    records = [pkg("wf", f"h{i}", bytes([i]) * MIB, n=i) for i in range(4)]
    await put_all(stores(), records)

    async def sent_by_server(store: RedisPackageStore) -> int:
        before = int((await client.info("stats"))["total_net_output_bytes"])
        assert await store.list_packages() == records
        await cache_of(store).settle()
        return int((await client.info("stats"))["total_net_output_bytes"]) - before

    cold = await sent_by_server(stores(archive_cache=tmp_path))
    warm = await sent_by_server(stores(archive_cache=tmp_path))
    assert cold > 4 * MIB
    assert warm < 64 << 10  # rows, stamps and digests: no archive


async def test_a_listing_keeps_its_order_and_its_bound_with_the_cache_half_warm(
    stores: StoreFactory, tmp_path: Path
) -> None:
    records = [pkg("t", f"h{i:02d}", bytes([i]) * (2 * MIB), n=i) for i in range(12)]
    writer = stores()
    await put_all(writer, records)
    warm = stores(archive_cache=tmp_path)
    for record in records[::2]:  # every other archive in the cache
        await warm.get_package(record.workflow_type, record.content_hash)
    await cache_of(warm).settle()

    store = stores(archive_cache=tmp_path)
    listed: list[tuple[str, str]] = []
    tracemalloc.start()
    try:
        async for record in store.iter_packages(max_bytes=4 * MIB):
            assert record == records[len(listed)]
            listed.append((record.workflow_type, record.content_hash))
            del record
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(listed) == len(records)
    # Archives read from the cache and those written to it count within max_bytes: a
    # round trip's archives and the parser's copies at most, as without a cache.
    assert peak < 16 * MIB
    await cache_of(store).settle()
    assert set(cached_files(tmp_path).values()) == {r.archive for r in records}


async def test_a_row_that_names_another_archive_by_the_time_it_is_read_is_read_again(
    stores: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The walk reads a cached row's digest, not its blob; a row that names another
    # archive by the time it is read is read again, never answered from the cache.
    old, new = large(b"old"), large(b"new")
    store = stores(archive_cache=tmp_path)
    await store.put_package(pkg("wf", "h1", old))
    await store.get_package("wf", "h1")
    await cache_of(store).settle()
    other = stores()
    listing_send = store._listing_send
    re_put: list[bool] = []

    def re_putting_first(mark: Any) -> Any:
        send = listing_send(mark)

        async def re_put_first(commands: list[Command], *, large: bool) -> list[Any]:
            if not re_put and any(flatten(c)[2:] == (b"digest",) for c in commands):
                re_put.append(True)  # after the walk chose to read the digest alone
                await other.put_package(pkg("wf", "h1", new))  # the same stamp
            replies: list[Any] = await send(commands, large=large)
            return replies

        return re_put_first

    monkeypatch.setattr(store, "_listing_send", re_putting_first)
    assert await store.list_packages() == [pkg("wf", "h1", new)]
    assert re_put == [True]


# Damage.


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped":
        data[len(data) // 2] ^= 0x01
    elif how == "truncated":
        del data[len(data) // 2 :]
    elif how == "empty":
        data.clear()
    else:
        data += b"x"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty", "appended"])
@pytest.mark.parametrize("call", ["get", "list"])
async def test_a_damaged_file_is_never_returned_but_removed_logged_and_fetched_again(
    stores: StoreFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str, call: str
) -> None:
    record = pkg("wf", "h1", large(b"archive"))
    store = stores(archive_cache=tmp_path)
    await store.put_package(record)
    await store.get_package("wf", "h1")
    await cache_of(store).settle()
    name = archive_digest(record.archive).decode()
    damage(tmp_path / name, how)

    again = stores(archive_cache=tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        if call == "get":
            assert await again.get_package("wf", "h1") == record
        else:
            assert await again.list_packages() == [record]
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0].getMessage()
    assert "damaged" in warnings[0].getMessage()
    await cache_of(again).settle()
    # Fetched from the server and written again, whole.
    assert (tmp_path / name).read_bytes() == record.archive


async def test_a_file_holding_another_archive_is_refused(
    stores: StoreFactory, tmp_path: Path
) -> None:
    mine, other = large(b"mine"), large(b"other")
    (tmp_path / archive_digest(mine).decode()).write_bytes(other)
    store = stores(archive_cache=tmp_path)
    await store.put_package(pkg("wf", "h1", mine))
    assert await store.get_package("wf", "h1") == pkg("wf", "h1", mine)
    assert [r.archive for r in await store.list_packages()] == [mine]
    cache = ArchiveCache(tmp_path, MIB)
    cache.write_now(archive_digest(mine), other)  # a caller that did not verify
    assert await cache.read(archive_digest(mine)) is None
    assert not (tmp_path / archive_digest(mine).decode()).exists()


async def test_a_large_file_is_read_on_a_thread_a_small_one_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ArchiveCache(tmp_path, 64 * MIB)
    small, big = large(b"s"), b"b" * ON_A_THREAD
    for archive in (small, big):
        cache.write_now(archive_digest(archive), archive)
    threads: list[Any] = []
    real = asyncio.to_thread

    async def counted(function: Any, *args: Any) -> Any:
        threads.append(args)
        return await real(function, *args)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    assert await cache.read(archive_digest(small)) == small
    assert threads == []
    assert await cache.read(archive_digest(big)) == big  # size unknown: found large
    assert await cache.read(archive_digest(big), len(big)) == big
    assert len(threads) == 2


# Eviction.


def total_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def test_eviction_keeps_the_directory_within_its_bound_least_recently_used_gone(
    tmp_path: Path,
) -> None:
    size = 10 << 10
    cache = ArchiveCache(tmp_path, 10 * size)
    archives = [bytes([i]) * size for i in range(11)]
    digests = [archive_digest(a) for a in archives]
    for archive, digest in zip(archives[:9], digests[:9], strict=True):
        cache.write_now(digest, archive)
    old = time.time() - 1000
    for i, digest in enumerate(digests[:9]):  # used in this order, long ago
        os.utime(cache.file_of(digest), (old + i, old + i))
    assert asyncio.run(cache.read(digests[0])) == archives[0]  # the oldest, used now
    for archive, digest in zip(archives[9:], digests[9:], strict=True):
        cache.write_now(digest, archive)
        assert total_size(tmp_path) <= 10 * size
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {d.decode() for d in [digests[0], *digests[4:]]}, "1, 2 and 3 gone"


def test_an_archive_the_bound_cannot_keep_is_not_written(tmp_path: Path) -> None:
    cache = ArchiveCache(tmp_path, 8 << 10)
    archive = large(b"x") * 2
    cache.write_now(archive_digest(archive), archive)
    asyncio.run(_write(cache, archive))
    assert list(tmp_path.iterdir()) == []


async def _write(cache: ArchiveCache, archive: bytes) -> None:
    assert await cache.write(archive_digest(archive), archive) is None
    cache.write_soon(archive_digest(archive), archive)
    await cache.settle()


async def test_a_listing_past_the_bound_lists_everything_and_leaves_the_bound(
    stores: StoreFactory, tmp_path: Path
) -> None:
    records = [pkg("wf", f"h{i}", large(b"%d" % i), n=i) for i in range(8)]
    bound = 3 * len(records[0].archive)
    store = stores(archive_cache=tmp_path, archive_cache_bytes=bound)
    await put_all(store, records)
    for _ in range(2):
        assert await store.list_packages() == records
        await cache_of(store).settle()
        assert 0 < total_size(tmp_path) <= bound


def test_stale_temporary_files_are_removed_and_other_files_left_alone(tmp_path: Path) -> None:
    stale, fresh, other = (tmp_path / n for n in (".abc.x.tmp", ".abd.y.tmp", "notes.txt"))
    for path in (stale, fresh, other):
        path.write_bytes(b"left")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    ArchiveCache(tmp_path, 1).evict()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".abd.y.tmp", "notes.txt"]


# Sharing.


def test_threads_writing_reading_and_evicting_one_directory_never_see_wrong_bytes(
    tmp_path: Path,
) -> None:
    archives = [os.urandom(random.randrange(5 << 10, 40 << 10)) for _ in range(12)]
    by_digest = {archive_digest(a): a for a in archives}
    # Several caches of one directory, as processes have; a bound of a few archives,
    # so evictions race the reads and writes.
    caches = [ArchiveCache(tmp_path, 100 << 10) for _ in range(4)]
    wrong: list[bytes] = []
    errors: list[BaseException] = []
    end = time.monotonic() + 1.5

    def work(cache: ArchiveCache, seed: int) -> None:
        chosen = random.Random(seed)
        try:
            while time.monotonic() < end:
                digest = chosen.choice(list(by_digest))
                if chosen.random() < 0.5:
                    cache.write_now(digest, by_digest[digest])
                else:
                    found = cache._read_now(digest, None)
                    if found is not None and found != by_digest[digest]:
                        wrong.append(digest)
                if chosen.random() < 0.05:
                    cache.evict()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(caches[i % 4], i), daemon=True) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == [] and wrong == []
    left = cached_files(tmp_path)
    assert all(by_digest[name.encode()] == data for name, data in left.items())


LISTER = """
import asyncio, hashlib, json, sys
from kvstore import RedisPackageStore

async def main(url, namespace, cache, rounds):
    expected = json.loads(sys.stdin.read())
    async with RedisPackageStore.from_url(
        url, namespace=namespace, archive_cache=cache, archive_cache_bytes=3 << 20
    ) as store:
        for _ in range(rounds):
            listed = [
                [r.workflow_type, r.content_hash, hashlib.sha256(r.archive).hexdigest()]
                async for r in store.iter_packages(chunk=3)
            ]
            if listed != expected:
                print("wrong listing", listed, file=sys.stderr)
                return 1
            for wf, h, digest in expected[::3]:
                got = await store.get_package(wf, h)
                if got is None or hashlib.sha256(got.archive).hexdigest() != digest:
                    print("wrong get", wf, h, file=sys.stderr)
                    return 1
    return 0

sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
"""


@pytest.mark.slow
async def test_processes_listing_at_once_with_one_cache_all_get_the_right_bytes(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    namespace = fresh_namespace()
    records = [
        pkg("wf", f"h{i:02d}", os.urandom(random.choice([6 << 10, 300 << 10, 700 << 10])), n=i)
        for i in range(16)
    ]
    async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as store:
        await put_all(store, records)
    expected = json.dumps(
        [[r.workflow_type, r.content_hash, archive_digest(r.archive).decode()] for r in records]
    ).encode()
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            LISTER,
            valkey_server.url,
            namespace,
            str(tmp_path),
            "4",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    try:
        done = await asyncio.wait_for(
            asyncio.gather(*(p.communicate(expected) for p in processes)), 120
        )
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    for process, (_, err) in zip(processes, done, strict=True):
        assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    # Whatever the evictions left is each archive, whole.
    by_digest = {archive_digest(r.archive).decode(): r.archive for r in records}
    assert all(by_digest[name] == data for name, data in cached_files(tmp_path).items())


# A cache that fails.


async def test_a_cache_that_cannot_be_written_changes_no_call_s_outcome(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    records = catalogue()
    store = backend.store(archive_cache=blocker / "cache")  # under a file: no directory
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            await put_all(store, records)
            for _ in range(3):
                assert await store.list_packages() == records
                for record in records:
                    got = await store.get_package(record.workflow_type, record.content_hash)
                    assert got == record
                await cache_of(store).settle()
    finally:
        await store.aclose()
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1, "a failing disk is logged once a minute at most"
    assert "NotADirectoryError" in warnings[0].getMessage()


async def test_a_cache_directory_that_cannot_be_read_changes_no_call_s_outcome(
    stores: StoreFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = pkg("wf", "h1", large(b"archive"))
    store = stores(archive_cache=tmp_path)
    await store.put_package(record)
    await store.get_package("wf", "h1")
    await cache_of(store).settle()
    # A directory where the file was: it cannot be read as one.
    file = tmp_path / archive_digest(record.archive).decode()
    file.unlink()
    file.mkdir()
    again = stores(archive_cache=tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await again.get_package("wf", "h1") == record
        assert await again.list_packages() == [record]
        await cache_of(again).settle()
    assert [r.name for r in caplog.records if r.name == LOGGER] == [LOGGER]
