"""The contract with the Lua library, as a table, and as the servers actually speak it.

Each function of ``kvstore.redis.protocol`` is checked against a table of replies and
messages, well formed and not; the route-change message round-trips for any text; and
on fakeredis, Valkey and Redis the bytes the library publishes and the refusals it
replies are exactly what the protocol module makes and reads.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import fakeredis
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from kvstore import BackendError, PackageRecord, RedisPackageStore
from kvstore.redis.keyspace import (
    BLOB_LAYOUT,
    FORMAT_VERSION,
    Keyspace,
    archive_digest,
    row_id,
)
from kvstore.redis.protocol import (
    ArgsRefusal,
    RouteChange,
    TypeRefusal,
    args_refusal,
    decode_route_change,
    encode_route_change,
    field_pairs,
    format_refusal,
    type_refusal,
)
from kvstore.redis.scripts import (
    DELETE_PACKAGE,
    DROP_BLOB,
    PUT_BLOB,
    PUT_PACKAGE,
    PUT_PACKAGE_BLOB,
    PUT_PACKAGE_DIGEST,
    PUT_ROUTE,
    load_library,
)
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace

T0 = datetime(2026, 5, 1, tzinfo=timezone.utc)

texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1)
versions = st.integers(min_value=-(2**63), max_value=2**63 - 1)


# Refusals.


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (ResponseError("KVSTORE_TYPE 3 string hash"), TypeRefusal(3, "string", "hash")),
        (ResponseError("KVSTORE_TYPE 1 zset counter"), TypeRefusal(1, "zset", "counter")),
        (ResponseError("KVSTORE_TYPE 12 ReJSON-RL string"), TypeRefusal(12, "ReJSON-RL", "string")),
        (ResponseError("KVSTORE_TYPE 0 string hash"), None),  # KEYS count from 1
        (ResponseError("KVSTORE_TYPE -1 string hash"), None),
        (ResponseError("KVSTORE_TYPE x string hash"), None),
        (ResponseError("KVSTORE_TYPE 3 string"), None),
        (ResponseError("KVSTORE_TYPE 3 string hash more"), None),
        (ResponseError("KVSTORE_TYPE 3  hash"), None),
        (ResponseError("KVSTORE_FORMAT 2"), None),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), None),
        ("KVSTORE_TYPE 3 string hash", None),  # text, not a refusal
        (b"KVSTORE_TYPE 3 string hash", None),
        (7, None),
        (None, None),
    ],
)
def test_type_refusal_reads_only_the_library_s_type_refusals(
    reply: object, expected: TypeRefusal | None
) -> None:
    assert type_refusal(reply) == expected


@pytest.mark.parametrize(
    ("index", "key"),
    [(1, b"{ns}:format"), (2, b"{ns}:routes"), (3, b"{ns}:route-version")],
)
def test_a_type_refusal_names_the_key_of_the_fcall_it_refused(index: int, key: bytes) -> None:
    fcall = ("FCALL", "lib_put_route", 3, b"{ns}:format", b"{ns}:routes", b"{ns}:route-version")
    assert TypeRefusal(index, "string", "hash").key_of((*fcall, b"1", b"t", b"h")) == key


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (ResponseError("KVSTORE_FORMAT 2"), b"2"),
        (ResponseError("KVSTORE_FORMAT two words"), b"two words"),
        (ResponseError("KVSTORE_FORMAT "), b""),  # an empty marker names a layout too
        (ResponseError("KVSTORE_FORMAT"), None),
        (ResponseError("KVSTORE_FORMATS 2"), None),
        (ResponseError("KVSTORE_TYPE 1 hash string"), None),
        ("KVSTORE_FORMAT 2", None),
        (b"2", None),
    ],
)
def test_format_refusal_reads_only_the_library_s_layout_refusals(
    reply: object, expected: bytes | None
) -> None:
    assert format_refusal(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            ResponseError("KVSTORE_ARGS ARGV[2] is not {a}:route-changes"),
            ArgsRefusal("ARGV[2]", "is not {a}:route-changes"),
        ),
        (ResponseError("KVSTORE_ARGS KEYS[5] is missing"), ArgsRefusal("KEYS[5]", "is missing")),
        (ResponseError("KVSTORE_ARGS KEYS[12] is x"), ArgsRefusal("KEYS[12]", "is x")),
        (ResponseError("KVSTORE_ARGS KEYS[0] is missing"), None),  # counted from 1
        (ResponseError("KVSTORE_ARGS KEYS[01] is missing"), None),
        (ResponseError("KVSTORE_ARGS ARGS[1] is missing"), None),
        (ResponseError("KVSTORE_ARGS KEYS[1]"), None),  # no reason
        (ResponseError("KVSTORE_ARGS KEYS[1]  "), None),
        (ResponseError("KVSTORE_ARGS"), None),
        (ResponseError("KVSTORE_TYPE 3 string hash"), None),
        ("KVSTORE_ARGS KEYS[1] is missing", None),  # text, not a refusal
        (None, None),
    ],
)
def test_args_refusal_reads_only_the_library_s_refusals_of_a_call(
    reply: object, expected: ArgsRefusal | None
) -> None:
    assert args_refusal(reply) == expected


# The route-change message.


@pytest.mark.parametrize(
    ("version", "content_hash", "types", "message"),
    [
        (7, "h1", ["order"], b"7\x00h1\x00order"),
        (1_700_000_000_000_001, "h", ["a", "b", "c"], b"1700000000000001\x00h\x00a\x00b\x00c"),
        (0, "h", ["t"], b"0\x00h\x00t"),
        (-3, "h", ["t"], b"-3\x00h\x00t"),
        (1, "h✓", ("zähler",), "1\x00h✓\x00zähler".encode()),
    ],
)
def test_a_route_change_is_version_hash_and_types_joined_by_nul(
    version: int, content_hash: str, types: list[str], message: bytes
) -> None:
    assert encode_route_change(version, content_hash, types) == message
    assert decode_route_change(message) == RouteChange(version, content_hash, tuple(types))


@given(versions, texts, st.lists(texts, min_size=1, max_size=5))
def test_every_route_change_round_trips(version: int, content_hash: str, types: list[str]) -> None:
    decoded = decode_route_change(encode_route_change(version, content_hash, types))
    assert decoded == (version, content_hash, tuple(types))


# Pieces that make messages well formed and not: bytes that decode is asked to read
# either are refused, or are exactly what encode makes of what they say.
pieces = st.sampled_from([b"0", b"1", b"07", b"-", b"+", b" ", b"\x00", b"a", b"\xc3\xa4", b"\xff"])


@given(st.lists(pieces, max_size=12).map(b"".join))
def test_decode_accepts_exactly_what_encode_makes(data: bytes) -> None:
    try:
        change = decode_route_change(data)
    except ValueError:
        return
    assert encode_route_change(*change) == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"7",
        b"7\x00h1",  # no type
        b"7\x00h1\x00",  # an empty type
        b"7\x00h1\x00a\x00",
        b"7\x00h1\x00\x00b",
        b"7\x00\x00order",  # an empty hash
        b"\x00h1\x00order",  # no version
        b"x\x00h1\x00order",
        b"7.0\x00h1\x00order",
        b"+7\x00h1\x00order",
        b" 7\x00h1\x00order",
        b"7 \x00h1\x00order",
        b"1_000\x00h1\x00order",
        b"07\x00h1\x00order",  # %d writes no leading zero
        b"-0\x00h1\x00order",
        b"-\x00h1\x00order",
        "\u0667\x00h1\x00order".encode(),  # a digit (Arabic-Indic), not one %d writes
        b"7\x00h\xff\x00order",  # not UTF-8
        b"\xff\x00h1\x00order",
    ],
)
def test_a_malformed_route_change_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a route change"):
        decode_route_change(data)


def test_a_route_change_is_bytes() -> None:
    with pytest.raises(TypeError, match="bytes, not str"):
        decode_route_change("7\x00h1\x00order")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("content_hash", "types"),
    [
        ("h1", []),
        ("", ["order"]),
        ("h1", [""]),
        ("h1", ["order", ""]),
        ("h\x001", ["order"]),
        ("h1", ["or\x00der"]),
        ("h1", ["order", "\x00"]),
    ],
)
def test_no_message_is_made_of_what_none_could_say(content_hash: str, types: list[str]) -> None:
    with pytest.raises(ValueError, match="needs a hash and at least one type"):
        encode_route_change(1, content_hash, types)


def test_text_that_is_not_utf_8_makes_no_message() -> None:
    with pytest.raises(ValueError):  # UnicodeEncodeError
        encode_route_change(1, "h1", ["\udc80"])


# Reply shapes.


@pytest.mark.parametrize(
    ("reply", "pairs"),
    [
        ([], []),
        ({}, []),
        ([b"a", b"1", b"b", b"2"], [(b"a", b"1"), (b"b", b"2")]),  # RESP2
        ({b"a": b"1", b"b": b"2"}, [(b"a", b"1"), (b"b", b"2")]),  # RESP3
        ((b"a", b"1"), [(b"a", b"1")]),
        ([b"x", [b"nested", 1]], [(b"x", [b"nested", 1])]),
    ],
)
def test_field_pairs_reads_a_flat_list_or_a_map(reply: Any, pairs: list[tuple[Any, Any]]) -> None:
    assert field_pairs(reply) == pairs


@pytest.mark.parametrize(
    ("reply", "error", "says"),
    [
        ([b"a"], ValueError, "even length, not 1"),
        ([b"a", b"1", b"b"], ValueError, "even length, not 3"),
        (None, TypeError, "not NoneType"),
        (b"a1", TypeError, "not bytes"),
        (3, TypeError, "not int"),
        ({b"a", b"1"}, TypeError, "not set"),
    ],
)
def test_field_pairs_refuses_what_is_not_pairs(
    reply: Any, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        field_pairs(reply)


# What the library says on the wire: on fakeredis, and on each real server.


def fake_clients() -> Callable[[], Redis]:
    fake = fakeredis.FakeServer()
    return lambda: fakeredis.FakeAsyncRedis(server=fake)


def server_clients(server: LocalServer) -> Callable[[], Redis]:
    return lambda: Redis.from_url(server.url)


async def test_fakeredis_publishes_exactly_encode_route_change() -> None:
    await publishes_exactly_encode_route_change(fake_clients())


async def test_servers_publish_exactly_encode_route_change(server: LocalServer) -> None:
    await publishes_exactly_encode_route_change(server_clients(server))


async def test_fakeredis_refuses_as_the_protocol_reads() -> None:
    await refuses_as_the_protocol_reads(fake_clients())


async def test_servers_refuse_as_the_protocol_reads(server: LocalServer) -> None:
    await refuses_as_the_protocol_reads(server_clients(server))


async def publishes_exactly_encode_route_change(connect: Callable[[], Redis]) -> None:
    """A subscriber of the namespace's channel receives, for each write of routes, the
    bytes ``encode_route_change`` makes of the write."""
    namespace = fresh_namespace()
    keys = Keyspace(namespace)
    listener, writer = connect(), connect()
    pubsub = listener.pubsub()
    try:
        await pubsub.ssubscribe(keys.route_changes)
        confirmed = await pubsub.get_message(timeout=5.0)
        assert confirmed is not None and confirmed["type"] == "ssubscribe", confirmed

        async def next_message() -> bytes:
            message = await pubsub.get_message(timeout=5.0)
            assert message is not None and message["type"] == "smessage", message
            data: bytes = message["data"]
            return data

        async with RedisPackageStore(writer, namespace=namespace) as store:
            record = PackageRecord("zähler", "h✓1", b"PK", T0)
            await store.put_package_with_routes(record, ["b", "c", "zähler"])
            first = await next_message()
            counter = await listener.get(keys.route_version)
            assert counter is not None
            version = int(counter)
            await store.put_package_route("d", "h2")
            second = await next_message()
        # A counter made anew starts at the server's clock in microseconds: a large one.
        assert version > 10**15
        assert first == encode_route_change(version, "h✓1", ["zähler", "b", "c"])
        assert second == encode_route_change(version + 1, "h2", ["d"])
        assert decode_route_change(first) == (version, "h✓1", ("zähler", "b", "c"))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await listener.aclose()
        await writer.aclose()


async def refuses_as_the_protocol_reads(connect: Callable[[], Redis]) -> None:
    """What an operation replies over a key of another type, or another layout, reads as
    the refusal it is, naming the key."""
    keys = Keyspace(fresh_namespace())
    client = connect()
    fcall = (
        "FCALL",
        PUT_ROUTE.name,
        PUT_ROUTE.numkeys,
        keys.format,
        keys.routes,
        keys.route_version,
        FORMAT_VERSION,
        keys.route_changes,
        b"order",
        b"h1",
    )

    async def refusal() -> ResponseError:
        with pytest.raises(ResponseError) as raised:
            await client.execute_command(*fcall)  # type: ignore[no-untyped-call]
        return raised.value

    try:
        await load_library(client)
        await client.set(keys.routes, b"not a hash")
        refused = type_refusal(await refusal())
        assert refused == TypeRefusal(2, "string", "hash")
        assert refused.key_of(fcall) == keys.routes

        await client.delete(keys.routes)
        await client.set(keys.route_version, b"not a number")
        refused = type_refusal(await refusal())
        assert refused == TypeRefusal(3, "string", "counter")
        assert refused.key_of(fcall) == keys.route_version

        await client.set(keys.format, b"9")
        reply = await refusal()
        assert format_refusal(reply) == b"9" and type_refusal(reply) is None
    finally:
        await client.aclose()


# Calls of another shape than the store's: each function checks its keys and channel
# before its first write, so a call that mixes namespaces changes nothing in either.

A, B = Keyspace("mine"), Keyspace("theirs")
ROW, OTHER_ROW = row_id("order", "h1"), row_id("order", "h0")
STAMP = b"2026-05-01T00:00:00.000000Z"
# The calls the store makes, as the flat arguments of FCALL after the function's name.
ROUTE_CALL: tuple[Any, ...] = (3, A.format, A.routes, A.route_version, FORMAT_VERSION)
ROUTE_CALL += (A.route_changes, b"order", b"h1")
PUT_CALL: tuple[Any, ...] = (5, A.format, A.index, A.routes, A.route_version, A.row(ROW))
PUT_CALL += (FORMAT_VERSION, A.route_changes, ROW, STAMP, b"PK", b"h1", b"order")
DELETE_CALL: tuple[Any, ...] = (3, A.format, A.index, A.row(ROW), FORMAT_VERSION, ROW)
CALLS = {PUT_ROUTE.name: ROUTE_CALL, PUT_PACKAGE.name: PUT_CALL, DELETE_PACKAGE.name: DELETE_CALL}
NOT_A_MARKER = "is not a layout marker {ns}:format"


def changed(function: str, at: int, value: Any) -> tuple[str, tuple[Any, ...]]:
    """The store's call of ``function`` with its argument ``at`` (counted after the
    function's name, the key count first) now ``value``; ``None`` drops it."""
    call = CALLS[function]
    return function, call[:at] + (() if value is None else (value,)) + call[at + 1 :]


