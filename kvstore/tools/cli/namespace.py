"""A namespace as a whole: whether it holds anything, and its removal (for the demo's
own namespace only)."""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError

from kvstore import RedisPackageStore
from kvstore.redis.keyspace import Keyspace, row_id
from kvstore.tools.cli.common import CliError


async def holds_anything(store: RedisPackageStore) -> bool:
    """Whether ``store``'s namespace has a package or a route."""
    async for _ in store.iter_package_heads(chunk=1):
        return True  # one is enough; the loop closes the walk
    return bool(await store.list_package_routes())


async def remove_namespace(store: RedisPackageStore) -> int:
    """Delete every key of ``store``'s namespace: the layout marker, index, routes,
    route version and each stored package's row; the number of keys deleted.

    The keys are named, not scanned for, so this works on a cluster too (they share the
    namespace's slot). For the demo's own namespace only: the contract has no way to
    remove a route, so this reaches past it to the store's client.
    """
    keys = Keyspace(store.namespace)
    names = [keys.format, keys.index, keys.routes, keys.route_version]
    async for head in store.iter_package_heads():
        names.append(keys.row(row_id(head.workflow_type, head.content_hash)))
    try:
        deleted = await asyncio.wait_for(store.client.delete(*names), store.options.timeout)
    except (RedisError, asyncio.TimeoutError) as exc:
        raise CliError(
            f"could not remove the namespace {store.namespace!r}: {type(exc).__name__} {exc}"
        ) from None
    return int(deleted)
