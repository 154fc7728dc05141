"""``kvstore status``: what the server promises about the namespace's packages.

``read_status(store)`` gathers the server's kind and version, its persistence,
replication and memory settings, the namespace's package and route counts and archive
bytes, its layout version and the ``kvstore_*`` Functions libraries loaded (whether the
one of this release's name holds this release's code), and turns every setting under
which an acknowledged put can be lost into a warning an operator can act on. A setting
the credential may not read (``NOPERM`` on ``INFO`` or ``CONFIG GET``) is reported as
not readable, never as a failure; only an unreachable server fails. It only reads:
nothing in the server or the namespace is changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

from kvstore.errors import BackendError, StoreError
from kvstore.redis.keyspace import LAYOUTS, Keyspace
from kvstore.redis.protocol import field_pairs
from kvstore.redis.scripts import LIBRARY, Held, held
from kvstore.redis.store import RedisPackageStore
from kvstore.tools.admin import Admin

UNREADABLE = "not readable with this credential"
LIBRARY_PREFIX = "kvstore_"
# Policies that may evict any key when maxmemory is reached; the volatile-* ones only
# evict keys with a TTL, and kvstore sets none.
EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


@dataclass
class Status:
    """What ``kvstore status`` reports. ``None`` means not readable with this credential."""

    server: str | None  # "redis" or "valkey"
    version: str | None
    appendonly: bool | None
    appendfsync: str | None
    save: str | None  # RDB snapshot rules, "" when snapshots are off
    role: str | None  # "master" or "slave", as the server says it
    connected_replicas: int | None
    used_memory: int | None
    maxmemory: int | None
    maxmemory_policy: str | None
    namespace: str
    layout: str | None  # the {ns}:format value; None when nothing was written yet
    packages: int | None
    routes: int | None
    archive_bytes: int | None  # the archives' sizes summed over packages (shared ones each time)
    functions: list[str] | None  # kvstore_* libraries; None when FUNCTION LIST is refused
    functions_note: str = ""  # why ``functions`` is None
    # Whether the library of this release's name holds this release's code, byte for
    # byte; None when it is not loaded, or its code is not readable.
    library_matches: bool | None = None
    notes: list[str] = field(default_factory=list)  # what could not be read, and why
    warnings: list[str] = field(default_factory=list)
    # The store's durability options this server can honour; None when not readable.
    durability: list[str] | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


async def read_status(store: RedisPackageStore) -> Status:
    """The status of ``store``'s server and namespace; ``BackendError`` if unreachable."""
    admin = Admin(store)
    notes: list[str] = []
    info = await _info(admin, notes)
    config = await _config(admin, notes)
    appendonly_text = config.get("appendonly")
    appendonly = (
        appendonly_text == "yes"
        if appendonly_text is not None
        else (bool(info["aof_enabled"]) if "aof_enabled" in info else None)
    )
    maxmemory = config.get("maxmemory", info.get("maxmemory"))
    status = Status(
        server=None if not info else ("valkey" if "valkey_version" in info else "redis"),
        version=_text(info.get("valkey_version", info.get("redis_version"))),
        appendonly=appendonly,
        appendfsync=config.get("appendfsync"),
        save=config.get("save"),
        role=_text(info.get("role")),
        connected_replicas=_int(info.get("connected_slaves")),
        used_memory=_int(info.get("used_memory")),
        maxmemory=_int(maxmemory),
        maxmemory_policy=config.get("maxmemory-policy", _text(info.get("maxmemory_policy"))),
        namespace=store.namespace,
        layout=None,
        packages=None,
        routes=None,
        archive_bytes=None,
        functions=None,
        notes=notes,
    )
    await _namespace(admin, store, status)
    await _functions(admin, status)
    status.warnings = warnings(status)
    status.durability = durability_levels(status)
    return status


async def _info(admin: Admin, notes: list[str]) -> dict[str, Any]:
    try:
        reply = await admin.command("INFO")
    except NoPermissionError:
        notes.append(f"INFO is {UNREADABLE}")
        return {}
    return dict(reply)


async def _config(admin: Admin, notes: list[str]) -> dict[str, str]:
    names = ("appendonly", "appendfsync", "save", "maxmemory-policy", "maxmemory")
    try:
        reply = await admin.command("CONFIG", "GET", *names)
    except NoPermissionError:
        notes.append(f"CONFIG GET is {UNREADABLE}")
        return {}
    return {_text(k) or "": _text(v) or "" for k, v in field_pairs(reply)}