def shaped(function: str, call: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    return function, call


ROUTE, PUT, DELETE = PUT_ROUTE.name, PUT_PACKAGE.name, DELETE_PACKAGE.name
MISUSES = [
    # put_route: another namespace's channel, keys, a marker that names no namespace.
    (changed(ROUTE, 5, B.route_changes), "ARGV[2]", "is not {mine}:route-changes"),
    (changed(ROUTE, 2, B.routes), "KEYS[2]", "is not {mine}:routes"),
    (changed(ROUTE, 3, B.route_version), "KEYS[3]", "is not {mine}:route-version"),
    (changed(ROUTE, 2, A.index), "KEYS[2]", "is not {mine}:routes"),
    (changed(ROUTE, 1, A.routes), "KEYS[1]", NOT_A_MARKER),
    (changed(ROUTE, 1, b"{mi}ne}:format"), "KEYS[1]", NOT_A_MARKER),
    (changed(ROUTE, 1, b"{" + b"n" * 65 + b"}:format"), "KEYS[1]", NOT_A_MARKER),
    # KEYS[1] names the namespace: the others must follow it.
    (changed(ROUTE, 1, B.format), "KEYS[2]", "is not {theirs}:routes"),
    (changed(ROUTE, 7, None), "ARGV[4]", "is missing"),
    (shaped(ROUTE, (*ROUTE_CALL, b"more")), "ARGV[5]", "is one too many"),
    (shaped(ROUTE, (2, *ROUTE_CALL[1:3], *ROUTE_CALL[4:])), "KEYS[3]", "is missing"),
    (shaped(ROUTE, (4, *ROUTE_CALL[1:4], A.index, *ROUTE_CALL[4:])), "KEYS[4]", "is one too many"),
    # put_package: the row must be the row of ARGV[3], in the namespace.
    (changed(PUT, 5, A.row(OTHER_ROW)), "KEYS[5]", "is not {mine}:pkg:<ARGV[3]>"),
    (changed(PUT, 5, B.row(ROW)), "KEYS[5]", "is not {mine}:pkg:<ARGV[3]>"),
    (changed(PUT, 7, B.route_changes), "ARGV[2]", "is not {mine}:route-changes"),
    (changed(PUT, 2, B.index), "KEYS[2]", "is not {mine}:packages"),
    (changed(PUT, 4, B.route_version), "KEYS[4]", "is not {mine}:route-version"),
    (shaped(PUT, PUT_CALL[:-1]), "ARGV[7]", "is missing"),
    (shaped(PUT, PUT_CALL[:-3]), "ARGV[5]", "is missing"),
    # delete_package: deleting another row than the one named would orphan its index entry.
    (changed(DELETE, 3, A.row(OTHER_ROW)), "KEYS[3]", "is not {mine}:pkg:<ARGV[2]>"),
    (changed(DELETE, 2, B.index), "KEYS[2]", "is not {mine}:packages"),
    (changed(DELETE, 3, B.row(ROW)), "KEYS[3]", "is not {mine}:pkg:<ARGV[2]>"),
    (shaped(DELETE, (*DELETE_CALL, b"more")), "ARGV[3]", "is one too many"),
]


async def test_fakeredis_functions_refuse_a_call_of_another_shape_and_write_nothing() -> None:
    await refuses_every_misuse(fake_clients())


async def test_servers_functions_refuse_a_call_of_another_shape_and_write_nothing(
    server: LocalServer,
) -> None:
    await refuses_every_misuse(server_clients(server))


async def namespaces_snapshot(client: Redis) -> dict[Any, Any]:
    """Every key of both namespaces, each as DUMP gives it."""
    keys = [*await client.keys("{mine}:*"), *await client.keys("{theirs}:*")]
    return {key: await client.dump(key) for key in sorted(keys)}


async def refuses_every_misuse(connect: Callable[[], Redis]) -> None:
    client = connect()
    try:
        await load_library(client)
        await client.delete(*await client.keys("{mine}:*"), *await client.keys("{theirs}:*"), "x")
        for namespace in ("mine", "theirs"):
            # Layout 1: the calls above are those of a store writing it.
            async with RedisPackageStore(connect(), namespace=namespace, layout=1) as store:
                for content_hash in ("h0", "h1"):
                    await store.put_package(PackageRecord("order", content_hash, b"PK", T0))
                await store.client.aclose()
        # The calls are well formed but for what each case changes.
        for function in (ROUTE, PUT):
            await client.execute_command("FCALL", function, *CALLS[function])  # type: ignore[no-untyped-call]
        before = await namespaces_snapshot(client)
        for (function, call), argument, why in MISUSES:
            with pytest.raises(ResponseError) as raised:
                await client.execute_command("FCALL", function, *call)  # type: ignore[no-untyped-call]
            assert args_refusal(raised.value) == ArgsRefusal(argument, why), (function, call)
            assert await namespaces_snapshot(client) == before, (function, call)
    finally:
        await client.aclose()


async def test_a_refused_call_raises_backend_error_naming_the_argument() -> None:
    # The store never sends such a call; one that reached the library is misuse.
    async with RedisPackageStore(fake_clients()(), namespace="mine") as store:
        function, call = changed(ROUTE, 5, B.route_changes)
        command = ("FCALL", function, *call)
        with pytest.raises(BackendError) as raised:
            await store._calls.call(command)
        assert str(raised.value) == (
            f"{store.server}: {PUT_ROUTE.name} refused the call: ARGV[2] is not "
            "{mine}:route-changes; nothing was written (no call kvstore makes has this shape)"
        )
        assert await store.list_package_routes() == []
        await store.client.aclose()


# Layout 2: the blob's key must be the blob of the digest the call carries, in the
# namespace of KEYS[1] where there is one.

A2, B2 = Keyspace("mine2"), Keyspace("theirs2")
DIGEST = archive_digest(b"PK")
OTHER_DIGEST = archive_digest(b"other")
BLOB_PUT_CALL: tuple[Any, ...] = (6, A2.format, A2.index, A2.routes, A2.route_version)
BLOB_PUT_CALL += (A2.row(ROW), A2.blob(DIGEST), BLOB_LAYOUT, A2.route_changes, ROW, STAMP)
BLOB_PUT_CALL += (DIGEST, b"2", b"h1", b"PK", b"order")
DIGEST_PUT_CALL: tuple[Any, ...] = (5, A2.format, A2.index, A2.routes, A2.route_version)
DIGEST_PUT_CALL += (A2.row(ROW), BLOB_LAYOUT, A2.route_changes, ROW, STAMP)
DIGEST_PUT_CALL += (DIGEST, b"2", b"h1", b"order")
BLOB_CALL: tuple[Any, ...] = (1, A2.blob(DIGEST), DIGEST, b"PK")
DROP_CALL: tuple[Any, ...] = (1, A2.blob(DIGEST), DIGEST, b"1")
BLOB_PUT, DIGEST_PUT = PUT_PACKAGE_BLOB.name, PUT_PACKAGE_DIGEST.name
BLOB, DROP = PUT_BLOB.name, DROP_BLOB.name
CALLS.update({BLOB_PUT: BLOB_PUT_CALL, DIGEST_PUT: DIGEST_PUT_CALL, BLOB: BLOB_CALL})
CALLS[DROP] = DROP_CALL
NOT_A_DIGEST = "is not a digest (64 of 0-9 a-f)"
BLOB_MISUSES = [
    # The blob of another digest, or another namespace's, or a digest that is not one.
    (changed(BLOB_PUT, 6, A2.blob(OTHER_DIGEST)), "KEYS[6]", "is not mine2/blob/{<ARGV[5]>}"),
    (changed(BLOB_PUT, 6, B2.blob(DIGEST)), "KEYS[6]", "is not mine2/blob/{<ARGV[5]>}"),
    (changed(BLOB_PUT, 11, DIGEST.upper()), "ARGV[5]", NOT_A_DIGEST),
    (changed(BLOB_PUT, 11, DIGEST[:-1]), "ARGV[5]", NOT_A_DIGEST),
    (changed(BLOB_PUT, 5, B2.row(ROW)), "KEYS[5]", "is not {mine2}:pkg:<ARGV[3]>"),
    (changed(BLOB_PUT, 8, B2.route_changes), "ARGV[2]", "is not {mine2}:route-changes"),
    (shaped(BLOB_PUT, BLOB_PUT_CALL[:-1]), "ARGV[9]", "is missing"),
    (changed(DIGEST_PUT, 10, b"x" * 64), "ARGV[5]", NOT_A_DIGEST),
    (changed(DIGEST_PUT, 5, B2.row(ROW)), "KEYS[5]", "is not {mine2}:pkg:<ARGV[3]>"),
    (shaped(DIGEST_PUT, DIGEST_PUT_CALL[:-1]), "ARGV[8]", "is missing"),
    (changed(BLOB, 1, A2.blob(OTHER_DIGEST)), "KEYS[1]", "is not ns/blob/{<ARGV[1]>}"),
    (changed(BLOB, 1, A2.row(ROW)), "KEYS[1]", "is not ns/blob/{<ARGV[1]>}"),
    (changed(BLOB, 1, b"mi{ne2/blob/{" + DIGEST + b"}"), "KEYS[1]", "is not ns/blob/{<ARGV[1]>}"),
    (changed(BLOB, 2, b"nope"), "ARGV[1]", NOT_A_DIGEST),
    (shaped(BLOB, BLOB_CALL[:-1]), "ARGV[2]", "is missing"),
    (shaped(BLOB, (*BLOB_CALL, b"more")), "ARGV[3]", "is one too many"),
    (shaped(BLOB, (2, A2.blob(DIGEST), *BLOB_CALL[1:])), "KEYS[2]", "is one too many"),
    (changed(DROP, 1, A2.blob(OTHER_DIGEST)), "KEYS[1]", "is not ns/blob/{<ARGV[1]>}"),
    (changed(DROP, 3, b"-1"), "ARGV[2]", "is not a time in microseconds"),
]


async def test_fakeredis_blob_functions_refuse_a_call_of_another_shape_and_write_nothing() -> None:
    await refuses_every_blob_misuse(fake_clients())


async def test_servers_blob_functions_refuse_a_call_of_another_shape_and_write_nothing(
    server: LocalServer,
) -> None:
    await refuses_every_blob_misuse(server_clients(server))


async def refuses_every_blob_misuse(connect: Callable[[], Redis]) -> None:
    client = connect()

    async def snapshot() -> dict[Any, Any]:
        keys = []
        for pattern in ("{mine2}:*", "{theirs2}:*", "mine2/*", "theirs2/*", "mi{ne2*"):
            keys += await client.keys(pattern)
        return {key: await client.dump(key) for key in sorted(keys)}

    try:
        await load_library(client)
        for pattern in ("{mine2}:*", "{theirs2}:*", "mine2/*", "theirs2/*"):
            if found := await client.keys(pattern):
                await client.delete(*found)
        for namespace in ("mine2", "theirs2"):
            async with RedisPackageStore(connect(), namespace=namespace, layout=2) as store:
                await store.put_package(PackageRecord("order", "h0", b"PK", T0))
                await store.client.aclose()
        # The calls are well formed but for what each case changes.
        for function in (BLOB_PUT, DIGEST_PUT, BLOB):
            await client.execute_command("FCALL", function, *CALLS[function])  # type: ignore[no-untyped-call]
        before = await snapshot()
        for (function, call), argument, why in BLOB_MISUSES:
            with pytest.raises(ResponseError) as raised:
                await client.execute_command("FCALL", function, *call)  # type: ignore[no-untyped-call]
            assert args_refusal(raised.value) == ArgsRefusal(argument, why), (function, call)
            assert await snapshot() == before, (function, call)
    finally:
        await client.aclose()
