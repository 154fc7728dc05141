"""The closed set of errors the store raises.

Caller mistakes are not here: a wrong argument raises the built-in ``TypeError`` or
``ValueError`` naming the argument, before anything is sent to the server.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises for a failure that is not the caller's."""


class BackendError(StoreError):
    """The server or the connection to it failed; the call may or may not have applied.

    Every store operation is idempotent, so retrying the same call is always safe.
    """


class SerializationError(StoreError):
    """What the server holds cannot be decoded; the message names the key."""
