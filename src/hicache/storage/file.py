"""The ``file`` storage backend: one file per page in a local (or shared) directory.

SGLang's default L3 backend is ``HiCacheFile`` (reference §6.2): a file per page named by the
page hash and the model and rank, written to a temporary file and ``os.replace``d into place,
existing keys skipped, an optional size cap with LRU eviction. This backend keeps those rules and
adds what SGLang lacks: every file carries the header and checksum of
:mod:`hicache.storage.base`, so a truncated or damaged file is a miss instead of garbage KV, and
the identity (model, layout, dtype, page size, rank, kind) is a directory, so readers that
disagree on it never see each other's files.

Files: ``{path}/{identity prefix}/{page hash}.bin``. Temporary files are
``{path}/{prefix}/.{page hash}.{pid}.{thread}.{random}.tmp``: hidden, never matched as pages,
and removed on failure (and at start-up when older than an hour, left by a killed writer).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Generator
from pathlib import Path

import numpy as np

from hicache.errors import StorageError
from hicache.storage.base import ExtraConfig, StorageBackend, StorageIdentity

__all__ = ["FileStorage", "default_storage_dir"]

_SUFFIX = ".bin"
_TMP_SUFFIX = ".tmp"
# A temporary file older than this at start-up was left by a writer that died.
_STALE_TMP_SECONDS = 3600.0


def default_storage_dir() -> Path:
    """The directory used when no path is configured.

    ``$HICACHE_STORAGE_DIR`` if set, else ``$XDG_CACHE_HOME/hicache/storage`` (``XDG_CACHE_HOME``
    defaults to ``~/.cache``). SGLang's default is ``/tmp/hicache``; a per-user cache directory
    survives reboots and is not shared with other users.
    """
    env = os.environ.get("HICACHE_STORAGE_DIR")
    if env:
        return Path(env)
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache_home) / "hicache" / "storage"


class FileStorage(StorageBackend):
    """Pages as files in a directory, written atomically, with an optional LRU size cap.

    Writes go to a temporary file in the same directory, then ``os.replace`` (atomic on POSIX):
    a reader sees a whole value or none. Without ``fsync`` a crash may leave an empty or short
    file; its header and checksum make it a miss. Files persist: a backend created later, in
    this process or another, on the same directory and identity, sees the pages.

    The size cap (``max_bytes``) bounds the bytes of this identity's page files (header
    included). Before a write that would exceed it, the least recently read or written files are
    deleted (``stats.evicted_pages``), never pages of the same ``set`` call; a page that still
    does not fit ends the call (a short count, not an error). Recency is kept in memory and, as
    the files' modification times, on disk, so a restarted backend resumes the same order.
    Each process enforces the cap over the files it knows (those present at start-up, plus the
    ones it writes or reads): processes sharing a capped directory may briefly exceed it.

    Thread-safe.
    """

    name = "file"

    def __init__(
        self,
        identity: StorageIdentity,
        path: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
        fsync: bool = False,
    ) -> None:
        """Opens (creating it if needed) the identity's directory under ``path``.

        Args:
            identity: what the pages mean.
            path: the root directory; ``None`` for :func:`default_storage_dir`.
            max_bytes: the size cap in bytes of this identity's files, or ``None`` for none.
            fsync: ``fsync`` each file before it is renamed into place (durable across power
                loss; slower).

        Raises:
            InvalidArgumentError: a bad identity.
            StorageError: the directory cannot be created or listed (the message names it).
        """
        super().__init__(identity)
        self._root = Path(path) if path is not None else default_storage_dir()
        self._dir = self._root / self._prefix
        self._max_bytes = max_bytes
        self._fsync = fsync
        # The cap's bookkeeping: file name -> size in bytes, least recently used first, and the
        # total. Guarded by _lock; only used when max_bytes is set.
        self._lock = threading.Lock()
        # Per-thread read buffers (see _staging).
        self._local = threading.local()
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._total_bytes = 0
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._scan()
        except OSError as error:
            raise StorageError(
                f"{self.description}: cannot open {self._dir}: {error}", self.description
            ) from error

    @classmethod
    def from_config(cls, identity: StorageIdentity, config: ExtraConfig) -> FileStorage:
        """Creates the backend from its extra config.

        Keys: ``path`` (SGLang's ``file_storage_path`` is an alias), ``max_bytes`` (an int, the
        size cap), ``fsync`` (a bool).

        Raises:
            InvalidArgumentError: an unknown key or a value of the wrong type (named).
            StorageError: the directory cannot be created.
        """
        path = config.get_str("path")
        alias = config.get_str("file_storage_path")
        max_bytes = config.get_int("max_bytes", minimum=1)
        fsync = config.get_bool("fsync")
        config.finish()
        return cls(identity, path if path is not None else alias, max_bytes, fsync)

    @property
    def description(self) -> str:
        """``"file at <root directory>"``."""
        return f"file at {self._root}"

    @property
    def directory(self) -> Path:
        """The directory holding this identity's page files."""
        return self._dir

    @property
    def total_bytes(self) -> int:
        """Bytes of the page files the size cap counts (0 without a cap)."""
        with self._lock:
            return self._total_bytes

    def close(self) -> None:
        """Nothing to release: files are opened per operation."""

    # --- transport ------------------------------------------------------------------------------

    def _path(self, storage_key: str) -> Path:
        return self._root / (storage_key + _SUFFIX)

    def _error(self, op: str, path: Path, error: OSError) -> StorageError:
        return StorageError(f"{self.description}: {op} {path.name}: {error}", self.description)

    def _exists(self, storage_keys: list[str]) -> int:
        num = 0
        for key in storage_keys:
            if not self._path(key).is_file():
                break
            num += 1
        return num

    def _get(
        self, storage_keys: list[str], value_nbytes: int
    ) -> Generator[np.ndarray | None, None, None]:
        for key in storage_keys:
            path = self._path(key)
            try:
                with open(path, "rb", buffering=0) as file:
                    size = os.fstat(file.fileno()).st_size
                    # One byte more than expected reveals an over-long file without reading it.
                    buffer = self._staging(min(size, value_nbytes + 1))
                    view = buffer.data
                    done = 0
                    while done < buffer.size:
                        count = file.readinto(view[done:])
                        if not count:
                            break
                        done += count
            except FileNotFoundError:
                yield None
                return
            except OSError as error:
                raise self._error("get", path, error) from error
            self._touch(path, size)
            yield buffer[:done]

    def _staging(self, nbytes: int) -> np.ndarray:
        """This thread's reusable read buffer, at least ``nbytes`` long (a view of that length).

        Reusing it saves the page faults of a fresh buffer per page; it is safe because the
        caller verifies and copies each value out before asking for the next one.
        """
        buffer = getattr(self._local, "staging", None)
        if buffer is None or buffer.size < nbytes:
            buffer = np.empty(nbytes, dtype=np.uint8)
            self._local.staging = buffer
        return buffer[:nbytes]

    def _set(
        self,
        storage_keys: list[str],
        encode: Callable[[int], list[memoryview | bytes]],
        page_nbytes: int,
    ) -> tuple[int, StorageError | None]:
        written: set[str] = set()
        for i, key in enumerate(storage_keys):
            path = self._path(key)
            if path.is_file():
                self._count(dedup_pages=1)
                self._touch(path, None)
                written.add(path.name)
                continue
            buffers = encode(i)
            nbytes = sum(memoryview(b).nbytes for b in buffers)
            if not self._reserve(path.name, nbytes, written):
                return i, None
            try:
                self._write_atomic(path, buffers)
            except OSError as error:
                self._release(path.name)
                return i, self._error("set", path, error)
            written.add(path.name)
            self._count(set_pages=1, set_bytes=page_nbytes)
        return len(storage_keys), None

    def _write_atomic(self, path: Path, buffers: list[memoryview | bytes]) -> None:
        """Writes ``buffers`` to a temporary file beside ``path``, then renames it to ``path``."""
        tmp = path.with_name(
            f".{path.stem}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}"
            + _TMP_SUFFIX
        )
        for attempt in range(2):
            try:
                with open(tmp, "wb") as file:
                    for buf in buffers:
                        file.write(buf)
                    if self._fsync:
                        file.flush()
                        os.fsync(file.fileno())
                os.replace(tmp, path)
                return
            except FileNotFoundError:
                # The directory was removed under us (a cleanup): recreate it once.
                if attempt:
                    raise
                path.parent.mkdir(parents=True, exist_ok=True)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def _discard(self, storage_key: str) -> None:
        path = self._path(storage_key)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            return
        self._release(path.name)

    # --- size cap -------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Loads the cap's bookkeeping from the directory; removes stale temporary files."""
        now = time.time()
        entries = []
        with os.scandir(self._dir) as it:
            for entry in it:
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.endswith(_TMP_SUFFIX):
                    if now - stat.st_mtime > _STALE_TMP_SECONDS:
                        Path(entry.path).unlink(missing_ok=True)
                elif entry.name.endswith(_SUFFIX) and self._max_bytes is not None:
                    entries.append((stat.st_mtime_ns, entry.name, stat.st_size))
        for _, name, size in sorted(entries):
            self._lru[name] = size
            self._total_bytes += size
        if self._max_bytes is not None and self._total_bytes > self._max_bytes:
            with self._lock:
                self._evict(self._total_bytes - self._max_bytes, set())

    def _touch(self, path: Path, size: int | None) -> None:
        """Marks a page file as just used (in memory and as its mtime); only with a cap."""
        if self._max_bytes is None:
            return
        with self._lock:
            if path.name in self._lru:
                self._lru.move_to_end(path.name)
            else:
                try:
                    size = path.stat().st_size if size is None else size
                except OSError:
                    return
                self._lru[path.name] = size
                self._total_bytes += size
        with contextlib.suppress(OSError):
            os.utime(path)

    def _reserve(self, name: str, nbytes: int, protected: set[str]) -> bool:
        """Makes room for a new file of ``nbytes``, evicting LRU files not in ``protected``."""
        if self._max_bytes is None:
            return True
        with self._lock:
            self._total_bytes -= self._lru.pop(name, 0)
            excess = self._total_bytes + nbytes - self._max_bytes
            if excess > 0 and not self._evict(excess, protected):
                return False
            self._lru[name] = nbytes
            self._total_bytes += nbytes
            return True

    def _release(self, name: str) -> None:
        """Forgets a file the cap counted (deleted, or its write failed)."""
        if self._max_bytes is None:
            return
        with self._lock:
            size = self._lru.pop(name, None)
            if size is not None:
                self._total_bytes -= size

    def _evict(self, excess: int, protected: set[str]) -> bool:
        """Deletes LRU files not in ``protected`` until ``excess`` bytes are freed (lock held).

        Returns whether enough was freed; when not, nothing is deleted.
        """
        victims = []
        freed = 0
        for name, size in self._lru.items():
            if freed >= excess:
                break
            if name not in protected:
                victims.append(name)
                freed += size
        if freed < excess:
            return False
        for name in victims:
            # A file that cannot be deleted is forgotten all the same: the cap counts only
            # what this process can manage.
            with contextlib.suppress(OSError):
                (self._dir / name).unlink(missing_ok=True)
            self._total_bytes -= self._lru.pop(name)
        self._count(evicted_pages=len(victims))
        return True
