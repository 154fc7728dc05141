"""Archives kept on local disk, named by their digest: ``RedisPackageStore(...,
archive_cache=DIR)``.

An engine that restarts on the same host lists every package with its archive; with a
cache, it fetches from the server only the archives it lacks. Only archives a blob holds
(layout 2, more than ``INLINE_LIMIT``) are kept: a smaller one comes with its row anyway.

The directory holds one file per archive, named by its SHA-256 in 64 lowercase hex
digits, and is shared by every process given it (any number of engines on one host):

- a file is written whole under a temporary name in the same directory (``.<digest>.
  <random>.tmp``), then renamed over its name (``os.replace``), so a reader opens either
  no file or a complete one, whichever process wrote it, and concurrent writes of the
  same digest each leave a complete file;
- a file is hashed whenever it is read, and used only if its SHA-256 is its name: a
  damaged or truncated file is removed, logged as a warning, and read as missing, so a
  cache never returns bytes other than the archive its digest names;
- the files most recently used are kept: a hit sets the file's modification time to now
  (``os.utime``), and once the files exceed ``max_bytes`` the least recently used are
  removed until they fill at most seven eighths of it (so that not every write scans the
  directory). A process looks at the directory once its own writes could have taken it
  past the bound, or after writing an eighth of it: files written by other processes
  since it last looked may take the directory past the bound until one of them looks.
  A file that vanishes between a listing of the directory and its use is simply gone;
- a temporary file left by a process that died while writing is removed by the next
  eviction that finds it over ten minutes old. Files of other names are never touched.

A failure of the disk (full, read-only, a permission refused, the directory removed)
never changes what a call returns: the archive is read from the server instead, and the
failure is logged as a warning at most once a minute per store.

Reading and hashing a file of ``ON_A_THREAD`` (256 KiB) or more is done on a thread
(``asyncio.to_thread``), so the event loop serves other calls meanwhile; a smaller one
costs less than handing it to a thread. Writes are always made on a thread, behind the
call that fetched the archive: a get returns without waiting for its write, and at most
``BACKLOG`` bytes of writes are under way per store (a get whose write would exceed it
leaves the archive uncached; a listing waits for room, and for the writes of a round
trip's archives before it lets go of their room under its ``max_bytes``). The store's
``aclose`` waits for the writes under way; a process that ends meanwhile leaves at most a
temporary file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from typing import Final

from kvstore.redis.keyspace import is_digest

_log = logging.getLogger("kvstore.redis.archive_cache")

# A file of this many bytes or more is read and hashed on a thread. Measured on a
# loopback host: handing a read to a thread costs about 100-170 us; reading and hashing
# a file of 256 KiB on the loop holds it about 330 us (8 KiB: 50 us, 1 MiB: 1 ms).
ON_A_THREAD: Final = 256 << 10
# The most bytes of writes to the cache under way at once per store (a larger archive
# is written alone).
BACKLOG: Final = 32 << 20
# A temporary file older than this is one a process left when it died while writing.
STALE_TEMPORARY: Final = 600.0
# Failures of the disk are logged at most once per this many seconds.
FAILURE_LOG_INTERVAL: Final = 60.0

_TEMPORARY_SUFFIX = ".tmp"


class _TooLarge:
    """What a read on the event loop answers for a file it leaves to a thread."""


_TOO_LARGE: Final = _TooLarge()


class ArchiveCache:
    """Archives in the directory ``path``, at most about ``max_bytes`` of them; see the
    module's documentation. Made with the store, it touches the disk only when used
    (the directory is made by the first write)."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        # Evictions bring the files down to this, so the next is due only after writes.
        self._low_water = max_bytes - max_bytes // 8
        self._lock = threading.Lock()  # the counters below, shared with the threads
        self._files_bytes: int | None = None  # at the last look (None: not looked yet)
        self._written = 0  # bytes this process wrote since it last looked
        self._evicting = False
        self._last_failure_logged: float | None = None
        self._failures_unlogged = 0
        self._writes: set[asyncio.Task[None]] = set()
        self._backlog = 0  # the bytes of ``_writes``

    def __repr__(self) -> str:
        return f"ArchiveCache({self.path!r}, max_bytes={self.max_bytes})"

    def file_of(self, digest: bytes) -> str:
        """The path of the file that holds the archive of ``digest`` (if the cache has it)."""
        return os.path.join(self.path, digest.decode("ascii"))

    # Reads.

    def holds(self, digest: bytes) -> bool:
        """Whether the cache has a file for ``digest`` now (not read: it is verified when
        it is). One ``stat``, cheap enough for the event loop."""
        try:
            return stat.S_ISREG(os.stat(self.file_of(digest)).st_mode)
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._failed("looking for an archive", exc)
            return False

    async def read(self, digest: bytes, size: int | None = None) -> bytes | None:
        """The archive of ``digest``, verified, or ``None`` if the cache has no good file
        for it. ``size``: the archive's size as its row gives it, if known: a large one is
        read on a thread at once (a file found large is read on a thread anyway)."""
        if size is None or size < ON_A_THREAD:
            found = self._read_now(digest, limit=ON_A_THREAD)
            if not isinstance(found, _TooLarge):
                return found
        got = await asyncio.to_thread(self._read_now, digest, None)
        return None if isinstance(got, _TooLarge) else got

    def _read_now(self, digest: bytes, limit: int | None) -> bytes | _TooLarge | None:
        path = self.file_of(digest)
        try:
            with open(path, "rb", buffering=0) as file:
                opened = os.fstat(file.fileno())
                if limit is not None and opened.st_size >= limit:
                    return _TOO_LARGE
                archive = file.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._failed("reading an archive", exc)
            return None
        if hashlib.sha256(archive).hexdigest().encode("ascii") != digest:
            self._discard(path, opened)
            return None
        try:
            os.utime(path)  # the file's recency: used now
        except FileNotFoundError:
            pass  # evicted meanwhile: what was read is still the archive
        except OSError as exc:
            self._failed("marking an archive used", exc)
        return archive

    def _discard(self, path: str, opened: os.stat_result) -> None:
        """Remove the damaged file ``path`` was opened as (not one written since)."""
        _log.warning(
            "archive cache %s: %s does not hold the archive its name is the SHA-256 of "
            "(damaged or truncated, %d bytes); removed, the archive is read from the server",
            self.path,
            os.path.basename(path),
            opened.st_size,
        )
        try:
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._failed("removing a damaged archive", exc)

    # Writes.

    def write_soon(self, digest: bytes, archive: bytes) -> None:
        """Write ``archive`` (verified against ``digest`` by the caller) on a thread,
        without waiting; left unwritten if the writes under way have no room for it."""
        if self._writable(archive) and (
            not self._backlog or self._backlog + len(archive) <= BACKLOG
        ):
            self._start_write(digest, archive)

    async def write(self, digest: bytes, archive: bytes) -> asyncio.Task[None] | None:
        """Write ``archive`` (verified against ``digest`` by the caller) on a thread,
        waiting only until the writes under way have room for it: the write, under way
        (it never raises), or ``None`` if the archive is not to be cached."""
        if not self._writable(archive):
            return None
        while self._writes and self._backlog + len(archive) > BACKLOG:
            await asyncio.wait(set(self._writes), return_when=asyncio.FIRST_COMPLETED)
        return self._start_write(digest, archive)

    def _writable(self, archive: bytes) -> bool:
        # An archive the cache could not keep past its next eviction is not written.
        return len(archive) <= self._low_water

    def _start_write(self, digest: bytes, archive: bytes) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._write_on_thread(digest, archive))
        self._writes.add(task)
        self._backlog += len(archive)
        size = len(archive)

        def done(finished: asyncio.Task[None]) -> None:
            self._writes.discard(finished)
            self._backlog -= size

        task.add_done_callback(done)
        return task

    async def _write_on_thread(self, digest: bytes, archive: bytes) -> None:
        await asyncio.to_thread(self.write_now, digest, archive)

    def write_now(self, digest: bytes, archive: bytes) -> None:
        """Write ``archive`` as the file of ``digest``, then evict if it is due; blocks.
        A failure of the disk is logged (at most once a minute), never raised."""
        if not is_digest(digest):
            raise ValueError(f"not a digest: {digest!r:.80}")
        try:
            self._write_file(digest, archive)
        except OSError as exc:
            self._failed("writing an archive", exc)
            return
        with self._lock:
            self._written += len(archive)
            if self._evicting or not self._eviction_due():
                return  # one that is under way looks again once it is done
            self._evicting = True
        try:
            while True:
                self.evict()
                with self._lock:
                    if not self._eviction_due():  # after writes made during the look
                        break
        except OSError as exc:
            self._failed("evicting archives", exc)
        finally:
            with self._lock:
                self._evicting = False

    def _eviction_due(self) -> bool:
        """Whether this process's writes since it last looked could have taken the files
        past the bound, or add up to an eighth of it (others write too). Under the lock."""
        known = self._files_bytes
        return (
            known is None
            or known + self._written > self.max_bytes
            or self._written > self.max_bytes // 8
        )

    def _write_file(self, digest: bytes, archive: bytes) -> None:
        name = digest.decode("ascii")
        try:
            fd, temporary = tempfile.mkstemp(
                prefix=f".{name}.", suffix=_TEMPORARY_SUFFIX, dir=self.path
            )
        except FileNotFoundError:
            os.makedirs(self.path, exist_ok=True)
            fd, temporary = tempfile.mkstemp(
                prefix=f".{name}.", suffix=_TEMPORARY_SUFFIX, dir=self.path
            )
        try:
            with open(fd, "wb") as file:
                os.fchmod(fd, 0o644)  # readable by the host's other engines (mkstemp: 0600)
                file.write(archive)
            os.replace(temporary, os.path.join(self.path, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def evict(self) -> None:
        """Remove the least recently used files until the files add up to at most seven
        eighths of ``max_bytes``, if they add up to more than it; and temporary files
        left by processes that died while writing. Blocks; tolerates other processes
        removing and writing files meanwhile."""
        with self._lock:
            counted = self._written
        files: list[tuple[int, int, str]] = []
        total = 0
        now = time.time()
        with os.scandir(self.path) as entries:
            for entry in entries:
                try:
                    found = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(found.st_mode):
                    continue
                name = entry.name
                if len(name) == 64 and is_digest(name.encode("ascii", "replace")):
                    files.append((found.st_mtime_ns, found.st_size, name))
                    total += found.st_size
                elif (
                    name.startswith(".")
                    and name.endswith(_TEMPORARY_SUFFIX)
                    and now - found.st_mtime > STALE_TEMPORARY
                ):
                    _unlink(entry.path)
        if total > self.max_bytes:
            files.sort()  # least recently used first
            for _, size, name in files:
                if total <= self._low_water:
                    break
                _unlink(os.path.join(self.path, name))
                total -= size
        with self._lock:
            self._files_bytes = total
            self._written -= counted  # what was written during the look is counted again

    async def settle(self) -> None:
        """Wait for the writes under way (each a thread, which cannot be stopped)."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    # Failures.

    def _failed(self, what: str, exc: OSError) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last_failure_logged
            if last is not None and now - last < FAILURE_LOG_INTERVAL:
                self._failures_unlogged += 1
                return
            self._last_failure_logged = now
            unlogged, self._failures_unlogged = self._failures_unlogged, 0
        more = f"; {unlogged} more failures since the last message" if unlogged else ""
        _log.warning(
            "archive cache %s: %s failed (%s: %s); archives are read from the server while "
            "it fails (logged at most once a minute%s)",
            self.path,
            what,
            type(exc).__name__,
            exc,
            more,
        )


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # another process removed it first
        os.unlink(path)
