"""Failures turned into ``BackendError``: one message shape, and no password in any.

Whatever fails under a call (a refusal of the server, a broken connection, a timeout)
reaches the caller as ``BackendError("<server>: <Class>: <text>")``, built here, so the
store, its pipeliner and the operator's tools say a failure the same way. Its text is
redacted: each secret the client sends (its password) becomes ``***`` wherever it
stands as a whole word, since a server or a library may quote it back in an error.

A URL is redacted by ``kvstore.redis.urls.redact_url``, with the same mask: there the
secret is not known, and is found by its place in the URL (however malformed) instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from kvstore.errors import BackendError
from kvstore.redis.target import target_for

MASK = "***"


def describe(exc: BaseException) -> str:
    """``exc`` in a message: ``<Class>: <text>``, or ``<Class>`` when it has no text."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` (empty ones ignored) replaced by ``***``."""
    for secret in secrets:
        if secret:
            # Where it stands as a whole, not inside a longer word, so a short password
            # does not mangle the message around it ("p" in "password").
            pattern = rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])"
            text = re.sub(pattern, MASK, text)
    return text


def backend_error(exc: BaseException, server: str, secrets: Iterable[str] = ()) -> BackendError:
    """``exc`` as ``BackendError("<server>: <Class>: <text>")``, ``secrets`` redacted.

    ``exc`` is kept as the cause only when redaction changed nothing: a cause carries
    the unredacted text into every traceback. In an ``except``, raise the result
    ``from error.__cause__`` (``from None`` would drop a cause kept, ``from exc`` would
    bring back one left out); the context of that ``except`` is never shown.
    """
    message = describe(exc)
    redacted = redact(message, secrets)
    error = BackendError(f"{server}: {redacted}")
    if redacted == message:
        error.__cause__ = exc
    error.__suppress_context__ = True
    return error


def client_secrets(client: Redis | RedisCluster) -> list[str]:
    """What ``client``'s connections send that no message may show: its password.

    A password a ``credential_provider`` hands out at each connection is not known
    here, and not redacted.
    """
    password = target_for(client).connection_options().get("password")
    return [password] if isinstance(password, str) and password else []
