"""The server dies by SIGKILL mid-write, again and again, and comes back from its files.

With ``appendonly yes`` and ``appendfsync always`` the server writes each command to its
append-only file and fsyncs it before replying, so an acknowledged put is on disk. What a
crash may leave is a write cut off halfway: these tests show that none is ever seen, that
every acknowledged put comes back byte for byte, and that the very store objects that
lost the server carry on by themselves once it is back (they reconnect; the kvstore
library comes back from the same files as the data, so nothing needs loading again).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from kvstore import RedisPackageStore
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .topology import Writer, check_outcome, eventually

# Servers of its own, killed again and again.
pytestmark = pytest.mark.slow

DURABLE = {"appendonly": "yes", "appendfsync": "always"}
KILLS = 4


async def test_acknowledged_puts_survive_kill_9(binary: Path, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    namespace = fresh_namespace()
    with LocalServer(binary, data_dir=tmp_path, settings=DURABLE) as server:
        stores = [
            RedisPackageStore.from_url(
                server.url, namespace=namespace, timeout=2.0, retry_budget=5.0
            )
            for _ in range(3)
        ]
        writers = [Writer(f"engine-{i}", stores[i % len(stores)]) for i in range(6)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(writer.run(stop, limit=50_000)) for writer in writers]

        def acked() -> int:
            return sum(len(writer.acked) for writer in writers)

        def acked_at_least(floor: int) -> Callable[[], bool]:
            return lambda: acked() >= floor

        try:
            for kill in range(KILLS):
                await eventually(
                    acked_at_least(acked() + 2 * len(writers)),
                    within=30,
                    what=f"puts acknowledged before kill {kill + 1} (seed {seed})",
                )
                await asyncio.sleep(rng.uniform(0.1, 0.5))
                server.kill()
                await asyncio.to_thread(server.start)
            since_restart = {writer.name: len(writer.acked) for writer in writers}
            await eventually(
                lambda: all(len(w.acked) >= since_restart[w.name] + 5 for w in writers),
                within=30,
                what=f"every store acknowledging puts after the last restart (seed {seed})",
            )
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        try:
            for store in stores:
                await check_outcome(store, writers)
        finally:
            for store in stores:
                await store.aclose()
        async with Redis(port=server.port) as raw:
            stats = await raw.info("commandstats")
        # The library came back with the data: after the last restart the stores called
        # it and never had to load it again.
        assert stats["cmdstat_fcall"]["calls"] >= 1
        assert "cmdstat_function|load" not in stats
        server.kill()
        await asyncio.to_thread(server.start)
        async with RedisPackageStore.from_url(server.url, namespace=namespace) as fresh:
            stored = await check_outcome(fresh, writers)
        assert stored >= acked() > 0
