"""The records a package store holds, and the checks every argument passes first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone


def check_text(value: object, field: str) -> str:
    """Return ``value`` if it is usable as a workflow type or a content hash.

    Both are opaque text: any non-empty string without NUL that encodes as UTF-8.
    """
    if not isinstance(value, str):
        raise TypeError(f"{field} must be str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{field} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{field} must not contain NUL: {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} cannot be encoded as UTF-8: {value!r}") from exc
    return value


def check_instant(value: object, field: str) -> datetime:
    """Return ``value`` as an aware UTC datetime, or say why it cannot be one."""
    if not isinstance(value, datetime):
        raise TypeError(f"{field} must be datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{field} must be timezone-aware: {value!r}")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError as exc:
        raise ValueError(f"{field} falls outside years 1 to 9999 in UTC: {value!r}") from exc


@dataclass(frozen=True, repr=False, slots=True)
class PackageRecord:
    """One deployed version of a workflow package.

    ``(workflow_type, content_hash)`` identifies the row. ``deployed_at`` must be aware;
    stores hand it back in UTC, equal to the instant given, to the microsecond.
    Construction checks every field and raises ``TypeError`` or ``ValueError`` naming it.
    Its ``repr`` shows the archive's size, not its bytes (``archive=<16777216 bytes>``),
    so that logging a record costs a line whatever the archive; equality and hashing
    compare every field, the archive's bytes included.
    """

    workflow_type: str
    content_hash: str
    archive: bytes
    deployed_at: datetime

    def __post_init__(self) -> None:
        check_text(self.workflow_type, "workflow_type")
        check_text(self.content_hash, "content_hash")
        if not isinstance(self.archive, bytes):
            raise TypeError(f"archive must be bytes, not {type(self.archive).__name__}")
        check_instant(self.deployed_at, "deployed_at")

    def __repr__(self) -> str:
        return (
            f"PackageRecord(workflow_type={self.workflow_type!r}, "
            f"content_hash={self.content_hash!r}, archive=<{len(self.archive)} bytes>, "
            f"deployed_at={self.deployed_at!r})"
        )


@dataclass(frozen=True, slots=True)
class PackageRouteRecord:
    """The version a workflow type's new runs start on."""

    workflow_type: str
    content_hash: str

    def __post_init__(self) -> None:
        check_text(self.workflow_type, "workflow_type")
        check_text(self.content_hash, "content_hash")


@dataclass(frozen=True, slots=True)
class PackageHead:
    """A stored package without its archive: what a listing shows, at a fraction of the
    bytes. ``size`` is the archive's length in bytes."""

    workflow_type: str
    content_hash: str
    deployed_at: datetime
    size: int

    @classmethod
    def of(cls, record: PackageRecord) -> PackageHead:
        """The head of ``record``."""
        return cls(
            record.workflow_type, record.content_hash, record.deployed_at, len(record.archive)
        )


def check_record(value: object) -> PackageRecord:
    """Return ``value`` if it is a ``PackageRecord`` (whose fields were checked when it was
    made); ``TypeError`` naming ``record`` otherwise."""
    if not isinstance(value, PackageRecord):
        raise TypeError(f"record must be PackageRecord, not {type(value).__name__}")
    return value


def check_chunk(value: object, field: str = "chunk") -> int:
    """Return ``value`` if it is usable as a listing's ``chunk`` (or other ``field`` that
    counts something): a positive int."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{field} must be a positive int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{field} must be a positive int, not {value!r}")
    return value


def check_route_types(value: object) -> list[str]:
    """Return the workflow types of ``put_package_with_routes`` as a list, each checked."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"route_workflow_types must be an iterable of str, not {type(value).__name__}"
        )
    return [check_text(item, f"route_workflow_types[{i}]") for i, item in enumerate(value)]
