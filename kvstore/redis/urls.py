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

import inspect
import re
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import Sentinel

from kvstore.redis.failures import MASK

# A scheme and its slashes, however mistyped (``redis:/``, ``unix:///``). Without its
# colon nothing is taken for a scheme (``pw-secret@host`` is a password with no scheme),
# so all before the last ``@`` is masked.
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:/*")
# Query parameters whose values are secrets; matched inside the lowercased name.
_SECRET_PARAMETERS = ("pass", "secret", "token", "auth", "cred")


def redact_url(url: str) -> str:
    """``url`` fit for messages: no password, whatever the shape of the URL.

    Everything between the scheme and the last ``@`` (the user information, however
    malformed) becomes ``***``, and so does the value of every query parameter whose
    name speaks of a secret (``password=``, ``requirepass=``, ``auth_token=``, …).
    Redacting too much is harmless; showing a password is not. The mask is
    ``kvstore.redis.failures.redact``'s, but not its way: that one knows the secrets and
    finds them in any text, while a URL that fails to parse has told no one its
    password, which is found here by its place.
    """
    head = _PREFIX.match(url)
    start = head.end() if head else 0
    credentials_end = url.rfind("@")
    if credentials_end >= start:
        url = url[:start] + MASK + url[credentials_end:]
    base, question, query = url.partition("?")
    if not question:
        return url
    kept = []
    for parameter in query.split("&"):
        name, equals, _ = parameter.partition("=")
        if equals and any(word in unquote(name).lower() for word in _SECRET_PARAMETERS):
            parameter = f"{name}={MASK}"
        kept.append(parameter)
    return f"{base}?{'&'.join(kept)}"


def _options_of(connection_class: type) -> set[str]:
    """The keyword arguments ``connection_class`` (and its bases) accept."""
    names: set[str] = set()
    for cls in connection_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names.update(
                p.name
                for p in inspect.signature(init).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            )
    return names - {"self"}


def _check_parts(url: str, scheme: str) -> None:
    """Refuse what redis-py would take silently or fail on later: an unknown query
    option (it becomes a bad keyword argument at the first connection), a path that
    is not a database number (it would be read as database 0), or a port outside
    1-65535 (port 0 would be read as 6379)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"url is not a URL: {redact_url(url)}") from None
    connection_class = {
        "redis": Connection,
        "rediss": SSLConnection,
        "unix": UnixDomainSocketConnection,
    }[scheme]
    known = _options_of(connection_class) | {"max_connections"}
    for name in parse_qs(parts.query, keep_blank_values=True):
        if name not in known:
            raise ValueError(f"url has an unknown option {name!r}: {redact_url(url)}")
    if scheme != "unix":
        _, colon, port = parts.netloc.rpartition("@")[2].rpartition(":")
        if colon and port and "]" not in port:  # "]": an IPv6 address without a port
            _port(port, url)
        db = unquote(parts.path).strip("/")
        if db and not db.isdigit():
            raise ValueError(f"url's database (its path) must be a number: {redact_url(url)}")


def _port(text: str, url: str) -> int:
    """``text`` as a TCP port; ``ValueError`` unless it is a number from 1 to 65535."""
    if not (text.isascii() and text.isdigit() and 0 < int(text) <= 65535):
        raise ValueError(f"url's port must be a number from 1 to 65535: {redact_url(url)}")
    return int(text)


def _hosts(netloc: str, url: str) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host, _, port = part.rpartition(":")
        if not host or not port or "]" in port:
            raise ValueError(f"url needs host:port for every node: {redact_url(url)}")
        hosts.append((host.strip("[]"), _port(port, url)))
    return hosts


def _credentials(netloc: str) -> dict[str, str]:
    credentials, at, _ = netloc.rpartition("@")
    if not at:
        return {}
    user, _, password = credentials.partition(":")
    found = {"username": unquote(user), "password": unquote(password)}
    return {k: v for k, v in found.items() if v}


def _check_text(url: str) -> None:
    """Refuse a URL that is not UTF-8, as typed or percent-encoded: redis-py would send
    a user or password of replacement characters, or fail at the first connection."""
    try:
        url.encode("utf-8")  # a byte that is not UTF-8 on the command line: a surrogate
        unquote(url, errors="strict")
    except UnicodeError:
        raise ValueError(f"url is not UTF-8 (as typed or %-encoded): {redact_url(url)}") from None


def client_from_url(url: str, options: dict[str, Any]) -> Redis | RedisCluster:
    """A client for ``url`` with ``options``; ``ValueError`` (password redacted) if bad."""
    _check_text(url)
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        _check_parts(url, scheme)
        try:
            return Redis.from_url(url, **options)
        except ValueError as exc:
            # Only redis-py's "Invalid value for 'name'" is shown: other messages (a bad
            # port, from urllib) may quote parts of the URL.
            why = f" ({exc})" if str(exc).startswith("Invalid value for") else ""
            raise ValueError(f"url is not a Redis URL{why}: {redact_url(url)}") from None
    if scheme not in ("redis+cluster", "redis+sentinel"):
        raise ValueError(
            "url must start with redis://, rediss://, unix://, redis+cluster:// or "
            f"redis+sentinel://, not {redact_url(url)}"
        )
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"url is not a URL: {redact_url(url)}") from None
    if parts.query:
        raise ValueError(
            f"{scheme}:// URLs take no options after '?'; pass them as keyword arguments: "
            + redact_url(url)
        )
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
