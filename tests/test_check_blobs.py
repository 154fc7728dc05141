"""``kvstore check`` on layout 2: blobs missing, damaged, orphaned or misnamed, and rows of
neither layout's shape, each found and named; ``--repair`` collects orphans past the
grace period and leaves everything a row refers to.

Damage is made with raw redis-py commands, on fakeredis and real servers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kvstore.redis.keyspace import Keyspace, archive_digest, row_id
from kvstore.tools.check import KINDS, check_store

from .conftest import Backend
from .support import large, pkg

ARCHIVE = large(b"the archive's bytes")
DIGEST = archive_digest(ARCHIVE)


def kinds(report: Any) -> list[str]:
    return sorted(f.kind for f in report.findings)


async def test_a_sound_namespace_of_layout_2_with_rows_of_both_shapes(backend: Backend) -> None:
    async with backend.store(layout=1) as old:
        await old.put_package(pkg("a", "h1", ARCHIVE))
        k = Keyspace(old.namespace)
    await backend.raw.set(k.format, b"2")  # as a migration starts
    async with backend.store(old.namespace) as store:
        await store.put_package(pkg("a", "h2", ARCHIVE))
        await store.put_package(pkg("b", "h3", ARCHIVE))
        report = await check_store(store, repair=True)
    assert report.findings == [] and report.repairs == []
    assert await backend.raw.hget(k.row(row_id("a", "h1")), "archive") == ARCHIVE


async def test_a_missing_blob_is_named_by_each_row_and_not_repaired(backend: Backend) -> None:
    async with backend.store() as store:
        k = Keyspace(store.namespace)
        await store.put_package(pkg("a", "h1", ARCHIVE))
        await store.put_package(pkg("b", "h2", ARCHIVE))
        await backend.raw.delete(k.blob(DIGEST))
        for repair in (False, True):
            report = await check_store(store, repair=repair, grace=0)
            assert kinds(report) == ["missing-blob", "missing-blob"]
            assert sorted(f.key for f in report.findings) == [
                f"{{{store.namespace}}}:pkg:a\\0h1",
                f"{{{store.namespace}}}:pkg:b\\0h2",
            ]
            assert all("must be deployed again" in f.message for f in report.findings)
            assert DIGEST.decode() in report.findings[0].message
            assert report.repairs == [] and not report.sound
        await store.put_package(pkg("a", "h1", ARCHIVE))  # writes the blob again
        assert (await check_store(store)).findings == []


async def test_a_damaged_blob_is_named_with_the_rows_that_refer_to_it(backend: Backend) -> None:
    async with backend.store() as store:
        k = Keyspace(store.namespace)
        raw = backend.raw
        await store.put_package(pkg("a", "h1", ARCHIVE))
        await store.put_package(pkg("b", "h2", ARCHIVE))
        blob = k.blob(DIGEST)
        damaged = bytearray(ARCHIVE)
        damaged[3] ^= 0x01  # one bit of one byte
        await raw.hset(blob, "archive", bytes(damaged))
        before = await raw.hgetall(blob)
        report = await check_store(store, repair=True, grace=0)
        (finding,) = report.findings
        assert (finding.kind, finding.key) == ("damaged-blob", blob.decode())
        assert "do not hash to its digest" in finding.message
        assert "a\\0h1" in finding.message and "b\\0h2" in finding.message
        assert report.repairs == [] and await raw.hgetall(blob) == before

        await raw.hdel(blob, "archive")
        assert "has no archive" in (await check_store(store)).findings[0].message

        await store.put_package(pkg("a", "h1", ARCHIVE))  # mends it
        assert (await check_store(store)).findings == []
        await raw.hset(k.row(row_id("b", "h2")), "size", b"5")
        (finding,) = (await check_store(store)).findings
        assert finding.kind == "damaged-blob" and f"is {len(ARCHIVE)} bytes" in finding.message
        assert "b\\0h2" in finding.message and "a\\0h1" not in finding.message

        await store.put_package(pkg("b", "h2", ARCHIVE))
        await raw.hdel(blob, "written")
        (finding,) = (await check_store(store)).findings
        assert finding.kind == "damaged-blob" and "no written stamp" in finding.message


async def test_orphans_are_collected_past_the_grace_and_no_other_blob(backend: Backend) -> None:
    async with backend.store() as store:
        k = Keyspace(store.namespace)
        raw = backend.raw
        await store.put_package(pkg("a", "h1", large(b"old orphan")))
        await store.put_package(pkg("a", "h2", large(b"young orphan")))
        await store.put_package(pkg("a", "h3", large(b"referred to")))
        await store.delete_package("a", "h1")
        await store.delete_package("a", "h2")
        old = k.blob(archive_digest(large(b"old orphan")))
        await raw.hset(old, "written", b"1000000")  # written long ago

        report = await check_store(store)
        orphans = sorted(f.key for f in report.findings if f.kind == "orphan-blob")
        assert orphans == sorted(
            [old.decode(), k.blob(archive_digest(large(b"young orphan"))).decode()]
        )
        assert report.sound and report.repairs == []

        repaired = await check_store(store, repair=True)  # an hour's grace
        assert [(r.kind, r.key) for r in repaired.repairs] == [("orphan-blob", old.decode())]
        (kept,) = [f for f in repaired.findings if f.kind == "orphan-blob"]
        assert "kept: written within the last 3600 s" in kept.message
        assert not await raw.exists(old)
        assert await raw.exists(k.blob(archive_digest(large(b"young orphan"))))
        assert (await store.get_package("a", "h3")) == pkg("a", "h3", large(b"referred to"))


async def test_keys_under_the_blob_prefix_that_are_no_blobs(backend: Backend) -> None:
    async with backend.store() as store:
        k = Keyspace(store.namespace)
        raw = backend.raw
        await store.put_package(pkg("a", "h1", ARCHIVE))
        odd = {
            k.blob_prefix + b"not-a-digest": b"x",
            k.blob_prefix + b"{" + DIGEST.upper() + b"}": b"x",
            k.blob_prefix + DIGEST: b"x",
        }
        for key, value in odd.items():
            await raw.set(key, value)
        await raw.rpush(k.blob(b"0" * 64), b"a list")
        await asyncio.sleep(0.01)
        report = await check_store(store, repair=True, grace=0)
        assert sorted((f.kind, f.key) for f in report.problems) == sorted(
            [("malformed-blob-key", key.decode()) for key in odd]
            + [("wrong-type", k.blob(b"0" * 64).decode())]
        )
        assert report.repairs == []
        assert await raw.exists(*odd, k.blob(b"0" * 64)) == 4


async def test_rows_of_neither_shape(backend: Backend) -> None:
    async with backend.store() as store:
        k = Keyspace(store.namespace)
        raw = backend.raw
        for n in range(1, 6):
            await store.put_package(pkg("a", f"h{n}", ARCHIVE))

        def row(n: int) -> bytes:
            return k.row(row_id("a", f"h{n}"))

        await raw.hset(row(1), "archive", b"other bytes")  # inside, but not its digest's
        await raw.hset(row(2), "digest", b"not a digest")
        await raw.hset(row(3), "size", b"-3")
        await raw.hdel(row(4), "size")
        await raw.hdel(row(5), "digest")
        report = await check_store(store, repair=True)
        found = {f.key.rpartition("\\0")[2]: (f.kind, f.message) for f in report.findings}
        assert {h: kind for h, (kind, _) in found.items()} == {
            "h1": "damaged-archive",
            "h2": "malformed-row",
            "h3": "malformed-row",
            "h4": "row-missing-field",
            "h5": "row-missing-field",
        }
        assert "does not hash to the row's digest" in found["h1"][1]
        assert "not 64 lowercase hex digits" in found["h2"][1]
        assert "not a decimal number" in found["h3"][1]
        assert "a digest but no size" in found["h4"][1]
        assert "neither an archive nor a digest" in found["h5"][1]
        assert report.repairs == []


async def test_a_row_of_layout_2_in_a_namespace_of_layout_1(backend: Backend) -> None:
    async with backend.store(layout=1) as store:
        k = Keyspace(store.namespace)
        await store.put_package(pkg("a", "h1", ARCHIVE))
        async with backend.store(store.namespace, layout=2) as other:
            await backend.raw.set(k.format, b"2")
            await other.put_package(pkg("a", "h2", ARCHIVE))  # a row with a digest
        await backend.raw.set(k.format, b"1")
        report = await check_store(store)
        (finding,) = report.problems
        assert finding.kind == "malformed-row" and finding.key.endswith("a\\0h2")
        assert "the namespace's layout is 1" in finding.message


def test_every_kind_is_documented_once() -> None:
    assert len(KINDS) == len(set(KINDS))
    for kind in ("missing-blob", "damaged-blob", "orphan-blob", "malformed-blob-key"):
        assert kind in KINDS
