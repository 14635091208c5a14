"""The ``valkey`` storage backend: pages as values in a Valkey or Redis server or cluster.

SGLang 0.5.23 ships no Redis backend of its own (its networked backends are Mooncake, 3FS,
NIXL, ...; reference §6.3), but its storage contract is the one this backend keeps: a leading
``batch_exists``, batched gets and sets of whole pages, existing keys not rewritten. Every
request is batched: ``exists`` is one pipeline of ``EXISTS``; ``get`` is ``MGET``
(``mget_nonatomic`` on a cluster) in batches of at most ``max_batch_bytes``; ``set`` is one
pipelined ``EXISTS`` for deduplication, then pipelines of ``SET`` of at most
``max_batch_bytes``. A ``SET`` is
atomic on the server, so a value is whole or absent, whatever the client does.

Failures (connection refused, timeout, ``OOM command not allowed`` when the server is full under
``maxmemory-policy noeviction``) become :class:`~hicache.errors.StorageError` naming
``host:port`` and the cause, by the failure rule of
:class:`~hicache.storage.base.StorageBackend`. The client reconnects by itself: after a server
restart the next call works again (one immediate retry covers a connection the server closed).
"""

from __future__ import annotations

import contextlib
import threading
import urllib.parse
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import valkey
import valkey.cluster
from valkey.backoff import NoBackoff
from valkey.exceptions import ValkeyClusterException, ValkeyError
from valkey.retry import Retry

from hicache.errors import InvalidArgumentError, StorageError
from hicache.storage.base import HEADER_SIZE, ExtraConfig, StorageBackend, StorageIdentity

__all__ = ["ValkeyStorage"]

# Errors of the client and of the socket underneath: each becomes a StorageError.
_CLIENT_ERRORS = (ValkeyError, ValkeyClusterException, OSError)
_DEFAULT_BATCH_BYTES = 64 << 20


