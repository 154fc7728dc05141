"""``kvstore import`` writes what it checked, and says how far it got when it stops.

The file is read once, into a private copy: what happens to the file meanwhile changes
nothing that is written.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from kvstore import PackageRecord, RedisPackageStore
from kvstore.server_process import LocalServer
from kvstore.tools.export_import import (
    Counts,
    ExportFormatError,
    check_file,
    export_file,
    import_file,
)
from tests.conftest import fresh_namespace
from tests.support import T0
from tests.test_cli import as_json, fails, kv


async def exported(url: str, path: Path, archives: list[bytes], routes: int = 1) -> None:
    """An export at ``path`` of one ``order`` package per archive, in that order, and
    ``routes`` routes (``audit-0`` … at the first package) besides ``order``'s."""
    async with RedisPackageStore.from_url(url, namespace=fresh_namespace()) as store:
        for n, archive in enumerate(archives):
            at = T0 + timedelta(seconds=n)
            await store.put_package(PackageRecord("order", f"h{n:03}", archive, at))
        for n in range(routes):
            await store.put_package_route(f"audit-{n}", "h000")
        await export_file(store, path)


async def test_an_import_writes_what_it_checked_though_the_file_is_cut_meanwhile(
    valkey_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over the reader's 1 MiB chunks, so a second read of the file would see the cut.
    archives = [os.urandom(8 << 10) for _ in range(300)]
    dump = tmp_path / "dump.kvx"
    await exported(valkey_server.url, dump, archives)
    async with RedisPackageStore.from_url(valkey_server.url, namespace=fresh_namespace()) as store:
        put = store.put_package

        async def put_then_cut(record: PackageRecord) -> None:
            await put(record)
            with open(dump, "r+b") as file:  # truncated in place, as by a careless copy
                file.truncate(100_000)

        monkeypatch.setattr(store, "put_package", put_then_cut)
        assert await import_file(store, dump) == Counts(300, 2)
        listed = await store.list_packages()
        assert [p.archive for p in listed] == archives
        assert [(r.workflow_type, r.content_hash) for r in await store.list_package_routes()] == [
            ("audit-0", "h000"),
            ("order", "h299"),
        ]


@pytest.mark.slow
async def test_an_import_that_fails_midway_says_how_many_packages_it_imported(
    tmp_path: Path,
) -> None:
    # A server whose proto-max-bulk-len is below one archive of the file: the put of
    # that package is refused, those before it and beside it land.
    archives = [b"small"] * 40
    archives[35] = b"L" * (2 << 20)
    dump = tmp_path / "dump.kvx"
    with LocalServer() as source:
        await exported(source.url, dump, archives, routes=3)
    with LocalServer(settings={"proto-max-bulk-len": "1mb"}) as small:
        target = ["--url", small.url, "--namespace", fresh_namespace()]
        fails(
            kv("import", str(dump), *target),
            "over the server's proto-max-bulk-len of 1048576 bytes: the server would refuse "
            "it; 39 of 40 packages and 0 of 4 routes were imported (importing the file again "
            "completes it)",
        )
        assert len(as_json("ls", *target)) == 39


def with_end(dump: Path, **counts: Any) -> Path:
    """``dump`` with ``counts`` in its end marker, whose checksum stays right."""
    data = dump.read_bytes()
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    ends = [unpacker.tell() for _ in unpacker]
    end = msgpack.unpackb(data[ends[-2] :], raw=False)
    dump.write_bytes(data[: ends[-2]] + msgpack.packb({**end, **counts}, use_bin_type=True))
    return dump


@pytest.mark.parametrize(
    ("counts", "says"),
    [
        ({"packages": True}, "the end marker's packages is not a count: True"),
        ({"routes": 2.0}, "the end marker's routes is not a count: 2.0"),
        ({"routes": None}, "the end marker's routes is not a count: None"),
    ],
)
async def test_an_end_marker_whose_counts_are_not_ints_is_refused(
    valkey_server: LocalServer, tmp_path: Path, counts: dict[str, Any], says: str
) -> None:
    dump = tmp_path / "dump.kvx"
    await exported(valkey_server.url, dump, [b"zip"])  # one package, two routes
    with pytest.raises(ExportFormatError, match=says):
        check_file(with_end(dump, **counts))


@pytest.mark.slow
async def test_import_refuses_an_end_marker_counting_true_before_writing(
    valkey_server: LocalServer, tmp_path: Path
) -> None:
    dump = tmp_path / "dump.kvx"
    await exported(valkey_server.url, dump, [b"zip"])
    with_end(dump, packages=True)
    target = ["--url", valkey_server.url, "--namespace", fresh_namespace()]
    fails(kv("import", str(dump), *target), "the end marker's packages is not a count: True")
    assert as_json("ls", *target) == [] and as_json("routes", *target) == []
