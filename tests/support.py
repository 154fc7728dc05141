"""What many test modules share: records, servers of a test's own, and waiting.

Fixtures live in ``conftest.py``; the topologies of the failure tests (Sentinel groups,
TLS servers, the checkable workload) in ``topology.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from kvstore import PackageRecord, PackageRouteRecord
from kvstore.redis.keyspace import INLINE_LIMIT
from kvstore.redis.route_watch import RouteWatch
from kvstore.server_process import LocalServer

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
# A generous bound for a change to cross from one store to another; the bench measures
# the real figure (milliseconds) against its 50 ms target.
VISIBLE_WITHIN = 2.0


def pkg(
    workflow_type: str = "wf", content_hash: str = "h1", archive: bytes = b"zip", n: int = 0
) -> PackageRecord:
    """A package deployed ``n`` microseconds after ``T0``."""
    return PackageRecord(workflow_type, content_hash, archive, T0 + timedelta(microseconds=n))


def large(archive: bytes) -> bytes:
    """``archive`` repeated past ``INLINE_LIMIT``: one layout 2 keeps as a blob (a smaller
    one stays inside its row)."""
    return archive * (INLINE_LIMIT // max(len(archive), 1) + 1)


def as_map(reply: Any) -> dict[Any, Any]:
    """A map in a server's reply: a dict in RESP3, a flat list of pairs in RESP2."""
    if isinstance(reply, dict):
        return dict(reply)
    assert isinstance(reply, list)
    return dict(zip(reply[::2], reply[1::2], strict=True))


@contextmanager
def password_server(password: str, binary: Path | None = None) -> Iterator[LocalServer]:
    """A server of the test's own that wants ``password``, which the test may stop
    (SIGSTOP) or kill: it is continued before it is shut down."""
    with LocalServer(binary, settings={"requirepass": password}) as running:
        yield running
        if running.pid is not None:
            os.kill(running.pid, signal.SIGCONT)


def url_of(server: LocalServer, password: str) -> str:
    return f"redis://:{password}@127.0.0.1:{server.port}"


async def eventually(check: Callable[[], Awaitable[bool]], within: float = VISIBLE_WITHIN) -> bool:
    """Whether ``check`` holds at some poll before ``within`` seconds have passed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    for _ in range(100_000):
        if await check():
            return True
        if loop.time() > end:
            return False
        await asyncio.sleep(0.001)
    return False


async def next_routes(watch: RouteWatch, count: int) -> list[PackageRouteRecord]:
    """The next ``count`` routes ``watch`` yields, all of them within ``VISIBLE_WITHIN``."""

    async def take() -> list[PackageRouteRecord]:
        return [await watch.__anext__() for _ in range(count)]

    return await asyncio.wait_for(take(), VISIBLE_WITHIN)