class ValkeyStorage(StorageBackend):
    """Pages as values of a Valkey/Redis server (``valkey.Valkey``) or cluster (``ValkeyCluster``).

    Thread-safe: the client's connection pool hands each call its own connection. Each thread
    that calls ``set`` keeps one reusable value buffer of up to ``max_batch_bytes`` (see
    :meth:`_arena`).
    """

    name = "valkey"

    def __init__(
        self,
        identity: StorageIdentity,
        host: str = "127.0.0.1",
        port: int = 6379,
        url: str | None = None,
        cluster: bool = False,
        socket_timeout: float = 5.0,
        password: str | None = None,
        db: int = 0,
        max_batch_bytes: int = _DEFAULT_BATCH_BYTES,
    ) -> None:
        """Creates the client; it connects on first use, so the server may start later.

        Args:
            identity: what the pages mean.
            host: the server's host (a cluster's seed node).
            port: the server's port.
            url: a ``valkey://``, ``redis://``, ``valkeys://`` or ``rediss://`` URL; overrides
                ``host``, ``port``, ``password`` and ``db``.
            cluster: use ``valkey.cluster.ValkeyCluster`` (cluster mode) instead of one server.
            socket_timeout: seconds before a connect or a reply times out.
            password: the server's password (``AUTH``), or None.
            db: the database number (a single server only; a cluster has only db 0).
            max_batch_bytes: the most value bytes one pipeline or ``MGET`` carries.

        Raises:
            InvalidArgumentError: a bad URL, or ``db != 0`` with ``cluster``.
        """
        super().__init__(identity)
        if url is not None:
            parsed = urllib.parse.urlparse(url)
            if parsed.scheme not in ("valkey", "valkeys", "redis", "rediss") or not parsed.hostname:
                raise InvalidArgumentError(
                    "valkey storage extra config: url: expected valkey://host:port[/db], got "
                    f"{url!r}"
                )
            host, port = parsed.hostname, parsed.port or 6379
        if cluster and db != 0:
            raise InvalidArgumentError(
                f"valkey storage extra config: db: a cluster has only db 0, got {db}"
            )
        self._host, self._port = host, port
        self._cluster = cluster
        self._max_batch_bytes = max_batch_bytes
        # Per-thread value buffers of set (see _arena).
        self._local = threading.local()
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "password": password,
            # One immediate retry: a pooled connection the server closed (a restart) fails once.
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [valkey.exceptions.ConnectionError],
        }
        client: Any
        if cluster:
            if url is not None:
                client = valkey.cluster.ValkeyCluster.from_url(url, **options)
            else:
                client = valkey.cluster.ValkeyCluster(host=host, port=port, **options)
        elif url is not None:
            client = valkey.Valkey.from_url(url, **options)
        else:
            client = valkey.Valkey(host=host, port=port, db=db, **options)
        self._client = client

    @classmethod
    def from_config(cls, identity: StorageIdentity, config: ExtraConfig) -> ValkeyStorage:
        """Creates the backend from its extra config.

        Keys: ``host``, ``port``, ``url``, ``cluster`` (bool), ``socket_timeout`` (seconds),
        ``password``, ``db``, ``max_batch_bytes``; see :meth:`__init__`.

        Raises:
            InvalidArgumentError: an unknown key or a value of the wrong type (named).
        """
        host = config.get_str("host", "127.0.0.1")
        port = config.get_int("port", 6379, minimum=1)
        url = config.get_str("url")
        cluster = config.get_bool("cluster")
        socket_timeout = config.get_float("socket_timeout", 5.0)
        password = config.get_str("password")
        db = config.get_int("db", 0, minimum=0)
        max_batch_bytes = config.get_int("max_batch_bytes", _DEFAULT_BATCH_BYTES, minimum=1)
        config.finish()
        assert host is not None and port is not None and socket_timeout is not None
        assert db is not None and max_batch_bytes is not None
        if port > 65535:
            raise InvalidArgumentError(
                f"valkey storage extra config: port: expected <= 65535, got {port}"
            )
        return cls(
            identity, host, port, url, cluster, socket_timeout, password, db, max_batch_bytes
        )

    @property
    def description(self) -> str:
        """``"valkey at host:port"`` (``"valkey cluster at ..."`` in cluster mode)."""
        kind = "valkey cluster" if self._cluster else "valkey"
        return f"{kind} at {self._host}:{self._port}"

    @property
    def client(self) -> Any:
        """The ``valkey`` client (for administration and tests; not needed to use the backend)."""
        return self._client

    def close(self) -> None:
        """Closes the client's connections."""
        with contextlib.suppress(*_CLIENT_ERRORS):
            self._client.close()

    # --- transport ------------------------------------------------------------------------------

    def _error(self, op: str, error: BaseException) -> StorageError:
        return StorageError(
            f"{self.description}: {op} failed: {type(error).__name__}: {error}", self.description
        )

    def _exists_flags(self, storage_keys: list[str], op: str) -> list[bool]:
        """Whether each key is stored.

        One multi-key ``EXISTS`` answers when all or none are (the usual cases), else one
        pipeline of single-key ``EXISTS`` does.
        """
        try:
            if not self._cluster:  # a cluster's multi-key EXISTS would span hash slots
                count = self._client.exists(*storage_keys)
                if count in (0, len(storage_keys)):
                    return [count > 0] * len(storage_keys)
            pipe = self._client.pipeline(transaction=False)
            for key in storage_keys:
                pipe.exists(key)
            return [bool(r) for r in pipe.execute()]
        except _CLIENT_ERRORS as error:
            raise self._error(op, error) from error

    def _exists(self, storage_keys: list[str]) -> int:
        num = 0
        for present in self._exists_flags(storage_keys, "exists"):
            if not present:
                break
            num += 1
        return num

    def _get(self, storage_keys: list[str], value_nbytes: int) -> Generator[Any, None, None]:
        batch = max(1, self._max_batch_bytes // value_nbytes)
        mget = self._client.mget_nonatomic if self._cluster else self._client.mget
        for begin in range(0, len(storage_keys), batch):
            try:
                values = mget(storage_keys[begin : begin + batch])
            except _CLIENT_ERRORS as error:
                raise self._error("get", error) from error
            yield from values

    def _set(
        self,
        storage_keys: list[str],
        encode: Callable[[int], list[memoryview | bytes]],
        page_nbytes: int,
    ) -> tuple[int, StorageError | None]:
        try:
            present = self._exists_flags(storage_keys, "set")
        except StorageError as error:
            return 0, error
        value_nbytes = HEADER_SIZE + page_nbytes
        per_batch = max(1, self._max_batch_bytes // value_nbytes)
        arena = self._arena(min(per_batch, present.count(False)) * value_nbytes)
        num = 0
        while num < len(storage_keys):
            # One pipeline: up to per_batch new values, in key order, each a view of the arena.
            pipe = self._client.pipeline(transaction=False)
            batch: list[int] = []
            end = num
            while end < len(storage_keys) and len(batch) < per_batch:
                if not present[end]:
                    begin = pos = len(batch) * value_nbytes
                    for buf in encode(end):
                        piece = np.frombuffer(buf, dtype=np.uint8)
                        arena[pos : pos + piece.size] = piece
                        pos += piece.size
                    pipe.set(storage_keys[end], arena[begin:pos].data)
                    batch.append(end)
                end += 1
            results: list[Any] = []
            if batch:
                try:
                    results = pipe.execute(raise_on_error=False)
                except _CLIENT_ERRORS as error:
                    return num, self._error("set", error)
            outcome = dict(zip(batch, results, strict=True))
            for i in range(num, end):
                if present[i]:
                    self._count(dedup_pages=1)
                elif isinstance(outcome[i], Exception):
                    return num, self._error("set", outcome[i])
                else:
                    self._count(set_pages=1, set_bytes=page_nbytes)
                num += 1
        return num, None

    def _arena(self, nbytes: int) -> np.ndarray:
        """This thread's reusable buffer for the values of one pipeline, ``nbytes`` long.

        A SET value is one argument, so a page's header and payload regions must be joined: into
        this buffer, which is reused (a fresh ``bytes`` per page would page-fault its way through
        every 4 KiB of it: 3x slower). The client sends memoryviews of it without copying, and the
        pipeline has been executed before the buffer is filled again.
        """
        arena = getattr(self._local, "arena", None)
        if arena is None or arena.size < nbytes:
            arena = np.empty(nbytes, dtype=np.uint8)
            self._local.arena = arena
        return arena

    def _discard(self, storage_key: str) -> None:
        with contextlib.suppress(*_CLIENT_ERRORS):
            self._client.delete(storage_key)
