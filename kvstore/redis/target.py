"""The deployment a store speaks to, decided once: one server, Sentinel, or a cluster.

``target_for(client)`` looks at the client once, when the store is made, and returns the
object that answers every later question whose answer depends on the deployment:

=============================  ==========================  ============================
question                       one server, Sentinel        a Redis Cluster
=============================  ==========================  ============================
``description``                ``host:port``, ``unix://…``, ``redis cluster``
                               ``sentinel service <name>``
``telemetry_attributes``       address, port, db index     the first startup node
``transport``                  pooled lanes, pipelined     the cluster client routes
``load_library``               on the server               on every primary
``subscription_client``        the store's own client      a client of the primary that
                                                           serves the key's slot
``reads_server_config``        yes (``CONFIG GET``)        no (no node to choose)
``waits_for_replicas``         yes (``WAIT``)              no (``WAIT`` names no key)
``writes_across_slots``        yes: one call writes a      no: a blob's node first,
                               blob and its row            then the row's
``admin_client``               the store's client          refused: the tools speak to
                                                           one server
``primaries``, ``node_of``     ``[None]``, ``None``        each primary, and the one
                                                           that serves a key's slot
``replica_pool``               connections to a replica    the same, to a replica or a
                               the primary names           primary of the cluster
``replica_lead``               nothing                     ``READONLY``: a cluster's
                                                           replica refuses reads
                                                           without it
=============================  ==========================  ============================

No other module asks which kind of deployment it is: each asks its target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ResponseError

from kvstore.redis.retry import no_client_retries
from kvstore.redis.transports import ClusterTransport, PooledTransport, Transport
from kvstore.redis.wire import Command

Send = Callable[[Command], Awaitable[Any]]
T = TypeVar("T")

# The options of a client's connections that a connection to another node of its
# deployment (a cluster's node, a primary's replica) takes: credentials, socket settings
# and, by prefix, TLS (``ssl_*``). The client's own options (pool sizes, reply
# callbacks, a Sentinel's) stay with it.
_NODE_OPTIONS: Final = frozenset(
    {
        "username",
        "password",
        "credential_provider",
        "client_name",
        "protocol",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
    }
)


def _node_options(options: dict[str, Any]) -> dict[str, Any]:
    """Of a client's connection options, those a connection to another of its nodes takes."""
    return {
        name: value
        for name, value in options.items()
        if name in _NODE_OPTIONS or name.startswith("ssl_")
    }


class Target(ABC):
    """What a store needs to know of its deployment, asked of one object."""

    waits_for_replicas: bool
    reads_server_config: bool
    # Whether one function call may write keys of any slot (a blob and its row).
    writes_across_slots: bool
    # What leads each round trip of reads sent to a replica (``kvstore.redis.replicas``).
    replica_lead: tuple[Command, ...] = ()

    @property
    @abstractmethod
    def client(self) -> Redis | RedisCluster: ...

    @property
    @abstractmethod
    def description(self) -> str:
        """The server as messages name it; never a secret."""

    @abstractmethod
    def connection_options(self) -> dict[str, Any]:
        """The options the client's connections are made with."""

    @abstractmethod
    def telemetry_attributes(self, namespace: str) -> dict[str, Any]:
        """The attributes every span and measurement of a store carries, by
        OpenTelemetry's conventions: the server, the database index, the namespace."""

    @abstractmethod
    def transport(self) -> Transport:
        """How the pipeliner's batches reach the server."""

    @abstractmethod
    async def load_library(
        self, on_server: Callable[[Send], Awaitable[T]], send: Send | None = None
    ) -> list[tuple[str, T]]:
        """``on_server`` (the library's load, or its check: ``kvstore.redis.scripts``)
        run on each server where the library must be, one after another, given a send of
        commands to that server whose refusal is its ``ResponseError`` value: each
        server's name with what ``on_server`` returned. ``send`` (one server only) sends
        the commands on the caller's own connections."""

    @abstractmethod
    async def subscription_client(self, key: bytes) -> Redis:
        """A client of the node that publishes the messages of ``key``'s slot, found anew
        at each call so a failover or a moved slot is followed. Close it with
        ``release_subscription_client``."""

    async def release_subscription_client(self, node: Redis) -> None:
        if node is not self.client:
            await node.aclose()

    @abstractmethod
    def admin_client(self) -> Redis:
        """The client the operator's tools send plain commands through."""

    @abstractmethod
    async def primaries(self) -> list[Any]:
        """Every server that may hold a key, as ``target_nodes`` of a command names it:
        ``[None]`` for the one server (the client's own), each primary of a cluster as
        its slot table has them now."""

    @abstractmethod
    def node_of(self, key: bytes) -> Any:
        """The server that holds ``key``, as ``primaries`` names it (call that first)."""

    @abstractmethod
    def replica_pool(self, host: str, port: int) -> ConnectionPool:
        """A pool of connections to the server at ``host:port`` (a replica, or a
        cluster's primary), made with the client's credentials and TLS settings; the
        pool's own retries are off."""


