"""How the pipeliner's batches reach the server: the bytes moved, and nothing else.

The pipeliner (``kvstore.redis.pipeline``) decides what goes where and when; a
transport moves a batch's commands and brings back their replies. There are two, and
the deployment (``kvstore.redis.target``) chooses one, once:

- ``PooledTransport``: connections taken from a redis-py pool and held as lanes. The
  commands are packed once (``kvstore.redis.wire``), written straight onto the socket,
  large arguments in slices, and the replies read off the connection's own reader
  (``kvstore.redis.replies``, ``kvstore.redis.streamed``). Several batches may be in
  flight on one connection (``pipelined``).
- ``ClusterTransport``: a ``RedisCluster`` client, which routes each command to the
  node of its slot and follows MOVED and ASK itself; one batch per lane at a time.

Both are below redis-py's public API only where ``replies.py`` and ``streamed.py`` say,
and in ``_stream_writer`` here (a connection's ``asyncio.StreamWriter``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import ConnectionError, ResponseError, SlotNotCoveredError

from kvstore.redis.replies import read_replies
from kvstore.redis.streamed import read_streamed
from kvstore.redis.wire import SLICE, Command, flatten, pack_commands, pack_parts

# How much one held connection carries at a time: batches of ``max_units`` units, and
# bytes as a multiple of ``max_bytes``. Several batches deep, the server works on the
# first while the client builds the next; the bounds keep what a broken connection
# sends again, and what waits in its buffers, to a few batches.
BATCHES_PER_CONNECTION = 16
BYTES_PER_CONNECTION = 2  # times max_bytes


class PooledTransport:
    """Batches written onto connections of a redis-py connection pool, pipelined."""

    pipelined = True

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def room(self, max_units: int, max_bytes: int) -> tuple[int, int]:
        """The units and bytes one connection may carry in flight at a time."""
        return BATCHES_PER_CONNECTION * max_units, BYTES_PER_CONNECTION * max_bytes

    def has_room_for(self, connections: int) -> bool:
        """Whether the pool may hold ``connections`` at once (``max_connections``)."""
        limit = getattr(self._pool, "max_connections", None)
        return not isinstance(limit, int) or limit >= connections

    async def connect(self) -> Any:
        return await self._pool.get_connection()

    async def send(
        self, connection: Any, commands: Sequence[Command], size: int, alive: Callable[[], bool]
    ) -> None:
        """Write ``commands`` (about ``size`` bytes) on ``connection``. From ``SLICE``
        bytes on, large arguments go in slices, the event loop running between them,
        for as long as ``alive()`` says the connection is still the lane's."""
        parts = pack_parts(commands) if size >= SLICE else None
        if parts is None or len(parts) == 1:
            data = pack_commands(commands) if parts is None else bytes(parts[0])
            await connection.send_packed_command(data, check_health=False)
        else:
            await _send_in_slices(connection, parts, alive)

    async def receive(self, connection: Any, units: Sequence[tuple[int, bool]]) -> list[Any]:
        """The replies to units sent on ``connection``, each given as (how many
        commands, whether its replies may hold archives, read in slices when large)."""
        if not any(streamed for _, streamed in units):
            return await read_replies(connection, sum(count for count, _ in units))
        replies: list[Any] = []
        for count, streamed in units:
            read = read_streamed if streamed else read_replies
            replies.extend(await read(connection, count))
        return replies

    async def discard(self, connection: Any) -> None:
        """Close ``connection`` and give it back: left between a request and its
        replies, it must not be reused."""
        await connection.disconnect(nowait=True)
        await self._pool.release(connection)

    async def release(self, connection: Any, *, in_flight: bool) -> None:
        if in_flight:
            await connection.disconnect(nowait=True)
        await self._pool.release(connection)


class ClusterTransport:
    """Batches sent through a ``RedisCluster`` client, which routes each command."""

    pipelined = False

    def __init__(self, client: Any) -> None:
        self._client = client

    def room(self, max_units: int, max_bytes: int) -> tuple[int, int]:
        return max_units, max_bytes

    async def exchange(self, commands: Sequence[Command]) -> list[Any]:
        """The replies to ``commands``, a refusal as its ``ResponseError`` value."""
        client = self._client
        await client.initialize()  # at once when it is: the slot table is needed here
        if len(commands) == 1:
            args, route = _routed(client, commands[0])
            try:
                return [await client.execute_command(*args, **route)]
            except ResponseError as exc:
                return [exc]
        pipe = client.pipeline(transaction=False)
        for command in commands:
            args, route = _routed(client, command)
            pipe.execute_command(*args, **route)
        return list(await pipe.execute(raise_on_error=False))


Transport = PooledTransport | ClusterTransport


def _routed(client: Any, command: Command) -> tuple[Command, dict[str, Any]]:
    """``command`` as a cluster client's method takes it, with the node an ``FCALL`` goes to.

    redis-py finds the keys of an ``FCALL`` by asking a node (``COMMAND GETKEYS``), a
    round trip per call; its first key names the node, and MOVED is still followed."""
    args = flatten(command)
    if args[0] == "FCALL" and int(args[2]) > 0:
        try:
            return args, {"target_nodes": client.get_node_from_key(args[3])}
        except SlotNotCoveredError:
            pass  # the slot table is being renewed: redis-py finds the node itself
    return args, {}


async def _send_in_slices(
    connection: Any, parts: list[bytes | memoryview], alive: Callable[[], bool]
) -> None:
    """Send ``parts`` (of ``pack_parts``: large arguments in slices, never copied
    whole) one at a time: between them the event loop runs and the socket drains, so a
    large archive stalls the loop for one slice at a time, not for the whole archive.

    Stops with ``ConnectionError`` as soon as the connection is no longer ``alive()``
    (its lane dropped it meanwhile): the rest of a command must never go out on a
    connection made anew, where the server would take it for a command of its own."""
    for i, part in enumerate(parts):
        if i and not (alive() and connection.is_connected):
            raise ConnectionError("the connection was lost while a large unit was sent")
        writer = _stream_writer(connection) if i and type(part) is not bytes else None
        if writer is None:
            # One part a call: a list of parts would be joined into one buffer.
            await connection.send_packed_command([part], check_health=False)
        else:
            # A slice goes to the transport as it is: redis-py would join it into a copy
            # of its own first (Python before 3.12 joins even a list of one part).
            try:
                writer.write(part)
                await writer.drain()
            except OSError as exc:
                await connection.disconnect(nowait=True)
                raise ConnectionError(f"writing a large unit failed: {exc}") from exc
        await asyncio.sleep(0)


def _stream_writer(connection: Any) -> asyncio.StreamWriter | None:
    """The ``asyncio.StreamWriter`` of a connected redis-py ``connection`` (its private
    ``_writer``), or ``None`` if it has none: its parts are then sent through
    ``send_packed_command``."""
    writer = getattr(connection, "_writer", None)
    return writer if isinstance(writer, asyncio.StreamWriter) else None
