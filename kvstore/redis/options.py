"""The options of a ``RedisPackageStore``, checked in one place.

``RedisPackageStore(client, ...)`` and ``RedisPackageStore.from_url(url, ...)`` take these
as keyword arguments (their signatures spell them out for readers and type checkers; the
defaults come from here). Both build one ``StoreOptions``, which refuses a bad value with
``TypeError`` or ``ValueError`` naming the option, before a client is made or anything is
sent. A number of seconds must be finite: an infinite or NaN timeout would let a call hang
for ever, the one thing the timeouts are there to prevent.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from kvstore.distribution import pip_install
from kvstore.redis.keyspace import check_namespace


def _seconds(value: object, name: str, *, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = "0 or more" if zero else "more than 0"
        raise ValueError(f"{name} must be a finite number of seconds, {bound}, not {value!r}")


def _count(value: object, name: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, not {value!r}")


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# The layouts a store can give a namespace it writes first (kvstore.redis.keyspace).
LAYOUT_NUMBERS = (1, 2)

# When a write is acknowledged: applied in the primary's memory, or fsynced to its AOF.
DURABILITY = ("memory", "fsync")


@dataclass(frozen=True)
class StoreOptions:
    """Every option of a ``RedisPackageStore``, each checked when the object is made.

    ``namespace``: the key prefix, 1 to 64 of ``A-Z a-z 0-9 _ . : -``.
    ``timeout``: seconds one attempt may take, or ``None`` for no bound.
    ``lanes``: connections the store holds and pipelines over (at least 1).
    ``retry_budget``: seconds a call keeps retrying transient failures (0 or more).
    ``min_replicas``: replicas every write waits for (0: none).
    ``replica_timeout``: seconds that wait may take (at least a millisecond, which is
    the server's unit: ``WAIT`` with 0 ms would wait for ever); the fsync's wait too.
    ``durability``: when a write is acknowledged: ``"memory"``, once the primary applied
    it (and ``min_replicas`` replicas received it); ``"fsync"``, once it is fsynced to
    the primary's append-only file (and to that of ``min_replicas`` replicas), by
    ``WAITAOF`` (Redis and Valkey 7.2 and later, with ``appendonly yes``).
    ``cache_routes``: keep every route in memory.
    ``route_health_interval``: seconds between checks of the route cache's subscription.
    ``telemetry``: spans and metrics of every call through OpenTelemetry (needs
    ``opentelemetry-api``, the ``telemetry`` extra; see ``kvstore.redis.telemetry``).
    ``layout``: the layout a namespace gets when this store writes it first (a namespace
    keeps the layout it has until ``kvstore migrate``): ``2``, each archive a blob named
    by its SHA-256, stored once, spread over a cluster's primaries and verified on every
    read; ``1``, each archive inside its row, the only layout releases before layout 2
    read (for a new namespace that engines of such a release share).
    ``archive_cache``: a directory on local disk where archives held in blobs are kept,
    named by their digest, shared by every engine of the host given it (made by the
    first write; see ``kvstore.redis.archive_cache``): a get or a listing fetches from
    the server only the archives it lacks. ``None``: no cache.
    ``archive_cache_bytes``: the most bytes of archives the cache keeps, the least
    recently used removed past it (at least 1).
    ``read_from_replicas``: send reads to the primary's replicas where one has applied
    every write acknowledged before the read began, to the primary otherwise (on one
    server, Sentinel or a cluster; see ``kvstore.redis.replicas``).
    ``replica_read_timeout``: seconds a replica may take to answer a round trip of a
    read before the read goes to the primary instead.
    """

    namespace: str = "aion"
    timeout: float | None = 10.0
    lanes: int = 2
    retry_budget: float = 5.0
    min_replicas: int = 0
    replica_timeout: float = 1.0
    durability: str = "memory"
    cache_routes: bool = False
    route_health_interval: float = 1.0
    telemetry: bool = False
    layout: int = 2
    archive_cache: str | os.PathLike[str] | None = None
    archive_cache_bytes: int = 1 << 30
    read_from_replicas: bool = False
    replica_read_timeout: float = 1.0

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        if self.timeout is not None:
            _seconds(self.timeout, "timeout")
        _count(self.lanes, "lanes", 1)
        _seconds(self.retry_budget, "retry_budget", zero=True)
        _count(self.min_replicas, "min_replicas", 0)
        _seconds(self.replica_timeout, "replica_timeout")
        if self.replica_timeout < 0.001:
            raise ValueError(
                f"replica_timeout must be at least 0.001 seconds, not {self.replica_timeout!r}"
            )
        if not isinstance(self.durability, str):
            raise TypeError(f"durability must be a str, not {type(self.durability).__name__}")
        if self.durability not in DURABILITY:
            raise ValueError(
                f"durability must be one of {', '.join(map(repr, DURABILITY))}, "
                f"not {self.durability!r}"
            )
        if not isinstance(self.cache_routes, bool):
            raise TypeError(f"cache_routes must be a bool, not {type(self.cache_routes).__name__}")
        _seconds(self.route_health_interval, "route_health_interval")
        if not isinstance(self.telemetry, bool):
            raise TypeError(f"telemetry must be a bool, not {type(self.telemetry).__name__}")
        if self.telemetry and not _installed("opentelemetry"):
            raise ValueError(f"telemetry=True needs opentelemetry-api: {pip_install('telemetry')}")

        if isinstance(self.layout, bool) or not isinstance(self.layout, int):
            raise TypeError(f"layout must be an int, not {type(self.layout).__name__}")
        if self.layout not in LAYOUT_NUMBERS:
            raise ValueError(f"layout must be 1 or 2, not {self.layout!r}")

        if self.archive_cache is not None:
            if not isinstance(self.archive_cache, (str, os.PathLike)):
                raise TypeError(
                    "archive_cache must be a str or path of a directory, or None, "
                    f"not {type(self.archive_cache).__name__}"
                )
            path = os.fspath(self.archive_cache)
            if not isinstance(path, str):
                raise TypeError(f"archive_cache must be a path of str, not {type(path).__name__}")
            if not path or "\0" in path:
                raise ValueError(f"archive_cache must name a directory, not {path!r}")
        _count(self.archive_cache_bytes, "archive_cache_bytes", 1)
        if not isinstance(self.read_from_replicas, bool):
            raise TypeError(
                f"read_from_replicas must be a bool, not {type(self.read_from_replicas).__name__}"
            )
        _seconds(self.replica_read_timeout, "replica_read_timeout")

    def keywords(self) -> dict[str, Any]:
        """The options as keyword arguments of ``RedisPackageStore``."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


DEFAULTS = StoreOptions()
