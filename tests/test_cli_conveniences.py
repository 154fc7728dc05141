"""What a new operator meets first: records that log in one line."""

from __future__ import annotations

from datetime import datetime, timezone

from kvstore import PackageRecord

# repr(PackageRecord)


def test_record_repr_shows_the_archive_size_not_its_bytes() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    record = PackageRecord("order", "3f2a", b"\x00" * (16 << 20), at)
    assert repr(record) == (
        "PackageRecord(workflow_type='order', content_hash='3f2a', "
        f"archive=<16777216 bytes>, deployed_at={at!r})"
    )
    # Equality and hashing still compare the bytes.
    same = PackageRecord("order", "3f2a", b"\x00" * (16 << 20), at)
    other = PackageRecord("order", "3f2a", b"\x01" + b"\x00" * ((16 << 20) - 1), at)
    assert record == same and hash(record) == hash(same)
    assert record != other and len({record, same, other}) == 2
