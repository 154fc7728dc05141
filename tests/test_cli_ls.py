"""``kvstore ls``: which routes point at each row, matched on the row's (type, hash), and
``--type T`` showing the package T's route points at wherever it is stored."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kvstore import PackageHead, PackageRouteRecord, RedisPackageStore
from kvstore.server_process import LocalServer
from kvstore.tools.cli.lookup import routes_on
from tests.conftest import fresh_namespace
from tests.support import T0, pkg
from tests.test_cli import as_json, ok


def head(workflow_type: str, content_hash: str) -> PackageHead:
    return PackageHead(workflow_type, content_hash, T0, 3)


def route(workflow_type: str, content_hash: str) -> PackageRouteRecord:
    return PackageRouteRecord(workflow_type, content_hash)


@pytest.mark.parametrize(
    ("heads", "routes", "expected"),
    [
        # A route points at its own type's row of that hash, and no other.
        (
            [head("a", "h"), head("b", "h")],
            [route("a", "h"), route("b", "h")],
            {("a", "h"): ["a"], ("b", "h"): ["b"]},
        ),
        # Stored under one type, routed by others (put_package_with_routes).
        (
            [head("order", "h"), head("order", "g")],
            [route("audit", "h"), route("billing", "h"), route("order", "h")],
            {("order", "h"): ["audit", "billing", "order"]},
        ),
        # No row of its own type: every row of that hash.
        (
            [head("a", "h"), head("b", "h")],
            [route("c", "h")],
            {("a", "h"): ["c"], ("b", "h"): ["c"]},
        ),
        # A hash no row has: no row is routed.
        ([head("a", "h")], [route("a", "gone")], {}),
        ([], [route("a", "h")], {}),
    ],
)
def test_a_route_points_at_its_types_row_else_at_the_rows_of_its_hash(
    heads: list[PackageHead],
    routes: list[PackageRouteRecord],
    expected: dict[tuple[str, str], list[str]],
) -> None:
    assert routes_on(heads, routes) == expected


@pytest.mark.slow
async def test_ls_matches_routes_on_type_and_hash_and_follows_a_route_to_another_type(
    valkey_server: LocalServer,
) -> None:
    namespace = fresh_namespace()
    async with RedisPackageStore.from_url(valkey_server.url, namespace=namespace) as store:
        await store.put_package_with_routes(pkg("order", "h1", n=1), ["audit"])
        await store.put_package(pkg("billing", "h0", n=2))
        await store.put_package(pkg("billing", "h1", n=3))  # the same hash, a row of its own
        await store.put_package_route("ghost", "never-stored")
    target = ["--url", valkey_server.url, "--namespace", namespace]

    listed = as_json("ls", *target)
    assert [(p["workflow_type"], p["content_hash"], p["routed_by"]) for p in listed] == [
        ("order", "h1", ["audit", "order"]),  # not billing: its route is to its own h1
        ("billing", "h0", []),
        ("billing", "h1", ["audit", "billing"]),  # audit has no h1 of its own
    ]

    # audit stores nothing itself: the packages its route points at are stored elsewhere.
    audit = as_json("ls", "--type", "audit", *target)
    assert [(p["workflow_type"], p["content_hash"]) for p in audit] == [
        ("order", "h1"),
        ("billing", "h1"),
    ]
    assert audit[0]["deployed_at"] == (T0 + timedelta(microseconds=1)).isoformat()
    lines = ok("ls", "--type", "audit", *target).splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["TYPE", "HASH"],
        ["order", "h1"],
        ["billing", "h1"],
    ]
    assert lines[1].endswith(" audit,order") and lines[2].endswith(" audit,billing")

    assert [p["content_hash"] for p in as_json("ls", "--type", "billing", *target)] == [
        "h0",
        "h1",
    ]
    assert ok("ls", "--type", "ghost", *target).strip() == "no packages"
