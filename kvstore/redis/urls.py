"""Clients made from URLs, one scheme per deployment shape.

=============================================================  ===========================
URL                                                            client
=============================================================  ===========================
``redis://[[user]:password@]host[:port][/db]``                 one server
``rediss://…``                                                 one server over TLS
``unix://[[user]:password@]/path/to/socket[?db=N]``            one server, Unix socket
``redis+cluster://[[user]:password@]host:port[,host:port…]``   a Redis Cluster, found from
                                                               any of its nodes
``redis+sentinel://[[user]:password@]host:port[,host:port…]``  the primary of ``service``,
``/service[/db]``                                              as the Sentinels say, even
                                                               across a failover
=============================================================  ===========================

The credentials of a cluster or Sentinel URL are those of the data nodes; options for
the Sentinels themselves go in ``sentinel_kwargs``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not sep or not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}:***@{location}"


def _hosts(netloc: str, url: str) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"url needs host:port for every node: {redact_url(url)}")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _credentials(netloc: str) -> dict[str, str]:
    credentials, at, _ = netloc.rpartition("@")
    if not at:
        return {}
    user, _, password = credentials.partition(":")
    found = {"username": unquote(user), "password": unquote(password)}
    return {k: v for k, v in found.items() if v}


def client_from_url(url: str, options: dict[str, Any]) -> Redis | RedisCluster:
    """A client for ``url`` with ``options``; ``ValueError`` (password redacted) if bad."""
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        try:
            return Redis.from_url(url, **options)
        except ValueError:
            raise ValueError(f"url is not a Redis URL: {redact_url(url)}") from None
    if scheme not in ("redis+cluster", "redis+sentinel"):
        raise ValueError(
            "url must start with redis://, rediss://, unix://, redis+cluster:// or "
            f"redis+sentinel://, not {redact_url(url)}"
        )
    parts = urlsplit(url)
    nodes = _hosts(parts.netloc, url)
    options = {**_credentials(parts.netloc), **options}
    if scheme == "redis+cluster":
        startup = [ClusterNode(host, port) for host, port in nodes]
        return RedisCluster(startup_nodes=startup, **options)
    service, _, db = parts.path.strip("/").partition("/")
    if not service:
        raise ValueError(f"url needs the Sentinel service name as its path: {redact_url(url)}")
    if db:
        if not db.isdigit():
            raise ValueError(f"url's database must be a number: {redact_url(url)}")
        options["db"] = int(db)
    sentinel_options = options.pop("sentinel_kwargs", None) or {
        k: options[k] for k in ("socket_connect_timeout", "socket_timeout") if k in options
    }
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_options, **options)  # type: ignore[no-untyped-call]
    client: Redis = sentinel.master_for(service, redis_class=Redis)
    return client
