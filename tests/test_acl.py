"""Least privilege: a store needs only ``STORE_USER_RULE``, and it keeps a user in its namespace.

The rule was found by trying: the whole contract, a route cache and ``min_replicas`` run
as a user that has nothing else, and the server refuses nothing they ask; each command
in it is one the store sends or one the kvstore library's functions call (functions run
with the caller's rights). It grants ``FCALL`` but neither ``EVAL``/``EVALSHA`` nor
``FUNCTION LOAD``: such a user runs the library an operator loaded (``kvstore setup``)
and no Lua of its own. ``{ns}`` stands for the namespace's hash tag, braces included, and
``<ns>`` for the namespace: the rule of namespace ``aion`` grants the keys ``{aion}:*``, the
blobs ``aion/blob/*`` and the channel ``{aion}:route-changes``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from kvstore import BackendError, PackageRouteRecord, RedisPackageStore
from kvstore.conformance import run_package_store_suite
from kvstore.redis.keyspace import FORMAT_VERSION, Keyspace, archive_digest
from kvstore.redis.protocol import ArgsRefusal, args_refusal
from kvstore.redis.scripts import LIBRARY, PUT_ROUTE, load_library
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import as_map, pkg
from .test_store_library import build_library_with_extra_line, impostor_text, replace_library
from .topology import raw_command

STORE_USER_RULE = (
    "resetkeys ~{ns}:* ~<ns>/blob/* resetchannels &{ns}:route-changes -@all "
    "+fcall +get +set +hget +hset +hdel +hmget +hstrlen +hgetall +del +zadd +zrem +zrangebylex "
    "+incr +type +exists +time +spublish +ssubscribe +ping +multi +exec +wait"
)

# redis-py names itself with CLIENT SETINFO on connecting and ignores a refusal; the store
# needs no such right (and Redis 7.0 has no such command to grant). Before its first
# large put the store asks CONFIG GET proto-max-bulk-len, and when refused sends large
# puts alone instead: granting CONFIG GET would let the user read every setting. Before
# its first write it asks FUNCTION LIST for the library's code, and when refused trusts
# the library by its name (`kvstore setup` checks it): granting FUNCTION LIST would let
# the user read the code of every library on the server.
NOT_NEEDED = {"client|setinfo", "config|get", "function|list"}


# ``+fcall`` narrowed to this release's functions, by first-argument rules (``+fcall|<function>``;
# Valkey 9 and Redis 7 accept them, Redis documents them as deprecated). As
# docs/operators/least-privilege.md states it, with the library's name as ``kvstore setup``
# prints it.
NARROWED_FCALL = (
    "+fcall|{library}_put_package +fcall|{library}_put_package_inline "
    "+fcall|{library}_put_package_blob +fcall|{library}_put_blob "
    "+fcall|{library}_put_package_digest +fcall|{library}_put_route "
    "+fcall|{library}_delete_package"
)


def rule_for(namespace: str, *, narrowed: bool = False) -> list[str]:
    rule = STORE_USER_RULE
    if narrowed:
        rule = rule.replace("+fcall", NARROWED_FCALL.format(library=LIBRARY.name))
    return rule.replace("{ns}", "{" + namespace + "}").replace("<ns>", namespace).split()


class Users:
    """Store users made on one server, each with the rule of its own namespace."""

    def __init__(self, server: LocalServer, admin: Redis) -> None:
        self.server = server
        self.admin = admin
        self.names: list[str] = []

    async def add(
        self, namespace: str, *, narrowed: bool = False, also: tuple[str, ...] = ()
    ) -> str:
        """A URL that logs in as a new user holding only the rule of ``namespace``
        (``narrowed``: with ``+fcall`` narrowed to this release's functions), and ``also``."""
        name, password = f"engine-{namespace}", secrets.token_hex(8)
        await raw_command(self.admin, "ACL", "SETUSER", name, "on", f">{password}")
        await raw_command(
            self.admin, "ACL", "SETUSER", name, *rule_for(namespace, narrowed=narrowed), *also
        )
        self.names.append(name)
        return f"redis://{name}:{password}@127.0.0.1:{self.server.port}"

    async def store(
        self, namespace: str, *, narrowed: bool = False, **options: float | bool
    ) -> RedisPackageStore:
        url = await self.add(namespace, narrowed=narrowed)
        return RedisPackageStore.from_url(url, namespace=namespace, **options)  # type: ignore[arg-type]

    async def refusals(self) -> list[str]:
        """What the server refused these users, as ``reason:object``, beyond ``NOT_NEEDED``."""
        found = []
        for entry in await raw_command(self.admin, "ACL", "LOG", "128"):
            fields = as_map(entry)
            user, reason, what = (fields[k].decode() for k in (b"username", b"reason", b"object"))
            if user in self.names and what not in NOT_NEEDED:
                found.append(f"{reason}:{what}")
        return found


@pytest.fixture
async def users(server: LocalServer) -> AsyncIterator[Users]:
    async with Redis(port=server.port) as admin:
        made = Users(server, admin)
        await load_library(admin)  # what `kvstore setup` does, as an operator
        await raw_command(admin, "ACL", "LOG", "RESET")
        try:
            yield made
        finally:
            for name in made.names:
                await raw_command(admin, "ACL", "DELUSER", name)


async def test_the_whole_contract_holds_for_a_user_with_only_the_rule(users: Users) -> None:
    await run_package_store_suite(lambda: users.store(fresh_namespace()))
    assert await users.refusals() == []


async def test_the_whole_contract_holds_with_fcall_narrowed_to_this_release(
    users: Users,
) -> None:
    await run_package_store_suite(lambda: users.store(fresh_namespace(), narrowed=True))
    assert await users.refusals() == []


async def test_fcall_runs_any_loaded_function_and_the_narrowed_rule_only_this_release_s(
    users: Users, tmp_path: Path
) -> None:
    # Another release's library: `+fcall` lets the user run its functions (with the user's
    # own rights, so in its own namespace); narrowed, the server refuses them.
    other = build_library_with_extra_line(tmp_path / "lua")
    await load_library(users.admin, other)
    try:
        for narrowed in (False, True):
            namespace = fresh_namespace()
            keys = Keyspace(namespace)
            url = await users.add(namespace, narrowed=narrowed)
            fcall = (
                "FCALL",
                other.functions["put_route"].name,
                "3",
                keys.format,
                keys.routes,
                keys.route_version,
                FORMAT_VERSION,
                keys.route_changes,
                "order",
                "h1",
            )
            async with Redis.from_url(url) as raw:
                if narrowed:
                    with pytest.raises(NoPermissionError):
                        await raw_command(raw, *fcall)
                    assert await users.admin.hgetall(keys.routes) == {}
                else:
                    await raw_command(raw, *fcall)
                    assert await users.admin.hgetall(keys.routes) == {b"order": b"h1"}
    finally:
        await users.admin.function_delete(other.name)
        await raw_command(users.admin, "ACL", "LOG", "RESET")


async def test_a_call_with_another_namespace_s_channel_writes_nothing(users: Users) -> None:
    # The rule refuses the user the other channel, but only when the function publishes,
    # after its writes: the function refuses the call before its first write instead.
    mine, theirs = Keyspace(fresh_namespace()), Keyspace(fresh_namespace())
    url = await users.add(mine.namespace)
    fcall = (
        "FCALL",
        PUT_ROUTE.name,
        "3",
        mine.format,
        mine.routes,
        mine.route_version,
        FORMAT_VERSION,
        theirs.route_changes,
        "order",
        "h1",
    )
    async with Redis.from_url(url) as raw:
        with pytest.raises(ResponseError) as raised:
            await raw_command(raw, *fcall)
    assert args_refusal(raised.value) == ArgsRefusal(
        "ARGV[2]", f"is not {{{mine.namespace}}}:route-changes"
    )
    assert await users.admin.keys(f"{{{mine.namespace}}}:*") == []


async def test_the_rule_trusts_the_library_by_its_name_and_setup_checks_its_code(
    users: Users,
) -> None:
    # The rule may not FUNCTION LIST: the store's check is refused, and it writes.
    async with await users.store(fresh_namespace()) as store:
        await store.put_package(pkg("order", "h1", b"PK"))
        assert len(await store.list_packages()) == 1
    await replace_library(users.admin, impostor_text())
    try:
        # Under another library of this release's name, such a store cannot tell: its put
        # is acknowledged and stores no package. The operator's `kvstore setup` tells.
        async with await users.store(fresh_namespace()) as store:
            await store.put_package(pkg("order", "h1", b"PK"))
            assert await store.list_packages() == []
        with pytest.raises(BackendError, match="is not this release's kvstore library"):
            await load_library(users.admin)
        # With FUNCTION LIST granted, the store checks the library itself.
        namespace = fresh_namespace()
        url = await users.add(namespace, also=("+function|list",))
        async with RedisPackageStore.from_url(url, namespace=namespace) as store:
            with pytest.raises(BackendError, match="is not this release's kvstore library"):
                await store.put_package(pkg("order", "h1", b"PK"))
    finally:
        await replace_library(users.admin, LIBRARY.text)


async def test_the_rule_runs_no_lua_of_the_users_own(users: Users) -> None:
    url = await users.add(fresh_namespace())
    async with Redis.from_url(url) as raw:
        with pytest.raises(NoPermissionError):
            await raw_command(raw, "EVAL", "return 1", "0")
        with pytest.raises(NoPermissionError):
            await raw_command(raw, "EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0")
        with pytest.raises(NoPermissionError):
            await raw_command(raw, "FUNCTION", "LOAD", "#!lua name=mine\nredis.log(1, 'x')")
        with pytest.raises(NoPermissionError):
            await raw_command(raw, "FUNCTION", "FLUSH")


async def test_a_store_on_a_server_without_the_library_says_what_to_run(users: Users) -> None:
    await raw_command(users.admin, "FUNCTION", "FLUSH")
    try:
        async with await users.store(fresh_namespace()) as store:
            with pytest.raises(BackendError) as raised:
                await store.put_package(pkg("order", "h1", b"PK"))
            assert str(raised.value) == (
                f"the kvstore library {LIBRARY.name} is not loaded on 127.0.0.1:"
                f"{users.server.port} and this credential may not load it; run `kvstore "
                "setup --url URL` with a credential that may (FUNCTION LOAD)"
            )
            assert await store.list_packages() == []
            await load_library(users.admin)
            await store.put_package(pkg("order", "h1", b"PK"))
            assert len(await store.list_packages()) == 1
    finally:
        await load_library(users.admin)


async def test_a_route_cache_lives_on_the_rule(users: Users) -> None:
    namespace = fresh_namespace()
    cached = await users.store(namespace, cache_routes=True, route_health_interval=0.1)
    async with cached, await users.store(namespace) as writer:
        async with cached.watch_routes() as watch:
            assert await cached.route_cache_ready(timeout=10)
            await asyncio.sleep(0.5)  # quiet: the cache PINGs the server several times
            await writer.put_package_route("order", "h1")
            seen = await asyncio.wait_for(anext(watch), timeout=10)
        assert seen == PackageRouteRecord("order", "h1")
        assert await cached.route_cache_ready(timeout=0)
    assert await users.refusals() == []


async def test_the_rule_lets_a_store_wait_for_replicas(users: Users) -> None:
    # This server has no replica: WAIT is answered (0 acknowledged), not refused.
    async with await users.store(fresh_namespace(), min_replicas=1, replica_timeout=0.1) as waiting:
        with pytest.raises(BackendError, match="0 of 1 replicas acknowledged"):
            await waiting.put_package(pkg("order", "h1", b"PK"))
    assert await users.refusals() == []


async def test_heads_are_listed_on_the_rule(users: Users) -> None:
    async with await users.store(fresh_namespace()) as store:
        await store.put_package(pkg("order", "h1", b"PK"))
        heads = [h async for h in store.iter_package_heads()]
        assert [(h.content_hash, h.size) for h in heads] == [("h1", 2)]
    assert await users.refusals() == []


async def test_a_read_the_server_refuses_raises_backend_error(users: Users) -> None:
    # Every read is led by a check of the layout marker; the server refusing that check is
    # a failure of the server, not a namespace holding another layout.
    url = await users.add(fresh_namespace())
    async with RedisPackageStore.from_url(
        url, namespace=fresh_namespace(), retry_budget=0
    ) as store:
        with pytest.raises(BackendError, match="NoPermissionError"):
            await store.get_package("order", "h1")


async def test_the_rule_keeps_a_user_out_of_other_namespaces(users: Users) -> None:
    mine, theirs = fresh_namespace(), fresh_namespace()
    owner = RedisPackageStore(users.admin, namespace=theirs)
    record = pkg("order", "h1", b"theirs" * 1000)  # a blob, outside {theirs}
    await owner.put_package(record)
    blob = Keyspace(theirs).blob(archive_digest(record.archive))
    url = await users.add(mine)
    async with Redis.from_url(url) as raw:
        with pytest.raises(NoPermissionError):
            await raw.hgetall(f"{{{theirs}}}:routes")
        with pytest.raises(NoPermissionError):
            await raw.hset(f"{{{theirs}}}:routes", "order", "forged")
        with pytest.raises(NoPermissionError):
            await raw.hget(blob, "archive")
        with pytest.raises(NoPermissionError):
            await raw.hset(blob, "archive", b"forged")
        with pytest.raises(NoPermissionError):
            await raw_command(raw, "KEYS", "*")
        # Its own blobs it may read and write, through the library's functions.
        async with RedisPackageStore.from_url(url, namespace=mine) as store:
            await store.put_package(pkg("order", "h1", b"mine" * 2000))
        assert await raw.hget(Keyspace(mine).blob(archive_digest(b"mine" * 2000)), "archive")
    async with RedisPackageStore.from_url(url, namespace=theirs, retry_budget=0) as intruder:
        with pytest.raises(BackendError):
            await intruder.get_package_route("order")
        with pytest.raises(BackendError):
            await intruder.list_packages()
        with pytest.raises(BackendError):
            await intruder.put_package(pkg("order", "h2", b"forged"))
        with pytest.raises(BackendError):
            await intruder.delete_package("order", "h1")
    assert await owner.list_packages() == [record]
    assert await owner.list_package_routes() == [PackageRouteRecord("order", "h1")]


def test_the_documentation_states_this_rule_and_its_narrowing() -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "operators" / "least-privilege.md"
    stated = " ".join(rule_for("aion"))
    text = page.read_text(encoding="utf-8")
    assert f"ACL SETUSER engine on >PASSWORD {stated}\n" in text
    assert f"    {NARROWED_FCALL.format(library='kvstore_<12 hex>')}\n" in text
