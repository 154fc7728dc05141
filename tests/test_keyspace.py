"""Properties of the key encoding: injective, and ordered as the contract orders records."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import InMemoryPackageStore, PackageRecord, RedisPackageStore
from kvstore.redis.keyspace import (
    Keyspace,
    decode_stamp,
    encode_stamp,
    index_member,
    row_id,
    split_index_member,
    split_row_id,
)

texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1)
instants = st.datetimes(timezones=st.just(timezone.utc))


@given(texts, texts, texts, texts)
def test_row_ids_are_injective(t1: str, h1: str, t2: str, h2: str) -> None:
    assert (row_id(t1, h1) == row_id(t2, h2)) == ((t1, h1) == (t2, h2))
    assert split_row_id(row_id(t1, h1)) == (t1, h1)


@given(instants)
def test_stamps_round_trip_in_every_year(instant: datetime) -> None:
    assert decode_stamp(encode_stamp(instant)) == instant
    assert len(encode_stamp(instant)) == 27


@given(instants, texts, texts, instants, texts, texts)
def test_index_members_sort_as_records_do(
    d1: datetime, t1: str, h1: str, d2: datetime, t2: str, h2: str
) -> None:
    m1 = index_member(encode_stamp(d1), row_id(t1, h1))
    m2 = index_member(encode_stamp(d2), row_id(t2, h2))
    assert (m1 < m2) == ((d1, t1, h1) < (d2, t2, h2))
    assert split_index_member(m1) == (encode_stamp(d1), row_id(t1, h1))


operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abc"), st.sampled_from("xyz"), instants),
        st.tuples(st.just("delete"), st.sampled_from("abc"), st.sampled_from("xyz")),
        st.tuples(st.just("route"), st.sampled_from("abcd"), st.sampled_from("xyz")),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_redis_store_agrees_with_the_reference_store(ops: list[tuple[object, ...]]) -> None:
    async def apply_all() -> None:
        reference = InMemoryPackageStore()
        redis = RedisPackageStore(fakeredis.FakeAsyncRedis())
        for n, op in enumerate(ops):
            for store in (reference, redis):
                if op[0] == "put":
                    _, t, h, at = op
                    record = PackageRecord(str(t), str(h), f"{n}".encode(), at)  # type: ignore[arg-type]
                    await store.put_package(record)
                elif op[0] == "delete":
                    await store.delete_package(str(op[1]), str(op[2]))
                else:
                    await store.put_package_route(str(op[1]), str(op[2]))
        assert await redis.list_packages() == await reference.list_packages()
        assert await redis.list_package_routes() == await reference.list_package_routes()

    asyncio.run(apply_all())


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"{ns}:format", "string"),
        (b"{ns}:packages", "zset"),
        (b"{ns}:routes", "hash"),
        (b"{ns}:route-version", "string"),
        (b"{ns}:pkg:order\x00h1", "hash"),
        (b"{ns}:pkg:", "hash"),  # a row key, if one that names no package
        (b"{ns}:route-changes", None),  # a channel, never a key
        (b"{ns}:other", None),
        (b"{ns2}:format", None),  # another namespace's
        (b"format", None),
    ],
)
def test_the_keyspace_table_gives_each_key_its_type(key: bytes, expected: str | None) -> None:
    assert Keyspace("ns").expected_type(key) == expected


@pytest.mark.parametrize(
    ("key", "row"),
    [
        (b"{ns}:pkg:order\x00h1", b"order\x00h1"),
        (b"{ns}:pkg:", b""),
        (b"{ns}:pkg", None),
        (b"{ns}:packages", None),
        (b"{ns2}:pkg:order\x00h1", None),
    ],
)
def test_a_row_key_gives_back_its_row_id(key: bytes, row: bytes | None) -> None:
    keys = Keyspace("ns")
    assert keys.row_of(key) == row
    if row is not None:
        assert keys.row(row) == key