async def _namespace(admin: Admin, store: RedisPackageStore, status: Status) -> None:
    keys = Keyspace(store.namespace)
    try:
        layout = await admin.command("GET", keys.format)
    except NoPermissionError:
        status.notes.append(f"the namespace's keys are {UNREADABLE}")
        return
    except BackendError as exc:  # WRONGTYPE: damage that `kvstore check` reports
        status.notes.append(f"the layout marker cannot be read: {exc}")
        return
    status.layout = None if layout is None else layout.decode("utf-8", "backslashreplace")
    if layout is not None and layout not in LAYOUTS:
        return  # the store refuses to read a layout it does not know, and so do we
    try:
        status.routes = len(await store.list_package_routes())
        count = size = 0
        async for head in store.iter_package_heads():
            count, size = count + 1, size + head.size
        status.packages, status.archive_bytes = count, size
    except StoreError as exc:
        # A NOPERM reply, or damage that `kvstore check` reports in detail.
        refused = isinstance(exc.__cause__, NoPermissionError)
        what = UNREADABLE if refused else f"not countable: {exc}"
        status.notes.append(f"the namespace's packages are {what}")


async def _functions(admin: Admin, status: Status) -> None:
    try:
        reply = await admin.command("FUNCTION", "LIST")
    except NoPermissionError:
        status.functions_note = f"FUNCTION LIST is {UNREADABLE}"
        return
    except BackendError as exc:
        if isinstance(exc.__cause__, ResponseError):  # an unknown command: before Redis 7
            status.functions_note = "this server has no Functions (Redis 7 or Valkey needed)"
            return
        raise
    names = []
    for library in reply:
        entry = dict(field_pairs(library))
        name = _text(entry.get(b"library_name", entry.get("library_name")))
        if name is not None and name.startswith(LIBRARY_PREFIX):
            names.append(name)
    status.functions = sorted(names)
    if LIBRARY.name in names:
        listed = await admin.command("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY.name, "WITHCODE")
        found = held(listed, LIBRARY)
        status.library_matches = None if found is Held.ABSENT else found is Held.OURS


def durability_levels(status: Status) -> list[str] | None:
    """The ``durability`` and ``min_replicas`` a store on this server can be given and
    keep: ``"memory"`` always; ``"fsync"`` where the server has ``WAITAOF`` (Redis and
    Valkey 7.2 and later) and its append-only file is on; with replicas, waiting for
    them too. ``None`` when the version or the persistence is not readable."""
    if status.version is None or status.appendonly is None:
        return None
    try:
        major, minor = (int(part) for part in status.version.split(".")[:2])
    except ValueError:
        return None
    replicas = status.connected_replicas or 0
    levels = ["durability='memory'"]
    if replicas:
        levels.append(f"durability='memory', min_replicas up to {replicas}")
    if (major, minor) >= (7, 2) and status.appendonly:
        levels.append("durability='fsync'")
        if replicas:
            levels.append(
                f"durability='fsync', min_replicas up to {replicas} (if their appendonly is on)"
            )
    return levels


def warnings(status: Status) -> list[str]:
    """Each way acknowledged packages can be lost under these settings, as advice."""
    found = []
    if status.appendonly is None:
        found.append(
            f"the persistence settings are {UNREADABLE}: ask the server's operator whether "
            "appendonly is on, or a restart may lose packages"
        )
    elif not status.appendonly and status.save is None:
        found.append(
            f"appendonly is no and the RDB snapshot rules are {UNREADABLE}: without "
            "snapshots a restart loses every package, with them a crash loses those written "
            "since the last one; set appendonly yes"
        )
    elif not status.appendonly:
        if status.save == "":
            found.append(
                "no persistence (appendonly no, RDB snapshots off): a restart of the server "
                "loses every package; set appendonly yes"
            )
        else:
            found.append(
                f"appendonly is no, only RDB snapshots (save {status.save!r}): a crash loses "
                "every package written since the last snapshot; set appendonly yes"
            )
    elif status.appendfsync is None:
        found.append(
            f"appendfsync is {UNREADABLE}: unless it is always, a crash of the machine can "
            "lose the last acknowledged packages"
        )
    elif status.appendfsync == "everysec":
        found.append(
            "appendfsync everysec: a crash of the machine can lose about the last second of "
            "acknowledged packages (a crash of the server process alone loses none); set "
            "appendfsync always to lose none"
        )
    elif status.appendfsync == "no":
        found.append(
            "appendfsync no: the operating system decides when the log reaches the disk, so a "
            "crash of the machine can lose more than the last second of acknowledged packages "
            "(often about 30 seconds); set appendfsync always to lose none"
        )
    policy = status.maxmemory_policy
    if policy is None:
        found.append(f"maxmemory-policy is {UNREADABLE}: an allkeys-* policy would evict packages")
    elif policy in EVICTING:
        limit = (
            "as soon as a maxmemory is set (it is 0, no limit, now)"
            if status.maxmemory == 0
            else "when the server reaches maxmemory"
        )
        found.append(
            f"maxmemory-policy {policy} evicts any key {limit}: packages, the index and "
            "routes can silently disappear; set maxmemory-policy noeviction (or a volatile-* "
            "policy: kvstore's keys have no expiry)"
        )
    if status.library_matches is False:
        found.append(
            f"the library {LIBRARY.name} is not this release's kvstore library (its code "
            "differs): a store whose credential may not check it (FUNCTION LIST) "
            "acknowledges puts it may not store, and any other fails every write; remove it "
            f"with `FUNCTION DELETE {LIBRARY.name}`, then run `kvstore setup`"
        )
    if status.layout is not None and status.layout.encode() not in LAYOUTS:
        found.append(
            f"the namespace holds layout {status.layout!r}, which this kvstore neither reads "
            "nor writes"
        )
    return found


def describe(status: Status) -> list[str]:
    """The status as plain lines, one fact each; warnings last, each on its own line."""

    def shown(value: object, text: str | None = None) -> str:
        return UNREADABLE if value is None else (text if text is not None else str(value))

    def facts(*parts: tuple[object, str, str]) -> str:
        """``(value, its text, its name)`` as one line's parts; an unreadable value is
        named, and when none is readable, the line says so once."""
        if all(value is None for value, _, _ in parts):
            return UNREADABLE
        return ", ".join(f"{name} {UNREADABLE}" if v is None else text for v, text, name in parts)

    lines = [f"server: {shown(status.server)} {status.version or ''}".rstrip()]
    if status.appendonly is None:
        lines.append(f"persistence: {UNREADABLE}")
    else:
        save = shown(status.save, "off" if status.save == "" else repr(status.save))
        lines.append(
            f"persistence: appendonly {'yes' if status.appendonly else 'no'}, "
            f"appendfsync {shown(status.appendfsync)}, RDB snapshots {save}"
        )
    replicas = status.connected_replicas
    lines.append(
        "replication: "
        + facts(
            (status.role, f"role {status.role}", "role"),
            (replicas, f"{replicas} connected replicas", "connected replicas"),
        )
    )
    lines.append(
        "memory: "
        + facts(
            (status.used_memory, f"{_size(status.used_memory or 0)} used", "used"),
            (status.maxmemory, f"maxmemory {_limit(status.maxmemory)}", "maxmemory"),
            (
                status.maxmemory_policy,
                f"maxmemory-policy {status.maxmemory_policy}",
                "maxmemory-policy",
            ),
        )
    )
    layout = "nothing written yet" if status.layout is None else f"layout {status.layout}"
    if status.packages is None:
        lines.append(f"namespace {status.namespace!r}: {layout}")
    else:
        lines.append(
            f"namespace {status.namespace!r}: {layout}, {status.packages} packages, "
            f"{status.routes} routes, {_size(status.archive_bytes or 0)} of archives"
        )
    if status.functions is None:
        lines.append(f"functions: {status.functions_note}")
    else:
        ours = "this release's" if status.library_matches is not False else "another's code"
        names = [f"{n} ({ours})" if n == LIBRARY.name else n for n in status.functions]
        loaded = ", ".join(names) if names else "none loaded"
        lines.append(f"functions: {LIBRARY_PREFIX}* libraries: {loaded}")
        if LIBRARY.name not in status.functions:
            lines.append(
                f"note: this release's library {LIBRARY.name} is not loaded; a store loads it "
                "on its first write where its credential may, else run `kvstore setup`"
            )
    if status.durability is None:
        lines.append(f"durability: {UNREADABLE}")
    else:
        lines.append("durability a store can ask for: " + "; ".join(status.durability))
    lines += [f"note: {note}" for note in status.notes]
    lines += [f"warning: {warning}" for warning in status.warnings]
    if not status.warnings:
        lines.append("no warnings: these settings lose no acknowledged package")
    return lines


def _limit(maxmemory: int | None) -> str:
    return "0 (no limit)" if maxmemory == 0 else _size(maxmemory or 0)


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit} ({n} bytes)"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)
