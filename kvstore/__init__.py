"""An atomic package store for workflow engines that share Redis."""

import logging

from kvstore.contract import PackageStore
from kvstore.errors import BackendError, SerializationError, StoreError
from kvstore.memory_store import InMemoryPackageStore
from kvstore.records import PackageHead, PackageRecord, PackageRouteRecord
from kvstore.redis.store import RedisPackageStore, StoreHealth

# A library's logs are the application's to show: without a handler of its own, Python
# would print warnings on stderr (through its last resort).
logging.getLogger("kvstore").addHandler(logging.NullHandler())

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
