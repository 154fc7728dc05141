"""Export files: damage anywhere is refused before anything is written; version 1 still
imports."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from kvstore import PackageRecord, RedisPackageStore
from kvstore.server_process import LocalServer
from kvstore.tools.export_import import ExportFormatError, check_file, export_file
from tests.conftest import fresh_namespace
from tests.test_cli import as_json, fails, kv, ok

ARCHIVE = b"ARCHIVE-ONE-" * 200
OTHER = bytes(range(256)) * 4


@pytest.fixture
async def dump(valkey_server: LocalServer, tmp_path: Path) -> Path:
    """An export (version 2) of two packages and two routes."""
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    async with RedisPackageStore.from_url(valkey_server.url, namespace=fresh_namespace()) as s:
        await s.put_package(PackageRecord("order", "hash-one", ARCHIVE, at))
        await s.put_package(PackageRecord("invoice", "hash-two", OTHER, at))
        await s.put_package_route("audit", "hash-one")
        path = tmp_path / "dump.kvx"
        await export_file(s, path)
    return path


def flip_at(offset: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    def damage(data: bytes) -> bytes:
        i = offset(data)
        return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]

    return damage


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "a byte of an archive": (
        flip_at(lambda d: d.index(ARCHIVE) + len(ARCHIVE) // 2),
        "archive of order hash-one is damaged",
    ),
    "a byte of an archive's checksum": (
        flip_at(lambda d: d.index(hashlib.sha256(OTHER).digest()) + 5),
        "archive of invoice hash-two is damaged",
    ),
    "a byte of a content hash": (flip_at(lambda d: d.index(b"hash-two") + 2), "damaged"),
    "a byte of a route": (flip_at(lambda d: d.index(b"audit") + 1), "damaged"),
    "a byte of the header": (flip_at(lambda d: d.index(b"exported_at") + 3), "damaged"),
    "a byte of the trailer's checksum": (flip_at(lambda d: len(d) - 1), "damaged"),
    "a count in the trailer": (
        flip_at(lambda d: d.rindex(b"packages") + len(b"packages")),
        "end marker counts",
    ),
    "the end cut off inside an archive": (lambda d: d[: d.index(ARCHIVE) + 100], "cut off"),
    "the trailer cut off": (lambda d: d[: d.rindex(b"\x84\xa4kind\xa3end")], "cut off"),
    "the last byte cut off": (lambda d: d[:-1], "cut off"),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(DAMAGE))
def test_a_damaged_export_is_refused_whole(
    dump: Path, valkey_server: LocalServer, where: str
) -> None:
    damage, says = DAMAGE[where]
    damaged = dump.with_name("damaged.kvx")
    damaged.write_bytes(damage(dump.read_bytes()))
    with pytest.raises(ExportFormatError, match=says):
        check_file(damaged)
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    fails(kv("import", str(damaged), *target), says)
    assert as_json("ls", *target) == [] and as_json("routes", *target) == []


def test_an_intact_export_checks_and_imports(dump: Path, valkey_server: LocalServer) -> None:
    with open(dump, "rb") as source:
        header = next(iter(msgpack.Unpacker(source, raw=False)))
    assert header["version"] == 2
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    ok("import", str(dump), *target)
    assert [(p["workflow_type"], p["size"]) for p in as_json("ls", *target)] == [
        ("invoice", len(OTHER)),
        ("order", len(ARCHIVE)),
    ]


@pytest.mark.slow
def test_a_version_1_export_still_imports(valkey_server: LocalServer, tmp_path: Path) -> None:
    at = datetime(1999, 12, 31, 23, 59, 59, 1, tzinfo=timezone.utc)
    packer = msgpack.Packer(datetime=True, use_bin_type=True)
    items = [
        {"format": "kvstore-export", "version": 1, "namespace": "old", "exported_at": at},
        {
            "kind": "package",
            "workflow_type": "order",
            "content_hash": "h1",
            "deployed_at": at,
            "archive": ARCHIVE,
        },
        {"kind": "route", "workflow_type": "order", "content_hash": "h1"},
        {"kind": "end", "packages": 1, "routes": 1},
    ]
    old = tmp_path / "old.kvx"
    old.write_bytes(b"".join(packer.pack(item) for item in items))
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    assert "imported 1 packages and 1 routes" in ok("import", str(old), *target)
    listed = as_json("ls", *target)
    assert [(p["content_hash"], p["size"], p["deployed_at"]) for p in listed] == [
        ("h1", len(ARCHIVE), at.isoformat(timespec="microseconds"))
    ]


def test_an_unknown_version_is_refused_by_number(tmp_path: Path) -> None:
    packer = msgpack.Packer(use_bin_type=True)
    future = tmp_path / "future.kvx"
    future.write_bytes(packer.pack({"format": "kvstore-export", "version": 3}))
    with pytest.raises(ExportFormatError, match="version 3; this kvstore reads versions 1 and 2"):
        check_file(future)
