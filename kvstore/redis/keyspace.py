"""Where every key of a namespace lives, and how text becomes key bytes.

A namespace has one of two layouts, named by its layout marker: ``1``, each archive
inside its package's row; ``2``, each archive (but the smallest, kept inside their rows)
a blob named by its digest, stored once however many rows refer to it, in a key whose
cluster slot follows the digest, so a namespace's archives spread over every primary of
a cluster, and every archive verified against its digest when it is read. Rows of every
shape are read by every call: a namespace being migrated (``kvstore migrate``) holds
both layouts' rows.

=========================  =======  ========================================================
key                        type     holds
=========================  =======  ========================================================
``{ns}:format``            string   the layout of the namespace (``1`` or ``2``); written
                                    by the first write, checked by every call
``{ns}:packages``          zset     one member per stored package, all with score 0, so
                                    the set is ordered by member bytes:
                                    ``<stamp> <type>\\0<hash>``
``{ns}:pkg:<id>``          hash     one package; ``<id>`` is ``<type>\\0<hash>``.
                                    ``deployed_at`` (``<stamp>``); in layout 1, ``archive``
                                    (the raw bytes); in layout 2, ``digest``
                                    (``<digest>``) and ``size`` (the archive's length in
                                    decimal), and ``archive`` too for an archive of at
                                    most ``INLINE_LIMIT`` (4 KiB), kept inside its row. A
                                    namespace being migrated holds rows of both
``ns/blob/{<digest>}``     hash     one archive of layout 2: ``archive`` (the raw bytes,
                                    whose SHA-256 is ``<digest>``) and ``written`` (the
                                    server's ``TIME`` in microseconds when a put last wrote
                                    or re-used it: ``kvstore gc`` spares a blob written
                                    within its grace period)
``{ns}:routes``            hash     field ``<type>``, value ``<hash>``: where each route
                                    points
``{ns}:route-version``     string   a counter, raised (``INCR``) by the same function that
                                    writes routes: the version of the routes table. Made
                                    by a write that finds it absent, at the server's
                                    ``TIME`` in microseconds, so a counter made anew (after
                                    a flush, or a restart without the data) starts above
                                    any version the lost one reached. One the next write
                                    cannot raise (see ``protocol.is_route_counter``)
                                    refuses every write
``{ns}:route-changes``     channel  not a key: each function that writes routes publishes
                                    ``<version>\\0<hash>\\0<type>[\\0<type>...]`` here, so
                                    route caches follow the table in version order
=========================  =======  ========================================================

Each key's type is the one ``TYPE`` names; ``Keyspace.expected_type`` answers from this
table (``kvstore check`` asks it), and the Lua functions check it before they write. They
check first that the keys of a call are exactly these, of one namespace (a row's key
``{ns}:pkg:`` and the row id the call carries, a blob's key and the digest the call
carries), and its channel ``{ns}:route-changes`` (``check_call`` in ``lua/library.lua``).

``<stamp>`` is ``deployed_at`` in UTC as fixed-width ISO 8601 text,
``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (27 bytes for every year from 1 to 9999), so byte order
is time order to the microsecond, which a double score could not give beyond about
285 years from 1970. After it, ``<type>\\0<hash>`` breaks ties: NUL is the smallest byte
and never occurs in a type, and UTF-8 byte order is code-point order, so members sort
exactly as ``(deployed_at, workflow_type, content_hash)``. Types and hashes are stored as
their UTF-8 bytes; the single NUL keeps ``("a:b", "c")`` and ``("a", "b:c")`` apart.
``<digest>`` is the SHA-256 of the archive in 64 lowercase hex digits, computed by the
store that puts it.

Every key but a blob's begins with the hash tag ``{ns}``: the rows, index and routes of a
namespace sit in one cluster slot, so each Lua function call's keys are always on one
node. A blob's key begins with the namespace without braces and carries its digest as
its hash tag: on a cluster a put writes the blob first, on the blob's node, then the row
(on one server, one call writes both). A namespace cannot contain ``{``, ``}`` or ``/``,
so the tag always ends where the namespace does, no two namespaces share a key, and the
ACL patterns ``~{ns}:*`` and ``~ns/blob/*`` hold the keys of exactly one namespace.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone

# The layouts, as the marker names them: archives inside rows, or blobs named by digest.
INLINE_LAYOUT = b"1"
BLOB_LAYOUT = b"2"
LAYOUTS = (INLINE_LAYOUT, BLOB_LAYOUT)
# The layout releases before layout 2 wrote, and the only one they read.
FORMAT_VERSION = INLINE_LAYOUT
STAMP_LENGTH = 27
# Layout 2 keeps an archive of at most this many bytes inside its row, with its digest
# and size: a blob would take a get a second round trip, which costs a small archive
# about twice what reading it costs (`python -m bench`: layout_get_1KiB), and such
# archives add little to the namespace's node.
INLINE_LIMIT = 4 << 10

_NAMESPACE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be str, not {type(namespace).__name__}")
    if not _NAMESPACE.fullmatch(namespace):
        raise ValueError(
            f"namespace must be 1 to 64 of A-Z a-z 0-9 _ . : - (no braces), not {namespace!r}"
        )
    return namespace


def encode_stamp(instant: datetime) -> bytes:
    """``instant`` (aware, UTC) as the 27 bytes that sort in time order."""
    # Formatted by hand: strftime's %Y does not zero-pad years before 1000 on every
    # platform. Bytes formatting, once per put, takes about half the time of an f-string
    # and its encoding.
    return b"%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (
        instant.year,
        instant.month,
        instant.day,
        instant.hour,
        instant.minute,
        instant.second,
        instant.microsecond,
    )


def decode_stamp(stamp: bytes) -> datetime:
    """The aware UTC datetime ``encode_stamp`` was given; ``ValueError`` if malformed."""
    if len(stamp) != STAMP_LENGTH or stamp[10:11] != b"T" or stamp[-1:] != b"Z":
        raise ValueError(f"not a stamp: {stamp!r}")
    # fromisoformat is C code, several times faster than strptime; listings decode many.
    return datetime.fromisoformat(stamp[:-1].decode("ascii")).replace(tzinfo=timezone.utc)


def archive_digest(archive: bytes) -> bytes:
    """The digest a blob of ``archive`` is named by: its SHA-256, 64 lowercase hex digits."""
    # hashlib releases the GIL while it hashes more than 2 KiB.
    return hashlib.sha256(archive).hexdigest().encode("ascii")


_DIGEST = re.compile(rb"[0-9a-f]{64}")


def is_digest(value: object) -> bool:
    """Whether ``value`` is a digest as rows and blob keys hold it."""
    return isinstance(value, bytes) and _DIGEST.fullmatch(value) is not None


def row_id(workflow_type: str, content_hash: str) -> bytes:
    return workflow_type.encode("utf-8") + b"\x00" + content_hash.encode("utf-8")


def split_row_id(row: bytes) -> tuple[str, str]:
    """``(workflow_type, content_hash)`` of a row id; ``ValueError`` if it is not one."""
    workflow_type, sep, content_hash = row.partition(b"\x00")
    if not sep or not workflow_type or not content_hash or b"\x00" in content_hash:
        raise ValueError(f"not a row id: {row!r}")
    return workflow_type.decode("utf-8"), content_hash.decode("utf-8")


def index_member(stamp: bytes, row: bytes) -> bytes:
    return stamp + b" " + row


def split_index_member(member: bytes) -> tuple[bytes, bytes]:
    """``(stamp, row id)`` of an index member; ``ValueError`` if it is not one."""
    if len(member) <= STAMP_LENGTH + 1 or member[STAMP_LENGTH : STAMP_LENGTH + 1] != b" ":
        raise ValueError(f"not an index member: {member!r}")
    return member[:STAMP_LENGTH], member[STAMP_LENGTH + 1 :]


class Keyspace:
    """The keys of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = check_namespace(namespace)
        self.prefix = b"{" + namespace.encode("ascii") + b"}:"
        self.format = self.prefix + b"format"
        self.index = self.prefix + b"packages"
        self.routes = self.prefix + b"routes"
        self.route_version = self.prefix + b"route-version"
        # A channel, not a key; it carries the hash tag so that sharded publish (SPUBLISH)
        # keeps it on the namespace's shard.
        self.route_changes = self.prefix + b"route-changes"
        self._row_prefix = self.prefix + b"pkg:"
        # Blobs: the namespace without braces, so that the digest is the hash tag.
        self.blob_prefix = namespace.encode("ascii") + b"/blob/"
        self.blob_pattern = self.blob_prefix + b"*"  # as SCAN MATCH and ACL patterns read it

        # The type of each key of the table above but the rows, as TYPE names it.
        self._types = {
            self.format: "string",
            self.index: "zset",
            self.routes: "hash",
            self.route_version: "string",
        }

    def row(self, row: bytes) -> bytes:
        return self._row_prefix + row

    def row_of(self, key: bytes) -> bytes | None:
        """The row id ``key`` is the row of (not checked), or ``None`` if it is no row key."""
        if not key.startswith(self._row_prefix):
            return None
        return key[len(self._row_prefix) :]

    def blob(self, digest: bytes) -> bytes:
        """The key of the blob named by ``digest`` (not checked)."""
        return self.blob_prefix + b"{" + digest + b"}"

    def digest_of(self, key: bytes) -> bytes | None:
        """The digest ``key`` is the blob of, or ``None`` if it is no blob key."""
        if not key.startswith(self.blob_prefix):
            return None
        digest = key[len(self.blob_prefix) + 1 : -1]
        framed = key[len(self.blob_prefix) : len(self.blob_prefix) + 1] == b"{" and key[-1:] == b"}"
        return digest if framed and is_digest(digest) else None

    def expected_type(self, key: bytes) -> str | None:
        """The type (as ``TYPE`` names it) the table gives ``key``, or ``None`` for a key
        the namespace does not hold."""
        if key.startswith(self._row_prefix) or self.digest_of(key) is not None:
            return "hash"
        return self._types.get(key)
