"""The package store contract every backend keeps.

An engine persists each deployed workflow package here and rebuilds its catalogue from
here at start-up. Each promise below says what breaks for the engine if it is not kept;
``kvstore.conformance`` checks every one of them against any implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Protocol, runtime_checkable

from kvstore.records import PackageRecord, PackageRouteRecord


@runtime_checkable
class PackageStore(Protocol):
    """Archives of deployed workflow packages and the route of each workflow type.

    Every method checks its arguments before anything is written and raises
    ``TypeError`` or ``ValueError`` naming the bad one. Failures of the backend raise
    ``kvstore.BackendError``; stored data that cannot be decoded raises
    ``kvstore.SerializationError``. Every method is idempotent, so a call that failed
    with ``BackendError`` can be retried as it is.
    """

    async def put_package(self, record: PackageRecord) -> None:
        """Store ``record`` and point ``record.workflow_type``'s route at its hash.

        Both happen or neither does: a deploy that stored the archive but left the old
        route would come back after a restart running a version nobody chose, and a
        route without its archive would strand new runs. Putting an existing
        ``(workflow_type, content_hash)`` again replaces its archive and ``deployed_at``
        (the row is never duplicated) and still re-points the route.
        """
        ...

    async def put_package_with_routes(
        self, record: PackageRecord, route_workflow_types: Iterable[str]
    ) -> None:
        """Store ``record`` and point each listed workflow type's route at its hash.

        For archives that carry several workflow types. ``record.workflow_type`` is
        always re-pointed too, as by ``put_package``; the row and every route change
        in one atomic step.
        """
        ...

    async def list_packages(self) -> list[PackageRecord]:
        """Every stored record, complete, in ascending ``deployed_at``.

        Records deployed at the same microsecond are ordered by
        ``(workflow_type, content_hash)`` in code-point order, so every engine rebuilds
        the same catalogue in the same order. A listing never returns a half-written
        record, and a concurrent writer never makes it fail. Like ``iter_packages`` (it
        lists what one walk with the default chunk lists), it never returns a row twice.
        """
        ...

    def iter_packages(self, *, chunk: int = 1000) -> AsyncIterator[PackageRecord]:
        """Every stored record in ``list_packages`` order, streamed ``chunk`` at a time.

        For catalogues too large to hold at once: the store holds at most ``chunk``
        records (archives included) for the caller at a time, plus one entry per row
        already listed (its ``(workflow_type, content_hash)``, never its archive). That
        entry is what keeps the promise while others write: a row neither put nor
        deleted during the walk is listed exactly once; a row put or deleted meanwhile
        is listed at most once, as it was or as it became; no listing ever returns the
        same ``(workflow_type, content_hash)`` twice. An engine that rebuilt its
        catalogue from a listing with a package twice would load it twice, or fail.
        ``chunk`` must be a positive int (``TypeError`` or ``ValueError`` naming it,
        raised by the first ``anext``).
        """
        ...

    async def get_package(self, workflow_type: str, content_hash: str) -> PackageRecord | None:
        """The stored record for ``(workflow_type, content_hash)``, or ``None``."""
        ...

    async def delete_package(self, workflow_type: str, content_hash: str) -> None:
        """Remove exactly that row; removing an absent row is a no-op, not an error.

        Routes are never touched: a route may point at a version whose archive is gone,
        and it is the engine's call what to do about it.
        """
        ...

    async def put_package_route(self, workflow_type: str, content_hash: str) -> None:
        """Point ``workflow_type``'s route at ``content_hash`` (a rollback or roll-forward).

        The version need not have a stored archive; no archive is touched.
        """
        ...

    async def get_package_route(self, workflow_type: str) -> str | None:
        """The content hash ``workflow_type``'s route points at, or ``None``."""
        ...

    async def list_package_routes(self) -> list[PackageRouteRecord]:
        """Every route, ordered by workflow type in code-point order."""
        ...


__all__ = ["PackageRecord", "PackageRouteRecord", "PackageStore"]
