"""A watch of a namespace's route writes, fed by its route cache.

``kvstore.redis.route_cache.RouteCache`` pushes each write it applies (``push``) and
hands a watch its table when it must start again (``take_table``); ``RouteWatch`` is
what ``RedisPackageStore.watch_routes()`` returns.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Protocol

from kvstore.records import PackageRouteRecord


class WatchedCache(Protocol):
    """What a watch asks of the cache that feeds it."""

    @property
    def live(self) -> bool: ...

    def stream_table(self) -> list[PackageRouteRecord]: ...

    def forget(self, watch: RouteWatch) -> None: ...


class RouteWatch:
    """An async iterator of the writes to a namespace's routes, as the cache sees them.

    It first yields every route of the table as of version V, the version the cache
    holds when the watch is made (or first loads, if it is not live yet), in code-point
    order of workflow type; then each route write above V, in the order the server
    applied them, including writes that left a route where it was. While the
    subscription is down or the table is reloading nothing is yielded; once the
    table is loaded again (after a reconnect, a lost message, or the server's version
    going backwards), each route whose value changed meanwhile is yielded once, with
    its current value. A route that no longer exists (after a flush or a restore) is
    not yielded: a watch announces values, not removals. A watch that falls ``limit``
    writes behind its reader is handed the whole table again instead of the writes it
    missed. So the last value yielded for each type that has a route is always the
    route's value as of the cache. It ends when the store is closed or the watch is
    (``aclose``, or leaving ``async with``).
    """

    def __init__(self, cache: WatchedCache, limit: int) -> None:
        self._cache = cache
        self._limit = limit
        self._pending: deque[PackageRouteRecord] = deque()
        self._needs_table = True
        self._wake = asyncio.Event()
        self._done = False

    def push(self, changes: list[PackageRouteRecord]) -> None:
        # Called while the cache is live, its table already holding ``changes``.
        self._wake.set()
        if self._needs_table:
            self.take_table()
        elif len(self._pending) + len(changes) > self._limit:
            self._pending.clear()
            self._needs_table = True
        else:
            self._pending.extend(changes)

    def take_table(self) -> None:
        self._needs_table = False
        self._pending.extend(self._cache.stream_table())

    def finish(self) -> None:
        self._done = True
        self._wake.set()

    def __aiter__(self) -> RouteWatch:
        return self

    async def __anext__(self) -> PackageRouteRecord:
        # Each turn returns or waits for a wake-up; the wake-ups are the cache's writes.
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._done:
                raise StopAsyncIteration
            if self._needs_table and self._cache.live:
                self.take_table()
                continue
            self._wake.clear()
            await self._wake.wait()

    async def aclose(self) -> None:
        self._cache.forget(self)
        self.finish()
        self._pending.clear()

    async def __aenter__(self) -> RouteWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
