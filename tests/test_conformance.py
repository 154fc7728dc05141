"""Every backend keeps every promise of the contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime

import pytest

from kvstore import InMemoryPackageStore, PackageRecord, PackageRouteRecord
from kvstore.conformance import SCENARIOS, ConformanceError, run_package_store_suite, run_scenario

from .conftest import StoreMaker


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_backend_keeps_the_promise(make_store: StoreMaker, scenario: str) -> None:
    await run_scenario(scenario, make_store)


async def test_whole_suite_runs_from_one_call() -> None:
    await run_package_store_suite(InMemoryPackageStore)


class _ForgetsRoutes(InMemoryPackageStore):
    async def put_package(self, record: PackageRecord) -> None:
        self._packages[(record.workflow_type, record.content_hash)] = record


class _ListsInPutOrder(InMemoryPackageStore):
    async def list_packages(self) -> list[PackageRecord]:
        return [replace(r) for r in self._packages.values()]


class _DeleteTakesTheRoute(InMemoryPackageStore):
    async def delete_package(self, workflow_type: str, content_hash: str) -> None:
        await super().delete_package(workflow_type, content_hash)
        self._routes.pop(workflow_type, None)


class _RoutesUnsorted(InMemoryPackageStore):
    async def list_package_routes(self) -> list[PackageRouteRecord]:
        return [PackageRouteRecord(t, h) for t, h in reversed(list(self._routes.items()))]


class _WalksWithoutMemory(InMemoryPackageStore):
    """Walks the live rows in order, one at a time, forgetting what it listed."""

    async def iter_packages(self, *, chunk: int = 1000) -> AsyncIterator[PackageRecord]:
        def order(r: PackageRecord) -> tuple[datetime, str, str]:
            return (r.deployed_at, r.workflow_type, r.content_hash)

        after: tuple[datetime, str, str] | None = None
        while ahead := [r for r in self._packages.values() if after is None or order(r) > after]:
            record = min(ahead, key=order)
            after = order(record)
            yield record


@pytest.mark.parametrize(
    ("broken", "scenario"),
    [
        (_ForgetsRoutes, "put_points_the_route_at_the_new_version"),
        (_ListsInPutOrder, "order_is_exact_to_the_microsecond_in_every_year"),
        (_DeleteTakesTheRoute, "delete_never_touches_routes"),
        (_RoutesUnsorted, "routes_list_in_code_point_order"),
        (_WalksWithoutMemory, "iter_packages_never_lists_a_row_twice_while_rows_are_re_put"),
    ],
)
async def test_suite_catches_a_broken_store(
    broken: type[InMemoryPackageStore], scenario: str
) -> None:
    with pytest.raises(ConformanceError, match=scenario):
        await run_scenario(scenario, broken)
