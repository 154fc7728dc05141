"""Finding what a command names: a package by its hash or a prefix of it, the types that
store a hash, and the rows each route points at. Arguments are checked here before any
server is started."""

from __future__ import annotations

from collections.abc import Iterable

from kvstore import PackageHead, PackageRecord, PackageRouteRecord, RedisPackageStore
from kvstore.tools.cli.common import EXIT_USAGE, CliError
from kvstore.tools.cli.output import short_hash

LISTED = 5  # candidates an ambiguous prefix's message names


class AmbiguousHash(CliError):
    """A prefix that more than one stored hash has: more of it is needed, not --force."""


def route_arg(workflow_type: str, content_hash: str) -> PackageRouteRecord:
    """``workflow_type`` and ``content_hash`` checked as a route's; a wrong one exits 2."""
    try:
        return PackageRouteRecord(workflow_type, content_hash)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


async def find_package(
    store: RedisPackageStore, workflow_type: str, text: str, *, any_type: bool = False
) -> PackageRecord:
    """The stored package ``text`` names under ``workflow_type``: by full hash, or by a
    prefix that only one stored hash has.

    With ``any_type``, a package stored under another type counts too: an archive
    deployed with ``--also`` is stored once, under its first type. A prefix costs a
    scan of the catalogue's heads, so it is tried only when the exact hash is not stored.
    """
    record = await store.get_package(workflow_type, text)
    if record is not None:
        return record
    type_known = False
    same: set[str] = set()
    other: dict[str, str] = {}  # hash -> a type that holds it
    async for candidate in store.iter_package_heads():
        mine = candidate.workflow_type == workflow_type
        type_known = type_known or mine
        if not candidate.content_hash.startswith(text):
            continue
        if mine:
            same.add(candidate.content_hash)
        elif any_type:
            other.setdefault(candidate.content_hash, candidate.workflow_type)
    if text in other:
        key = (other[text], text)
    else:
        pool = dict.fromkeys(same, workflow_type) or other
        if len(pool) > 1:
            names = sorted(f"{t} {short_hash(h)}" for h, t in pool.items())
            more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
            raise AmbiguousHash(
                f"hash {text!r} matches {len(pool)} stored hashes ({', '.join(names[:LISTED])}"
                f"{more}); give more of it"
            )
        if not pool:
            if not type_known and not any_type:
                raise CliError(f"no package of type {workflow_type!r} is stored")
            raise CliError(f"no package {workflow_type} {text!r} is stored")
        ((content_hash, holder),) = pool.items()
        key = (holder, content_hash)
    found = await store.get_package(*key)
    if found is None:
        raise CliError(f"package {key[0]} {key[1]} was removed meanwhile")
    return found


async def holders_of(store: RedisPackageStore, hashes: set[str]) -> dict[str, set[str]]:
    """For each of ``hashes`` that some package has, the types storing it (one scan)."""
    found: dict[str, set[str]] = {}
    if hashes:
        async for head in store.iter_package_heads():
            if head.content_hash in hashes:
                found.setdefault(head.content_hash, set()).add(head.workflow_type)
    return found


def routes_on(
    heads: Iterable[PackageHead], routes: Iterable[PackageRouteRecord]
) -> dict[tuple[str, str], list[str]]:
    """For each stored row ``(type, hash)``, the types whose route points at it, in the
    order of ``routes``.

    A route ``T -> H`` points at the row ``(T, H)`` when it is stored; otherwise at every
    row of hash ``H`` stored under another type (``put_package_with_routes`` stores one
    row and points several types at its hash). A route whose hash no row has points at
    nothing (``kvstore routes`` says "no archive").
    """
    rows = [(head.workflow_type, head.content_hash) for head in heads]
    stored = set(rows)
    by_hash: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        by_hash.setdefault(row[1], []).append(row)
    found: dict[tuple[str, str], list[str]] = {}
    for route in routes:
        own = (route.workflow_type, route.content_hash)
        for row in [own] if own in stored else by_hash.get(route.content_hash, []):
            found.setdefault(row, []).append(route.workflow_type)
    return found
