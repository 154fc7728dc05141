"""``bench.stall.loop_stall`` measures a put and a get on a real server, both sides.

Only the shape of what it returns is checked: the figures are the bench's business.
"""

from __future__ import annotations

from bench.stall import loop_stall
from kvstore.server_process import LocalServer


async def test_loop_stall_reports_the_store_and_raw_redis_py_side_by_side(
    valkey_server: LocalServer,
) -> None:
    figures = await loop_stall(valkey_server.url, (1 << 20) + 3, rounds=1)
    sides = {f"{who}_{op}" for who in ("store", "raw") for op in ("put", "get")}
    assert set(figures) == {"size"} | {f"{s}_ms" for s in sides} | {f"{s}_cpu_ms" for s in sides}
    assert figures["size"] == (1 << 20) + 3
    assert all(value >= 0 for value in figures.values())
