"""The behavioural suite every ``PackageStore`` must pass.

``await run_package_store_suite(make_store)`` runs every scenario, each on a fresh store
from ``make_store`` (a function returning a store, or an awaitable of one, isolated from
every other store it returns), and raises ``ConformanceError`` naming the scenario and
the broken promise at the first failure. ``SCENARIOS`` lists them for a test runner that
wants one test each.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from kvstore.contract import PackageStore
from kvstore.records import PackageRecord, PackageRouteRecord

StoreFactory = Callable[[], PackageStore | Awaitable[PackageStore]]
Scenario = Callable[[PackageStore], Awaitable[None]]

UTC = timezone.utc
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
US = timedelta(microseconds=1)


class ConformanceError(AssertionError):
    """A store broke a promise of the contract."""


def expect(condition: bool, promise: str, *detail: object) -> None:
    if not condition:
        raise ConformanceError(" ".join([promise, *map(repr, detail)]))


def pkg(
    workflow_type: str, content_hash: str, archive: bytes = b"zip", at: datetime = T0
) -> PackageRecord:
    return PackageRecord(workflow_type, content_hash, archive, at)


async def put_then_read_returns_the_record(store: PackageStore) -> None:
    record = pkg("order", "h1", b"PK\x03\x04 archive")
    await store.put_package(record)
    expect(await store.list_packages() == [record], "list_packages returns what was put")
    expect(await store.get_package("order", "h1") == record, "get_package returns what was put")


async def put_points_the_route_at_the_new_version(store: PackageStore) -> None:
    await store.put_package(pkg("order", "h1"))
    expect(await store.get_package_route("order") == "h1", "put_package points the route")
    await store.put_package(pkg("order", "h2", at=T0 + US))
    expect(await store.get_package_route("order") == "h2", "a newer put re-points the route")
    expect(
        await store.list_package_routes() == [PackageRouteRecord("order", "h2")],
        "one route per workflow type",
    )


async def re_put_replaces_the_row_and_re_points_the_route(store: PackageStore) -> None:
    await store.put_package(pkg("order", "h1", b"old", T0))
    await store.put_package(pkg("order", "h2", b"other", T0 + US))
    newer = pkg("order", "h1", b"new", T0 + timedelta(days=1))
    await store.put_package(newer)
    listed = await store.list_packages()
    expect(len(listed) == 2, "re-putting a row never duplicates it", listed)
    expect(listed[-1] == newer, "re-put replaces archive and deployed_at, and moves in order")
    expect(await store.get_package("order", "h1") == newer, "get_package sees the replacement")
    expect(await store.get_package_route("order") == "h1", "re-put re-points the route")


async def put_with_routes_re_points_every_listed_type(store: PackageStore) -> None:
    await store.put_package_route("billing", "old")
    await store.put_package_route("untouched", "old")
    record = pkg("order", "multi")
    await store.put_package_with_routes(record, ["billing", "shipping", "billing"])
    expect(await store.list_packages() == [record], "put_package_with_routes stores one row")
    expect(
        await store.list_package_routes()
        == [
            PackageRouteRecord("billing", "multi"),
            PackageRouteRecord("order", "multi"),
            PackageRouteRecord("shipping", "multi"),
            PackageRouteRecord("untouched", "old"),
        ],
        "every listed type and the record's own type point at the hash; no other moves",
        await store.list_package_routes(),
    )


async def put_with_no_extra_routes_is_a_put(store: PackageStore) -> None:
    record = pkg("order", "h1")
    await store.put_package_with_routes(record, [])
    expect(await store.get_package_route("order") == "h1", "the record's own route is set")
    expect(await store.list_packages() == [record], "the record is stored")


async def list_orders_by_deployed_at_then_type_then_hash(store: PackageStore) -> None:
    records = [
        pkg("b", "1", at=T0),
        pkg("a", "2", at=T0),
        pkg("a", "10", at=T0),
        pkg("a", "1", at=T0),
        pkg("ab", "0", at=T0),
        pkg("a", "0", at=T0 + US),
        pkg("z", "0", at=T0 - US),
        pkg("Z", "9", at=T0),
        pkg("é", "0", at=T0),
    ]
    for record in records:
        await store.put_package(record)
    expected = sorted(records, key=lambda r: (r.deployed_at, r.workflow_type, r.content_hash))
    expect(await store.list_packages() == expected, "ascending deployed_at, ties by (type, hash)")


async def order_is_exact_to_the_microsecond_in_every_year(store: PackageStore) -> None:
    earliest = datetime.min.replace(tzinfo=UTC)
    latest = datetime.max.replace(tzinfo=UTC)
    instants = [
        earliest,
        earliest + US,
        earliest + 2 * US,
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(5000, 6, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(5000, 6, 1, 0, 0, 0, 2, tzinfo=UTC),
        latest - US,
        latest,
    ]
    records = [pkg(f"t{i}", "h", at=at) for i, at in enumerate(instants)]
    for record in reversed(records):
        await store.put_package(record)
    expect(await store.list_packages() == records, "years 1 to 9999 order to the microsecond")


async def deployed_at_comes_back_in_utc(store: PackageStore) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    given = datetime(2026, 3, 1, 17, 30, 0, 654321, tzinfo=india)
    await store.put_package(pkg("order", "h1", at=given))
    for record in [await store.get_package("order", "h1"), *(await store.list_packages())]:
        expect(record is not None, "the record is there")
        assert record is not None
        expect(record.deployed_at == given, "the same instant, to the microsecond")
        expect(record.deployed_at.utcoffset() == timedelta(0), "in UTC", record.deployed_at)


async def archives_round_trip_byte_for_byte(store: PackageStore) -> None:
    archives = {
        "empty": b"",
        "every-byte": bytes(range(256)) * 4,
        "large": bytes(i * 7 % 251 for i in range(1 << 16)) * 128,  # 8 MiB
    }
    for name, archive in archives.items():
        await store.put_package(pkg(name, "h", archive))
    for name, archive in archives.items():
        record = await store.get_package(name, "h")
        expect(record is not None and record.archive == archive, "archive byte for byte", name)
        expect(record is not None and type(record.archive) is bytes, "archive comes back as bytes")
    listed = {r.workflow_type: r.archive for r in await store.list_packages()}
    expect(listed == archives, "listed archives byte for byte")


ODD_TEXT = [
    "a:b",
    "{ns}",
    "}{",
    "with space",
    "line\nbreak",
    "tab\t",
    "é",
    "日本",
    "😀",
    "\uffff",
    "\x01",
]


async def types_and_hashes_are_opaque_text(store: PackageStore) -> None:
    for i, text in enumerate(ODD_TEXT):
        await store.put_package(pkg(text, text, text.encode(), T0 + i * US))
    for text in ODD_TEXT:
        record = await store.get_package(text, text)
        expect(record is not None and record.archive == text.encode(), "round trip of", text)
        expect(await store.get_package_route(text) == text, "route round trip of", text)
    listed = [(r.workflow_type, r.content_hash) for r in await store.list_packages()]
    expect(listed == [(t, t) for t in ODD_TEXT], "listing keeps odd text", listed)


async def keys_are_injective(store: PackageStore) -> None:
    pairs = [("a:b", "c"), ("a", "b:c"), ("a", "b\nc"), ("a b", "c"), ("c", "a:b"), ("{a}", "b")]
    for i, (t, h) in enumerate(pairs):
        await store.put_package(pkg(t, h, f"{i}".encode(), T0 + i * US))
    for i, (t, h) in enumerate(pairs):
        record = await store.get_package(t, h)
        expect(record is not None and record.archive == f"{i}".encode(), "distinct row", (t, h))
    expect(len(await store.list_packages()) == len(pairs), "one row per distinct pair")
    await store.delete_package("a:b", "c")
    expect(await store.get_package("a", "b:c") is not None, "deleting one pair spares the other")


async def delete_removes_exactly_that_row(store: PackageStore) -> None:
    keep = [pkg("order", "h2", at=T0 + US), pkg("billing", "h1", at=T0 + 2 * US)]
    await store.put_package(pkg("order", "h1"))
    for record in keep:
        await store.put_package(record)
    await store.delete_package("order", "h1")
    expect(await store.get_package("order", "h1") is None, "the deleted row is gone")
    expect(await store.list_packages() == keep, "every other row stays, in order")


async def delete_of_absent_row_is_a_no_op(store: PackageStore) -> None:
    await store.delete_package("never", "stored")
    record = pkg("order", "h1")
    await store.put_package(record)
    await store.delete_package("order", "other")
    await store.delete_package("other", "h1")
    await store.delete_package("order", "h1")
    await store.delete_package("order", "h1")
    expect(await store.list_packages() == [], "nothing left and no error")


async def delete_never_touches_routes(store: PackageStore) -> None:
    await store.put_package(pkg("order", "h1"))
    await store.delete_package("order", "h1")
    expect(await store.get_package_route("order") == "h1", "the route outlives its archive")


async def put_route_upserts_and_leaves_archives(store: PackageStore) -> None:
    records = [pkg("order", "h1"), pkg("order", "h2", at=T0 + US)]
    for record in records:
        await store.put_package(record)
    await store.put_package_route("order", "h1")
    expect(await store.get_package_route("order") == "h1", "rollback re-points the route")
    await store.put_package_route("order", "not-stored")
    expect(await store.get_package_route("order") == "not-stored", "no archive needed")
    await store.put_package_route("fresh", "h9")
    expect(await store.get_package_route("fresh") == "h9", "a new route is inserted")
    expect(await store.list_packages() == records, "archives are untouched")


async def routes_list_in_code_point_order(store: PackageStore) -> None:
    types = ["b", "a", "Z", "é", "\U00010000", "\uffff", "a:b", "a b", "ab"]
    for t in types:
        await store.put_package_route(t, f"h-{t}")
    expect(
        await store.list_package_routes()
        == [PackageRouteRecord(t, f"h-{t}") for t in sorted(types)],
        "routes ordered by workflow type in code-point order",
    )


async def absent_reads_are_none(store: PackageStore) -> None:
    expect(await store.get_package("order", "h1") is None, "absent package is None")
    expect(await store.get_package_route("order") is None, "absent route is None")
    expect(await store.list_packages() == [], "an empty store lists nothing")
    expect(await store.list_package_routes() == [], "an empty store has no routes")


BAD_TEXT: list[tuple[object, type[Exception]]] = [
    ("", ValueError),
    ("a\x00b", ValueError),
    ("\ud800", ValueError),
    (b"bytes", TypeError),
    (None, TypeError),
    (7, TypeError),
]


async def bad_arguments_are_refused_before_anything_is_written(store: PackageStore) -> None:
    good = pkg("order", "h1")
    calls: list[tuple[str, type[Exception], str, tuple[object, ...]]] = []
    for bad, kind in BAD_TEXT:
        calls += [
            ("workflow_type", kind, "delete_package", (bad, "h1")),
            ("content_hash", kind, "delete_package", ("order", bad)),
            ("workflow_type", kind, "put_package_route", (bad, "h1")),
            ("content_hash", kind, "put_package_route", ("order", bad)),
            ("workflow_type", kind, "get_package", (bad, "h1")),
            ("content_hash", kind, "get_package", ("order", bad)),
            ("workflow_type", kind, "get_package_route", (bad,)),
            ("route_workflow_types[1]", kind, "put_package_with_routes", (good, ["x", bad])),
        ]
    calls += [
        ("record", TypeError, "put_package", (("order", "h1", b"", T0),)),
        ("record", TypeError, "put_package_with_routes", (None, [])),
        ("route_workflow_types", TypeError, "put_package_with_routes", (good, "billing")),
        ("route_workflow_types", TypeError, "put_package_with_routes", (good, None)),
    ]
    for field, kind, method, args in calls:
        try:
            await getattr(store, method)(*args)
        except (TypeError, ValueError) as exc:
            expect(type(exc) is kind, f"a bad {field} raises {kind.__name__}", exc)
            expect(field in str(exc), f"the error names {field}", str(exc))
        else:
            raise ConformanceError(f"a bad {field} was accepted")
    expect(await store.list_packages() == [], "nothing was written by a refused call")
    expect(await store.list_package_routes() == [], "no route was written by a refused call")


def bad_records_are_refused_at_construction() -> None:
    cases: list[tuple[str, dict[str, object]]] = [
        ("workflow_type", {"workflow_type": ""}),
        ("content_hash", {"content_hash": "a\x00"}),
        ("archive", {"archive": "text"}),
        ("archive", {"archive": bytearray(b"x")}),
        ("deployed_at", {"deployed_at": datetime(2026, 1, 1)}),
        ("deployed_at", {"deployed_at": "2026-01-01T00:00:00Z"}),
        ("deployed_at", {"deployed_at": datetime.min.replace(tzinfo=timezone(timedelta(hours=1)))}),
    ]
    base: dict[str, object] = {
        "workflow_type": "order",
        "content_hash": "h1",
        "archive": b"",
        "deployed_at": T0,
    }
    for field, change in cases:
        try:
            PackageRecord(**{**base, **change})  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            expect(field in str(exc), f"the error names {field}", str(exc))
        else:
            raise ConformanceError(f"PackageRecord accepted a bad {field}: {change!r}")


async def records_are_checked_at_construction(store: PackageStore) -> None:
    bad_records_are_refused_at_construction()
    expect(await store.list_packages() == [], "nothing was written")


async def many_concurrent_callers_share_one_store(store: PackageStore) -> None:
    count = 2000
    records = [pkg(f"type-{i % 50}", f"h{i}", f"{i}".encode(), T0 + i * US) for i in range(count)]
    await asyncio.gather(*(store.put_package(r) for r in records))
    found = await asyncio.gather(
        *(store.get_package(r.workflow_type, r.content_hash) for r in records)
    )
    expect(found == records, "every concurrent put is stored and read back")
    expect(await store.list_packages() == records, "every concurrent put is listed in order")
    routes = await store.list_package_routes()
    expect(len(routes) == 50, "one route per type", len(routes))
    await asyncio.gather(*(store.delete_package(r.workflow_type, r.content_hash) for r in records))
    expect(await store.list_packages() == [], "every concurrent delete applied")


async def iter_packages_lists_in_list_packages_order(store: PackageStore) -> None:
    records = [
        pkg(f"t{i % 4}", f"h{i:02d}", f"{i}".encode(), T0 + (i * 7 % 23) * US) for i in range(23)
    ]
    for record in records:
        await store.put_package(record)
    listed = await store.list_packages()
    for chunk in (1, 7, 22, 23, 24, 1000):
        walked = [record async for record in store.iter_packages(chunk=chunk)]
        expect(walked == listed, "iter_packages lists what list_packages lists, in order", chunk)
    expect([r async for r in store.iter_packages()] == listed, "the default chunk too")


async def iter_packages_never_lists_a_row_twice_while_rows_are_re_put(store: PackageStore) -> None:
    # Rows re-put with later stamps while the walk goes on: each one read at its old place
    # is met again at its new place, ahead of the walk.
    records = [pkg("order", f"h{i:02d}", at=T0 + i * US) for i in range(30)]
    for record in records:
        await store.put_package(record)
    later = T0 + timedelta(days=1)
    for chunk in (1, 3, 7):
        walked: list[PackageRecord] = []
        async for record in store.iter_packages(chunk=chunk):
            walked.append(record)
            if int(record.content_hash[1:]) % 2 == 0 and len(walked) < 60:
                later += US
                await store.put_package(replace(record, deployed_at=later))
        ids = [(r.workflow_type, r.content_hash) for r in walked]
        expect(len(ids) == len(set(ids)), "no row is listed twice", chunk, ids)
        untouched = [r.content_hash for r in records if int(r.content_hash[1:]) % 2 == 1]
        expect(
            [h for _, h in ids if int(h[1:]) % 2 == 1] == untouched,
            "each row nobody wrote is listed exactly once, in order",
            chunk,
        )
        order = [(r.deployed_at, r.workflow_type, r.content_hash) for r in walked]
        expect(order == sorted(order), "the walk stays in ascending order", chunk)
    expect(len(await store.list_packages()) == 30, "re-puts never duplicate a row")


async def iter_packages_refuses_a_bad_chunk(store: PackageStore) -> None:
    await store.put_package(pkg("order", "h1"))
    bad: list[tuple[object, type[Exception]]] = [
        (0, ValueError),
        (-1, ValueError),
        (1.5, TypeError),
        ("7", TypeError),
        (True, TypeError),
        (None, TypeError),
    ]
    for chunk, kind in bad:
        try:
            await anext(store.iter_packages(chunk=chunk))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            expect(type(exc) is kind, f"chunk={chunk!r} raises {kind.__name__}", exc)
            expect("chunk" in str(exc), "the error names chunk", str(exc))
        else:
            raise ConformanceError(f"iter_packages accepted chunk={chunk!r}")


SCENARIOS: dict[str, Scenario] = {
    scenario.__name__: scenario
    for scenario in [
        put_then_read_returns_the_record,
        put_points_the_route_at_the_new_version,
        re_put_replaces_the_row_and_re_points_the_route,
        put_with_routes_re_points_every_listed_type,
        put_with_no_extra_routes_is_a_put,
        list_orders_by_deployed_at_then_type_then_hash,
        order_is_exact_to_the_microsecond_in_every_year,
        deployed_at_comes_back_in_utc,
        archives_round_trip_byte_for_byte,
        types_and_hashes_are_opaque_text,
        keys_are_injective,
        delete_removes_exactly_that_row,
        delete_of_absent_row_is_a_no_op,
        delete_never_touches_routes,
        put_route_upserts_and_leaves_archives,
        routes_list_in_code_point_order,
        absent_reads_are_none,
        bad_arguments_are_refused_before_anything_is_written,
        records_are_checked_at_construction,
        many_concurrent_callers_share_one_store,
        iter_packages_lists_in_list_packages_order,
        iter_packages_never_lists_a_row_twice_while_rows_are_re_put,
        iter_packages_refuses_a_bad_chunk,
    ]
}


async def run_scenario(name: str, make_store: StoreFactory) -> None:
    """Run one scenario on a fresh store, closing the store afterwards if it can be."""
    made = make_store()
    store: PackageStore = await made if inspect.isawaitable(made) else made
    try:
        await SCENARIOS[name](store)
    except ConformanceError as exc:
        raise ConformanceError(f"{name}: {exc}") from None
    finally:
        close = getattr(store, "aclose", None)
        if close is not None:
            await close()


async def run_package_store_suite(
    make_store: StoreFactory, names: Iterable[str] | None = None
) -> None:
    """Run every scenario (or those ``names``), each on a fresh store from ``make_store``."""
    for name in SCENARIOS if names is None else names:
        await run_scenario(name, make_store)
