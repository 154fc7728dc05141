"""The reference implementation: the whole contract in a few dictionaries.

Small enough to be obviously right, it is what tests use when they need a store but
not a server, and what the other backends are checked against.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import replace

from kvstore.records import (
    PackageHead,
    PackageRecord,
    PackageRouteRecord,
    check_chunk,
    check_instant,
    check_record,
    check_route_types,
    check_text,
)


class InMemoryPackageStore:
    """A ``PackageStore`` held in this process; nothing survives the object."""

    def __init__(self) -> None:
        self._packages: dict[tuple[str, str], PackageRecord] = {}
        self._routes: dict[str, str] = {}

    async def put_package(self, record: PackageRecord) -> None:
        await self.put_package_with_routes(record, ())

    async def put_package_with_routes(
        self, record: PackageRecord, route_workflow_types: Iterable[str]
    ) -> None:
        check_record(record)
        types = [record.workflow_type, *check_route_types(route_workflow_types)]
        stored = replace(record, deployed_at=check_instant(record.deployed_at, "deployed_at"))
        self._packages[(record.workflow_type, record.content_hash)] = stored
        for workflow_type in types:
            self._routes[workflow_type] = record.content_hash

    async def list_packages(self) -> list[PackageRecord]:
        return sorted(
            self._packages.values(),
            key=lambda r: (r.deployed_at, r.workflow_type, r.content_hash),
        )

    async def iter_packages(self, *, chunk: int = 1000) -> AsyncIterator[PackageRecord]:
        """``list_packages`` as it was at the first ``anext``, one record at a time.

        Walking that snapshot lists each row once whatever is written meanwhile; it holds
        one reference per row (the records are in memory already), so ``chunk`` is only
        checked.
        """
        check_chunk(chunk)
        for record in await self.list_packages():
            yield record

    async def get_package(self, workflow_type: str, content_hash: str) -> PackageRecord | None:
        key = (check_text(workflow_type, "workflow_type"), check_text(content_hash, "content_hash"))
        return self._packages.get(key)

    async def get_package_head(self, workflow_type: str, content_hash: str) -> PackageHead | None:
        """The package without its archive, or ``None``: as ``RedisPackageStore`` gives it,
        beyond the contract."""
        record = await self.get_package(workflow_type, content_hash)
        return None if record is None else PackageHead.of(record)

    async def delete_package(self, workflow_type: str, content_hash: str) -> None:
        key = (check_text(workflow_type, "workflow_type"), check_text(content_hash, "content_hash"))
        self._packages.pop(key, None)

    async def put_package_route(self, workflow_type: str, content_hash: str) -> None:
        route = PackageRouteRecord(workflow_type, content_hash)
        self._routes[route.workflow_type] = route.content_hash

    async def get_package_route(self, workflow_type: str) -> str | None:
        return self._routes.get(check_text(workflow_type, "workflow_type"))

    async def list_package_routes(self) -> list[PackageRouteRecord]:
        return [PackageRouteRecord(t, h) for t, h in sorted(self._routes.items())]

    async def aclose(self) -> None:
        """Nothing to release; present so every store closes the same way."""
