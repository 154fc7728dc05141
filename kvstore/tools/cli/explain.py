"""Why a store could not reach or enter its server, as a sentence an operator can act on:
no server listens, the host is unknown, a password is missing or refused, the database
does not exist, no reply came within ``--timeout``. A failure through a cluster or a
sentinel also names the hosts the URL gave. Pure: no I/O.
"""

from __future__ import annotations

from urllib.parse import urlsplit

# How a store's failure says that nothing listens, and that the host is not known.
REFUSED = ("Connection refused", "Error 111 ")
UNRESOLVED = ("Name or service not known", "name resolution")


def explain_failure(message: str, url: str | None, timeout: float) -> str:
    """A store's failure to reach or enter the server, as a sentence an operator can act
    on; any other message as it is. Never shows a password: ``message`` is the store's,
    already redacted, and of ``url`` only the host part is used."""
    where, _, detail = message.partition(": ")
    try:
        parts = None if url is None else urlsplit(url)
        given = parts is not None and bool(parts.password or "password=" in parts.query)
    except ValueError:  # not a URL from_url would take: the message is already exact
        return message
    if parts is not None:
        hosts = parts.netloc.rpartition("@")[2]
        if hosts and ("cluster" in where or "sentinel" in where):
            where = f"{where} (via {hosts})"
    if "AuthenticationError" in detail or "NOAUTH" in detail or "WRONGPASS" in detail:
        if parts is None:
            return message  # the embedded server's password is the command's own
        if given:
            return (
                f"the server at {where} refused the password in the URL: it is wrong, or "
                "the user is unknown or disabled"
            )
        return (
            f"the server at {where} needs a password: put it in the URL "
            "(redis://:PASSWORD@host:port) or KVSTORE_URL"
        )
    if any(text in detail for text in REFUSED):
        return f"no server listens at {where} (connection refused): is it running there?"
    if any(text in detail for text in UNRESOLVED):
        return f"the host of {where} is not known (its name does not resolve)"
    if "DB index is out of range" in detail:
        return f"the server at {where} has no database of the number the URL names (/DB)"
    if detail.startswith("TimeoutError"):
        return f"the server at {where} did not reply within {timeout:g} s (--timeout)"
    return message


def is_final(message: str) -> bool:
    """Whether a store's failure at its first contact is one that retrying would only
    make the operator wait for: nothing listens, the host's name does not resolve, or
    no reply came within the timeout (which was waited already)."""
    detail = message.partition(": ")[2]
    return any(text in detail for text in REFUSED + UNRESOLVED) or detail.startswith("TimeoutError")
