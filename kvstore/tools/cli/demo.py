"""``kvstore demo``: a tour in which two engines share a server that restarts.

The tour writes made-up packages, so it runs in a namespace of its own (an empty one,
if the operator names it) and, on any server that outlives it, removes that namespace
at the end, whether it succeeded, failed or was interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import secrets
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kvstore import PackageRecord, RedisPackageStore
from kvstore.tools.cli.common import CliError, data_dir, given_url, open_store
from kvstore.tools.cli.namespace import holds_anything, remove_namespace
from kvstore.tools.cli.output import short_hash
from kvstore.tools.cli.signals import run_async
from kvstore.tools.embedded_server import EmbeddedServer


async def _tour(
    connect: Callable[[], RedisPackageStore],
    namespace: str,
    restart: Callable[[], None] | None,
    *,
    clean_up: bool,
) -> None:
    """The tour, in ``namespace``, which must be empty. ``restart`` restarts the server;
    without it (a server that is not ours) the tour reconnects instead, and says so.
    With ``clean_up``, the namespace is removed at the end, whether the tour succeeded,
    failed or was interrupted, so the server keeps nothing of it."""

    def say(text: str) -> None:
        print(text, flush=True)

    async with connect() as store:
        if await holds_anything(store):
            raise CliError(
                f"namespace {namespace!r} already holds packages or routes; the demo writes "
                "made-up ones and removes them after: name an empty namespace, or none"
            )

    async def remove() -> None:
        async with connect() as store:
            removed = await remove_namespace(store)
        say(f"removed the namespace {namespace!r} ({removed} keys)")

    try:
        await _tour_steps(connect, namespace, restart, say)
    except BaseException:
        if clean_up:
            # The tour's failure is the message; a clean-up that fails too adds nothing.
            with contextlib.suppress(Exception):
                await remove()
        raise
    if clean_up:
        await remove()


async def _tour_steps(
    connect: Callable[[], RedisPackageStore],
    namespace: str,
    restart: Callable[[], None] | None,
    say: Callable[[str], None],
) -> None:
    def version(workflow_type: str, n: int) -> tuple[bytes, str]:
        archive = f"{workflow_type} version {n}\n".encode() * 8
        return archive, hashlib.sha256(archive).hexdigest()

    start = datetime.now(timezone.utc)
    step = iter(range(1000))

    def deployed(workflow_type: str, n: int) -> PackageRecord:
        archive, content_hash = version(workflow_type, n)
        at = start + timedelta(milliseconds=next(step))
        return PackageRecord(workflow_type, content_hash, archive, at)

    say(f"namespace {namespace!r}; two engines, A and B, share the server")
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(connect())
        b = await stack.enter_async_context(connect())
        for engine, name, record in [
            (a, "A", deployed("order-flow", 1)),
            (b, "B", deployed("invoice-flow", 1)),
            (a, "A", deployed("order-flow", 2)),
            (b, "B", deployed("invoice-flow", 2)),
        ]:
            await engine.put_package(record)
            say(f"engine {name} deploys {record.workflow_type} {short_hash(record.content_hash)}")
        seen = await b.list_packages()
        routes = await b.list_package_routes()
        say(f"engine B sees {len(seen)} packages; routes:")
        for route in routes:
            say(f"  {route.workflow_type} -> {short_hash(route.content_hash)}")

        v1 = version("order-flow", 1)[1]
        await a.put_package_route("order-flow", v1)
        say(f"engine A rolls order-flow back to {short_hash(v1)}")
        if await b.get_package_route("order-flow") != v1:
            raise CliError("engine B does not see the rollback")
        say(f"engine B sees order-flow routed to {short_hash(v1)}")

        v2 = version("order-flow", 2)[1]
        await b.delete_package("order-flow", v2)
        say(f"engine B deletes the archive of order-flow {short_hash(v2)} (no route uses it)")
        if await a.get_package("order-flow", v2) is not None:
            raise CliError("engine A still finds the deleted archive")
        say("engine A no longer finds it")
        before = (await a.list_packages(), await a.list_package_routes())
        say("the engines close their connections")

    if restart is None:
        say("the server is not ours to restart (--url); a new engine connects instead")
        after_what = "a new connection"
    else:
        say("stopping the server and starting it again")
        restart()
        after_what = "the restart"
    async with connect() as again:
        after = (await again.list_packages(), await again.list_package_routes())
    if after != before:
        raise CliError(f"the catalogue differs after {after_what}")
    say(
        f"after {after_what}: {len(after[0])} packages and {len(after[1])} routes, "
        "exactly as before"
    )


def run_demo(args: argparse.Namespace) -> None:
    # Never the operator's own namespace: the tour writes made-up packages.
    namespace = args.namespace or f"demo-{secrets.token_hex(4)}"
    url = given_url(args)
    if url:
        connect = functools.partial(open_store, url, namespace, args.timeout)
        run_async(_tour(connect, namespace, None, clean_up=True))
        return
    with contextlib.ExitStack() as stack:
        if args.data_dir:
            folder = data_dir(args.data_dir)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvstore-demo-")))
        server = stack.enter_context(EmbeddedServer(folder))
        print(f"embedded server on {server.address}, data in {server.data_dir}", flush=True)

        def restart() -> None:
            server.stop()
            server.start()

        connect = functools.partial(open_store, server.url, namespace, args.timeout)
        # A throwaway server's data goes with it; a --data-dir server's stays: clean it.
        run_async(_tour(connect, namespace, restart, clean_up=bool(args.data_dir)))
        print("stopping the server", flush=True)
