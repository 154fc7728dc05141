"""Plain server commands for the operator's tools (``status``, ``check``).

The store has methods for the contract only; the tools also need ``INFO``, ``CONFIG
GET``, ``SCAN`` and ``WATCH``. They borrow the store's own client for those: the store
sends its calls on connections of its own (its lanes), so a borrowed command takes
another pooled connection and never interleaves with the store's pipelines. Each
command is bounded by the store's ``timeout``, since a client made by ``from_url`` has no
socket timeout of its own, and its failures become ``BackendError`` as the store's do
(``kvstore.redis.failures``), password redacted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError, WatchError

from kvstore.errors import BackendError
from kvstore.redis.failures import backend_error, client_secrets
from kvstore.redis.store import RedisPackageStore
from kvstore.redis.target import target_for

T = TypeVar("T")


def borrow_client(store: RedisPackageStore) -> Redis:
    """The store's client; ``TypeError`` for a cluster client (the tools speak to one node)."""
    return target_for(store.client).admin_client()


class Admin:
    """Commands on one server for one store's namespace, each bounded and translated."""

    def __init__(self, store: RedisPackageStore) -> None:
        self.store = store
        self.client = borrow_client(store)
        self.timeout = store.options.timeout
        self._secrets = client_secrets(self.client)

    async def bounded(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result; ``BackendError`` on a timeout or any refusal but NOPERM.

        ``NoPermissionError`` passes through, for callers to say what the credential may
        not read, and ``WatchError``, for a check-and-set to judge again.
        """
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except (NoPermissionError, WatchError):
            raise
        except asyncio.TimeoutError:
            raise BackendError(f"{self.store!r}: no reply within {self.timeout} seconds") from None
        except RedisError as exc:
            error = self.error(exc)
            raise error from error.__cause__  # the cause is kept only when nothing was redacted

    def error(self, exc: BaseException) -> BackendError:
        """``exc``, a failure of a command sent here, as ``BackendError`` naming the store."""
        return backend_error(exc, repr(self.store), self._secrets)

    async def command(self, *args: Any) -> Any:
        return await self.bounded(self.client.execute_command(*args))  # type: ignore[no-untyped-call]
