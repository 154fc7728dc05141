"""Many processes on one server: listings are never torn and never fail for a busy writer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from datetime import datetime

import pytest

from kvstore import PackageRecord, RedisPackageStore
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace

# Writers in processes of their own.
pytestmark = pytest.mark.slow

WRITER = r"""
import asyncio, hashlib, json, random, sys
from datetime import datetime, timedelta, timezone
from kvstore import PackageRecord, RedisPackageStore

START = datetime(2026, 1, 1, tzinfo=timezone.utc)

def archive(t, h, at):
    seed = hashlib.sha256(f"{t}|{h}|{at.isoformat()}".encode()).digest()
    return seed * (1 + seed[0] * 40)

async def main(url, ns, me, count):
    rng = random.Random(me)
    acked = {}
    async with RedisPackageStore.from_url(url, namespace=ns) as store:
        for i in range(count):
            t, h = f"type-{rng.randrange(4)}", f"{me}-{rng.randrange(25)}"
            if rng.random() < 0.15:
                await store.delete_package(t, h)
                acked.pop(f"{t}|{h}", None)
                continue
            at = START + timedelta(microseconds=rng.randrange(10**9))
            await store.put_package(PackageRecord(t, h, archive(t, h, at), at))
            acked[f"{t}|{h}"] = at.isoformat()
    print(json.dumps(acked))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


def expected_archive(record: PackageRecord) -> bytes:
    key = f"{record.workflow_type}|{record.content_hash}|{record.deployed_at.isoformat()}"
    seed = hashlib.sha256(key.encode()).digest()
    return seed * (1 + seed[0] * 40)


async def test_listings_are_whole_while_processes_write(valkey_server: LocalServer) -> None:
    namespace = fresh_namespace()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, valkey_server.url, namespace, str(me), "400"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for me in range(3)
    ]
    listings = 0
    async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as store:
        for _ in range(200):
            listed = await store.list_packages()
            listings += 1
            keys = [(r.deployed_at, r.workflow_type, r.content_hash) for r in listed]
            assert keys == sorted(keys), "listing out of order"
            assert len({(r.workflow_type, r.content_hash) for r in listed}) == len(listed)
            for record in listed:
                assert record.archive == expected_archive(record), f"torn {record!r:.80}"
            if all(w.poll() is not None for w in writers):
                break
            await asyncio.sleep(0.01)
        outputs = [w.communicate(timeout=120)[0] for w in writers]
        assert all(w.returncode == 0 for w in writers)
        acked: dict[str, str] = {}
        for out in outputs:
            acked.update(json.loads(out))
        final = {f"{r.workflow_type}|{r.content_hash}": r for r in await store.list_packages()}
    assert listings > 1
    assert set(final) == set(acked), "every acknowledged put is there, nothing deleted is"
    for key, at in acked.items():
        assert final[key].deployed_at == datetime.fromisoformat(at)
        assert final[key].archive == expected_archive(final[key])
