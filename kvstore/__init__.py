"""An atomic package store for workflow engines that share Redis."""

from kvstore.contract import PackageStore
from kvstore.errors import BackendError, SerializationError, StoreError
from kvstore.memory_store import InMemoryPackageStore
from kvstore.records import PackageHead, PackageRecord, PackageRouteRecord
from kvstore.redis.store import RedisPackageStore, StoreHealth

__all__ = [
    "BackendError",
    "InMemoryPackageStore",
    "PackageHead",
    "PackageRecord",
    "PackageRouteRecord",
    "PackageStore",
    "RedisPackageStore",
    "SerializationError",
    "StoreError",
    "StoreHealth",
]
