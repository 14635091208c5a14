"""The storage (L3) backend interface, the stored page format and the backend factory.

A backend stores host-pool pages under string keys and reads them back into a host pool. It
mirrors SGLang 0.5.23's ``HiCacheStorage`` (reference §1.9): ``exists`` is its ``batch_exists``
(the leading run of hits), ``get`` / ``set`` are its zero-copy ``batch_get_v1`` /
``batch_set_v1`` on host indices, but they return the leading count instead of one bool per page.
The caller (the prefetch and backup controller) hashes pages with
:func:`hicache.storage.page_hashes` and passes the hex digests as keys; a backend prepends its
:meth:`StorageIdentity.prefix`, so that a reader whose model, layout, dtype, page size or rank
differs misses instead of reading bytes it would misinterpret.

One stored value is a 32-byte header followed by the page's payload::

    offset  size  field
    0       4     magic b"HCKV"
    4       2     format version (1), little-endian
    6       2     header size in bytes (32)
    8       8     identity prefix, raw (the 16 hex digits of StorageIdentity.prefix())
    16      8     payload size in bytes, little-endian
    24      8     xxh3_64 of (storage key || payload), little-endian

The checksum covers the key too, so a value stored under the wrong key (a renamed file, a bad
copy) fails like a flipped byte. A value whose header or checksum does not verify is a miss: it
is never written into the pool, it is counted in :attr:`StorageStats.corrupt_pages` and deleted
from storage (otherwise ``set`` would keep deduplicating against it and the page could never be
stored again).

The payload is the page's bytes in the host pool's own memory order (the layout is part of the
identity): for ``page_first`` and ``page_first_direct`` host pools, and for Mamba states, each
K/V buffer (conv/temporal buffer) of a page is one contiguous region, and ``set`` hands views of
pool memory to the backend with no copy (the file backend writes them directly; the valkey
backend joins them with the header, one copy); for ``layer_first`` a page is ``num_layers``
strided runs per buffer, gathered with one copy. ``get`` reads a value into a staging buffer,
verifies it, and only then copies it into the pool (one copy: a verified-before-visible rule,
never a partially written page).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import json
import logging
import re
import struct
import threading
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import xxhash

from hicache.errors import InvalidArgumentError, StorageError
from hicache.memory.host_pool import HostKVPool, HostLayout, check_slot_indices
from hicache.memory.mamba_pool import MambaHostPool

__all__ = [
    "HEADER_SIZE",
    "ExtraConfig",
    "StorageBackend",
    "StorageIdentity",
    "StorageStats",
    "create_backend",
    "parse_extra_config",
]

logger = logging.getLogger(__name__)

_KINDS = ("kv", "mamba", "swa")
_LAYOUTS = tuple(m.value for m in HostLayout)

# The stored value's header (see the module docstring).
_MAGIC = b"HCKV"
_VERSION = 1
_HEADER = struct.Struct("<4sHH8sQQ")
HEADER_SIZE = _HEADER.size

# A key becomes part of a file name and of a server key: hex digests and similar tokens only.
_KEY_RE = re.compile(r"[0-9A-Za-z_\-][0-9A-Za-z_.\-]{0,254}")

# Keys of SGLang's --hicache-storage-backend-extra-config that its controller consumes before the
# backend sees the rest (reference §6.4). They are accepted here and ignored, so that one JSON
# string can be passed to both.
_CONTROLLER_KEYS = frozenset(
    {
        "prefetch_threshold",
        "prefetch_timeout_base",
        "prefetch_timeout_per_ki_token",
        "hicache_storage_pass_prefix_keys",
    }
)

# name -> (module, class); "redis" is an alias of "valkey" (same protocol).
_BACKENDS = {
    "file": ("hicache.storage.file", "FileStorage"),
    "valkey": ("hicache.storage.valkey", "ValkeyStorage"),
    "redis": ("hicache.storage.valkey", "ValkeyStorage"),
}


def _dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class StorageIdentity:
    """What the stored bytes mean; its :meth:`prefix` is part of every storage key.

    Two processes share stored pages exactly when their identities are equal. SGLang puts the
    model name and the TP rank/size in its file names (reference §6.2); this identity adds the
    host layout, the dtype, the page size and the pool kind, which decide how the bytes are laid
    out. For MLA, where every TP rank holds the same latent KV, pass ``tp_rank=0, tp_size=1`` so
    that ranks share pages (SGLang's MLA file names omit the rank too).

    Attributes:
        model_name: the model (SGLang's ``--model-path`` or served name).
        layout: the host pool's layout: ``layer_first``, ``page_first`` or ``page_first_direct``.
        dtype: the element dtype's name, e.g. ``"bfloat16"`` (``"conv/temporal"`` for Mamba).
        page_size: tokens per page (1 for Mamba states).
        tp_rank: this rank in tensor parallelism.
        tp_size: the tensor-parallel size.
        kind: ``"kv"`` for KV pages, ``"mamba"`` for Mamba states, ``"swa"`` for SWA window
            pages.
        page_shape: the shape of one page's data (as :meth:`from_host_pool` writes it, e.g.
            ``"mha:L8:H8:D128"``), or ``""`` to leave it out; when set, a pool of another shape
            is rejected by ``get`` / ``set``.
    """

    model_name: str
    layout: str
    dtype: str
    page_size: int
    tp_rank: int = 0
    tp_size: int = 1
    kind: str = "kv"
    page_shape: str = ""

    def __post_init__(self) -> None:
        """Validates the fields.

        Raises:
            InvalidArgumentError: an empty ``model_name`` or ``dtype``, an unknown ``layout`` or
                ``kind``, ``page_size < 1``, or a rank outside ``[0, tp_size)``.
        """
        fn = "StorageIdentity"
        for name in ("model_name", "dtype"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"{fn}: {name}: expected a non-empty str, got {value!r}")
        if self.layout not in _LAYOUTS:
            raise InvalidArgumentError(
                f"{fn}: layout: expected one of {list(_LAYOUTS)}, got {self.layout!r}"
            )
        if self.kind not in _KINDS:
            raise InvalidArgumentError(
                f"{fn}: kind: expected one of {list(_KINDS)}, got {self.kind!r}"
            )
        for name in ("page_size", "tp_rank", "tp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(f"{fn}: {name}: expected an int, got {value!r}")
        if self.page_size < 1:
            raise InvalidArgumentError(f"{fn}: page_size: expected >= 1, got {self.page_size}")
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise InvalidArgumentError(
                f"{fn}: tp_rank: expected 0 <= tp_rank < tp_size, got tp_rank={self.tp_rank}, "
                f"tp_size={self.tp_size}"
            )
        if not isinstance(self.page_shape, str):
            raise InvalidArgumentError(
                f"{fn}: page_shape: expected a str, got {type(self.page_shape).__name__}"
            )

    def prefix(self) -> str:
        """A short stable string naming this identity: 16 lowercase hex digits.

        It is the BLAKE2b-64 of the fields (as sorted JSON), the same in every process and on
        every machine, and changes when any field changes.
        """
        fields = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(b"hicache-storage-v1" + fields.encode(), digest_size=8).hexdigest()

    @classmethod
    def from_host_pool(
        cls,
        host_pool: HostKVPool | MambaHostPool,
        model_name: str,
        tp_rank: int = 0,
        tp_size: int = 1,
        kind: str | None = None,
    ) -> StorageIdentity:
        """The identity of the pages of ``host_pool``.

        Args:
            host_pool: a :class:`HostKVPool` (KV or SWA pages) or a :class:`MambaHostPool`.
            model_name: the model's name.
            tp_rank: this rank in tensor parallelism.
            tp_size: the tensor-parallel size.
            kind: ``"kv"`` or ``"swa"`` for a :class:`HostKVPool` (default ``"kv"``); must be
                ``None`` or ``"mamba"`` for a :class:`MambaHostPool`.

        Returns:
            The identity, with ``page_shape`` filled in.

        Raises:
            InvalidArgumentError: ``host_pool`` is neither pool type, ``kind`` does not fit it,
                or a field is invalid.
        """
        codec = _PageCodec(host_pool, "StorageIdentity.from_host_pool")
        if kind is None:
            kind = "mamba" if codec.is_mamba else "kv"
        if (kind == "mamba") != codec.is_mamba:
            raise InvalidArgumentError(
                f"StorageIdentity.from_host_pool: kind: {kind!r} does not fit a "
                f"{type(host_pool).__name__}"
            )
        return cls(
            model_name=model_name,
            layout=codec.layout,
            dtype=codec.dtype,
            page_size=codec.page_size,
            tp_rank=tp_rank,
            tp_size=tp_size,
            kind=kind,
            page_shape=codec.page_shape,
        )


@dataclass
class StorageStats:
    """Counters of one backend, monotonically increasing since it was created.

    Updated under the backend's lock by the calls that count; read them through
    :meth:`StorageBackend.stats_snapshot` for a consistent copy.

    Attributes:
        exists_calls: ``exists`` calls.
        exists_pages: leading pages ``exists`` reported present.
        get_calls: ``get`` calls.
        get_pages: pages read, verified and written into a pool.
        get_bytes: payload bytes of those pages.
        set_calls: ``set`` calls.
        set_pages: pages newly stored (not counting deduplicated ones).
        set_bytes: payload bytes of those pages.
        corrupt_pages: stored values that failed verification (header, length or checksum).
        failed_ops: ``get`` / ``set`` / ``exists`` calls that hit a backend failure
            (:class:`~hicache.errors.StorageError` raised, or a short count returned).
        dedup_pages: pages ``set`` found already stored and did not rewrite.
        evicted_pages: stored pages the backend removed to respect its size cap.
    """

    exists_calls: int = 0
    exists_pages: int = 0
    get_calls: int = 0
    get_pages: int = 0
    get_bytes: int = 0
    set_calls: int = 0
    set_pages: int = 0
    set_bytes: int = 0
    corrupt_pages: int = 0
    failed_ops: int = 0
    dedup_pages: int = 0
    evicted_pages: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (field name -> value)."""
        return dataclasses.asdict(self)


class _PageCodec:
    """One host pool seen as pages of bytes: per page, uint8 numpy views of its regions.

    A page of a :class:`HostKVPool` is ``page_size`` slots of every layer of every K/V buffer; a
    page of a :class:`MambaHostPool` is one slot's conv and temporal states of every layer. The
    views alias the pool's memory (no copy), so reading a page is a memoryview of the pool and
    writing one is a single copy into it.
    """

    def __init__(self, pool: object, fn: str) -> None:
        if isinstance(pool, HostKVPool):
            self.is_mamba = False
            self.layout = pool.layout.value
            self.dtype = _dtype_name(pool.dtype)
            self.page_size = pool.page_size
            self.num_slots = pool.num_slots
            self.page_shape = f"{pool.kind}:L{pool.num_layers}:H{pool.num_heads}:D{pool.head_dim}"
            # [kv, ...layout dims..., head_dim * itemsize] bytes; see HostKVPool's docstring.
            self._buffers: tuple[np.ndarray, ...] = (pool.kv_buffer.view(torch.uint8).numpy(),)
        elif isinstance(pool, MambaHostPool):
            self.is_mamba = True
            self.layout = pool.layout.value
            self.dtype = f"{_dtype_name(pool.conv_dtype)}/{_dtype_name(pool.temporal_dtype)}"
            self.page_size = 1
            self.num_slots = pool.num_slots
            self.page_shape = (
                f"mamba:L{pool.num_layers}:conv{list(pool.conv_shape)}"
                f":temporal{list(pool.temporal_shape)}"
            )
            # [N, L, ...] each: one slot of all layers is contiguous in both layouts.
            self._buffers = (
                pool.conv_buffer.view(torch.uint8).numpy(),
                pool.temporal_buffer.view(torch.uint8).numpy(),
            )
        else:
            raise InvalidArgumentError(
                f"{fn}: pool: expected a HostKVPool or MambaHostPool, got {type(pool).__name__}"
            )
        self.contiguous = self.is_mamba or self.layout != HostLayout.LAYER_FIRST.value
        self.page_nbytes = sum(r.nbytes for r in self.regions(0))

    def regions(self, start: int) -> list[np.ndarray]:
        """uint8 views of the pool memory of the page starting at slot ``start``, in payload order.

        Contiguous views unless the layout is ``layer_first`` (then ``[L, P, H, D * itemsize]``
        strided views).
        """
        if self.is_mamba:
            return [buf[start] for buf in self._buffers]
        (kv,) = self._buffers
        if self.layout == HostLayout.LAYER_FIRST.value:
            return [kv[i, :, start : start + self.page_size] for i in range(kv.shape[0])]
        if self.layout == HostLayout.PAGE_FIRST.value:
            return [kv[i, start : start + self.page_size] for i in range(kv.shape[0])]
        return [kv[i, start // self.page_size] for i in range(kv.shape[0])]

    def payload(self, start: int) -> list[memoryview]:
        """The page's payload as flat byte buffers: views of the pool where it is contiguous."""
        out = []
        for region in self.regions(start):
            flat = (
                region.reshape(-1) if self.contiguous else np.ascontiguousarray(region).reshape(-1)
            )
            out.append(flat.data)
        return out

    def store(self, start: int, payload: np.ndarray) -> None:
        """Copies a verified ``[page_nbytes]`` uint8 payload into the page at slot ``start``."""
        offset = 0
        for region in self.regions(start):
            size = region.nbytes
            region[...] = payload[offset : offset + size].reshape(region.shape)
            offset += size


def _check_keys(keys: object, fn: str) -> list[str]:
    """Returns ``keys`` as a list of valid key strings, else raises InvalidArgumentError."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise InvalidArgumentError(
            f"{fn}: keys: expected a sequence of str, got {type(keys).__name__}"
        )
    out = list(keys)
    for i, key in enumerate(out):
        if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
            raise InvalidArgumentError(
                f"{fn}: keys[{i}]: expected 1-255 chars of [0-9A-Za-z_.-] not starting with '.' "
                f"(a page hash hex digest), got {key!r}"
            )
    return out


def _check_page_indices(indices: object, num_pages: int, codec: _PageCodec, fn: str) -> list[int]:
    """Checks page-aligned runs of host slot indices; returns each page's first slot.

    Raises:
        InvalidArgumentError: not an int64 1-D CPU tensor, a length other than
            ``num_pages * page_size``, or a page whose slots are not one aligned run.
        IndexOutOfRangeError: a slot outside the pool.
    """
    name = f"{fn}: indices"
    if not isinstance(indices, torch.Tensor):
        raise InvalidArgumentError(f"{name}: expected a torch.Tensor, got {type(indices).__name__}")
    check_slot_indices(indices, name, codec.num_slots, require_cpu=True)
    size = codec.page_size
    if indices.numel() != num_pages * size:
        raise InvalidArgumentError(
            f"{name}: expected len(keys) * page_size = {num_pages} * {size} = {num_pages * size} "
            f"slots, got {indices.numel()}"
        )
    pages = indices.view(num_pages, size)
    starts = pages[:, 0]
    bad = (starts % size != 0) | (pages - starts[:, None] != torch.arange(size)).any(dim=1)
    if bool(bad.any()):
        page = int(torch.nonzero(bad)[0])
        slots = pages[page].tolist()
        shown = slots if len(slots) <= 8 else [*slots[:4], "...", *slots[-2:]]
        raise InvalidArgumentError(
            f"{name}: page {page} is not an aligned run of {size} consecutive slots starting at a "
            f"multiple of {size}: {shown}"
        )
    return starts.tolist()


class StorageBackend(abc.ABC):
    """A storage (L3) tier: pages stored under keys, read back into a host pool.

    Subclasses implement the byte transport (:meth:`_exists`, :meth:`_get`, :meth:`_set`,
    :meth:`_discard`, :meth:`close`); this class validates arguments, encodes and verifies values
    (see the module docstring) and keeps :attr:`stats`. All methods are thread-safe: the
    controller's prefetch and backup threads may share one backend.

    Failure rule (``get`` and ``set``): when the backend fails after ``k > 0`` leading pages were
    done, the call returns ``k`` (and counts a failed op); when it fails before any page was
    done, it raises :class:`~hicache.errors.StorageError`. Either way nothing partial is left: a
    pool page is written only with verified bytes, and storage only ever shows whole values.
    """

    #: The backend's name in :func:`create_backend`.
    name: ClassVar[str] = ""
    #: What the stored bytes mean; fixed at construction.
    identity: StorageIdentity
    #: Counters; written under ``_stats_lock`` only.
    stats: StorageStats

    def __init__(self, identity: StorageIdentity) -> None:
        """Sets up the identity and the counters.

        Raises:
            InvalidArgumentError: ``identity`` is not a :class:`StorageIdentity`.
        """
        if not isinstance(identity, StorageIdentity):
            raise InvalidArgumentError(
                f"{type(self).__name__}: identity: expected a StorageIdentity, got "
                f"{type(identity).__name__}"
            )
        self.identity = identity
        self.stats = StorageStats()
        self._stats_lock = threading.Lock()
        self._prefix = identity.prefix()
        self._prefix_bytes = bytes.fromhex(self._prefix)

    # --- public API -----------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where the pages live, for messages: ``"file at /path"``, ``"valkey at host:port"``."""

    def storage_key(self, key: str) -> str:
        """The key a page is stored under: ``identity.prefix() + "/" + key``."""
        return f"{self._prefix}/{key}"

    def exists(self, keys: Sequence[str]) -> int:
        """How many leading pages of ``keys`` are stored (SGLang's ``batch_exists``).

        Args:
            keys: page keys (hex page hashes), in prefix order.

        Returns:
            The number of leading keys present; it stops at the first miss. Presence is not
            verification: a present page may still turn out corrupt in :meth:`get`.

        Raises:
            InvalidArgumentError: ``keys`` is not a sequence of valid key strings.
            StorageError: the backend cannot answer (server down, I/O error).
        """
        keys = _check_keys(keys, f"{self.name}.exists")
        self._count(exists_calls=1)
        if not keys:
            return 0
        try:
            num = self._exists([self.storage_key(k) for k in keys])
        except StorageError:
            self._count(failed_ops=1)
            raise
        self._count(exists_pages=num)
        return num

    def get(
        self, keys: Sequence[str], pool: HostKVPool | MambaHostPool, indices: torch.Tensor
    ) -> int:
        """Reads pages ``keys`` into ``pool`` (SGLang's ``batch_get_v1``, leading count).

        Page ``keys[i]`` goes to host slots ``indices[i * P:(i + 1) * P]``, ``P`` =
        ``pool.page_size`` (1 for a :class:`MambaHostPool`). It stops at the first page that is
        missing or fails verification; a failing page is counted in ``stats.corrupt_pages``,
        deleted from storage and never written into the pool.

        Args:
            keys: page keys (hex page hashes), in prefix order.
            pool: the host pool to fill; its layout, dtype, page size (and page shape, when the
                identity names one) must match :attr:`identity`.
            indices: ``[len(keys) * P]`` int64 CPU host slot indices, one aligned run of ``P``
                consecutive slots per page (as the host allocator hands out pages).

        Returns:
            The number of leading pages read and verified; exactly those pool pages changed.

        Raises:
            InvalidArgumentError: bad ``keys``, ``pool`` or ``indices`` (the message names it).
            IndexOutOfRangeError: a slot is outside the pool.
            StorageError: the backend failed before the first page (see the failure rule).
        """
        fn = f"{self.name}.get"
        keys = _check_keys(keys, fn)
        codec = self._codec(pool, fn)
        starts = _check_page_indices(indices, len(keys), codec, fn)
        self._count(get_calls=1)
        storage_keys = [self.storage_key(k) for k in keys]
        num = 0
        try:
            with closing(self._get(storage_keys, HEADER_SIZE + codec.page_nbytes)) as values:
                for value in values:
                    if value is None:
                        break
                    payload = self._verify(storage_keys[num], value, codec)
                    if payload is None:
                        self._count(corrupt_pages=1)
                        self._discard(storage_keys[num])
                        break
                    codec.store(starts[num], payload)
                    num += 1
        except StorageError as error:
            self._count(failed_ops=1)
            if num == 0:
                raise
            logger.warning("%s: returning %d of %d pages: %s", fn, num, len(keys), error)
        self._count(get_pages=num, get_bytes=num * codec.page_nbytes)
        return num

    def set(
        self, keys: Sequence[str], pool: HostKVPool | MambaHostPool, indices: torch.Tensor
    ) -> int:
        """Stores pages of ``pool`` under ``keys`` (SGLang's ``batch_set_v1``, leading count).

        Page ``keys[i]`` is host slots ``indices[i * P:(i + 1) * P]``. A key already stored is
        not rewritten (counted in ``stats.dedup_pages``), as SGLang's file backend skips
        existing keys. Each value appears in storage whole or not at all.

        Args:
            keys: page keys (hex page hashes), in prefix order.
            pool: the host pool holding the pages; it must match :attr:`identity`.
            indices: ``[len(keys) * P]`` int64 CPU host slot indices, one aligned run per page.

        Returns:
            The number of leading pages now stored (newly or already). It is short when the
            backend filled up (a size cap, a full server) or failed after some pages.

        Raises:
            InvalidArgumentError: bad ``keys``, ``pool`` or ``indices`` (the message names it).
            IndexOutOfRangeError: a slot is outside the pool.
            StorageError: the backend failed before storing any page (see the failure rule).

        Note:
            The pages are read from pool memory while they are written out (no snapshot), so
            they must not change during the call: the caller holds a host lock on them (as
            SGLang's backup does). Not checked: a page changed meanwhile usually fails its
            checksum on read, but it can also be stored torn (part old, part new bytes) with a
            matching checksum.
        """
        fn = f"{self.name}.set"
        keys = _check_keys(keys, fn)
        codec = self._codec(pool, fn)
        starts = _check_page_indices(indices, len(keys), codec, fn)
        self._count(set_calls=1)
        if not keys:
            return 0
        storage_keys = [self.storage_key(k) for k in keys]

        def encode(i: int) -> list[memoryview | bytes]:
            return self._encode(storage_keys[i], codec, starts[i])

        num, error = self._set(storage_keys, encode, codec.page_nbytes)
        if error is not None:
            self._count(failed_ops=1)
            if num == 0:
                raise error
            logger.warning("%s: stored %d of %d pages: %s", fn, num, len(keys), error)
        return num

    def stats_snapshot(self) -> StorageStats:
        """A consistent copy of :attr:`stats`."""
        with self._stats_lock:
            return dataclasses.replace(self.stats)

    @abc.abstractmethod
    def close(self) -> None:
        """Releases connections and files; the backend must not be used afterwards."""

    def __enter__(self) -> StorageBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, identity={self._prefix})"

    # --- transport, implemented by subclasses ---------------------------------------------------

    @abc.abstractmethod
    def _exists(self, storage_keys: list[str]) -> int:
        """The number of leading storage keys present; raises StorageError on failure."""

    @abc.abstractmethod
    def _get(self, storage_keys: list[str], value_nbytes: int) -> Generator[Any, None, None]:
        """Yields each stored value (a bytes-like object) in order, ``None`` for a missing one.

        The caller stops iterating at the first ``None`` or bad value and closes the iterator,
        so an implementation may fetch lazily, in batches. ``value_nbytes`` is the expected
        value size (header + payload). Raises StorageError on failure.
        """

    @abc.abstractmethod
    def _set(
        self,
        storage_keys: list[str],
        encode: Callable[[int], list[memoryview | bytes]],
        page_nbytes: int,
    ) -> tuple[int, StorageError | None]:
        """Stores the values ``encode(i)`` (header and payload buffers) of keys not yet stored.

        Returns the number of leading keys now stored and the error that stopped it, if any.
        Counts ``set_pages``, ``set_bytes`` (``page_nbytes`` per page), ``dedup_pages`` and
        ``evicted_pages`` itself.
        """

    @abc.abstractmethod
    def _discard(self, storage_key: str) -> None:
        """Deletes a stored value (a corrupt one); never raises."""

    # --- helpers --------------------------------------------------------------------------------

    def _count(self, **increments: int) -> None:
        """Adds ``increments`` to the named counters of :attr:`stats`."""
        with self._stats_lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _codec(self, pool: object, fn: str) -> _PageCodec:
        """The pool's codec, after checking that the pool's pages match :attr:`identity`."""
        codec = _PageCodec(pool, fn)
        ident = self.identity
        if codec.is_mamba != (ident.kind == "mamba"):
            raise InvalidArgumentError(
                f"{fn}: pool: a {type(pool).__name__} does not hold {ident.kind!r} pages "
                "(the backend identity's kind)"
            )
        checks: list[tuple[str, object, object]] = [
            ("layout", codec.layout, ident.layout),
            ("dtype", codec.dtype, ident.dtype),
        ]
        checks.append(("page_size", codec.page_size, ident.page_size))
        if ident.page_shape:
            checks.append(("page_shape", codec.page_shape, ident.page_shape))
        for name, got, expected in checks:
            if got != expected:
                raise InvalidArgumentError(
                    f"{fn}: pool: its {name} {got!r} differs from the backend identity's "
                    f"{expected!r}"
                )
        return codec

    def _encode(self, storage_key: str, codec: _PageCodec, start: int) -> list[memoryview | bytes]:
        """The value of one page: ``[header, *payload buffers]`` (payload: views of the pool)."""
        payload = codec.payload(start)
        digest = xxhash.xxh3_64(storage_key.encode())
        for buf in payload:
            digest.update(buf)
        header = _HEADER.pack(
            _MAGIC, _VERSION, HEADER_SIZE, self._prefix_bytes, codec.page_nbytes, digest.intdigest()
        )
        return [header, *payload]

    def _verify(self, storage_key: str, value: Any, codec: _PageCodec) -> np.ndarray | None:
        """The payload of a stored value as a uint8 array, or None if it does not verify."""
        data = np.frombuffer(value, dtype=np.uint8)
        if data.size != HEADER_SIZE + codec.page_nbytes:
            reason = f"size {data.size}, expected {HEADER_SIZE + codec.page_nbytes}"
        else:
            magic, version, header_size, prefix, nbytes, checksum = _HEADER.unpack_from(data.data)
            payload = data[HEADER_SIZE:]
            if (magic, version, header_size) != (_MAGIC, _VERSION, HEADER_SIZE):
                reason = f"header {magic!r} v{version} ({header_size} B)"
            elif prefix != self._prefix_bytes:
                reason = f"identity {prefix.hex()}, expected {self._prefix}"
            elif nbytes != codec.page_nbytes:
                reason = f"payload size {nbytes}, expected {codec.page_nbytes}"
            else:
                digest = xxhash.xxh3_64(storage_key.encode())
                digest.update(payload.data)
                if digest.intdigest() == checksum:
                    return payload
                reason = "checksum mismatch"
        logger.warning(
            "%s: corrupt page %s (%s): treated as a miss", self.description, storage_key, reason
        )
        return None


class ExtraConfig:
    """Typed reads of a backend's extra-config dict; every key must be read exactly once.

    A backend's ``from_config`` reads its keys with the typed getters and calls :meth:`finish`,
    which rejects keys nobody read, so a typo in a key is an error naming the key instead of a
    silently ignored setting.
    """

    def __init__(self, config: dict[str, Any], backend: str) -> None:
        """Wraps ``config`` (not copied) for the backend named ``backend``."""
        self._config = dict(config)
        self._backend = backend

    def _take(self, key: str, default: Any, types: tuple[type, ...], what: str) -> Any:
        if key not in self._config:
            return default
        value = self._config.pop(key)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in types:
            value = object()  # fall through to the error: True is not a port number
        if not isinstance(value, types):
            raise InvalidArgumentError(
                f"{self._backend} storage extra config: {key}: expected {what}, got {value!r}"
            )
        return value

    def get_str(self, key: str, default: str | None = None) -> str | None:
        """The string at ``key``, or ``default`` when absent or null."""
        return self._take(key, default, (str,), "a string")

    def get_int(
        self, key: str, default: int | None = None, minimum: int | None = None
    ) -> int | None:
        """The int at ``key`` (at least ``minimum``), or ``default`` when absent or null."""
        value = self._take(key, default, (int,), "an integer")
        if value is not None and minimum is not None and value < minimum:
            raise InvalidArgumentError(
                f"{self._backend} storage extra config: {key}: expected >= {minimum}, got {value}"
            )
        return value

    def get_float(self, key: str, default: float | None = None) -> float | None:
        """The positive number at ``key``, or ``default`` when absent or null."""
        value = self._take(key, default, (int, float), "a positive number")
        if value is not None and not value > 0:
            raise InvalidArgumentError(
                f"{self._backend} storage extra config: {key}: expected > 0, got {value}"
            )
        return None if value is None else float(value)

    def get_bool(self, key: str, default: bool = False) -> bool:
        """The bool at ``key``, or ``default`` when absent or null."""
        return bool(self._take(key, default, (bool,), "true or false"))

    def finish(self) -> None:
        """Raises InvalidArgumentError naming the first key that no getter read."""
        if self._config:
            key = sorted(self._config)[0]
            raise InvalidArgumentError(f"{self._backend} storage extra config: unknown key {key!r}")


def parse_extra_config(extra_config: dict[str, Any] | str | None) -> dict[str, Any]:
    """SGLang's ``--hicache-storage-backend-extra-config``: a dict, a JSON object string or None.

    Args:
        extra_config: the config.

    Returns:
        A new dict (empty for None or an empty string).

    Raises:
        InvalidArgumentError: a string that is not a JSON object, or another type.
    """
    if extra_config is None:
        return {}
    if isinstance(extra_config, str):
        if not extra_config.strip():
            return {}
        try:
            extra_config = json.loads(extra_config)
        except json.JSONDecodeError as error:
            raise InvalidArgumentError(f"storage extra config: not valid JSON: {error}") from None
    if not isinstance(extra_config, dict):
        raise InvalidArgumentError(
            "storage extra config: expected a JSON object (dict), got "
            f"{type(extra_config).__name__}"
        )
    return dict(extra_config)


def create_backend(
    name: str | None,
    identity: StorageIdentity,
    extra_config: dict[str, Any] | str | None = None,
) -> StorageBackend:
    """Creates a storage backend by name (SGLang's ``--hicache-storage-backend``, reference §6.3).

    Args:
        name: ``"file"`` (also for ``None`` or ``""``), ``"valkey"`` or its alias ``"redis"``.
        identity: what the pages mean (see :class:`StorageIdentity`).
        extra_config: SGLang's ``--hicache-storage-backend-extra-config``: a dict or a JSON
            object string. The keys SGLang's controller consumes (``prefetch_threshold``,
            ``prefetch_timeout_base``, ``prefetch_timeout_per_ki_token``,
            ``hicache_storage_pass_prefix_keys``, reference §6.4) are ignored here; the other
            keys belong to the backend (see :class:`~hicache.storage.file.FileStorage` and
            :class:`~hicache.storage.valkey.ValkeyStorage`).

    Returns:
        The backend.

    Raises:
        InvalidArgumentError: an unknown backend name, a bad config (the message names the
            key), or a bad identity.
        StorageError: the backend cannot be set up (e.g. its directory cannot be created).
    """
    backend = "file" if name is None or name == "" else name
    if not isinstance(backend, str) or backend.lower() not in _BACKENDS:
        raise InvalidArgumentError(
            f"create_backend: name: expected one of {sorted(_BACKENDS)}, got {name!r}"
        )
    if not isinstance(identity, StorageIdentity):
        raise InvalidArgumentError(
            f"create_backend: identity: expected a StorageIdentity, got {type(identity).__name__}"
        )
    config = {
        k: v for k, v in parse_extra_config(extra_config).items() if k not in _CONTROLLER_KEYS
    }
    module_name, class_name = _BACKENDS[backend.lower()]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_config(identity, ExtraConfig(config, backend.lower()))