class SingleNode(Target):
    """One server, through a ``Redis`` client (fakeredis included)."""

    waits_for_replicas = True
    reads_server_config = True
    writes_across_slots = True

    def __init__(self, client: Redis) -> None:
        self._client = client

    @property
    def client(self) -> Redis:
        return self._client

    def connection_options(self) -> dict[str, Any]:
        return dict(self._client.connection_pool.connection_kwargs)

    @property
    def description(self) -> str:
        options = self.connection_options()
        if "path" in options:
            return f"unix://{options['path']}"
        if "host" in options:
            return f"{options['host']}:{options.get('port', 6379)}"
        return type(self._client).__name__

    def telemetry_attributes(self, namespace: str) -> dict[str, Any]:
        options = self.connection_options()
        attributes: dict[str, Any] = {"kvstore.namespace": namespace}
        if "path" in options:
            attributes["server.address"] = options["path"]
        elif "host" in options:
            attributes["server.address"] = options["host"]
            attributes["server.port"] = int(options.get("port", 6379))
        attributes["db.namespace"] = str(options.get("db", 0))
        return attributes

    def transport(self) -> Transport:
        return PooledTransport(self._client.connection_pool)

    async def load_library(
        self, on_server: Callable[[Send], Awaitable[T]], send: Send | None = None
    ) -> list[tuple[str, T]]:
        client = self._client

        async def send_by_client(command: Command) -> Any:
            try:
                return await client.execute_command(*command)  # type: ignore[no-untyped-call]
            except ResponseError as exc:
                return exc

        return [(self.description, await on_server(send or send_by_client))]

    async def subscription_client(self, key: bytes) -> Redis:
        return self._client

    def admin_client(self) -> Redis:
        return self._client

    async def primaries(self) -> list[Any]:
        return [None]

    def node_of(self, key: bytes) -> Any:
        return None

    def replica_pool(self, host: str, port: int) -> ConnectionPool:
        primary = self._client.connection_pool
        tls = issubclass(primary.connection_class, SSLConnection)
        return ConnectionPool(
            connection_class=SSLConnection if tls else Connection,
            host=host,
            port=port,
            **_node_options(primary.connection_kwargs),
            retry=no_client_retries(),
        )


class Sentinel(SingleNode):
    """The primary a Sentinel names, through a client whose pool follows failovers."""

    @property
    def description(self) -> str:
        return f"sentinel service {self._client.connection_pool.service_name}"  # type: ignore[attr-defined]


class Cluster(Target):
    """A Redis Cluster, through a ``RedisCluster`` client."""

    waits_for_replicas = False
    reads_server_config = False
    writes_across_slots = False
    replica_lead = (("READONLY",),)

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._subscribed = False  # whether a subscription client was asked for before

    @property
    def client(self) -> RedisCluster:
        return self._client

    @property
    def description(self) -> str:
        return "redis cluster"

    def connection_options(self) -> dict[str, Any]:
        return dict(self._client.get_connection_kwargs())

    def telemetry_attributes(self, namespace: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {"kvstore.namespace": namespace}
        nodes = self._client.nodes_manager.startup_nodes
        if nodes:
            first = next(iter(nodes.values()))
            attributes["server.address"] = first.host
            attributes["server.port"] = first.port
        return attributes

    def transport(self) -> Transport:
        return ClusterTransport(self._client)

    async def load_library(
        self, on_server: Callable[[Send], Awaitable[T]], send: Send | None = None
    ) -> list[tuple[str, T]]:
        client = self._client
        await client.initialize()  # the nodes are known once it is
        said: list[tuple[str, T]] = []
        for node in client.get_primaries():

            async def send_to_node(command: Command, node: Any = node) -> Any:
                try:
                    return await client.execute_command(*command, target_nodes=node)
                except ResponseError as exc:
                    return exc

            said.append((node.name, await on_server(send_to_node)))
        return said

    async def subscription_client(self, key: bytes) -> Redis:
        # A client of its own to the primary that serves the slot, found anew each time:
        # a session that ended may have ended because the slot moved or its primary
        # failed over, which the client's slot table learns only from a command that
        # meets MOVED (a subscription's SSUBSCRIBE is not one), so it is read again.
        client = self._client
        await client.initialize()
        if self._subscribed:
            await client.nodes_manager.initialize()
        self._subscribed = True
        node = client.get_node_from_key(key.decode("ascii"))
        if node is None:
            raise LookupError(f"no cluster node serves {key!r}")
        cluster_options = client.get_connection_kwargs()
        pool = ConnectionPool(
            connection_class=cluster_options.get("connection_class") or Connection,
            host=node.host,
            port=node.port,
            **_node_options(cluster_options),
        )
        return Redis.from_pool(pool)  # closing the client closes the pool

    def admin_client(self) -> Redis:
        raise TypeError("status and check speak to one server, not to a Redis Cluster")

    def replica_pool(self, host: str, port: int) -> ConnectionPool:
        options = self._client.get_connection_kwargs()
        return ConnectionPool(
            connection_class=options.get("connection_class") or Connection,
            host=host,
            port=port,
            **_node_options(options),
            retry=no_client_retries(),
        )

    async def primaries(self) -> list[Any]:
        await self._client.initialize()
        return list(self._client.get_primaries())

    def node_of(self, key: bytes) -> Any:
        node = self._client.get_node_from_key(key)  # type: ignore[arg-type]
        if node is None:
            raise LookupError(f"no cluster node serves {key!r}")
        return node


def target_for(client: object) -> Target:
    """The target of ``client``; ``TypeError`` for anything but a redis-py asyncio client."""
    if isinstance(client, RedisCluster):
        return Cluster(client)
    if isinstance(client, Redis):
        if isinstance(getattr(client.connection_pool, "service_name", None), str):
            return Sentinel(client)
        return SingleNode(client)
    raise TypeError(
        f"client must be a redis.asyncio.Redis or RedisCluster, not {type(client).__name__}"
    )
