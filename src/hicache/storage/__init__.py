"""The storage (L3) tier: page hashes and the backends that store pages across processes.

- :mod:`hicache.storage.page_hash`: SGLang's SHA-256 page chain, the storage keys.
- :mod:`hicache.storage.base`: :class:`StorageBackend` (``exists`` / ``get`` / ``set``),
  :class:`StorageIdentity`, :class:`StorageStats` and :func:`create_backend`.
- :mod:`hicache.storage.file`: :class:`FileStorage` (``"file"``, the default).
- :mod:`hicache.storage.valkey`: ``ValkeyStorage`` (``"valkey"``, alias ``"redis"``), imported
  on first use by :func:`create_backend`.
- :mod:`hicache.storage.controller`: :class:`StorageController` (the prefetch and backup
  threads that :class:`hicache.HiCache` runs with a ``storage_backend``) and
  :class:`PrefetchConfig` (SGLang's prefetch policies and knobs).
"""

from hicache.storage.base import (
    StorageBackend,
    StorageIdentity,
    StorageStats,
    create_backend,
    parse_extra_config,
)
from hicache.storage.controller import PREFETCH_POLICIES, PrefetchConfig, StorageController
from hicache.storage.file import FileStorage
from hicache.storage.page_hash import block_hash, namespace_seed, page_hashes

__all__ = [
    "PREFETCH_POLICIES",
    "FileStorage",
    "PrefetchConfig",
    "StorageController",
    "StorageBackend",
    "StorageIdentity",
    "StorageStats",
    "block_hash",
    "create_backend",
    "namespace_seed",
    "page_hashes",
    "parse_extra_config",
]
