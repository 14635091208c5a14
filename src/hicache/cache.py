"""The public cache API: the radix tree, the device (L1) and host (L2) KV pools, kept consistent.

``HiCache`` is what an engine's scheduler talks to. It mirrors SGLang's ``HiRadixCache`` API
(``match_prefix``, ``insert``, ``inc_lock_ref``/``dec_lock_ref``, ``evict``, ``evict_host``,
``init_load_back``, ``ready_to_load_host_cache``, ``check_hicache_events``,
``cache_finished_req``/``cache_unfinished_req``) and adds the slot allocation that SGLang leaves to
its ``token_to_kv_pool_allocator``, so that "every slot is owned exactly once" (DESIGN.md invariant
3) is checked in one place. The tree decides, the cache executes: tree calls return freed slots and
transfer plans; the cache hands slots back to the allocators and queues copies on the
:class:`~hicache.controller.CacheController`, whose acks it feeds back to the tree.

Without a host pool the cache is SGLang's plain ``RadixCache`` (the device tier only). With a
storage backend (L3) it also backs acknowledged host pages up to storage and prefetches requests'
pages from it (``prefetch_from_storage`` / ``check_prefetch_progress`` / ``terminate_prefetch``,
SGLang's HiCache storage; see :mod:`hicache.storage.controller`).

Threading: the C++ tree is single-threaded; one re-entrant lock serialises every tree call
(DESIGN.md, threading contract). The controller's workers (or CUDA streams) only copy KV; acks are
applied by :meth:`HiCache.check_hicache_events` on the caller's thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from hicache import profiling
from hicache._tree import RadixTree
from hicache.controller import CacheController
from hicache.errors import (
    InvalidArgumentError,
    InvariantError,
    PoolExhaustedError,
    TransferError,
)
from hicache.events import KVEventPublisher, Medium
from hicache.memory import (
    DeviceKVPool,
    HostKVPool,
    MambaHostPool,
    MambaStatePool,
    PageAllocator,
    PoolTransfer,
    SWAKVPool,
)
from hicache.results import EvictResult, InsertResult, LockReceipt, MatchResult
from hicache.storage.base import StorageBackend
from hicache.storage.controller import PrefetchConfig, PrefetchOperation, StorageController
from hicache.storage.page_hash import namespace_seed
from hicache.transfer import KVTransfer

__all__ = ["WRITE_POLICIES", "CacheStats", "HiCache", "Req"]

_ROOT_ID = 0

# SGLang's --hicache-write-policy values, with the hit count at which an insert backs a node up
# (SGLang's write_through_threshold: 1 for write_through, 2 otherwise; write_back never does).
WRITE_POLICIES = {"write_through": 1, "write_through_selective": 2, "write_back": None}


def _empty_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


@dataclass
class CacheStats:
    """Token counters since construction or :meth:`HiCache.reset` (all in tokens).

    Attributes:
        match_calls: :meth:`HiCache.match_prefix` calls.
        device_hit_tokens: tokens those calls matched on device (L1), before any load-back.
        host_hit_tokens: tokens they matched on host only (L2), below the device part.
        evicted_tokens: device tokens freed by eviction (demoted + dropped).
        demoted_tokens: device tokens evicted with a host copy kept (they stay matchable on L2).
        dropped_tokens: device tokens evicted without a host copy (their KV is gone).
        host_evicted_tokens: host tokens freed by ``evict_host`` (or dropped with a device leaf).
        backup_tokens: tokens queued for device -> host backup.
        backup_failed_tokens: tokens whose backup was skipped (host full) or whose copy failed.
        load_back_tokens: tokens queued for host -> device load-back.
        load_back_failed_tokens: tokens whose load-back could not be queued (device full) or
            whose copy failed.
        mamba_forks: request state slots filled by copy-on-write from a cached state.
        mamba_published: states the tree took from finished requests (checkpoints).
        mamba_existed: checkpoints the tree already had a state for (the copy was freed).
        mamba_evicted_states: states freed by eviction (Mamba or Full pressure).
        mamba_backup_skipped: node backups that went without their state (no host state slot).
        swa_tombstoned_tokens: tokens whose SWA KV eviction freed while their Full KV stayed.
        swa_recovered_tokens: SWA tombstone tokens that took a request's SWA KV on insert.
        swa_window_freed_tokens: request tokens whose SWA KV left the window
            (:meth:`HiCache.free_swa_out_of_window`).
        storage_prefetches: :meth:`HiCache.prefetch_from_storage` calls that queued a prefetch.
        storage_hit_tokens: tokens prefetched from storage (L3) and inserted in the tree as host
            nodes (duplicates of pages the tree already had are not counted).
        storage_backup_tokens: tokens queued for host -> storage backup (after deduplication).
        storage_backup_failed_tokens: of those, tokens the backend did not store (a failure,
            or a full backend).
    """

    match_calls: int = 0
    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    evicted_tokens: int = 0
    demoted_tokens: int = 0
    dropped_tokens: int = 0
    host_evicted_tokens: int = 0
    backup_tokens: int = 0
    backup_failed_tokens: int = 0
    load_back_tokens: int = 0
    load_back_failed_tokens: int = 0
    mamba_forks: int = 0
    mamba_published: int = 0
    mamba_existed: int = 0
    mamba_evicted_states: int = 0
    mamba_backup_skipped: int = 0
    swa_tombstoned_tokens: int = 0
    swa_recovered_tokens: int = 0
    swa_window_freed_tokens: int = 0
    storage_prefetches: int = 0
    storage_hit_tokens: int = 0
    storage_backup_tokens: int = 0
    storage_backup_failed_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


@dataclass
class Req:
    """A request as the cache sees it: SGLang's ``Req`` reduced to the fields the cache touches.

    Attributes:
        token_ids: ``[num_tokens]`` int32/int64 CPU tensor (or list) of the tokens whose KV has been
            computed so far.
        extra_key: namespace of the request (LoRA id, tenant salt); ``None`` for none.
        kv_indices: ``[>= num_tokens]`` int64 CPU tensor, whole pages: ``kv_indices[i]`` holds the
            KV of ``token_ids[i]``. Slots past ``len(token_ids)`` are allocated but unused (the tail
            of the last page).
        last_node: the node this request holds a lock on (the root, id 0, holds nothing).
        prefix_len: SGLang's ``cache_protected_len``: ``kv_indices[:prefix_len]`` belong to the tree
            (kept alive by the lock on ``last_node``); the request owns ``kv_indices[prefix_len:]``.
        mamba_node_id: the Mamba part of the lock receipt (``LockReceipt.mamba_node_id``); -1
            when the lock holds no state.
        mamba_checkpoints: Mamba caches: ``(num_tokens, slot)`` pairs, the request's states after
            its first ``num_tokens`` tokens (page-aligned, ascending) that
            :meth:`HiCache.cache_finished_req` publishes in the tree; the request owns the slots
            until then, and the cache frees those the tree does not take.
        swa_lock_tokens: the SWA part of the lock receipt (``LockReceipt.swa_lock_tokens``).
        swa_evicted_seqlen: SWA caches: the request freed the SWA KV of its own slots below this
            many tokens (:meth:`HiCache.free_swa_out_of_window`; SGLang's field of that name).
    """

    token_ids: torch.Tensor
    extra_key: str | None = None
    kv_indices: torch.Tensor = field(default_factory=_empty_slots)
    last_node: int = _ROOT_ID
    prefix_len: int = 0
    mamba_node_id: int = -1
    mamba_checkpoints: list[tuple[int, int]] = field(default_factory=list)
    swa_lock_tokens: int = 0
    swa_evicted_seqlen: int = 0


class HiCache:
    """A hierarchical prefix KV cache over a device KV pool and, optionally, a host KV pool.

    Args:
        device_pool: the KV pool whose slots the tree indexes (L1).
        page_size: tokens per page, >= 1; the pools' sizes must be multiples of it.
        host_pool: the host (L2) pool; ``None`` for a device-only cache (SGLang's ``RadixCache``).
            Its ``page_size`` must equal ``page_size``.
        write_policy: one of :data:`WRITE_POLICIES` (SGLang's ``--hicache-write-policy``):
            ``write_through`` backs a node up when it is first inserted, ``write_through_selective``
            once an insert has walked it twice, ``write_back`` only when it is evicted from device.
        io_backend: the controller's transfer backend: ``"auto"`` (the CUDA kernels where they
            can run, else torch copies), ``"kernel"`` or ``"direct"``.
        enable_kv_events: publish KV events (:mod:`hicache.events`) through :attr:`kv_events`;
            costs a page hash per inserted page, so it is off by default (SGLang's
            ``--kv-events-config``).
        mamba_pool: hybrid Mamba + attention models: the Mamba state pool. The tree then has the
            Mamba component (see :class:`~hicache.RadixTree`): matches end at cached states,
            :meth:`fork_mamba` gives a request its own copy (copy-on-write),
            :meth:`cache_finished_req` publishes ``req.mamba_checkpoints``, and states are evicted
            (:meth:`alloc_mamba`) least recently used first.
        mamba_host_pool: with ``host_pool`` and ``mamba_pool``: the host Mamba state pool (over
            ``mamba_pool``). Backups carry each node's state with its KV (a ``"mamba"``
            :class:`~hicache.memory.PoolTransfer` in the same controller batch), demotion keeps
            it, and a load-back brings the anchor's state back before its layer 0 is signalled.
            A node whose state found no free host slot is backed up without it.
        swa_pool: hybrid sliding-window models: the SWA KV pool (its ``num_full_slots`` is
            ``device_pool.num_slots``, same page size). The tree then has the SWA component with
            window ``sliding_window_size`` (see :class:`~hicache.RadixTree`): :meth:`alloc` maps
            every new full slot to an SWA slot (evicting SWA KV least recently used first,
            internal nodes becoming SWA tombstones), frees release both sides, matches end
            behind a live window, and :meth:`free_swa_out_of_window` drops a request's SWA KV
            that left its window (SGLang PR #29860's frontier).
        swa_host_pool: with ``host_pool`` and ``swa_pool``: a :class:`HostKVPool` over
            ``swa_pool`` with as many slots as ``host_pool``. Backups carry each node's live SWA
            KV (an ``"swa"`` :class:`~hicache.memory.PoolTransfer`), demotion keeps it, and a
            load-back brings it back.
        sliding_window_size: the SWA window in tokens (> 0 with ``swa_pool``).
        storage_backend: the storage (L3) tier, with ``host_pool`` (SGLang's
            ``--hicache-storage-backend``): every node then carries its page hashes (the storage
            keys), a node whose device -> host copy is acknowledged is backed up to storage (its
            host pages host-locked until the storage ack), and :meth:`prefetch_from_storage`
            reads a request's pages from storage into host pages. A
            :class:`~hicache.storage.controller.StorageController` runs both on its own threads.
            The cache does not close the backend.
        prefetch_config: the prefetch policy and its knobs (SGLang's
            ``--hicache-storage-prefetch-policy`` and extra-config keys); default
            ``best_effort``, threshold 256 tokens, timeout 1 s + 0.25 s per 1024 tokens.
        mamba_storage_backend: with ``storage_backend`` and a Mamba pool (required then): the
            backend of node states, whose identity is ``mamba_host_pool``'s (SGLang stores them
            as ``{last_page_hash}.mamba``, reference §3.11). A node's host state is stored under
            its last page's hash after its backup; a prefetch is all-or-nothing: it stops at
            the deepest stored page whose state is stored too, and inserts its pages only when
            all of them and that state were read.
        swa_storage_backend: with ``storage_backend`` and an SWA pool (required then): the
            backend of SWA pages, whose identity is ``swa_host_pool``'s with kind ``"swa"``
            (SGLang stores them as ``{page_hash}.swa``, reference §3.11). A node's host SWA
            copy is stored page by page under the node's page hashes after its backup; a
            prefetch is all-or-nothing: it stops at the deepest stored page whose window (the
            ``ceil(sliding_window_size / page_size)`` pages ending there, or every prefetched
            page when fewer) has its SWA pages stored too, reads them into host SWA slots, and
            inserts its pages (the window's nodes with host SWA copies, which a load-back brings
            back to device) only when all of them and that window were read.

    Raises:
        InvalidArgumentError: bad ``page_size``, pool sizes that are not whole pages, a host pool of
            another page size, an unknown write policy or io backend, or Mamba pools that do not
            fit together (a host pool and a Mamba pool need a Mamba host pool over that Mamba
            pool, and a Mamba host pool needs both), SWA pools that do not fit together (the
            same rule, a window <= 0, an SWA pool over another full pool size or page size), a
            storage backend without a host pool, a Mamba pool with a storage backend but no
            ``mamba_storage_backend`` (or the reverse), or an SWA pool with a storage backend
            but no ``swa_storage_backend`` (or the reverse).
    """

    def __init__(
        self,
        device_pool: DeviceKVPool,
        page_size: int = 1,
        host_pool: HostKVPool | None = None,
        write_policy: str = "write_through",
        io_backend: str = "auto",
        enable_kv_events: bool = False,
        mamba_pool: MambaStatePool | None = None,
        mamba_host_pool: MambaHostPool | None = None,
        swa_pool: SWAKVPool | None = None,
        swa_host_pool: HostKVPool | None = None,
        sliding_window_size: int = 0,
        storage_backend: StorageBackend | None = None,
        prefetch_config: PrefetchConfig | None = None,
        mamba_storage_backend: StorageBackend | None = None,
        swa_storage_backend: StorageBackend | None = None,
    ) -> None:
        _check_swa_pools(
            device_pool, page_size, host_pool, swa_pool, swa_host_pool, sliding_window_size
        )
        if storage_backend is not None and host_pool is None:
            raise InvalidArgumentError(
                "HiCache: a storage backend needs a host pool (pages move storage <-> host)"
            )
        if (mamba_storage_backend is not None) != (
            storage_backend is not None and mamba_pool is not None
        ):
            raise InvalidArgumentError(
                "HiCache: a storage backend with a Mamba pool needs mamba_storage_backend (node "
                "states are stored beside the KV pages), and mamba_storage_backend needs both"
            )
        if (swa_storage_backend is not None) != (
            storage_backend is not None and swa_pool is not None
        ):
            raise InvalidArgumentError(
                "HiCache: a storage backend with an SWA pool needs swa_storage_backend (SWA "
                "windows are stored beside the KV pages), and swa_storage_backend needs both"
            )
        hybrid_host = host_pool is not None and mamba_pool is not None
        if hybrid_host != (mamba_host_pool is not None) or (
            mamba_host_pool is not None and mamba_host_pool.device_pool is not mamba_pool
        ):
            raise InvalidArgumentError(
                "HiCache: a host pool with a Mamba pool needs a mamba_host_pool over that Mamba "
                "pool (the host tier keeps each node's state with its KV), and a mamba_host_pool "
                "needs both"
            )
        if write_policy not in WRITE_POLICIES:
            raise InvalidArgumentError(
                f"HiCache: write_policy: expected one of {sorted(WRITE_POLICIES)}, "
                f"got {write_policy!r}"
            )
        if host_pool is not None and host_pool.page_size != page_size:
            raise InvalidArgumentError(
                f"HiCache: host_pool.page_size {host_pool.page_size} differs from page_size "
                f"{page_size}"
            )
        self.device_pool = device_pool
        self.host_pool = host_pool
        self.page_size = page_size
        self.write_policy = write_policy
        self.allocator = PageAllocator(device_pool.num_slots, page_size)
        num_host_slots = host_pool.num_slots if host_pool is not None else 0
        self.mamba_pool = mamba_pool
        self.mamba_host_pool = mamba_host_pool
        self.tree = RadixTree(
            page_size,
            device_pool.num_slots,
            num_host_slots,
            mamba_pool is not None,
            mamba_pool.num_slots if mamba_pool is not None else 0,
            mamba_host_pool.num_slots if mamba_host_pool is not None else 0,
            sliding_window_size if swa_pool is not None else 0,
            swa_host_pool.num_slots if swa_host_pool is not None else 0,
            page_hashes=storage_backend is not None,
        )
        self.swa_pool = swa_pool
        self.swa_host_pool = swa_host_pool
        self.sliding_window_size = sliding_window_size if swa_pool is not None else 0
        extra_pools: dict = {}
        if mamba_host_pool is not None:
            extra_pools["mamba"] = mamba_host_pool
        if swa_pool is not None and swa_host_pool is not None:
            extra_pools["swa"] = KVTransfer(swa_pool, swa_host_pool, io_backend)
        self.controller = (
            CacheController(device_pool, host_pool, io_backend, extra_pools)
            if host_pool is not None
            else None
        )
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._write_threshold = WRITE_POLICIES[write_policy] if host_pool is not None else None
        self._write_back = host_pool is not None and write_policy == "write_back"
        # In-flight transfers by ack id (the node id given to the tree's commit): the
        # transfer's lock receipt. Loads also hold a host lock on the ack id.
        self._ongoing_writes: dict[int, LockReceipt | None] = {}
        self._ongoing_loads: dict[int, LockReceipt] = {}
        self._state_writes: set[int] = set()  # ack ids of the writes that back up a state alone
        # KV events: None unless enabled. With events, the (source, destination) slots of each
        # in-flight transfer by ack id, so that its ack can report what was copied where.
        self.kv_events = KVEventPublisher(page_size) if enable_kv_events else None
        self._transfer_slots: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # Storage (L3): None without a backend. Prefetches in flight by request id (each holds a
        # host lock on its anchor), the host slots each holds outside the tree (written by the
        # prefetch thread's callbacks and by termination, under _lock), the tokens the last
        # terminated prefetch of a request inserted, and the host locks of storage backups by
        # node id (one per backup queued).
        self.storage: StorageController | None = None
        self._ongoing_prefetch: dict[object, PrefetchOperation] = {}
        self._prefetch_host: dict[PrefetchOperation, torch.Tensor] = {}
        self._prefetch_state: dict[PrefetchOperation, int] = {}  # hybrid: host state slots
        self._prefetch_swa: dict[PrefetchOperation, torch.Tensor] = {}  # SWA: host SWA slots
        self._prefetch_loaded: dict[object, int] = {}
        self._prefetch_tokens_occupied = 0  # tokens of the prefetches in flight
        self._storage_backups: dict[int, int] = {}
        if storage_backend is not None:
            assert host_pool is not None
            self.storage = StorageController(
                storage_backend,
                host_pool,
                page_size,
                prefetch_config or PrefetchConfig(),
                self._attach_prefetch_host,
                self._free_prefetch_host,
                state_backend=mamba_storage_backend,
                state_pool=mamba_host_pool if mamba_storage_backend is not None else None,
                swa_backend=swa_storage_backend,
                swa_pool=swa_host_pool if swa_storage_backend is not None else None,
            )

    @property
    def num_evicted_tokens(self) -> int:
        """Device tokens freed by eviction since construction or reset."""
        return self.stats.evicted_tokens

    # ---- tree operations ------------------------------------------------------------------------

    def match_prefix(
        self, key, extra_key: str | None = None, load_back: bool = False
    ) -> MatchResult:
        """Finds the longest cached prefix of ``key`` on device and host.

        Args:
            key: ``[num_tokens]`` token ids (list, int32/int64 CPU tensor, numpy array).
            extra_key: namespace; keys with different extra keys never share pages.
            load_back: when part of the match is host-only, also queue its load-back (see
                :meth:`init_load_back`) and return the match as it is after that: the loaded
                tokens then count in ``device_indices``. Their KV is valid once the batch's layer
                events fire (:meth:`ready_to_load_host_cache`, :meth:`wait_until_layer_ready`).

        Returns:
            MatchResult: ``device_indices`` is an int64 CPU tensor of the tree's device slots;
            ``host_hit_length`` counts the host-only tokens below ``last_device_node``. With a
            Mamba pool the match ends at the deepest node holding a usable state (see
            :class:`~hicache.RadixTree`) and ``mamba_branching_seqlen`` reports the Full tokens
            matched beyond it; continue from ``last_device_node`` with :meth:`fork_mamba`.
        """
        with self._lock, profiling.nvtx_range(profiling.MATCH_PREFIX):
            result = self.tree.match_prefix(key, extra_key)
            self.stats.match_calls += 1
            self.stats.device_hit_tokens += result.device_prefix_len
            self.stats.host_hit_tokens += result.host_hit_length
            if load_back and result.host_hit_length > 0:
                if self.init_load_back(result.best_match_node) > 0:
                    result = self.tree.match_prefix(key, extra_key)
            return result

    def insert(
        self,
        key,
        value: torch.Tensor,
        extra_key: str | None = None,
        swa_evicted_seqlen: int = 0,
    ) -> InsertResult:
        """Inserts ``key`` with device slots ``value`` (see :meth:`RadixTree.insert`).

        The caller keeps ownership of ``value[:prefix_len]`` (already cached: free them) and of
        ``value[cached_len:]`` (not cached: the unaligned tail, and everything from a node whose
        load-back is in flight or has failed, where the insert stops so that the caller's valid KV
        is never traded for KV that may turn out to be garbage); the tree owns the rest. Under a
        write-through policy, the inserted path's unbacked nodes are then queued for backup.

        SWA caches: ``swa_evicted_seqlen`` says the caller freed the SWA KV of its slots below
        it (the rest of its own slots are mapped); SWA tombstones above it take the caller's SWA
        KV (the mapping moves, and the caller's duplicates are then freed full-only by
        :meth:`free`).
        """
        return self._insert(key, value, extra_key, (), swa_evicted_seqlen)

    def _insert(
        self,
        key,
        value: torch.Tensor,
        extra_key: str | None,
        checkpoints=(),
        swa_evicted_seqlen: int = 0,
    ) -> InsertResult:
        """:meth:`insert`, publishing Mamba ``checkpoints`` before the write-through backups.

        A checkpoint's state is on its node before the backup is planned, so the backup carries
        it (a state published after its node's backup would never reach the host tier).
        """
        with self._lock, profiling.nvtx_range(profiling.INSERT):
            result = self.tree.insert(key, value, extra_key, -1, swa_evicted_seqlen)
            if result.swa_remap_dst.numel():  # SWA tombstones took the caller's SWA KV
                self._swa().move_mapping(result.swa_remap_dst, result.swa_remap_src)
                self.stats.swa_recovered_tokens += int(result.swa_remap_dst.numel())
            if self.kv_events is not None:
                # Only the pages the tree took: an insert stopped at a pending load leaves the
                # caller value[cached_len:], which must not be reported stored.
                cached = result.cached_len
                self.kv_events.on_device_insert(
                    key[:cached],
                    value[result.prefix_len : cached],
                    result.prefix_len // self.page_size,
                    extra_key,
                )
            self._publish_checkpoints(key, value, extra_key, checkpoints, swa_evicted_seqlen)
            self._write_through(result.last_node)
            self._write_through_states(result.last_node)
            return result

    def inc_lock_ref(self, node_id: int) -> LockReceipt:
        """Protects a node's device KV and its ancestors' from eviction; returns the receipt.

        The lock starts at the deepest device node at or above ``node_id``; with a Mamba pool it
        also locks that node's state. Pass the receipt's ``node_id`` and ``mamba_node_id`` to
        :meth:`dec_lock_ref`.
        """
        with self._lock:
            return self.tree.inc_lock_ref(node_id)

    def dec_lock_ref(self, node_id: int, mamba_node_id: int = -1, swa_lock_tokens: int = 0) -> int:
        """Releases a lock from :meth:`inc_lock_ref`; returns tokens that became evictable.

        The last lock on nodes whose load-back failed demotes them back to host-only and frees
        their device slots (a request that locked them was told by a :class:`TransferError`; its
        prefix KV is garbage and it must be aborted).

        Raises:
            InvalidArgumentError: not a receipt of a held lock (see ``RadixTree.dec_lock_ref``).
        """
        with self._lock:
            return self._dec_lock_ref(node_id, mamba_node_id, swa_lock_tokens)

    def evict(self, num_tokens: int) -> int:
        """Evicts at least ``num_tokens`` device tokens (whole pages), least recently used first.

        Backed-up nodes are demoted to host-only; unbacked ones are dropped, except under
        ``write_back``, where each is first backed up (a synchronous device -> host copy; SGLang's
        ``BackupKV`` + ``writing_check(write_back=True)``). When the host cannot take a backup the
        node is dropped instead of demoted (SGLang PR #27108: never demote without a copy).

        Returns:
            int: device tokens freed (fewer than asked when too little is evictable).
        """
        with self._lock, profiling.nvtx_range(profiling.EVICT):
            return self._evict_loop(self.tree.evict, num_tokens)

    def _evict_loop(self, evict, num_tokens: int) -> int:
        """Runs a tree eviction (``evict(n, write_back)``) until ``num_tokens`` are freed.

        Under write_back a victim the tree names in ``needs_backup`` is backed up synchronously,
        then evicted by the next round; when the host cannot take it, it is evicted without a
        backup (it is still the LRU victim). Stops when nothing more can go (a victim held by an
        in-flight host operation). Returns the tokens freed (device tokens; plus SWA tombstoned
        tokens for an SWA eviction).
        """
        remaining, freed = num_tokens, 0
        while remaining > 0:
            result = evict(remaining, self._write_back)
            n = self._free_evicted(result) + int(result.swa_indices.numel())
            stuck = False
            if result.needs_backup >= 0 and not self._backup_now(result.needs_backup):
                size = self.tree.node_info(result.needs_backup).num_tokens
                forced = evict(size, False)
                m = self._free_evicted(forced) + int(forced.swa_indices.numel())
                n, stuck = n + m, m == 0
            freed += n
            remaining -= n
            if result.needs_backup < 0 or stuck:
                break
        return freed

    def evict_swa(self, num_tokens: int) -> int:
        """SWA caches: frees at least ``num_tokens`` SWA tokens, least recently used first.

        Internal nodes become SWA tombstones (their Full KV stays); a device leaf goes whole as
        in :meth:`evict`. Under ``write_back`` an unbacked victim is backed up first (SGLang PR
        #28468), or, when the host cannot take it, evicted without a backup.

        Returns:
            int: SWA tokens freed (fewer when too little is evictable).
        """
        with self._lock, profiling.nvtx_range(profiling.EVICT):
            return self._evict_loop(self.tree.evict_swa, num_tokens)

    def evict_host(self, num_tokens: int) -> int:
        """Evicts at least ``num_tokens`` host tokens (whole pages) from host-only leaves.

        Returns:
            int: host tokens freed (fewer when too little is host-evictable).
        """
        with self._lock, profiling.nvtx_range(profiling.EVICT_HOST):
            freed = self.tree.evict_host(num_tokens)
            self._free_host(freed)
            return int(freed.numel())

    def evictable_size(self) -> int:
        """Tokens of device KV in unlocked nodes."""
        return self.tree.evictable_size()

    def protected_size(self) -> int:
        """Tokens of device KV in locked nodes."""
        return self.tree.protected_size()

    def total_size(self) -> int:
        """Tokens of device KV held by the tree."""
        return self.tree.total_size()

    def available_size(self) -> int:
        """Free device slots (tokens), not counting what eviction could free."""
        return self.allocator.available_size()

    # ---- load-back (host -> device) -------------------------------------------------------------

    def init_load_back(self, node_id: int) -> int:
        """Queues the load-back of the host-only part of the path ending at ``node_id``.

        SGLang's ``init_load_back`` / ``load_back``. ``node_id`` must be a match's
        ``best_match_node``: the only valid anchor (DESIGN.md failure class 4). The anchor is
        host-locked from the plan to the ack, so that no host eviction (triggered by the device
        allocation below, e.g. by a write-back) frees the source pages (SGLang PRs #26728, #31427);
        its device ancestors are locked while device slots are allocated, then the loaded path
        stays locked until the ack. The copy itself runs when :meth:`ready_to_load_host_cache` is
        called; the loaded slots hold valid KV once its layer events fire.

        Returns:
            int: tokens queued for loading; 0 when nothing is host-only there or the device
            cannot hold them (the caller recomputes them instead).

        Raises:
            IndexOutOfRangeError: unknown node id.
            TransferError: a backup that the device allocation waited for failed (see
                :meth:`alloc`); nothing was queued and no lock is left held.
        """
        with self._lock, profiling.nvtx_range(profiling.LOAD_BACK):
            if self.controller is None:
                return 0
            plan = self.tree.load_back_plan(node_id)
            if plan.num_tokens == 0:
                return 0
            self.tree.inc_host_lock_ref(node_id)
            ancestors = self.tree.inc_lock_ref(node_id)
            host_state = plan.states[-1] if plan.states else -1
            device_indices = device_state = swa_device = None
            try:
                device_indices = self._alloc_full(plan.num_tokens)
                if any(plan.swa):  # the host SWA copies come back into fresh SWA slots
                    swa_device = self._alloc_swa_for(_flagged(device_indices, plan))
                if host_state >= 0:  # the anchor's state comes back with its KV
                    device_state = self.alloc_mamba(1)
            except BaseException as e:
                # Whatever alloc raised (it can also raise TransferError, or be interrupted),
                # release what was allocated and both locks, or they pin the path forever.
                if device_indices is not None:
                    self._free_device(device_indices)
                self._dec_receipt(ancestors)
                self.tree.dec_host_lock_ref(node_id)
                if not isinstance(e, PoolExhaustedError):
                    raise
                self.stats.load_back_failed_tokens += plan.num_tokens
                return 0
            state = int(device_state[0]) if device_state is not None else -1
            self.tree.commit_load_back(node_id, device_indices, state)
            self._remember_slots("load", node_id, plan.indices, device_indices)
            self._dec_receipt(ancestors)
            self._ongoing_loads[node_id] = self.tree.inc_lock_ref(node_id)
            transfers: tuple[PoolTransfer, ...] = ()
            if device_state is not None:
                host = torch.tensor([host_state], dtype=torch.int64)
                transfers = (PoolTransfer("mamba", host, device_state),)
            if swa_device is not None:
                transfers += (PoolTransfer("swa", plan.swa_indices, swa_device),)
            self._controller().load(plan.indices, device_indices, node_id, transfers)
            self.stats.load_back_tokens += plan.num_tokens
            return plan.num_tokens

    def ready_to_load_host_cache(self) -> int:
        """Starts every queued load-back, layer by layer (SGLang's ``ready_to_load_host_cache``).

        Returns:
            int: the consumer index of this batch's layer events (for
            :meth:`wait_until_layer_ready`), or -1 when nothing was queued.
        """
        with self._lock:
            return self.controller.start_loading() if self.controller is not None else -1

    def wait_until_layer_ready(self, layer: int, consumer_index: int | None = None) -> None:
        """Waits until layer ``layer`` of a load batch is on device (SGLang's ``wait_until``).

        On CUDA the current stream waits for that layer's event (the host does not block);
        without CUDA the caller blocks until the layer has been copied. Does not take the cache's
        lock. A model calls it before reading layer ``layer``'s KV.

        Args:
            layer: layer index.
            consumer_index: a value returned by :meth:`ready_to_load_host_cache` (default: the
                latest).

        Raises:
            TransferError: the batch failed before copying this layer (its KV is not there; the
                next :meth:`check_hicache_events` undoes the load).
        """
        if self.controller is not None:
            self.controller.wait_until_layer_ready(layer, consumer_index)

    # ---- acks -----------------------------------------------------------------------------------

    def check_hicache_events(self, block: bool = False) -> None:
        """Submits queued backups and applies finished transfers to the tree.

        SGLang's ``check_hicache_events``: a finished backup clears its node's pending mark and
        releases its lock; a finished load releases the loaded path's locks. A failed copy is
        undone in the tree (its slots freed; the garbage it wrote is never served), counted in
        :attr:`stats`, and then raised. A failed load's nodes that running requests have locked
        are never matched again and go back to host-only (their device slots freed) when the last
        of those requests unlocks them; such a request must be aborted (its own
        :meth:`wait_until_layer_ready` raised too), and ``cache_*_req`` never caches anything
        under them.

        Args:
            block: wait for every submitted transfer first.

        Raises:
            TransferError: a copy failed; the cache is consistent and the failed transfer undone.
        """
        if self.controller is None:
            return
        with self._lock, profiling.nvtx_range(profiling.ACK):
            errors: list[TransferError] = []
            self.controller.start_writing()
            self._apply_acks(self.controller.writing_check, self._finish_write, block, errors)
            self._apply_acks(self.controller.loading_check, self._finish_load, block, errors)
            if self.storage is not None:
                if block:
                    self.storage.wait_backups()
                self._apply_storage_acks()
            if errors:
                raise errors[0]

    def flush(self) -> None:
        """Starts every queued transfer, waits for all of them and applies their acks.

        Raises:
            TransferError: as :meth:`check_hicache_events`.
        """
        if self.controller is None:
            return
        with self._lock:
            self.controller.start_loading()
            self.check_hicache_events(block=True)

    def _apply_acks(self, check, finish, block: bool, errors: list[TransferError]) -> None:
        """Pops acks from ``check`` until none is ready; a failed batch is undone via ``finish``.

        ``check`` returns the successes that precede a failed batch and raises for that batch only
        on its next call, so the loop stops only at a call that returns nothing: otherwise a
        failed batch could stay unapplied (its nodes locked, its garbage marked as copied).
        """
        while True:
            try:
                ack_ids = check(block)
            except TransferError as e:
                for ack_id in e.ack_ids:
                    finish(ack_id, ok=False)
                errors.append(e)
                continue
            if not ack_ids:
                return
            for ack_id in ack_ids:
                finish(ack_id, ok=True)

    def _remember_slots(self, kind: str, ack_id: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """With KV events on, keeps a transfer's slots until its ack reports the copy."""
        if self.kv_events is not None:
            self._transfer_slots[(kind, ack_id)] = (src, dst)

    def _report_copy(self, kind: str, ack_id: int, ok: bool) -> None:
        """With KV events on, reports a finished copy (nothing for a failed one)."""
        slots = self._transfer_slots.pop((kind, ack_id), None)
        if ok and slots is not None and self.kv_events is not None:
            src, dst = (Medium.GPU, Medium.CPU) if kind == "write" else (Medium.CPU, Medium.GPU)
            self.kv_events.on_copied(src, slots[0], dst, slots[1])

    def _finish_write(self, ack_id: int, ok: bool) -> None:
        receipt = self._ongoing_writes.pop(ack_id)
        self._report_copy("write", ack_id, ok)
        if ack_id in self._state_writes:  # a state alone (an incremental backup)
            self._state_writes.remove(ack_id)
            if ok:
                self.tree.finish_state_backup(ack_id)
                self._backup_state_to_storage(ack_id)
            else:
                self.tree.abort_state_backup(ack_id)
                self._free_host_states()
        elif ok:
            self._backup_to_storage(ack_id)  # its plan is read off the pending marks
            self.tree.finish_backup(ack_id)
        else:
            freed = self.tree.abort_backup(ack_id)
            self.stats.backup_failed_tokens += int(freed.numel())
            self._free_host(freed, count=False)
        if receipt is not None:
            self._dec_receipt(receipt)

    def _finish_load(self, ack_id: int, ok: bool) -> None:
        # The tree records the outcome while the load's lock still holds the nodes; releasing it
        # then demotes a failed load's nodes unless a request holds them too (then its unlock
        # does), so their garbage is never served.
        receipt = self._ongoing_loads.pop(ack_id)
        self._report_copy("load", ack_id, ok)
        if ok:
            self.tree.finish_load_back(ack_id)
        else:
            self.stats.load_back_failed_tokens += self.tree.abort_load_back(ack_id)
        self.tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id, receipt.swa_lock_tokens)
        self.tree.dec_host_lock_ref(ack_id)
        self._free_failed_load_slots()

    def _dec_lock_ref(self, node_id: int, mamba_node_id: int = -1, swa_lock_tokens: int = 0) -> int:
        """``tree.dec_lock_ref``, then frees the device slots of failed loads it demoted."""
        if not self.tree.load_failed_size():  # nothing it could demote
            return self.tree.dec_lock_ref(node_id, mamba_node_id, swa_lock_tokens)
        delta = self.tree.dec_lock_ref(node_id, mamba_node_id, swa_lock_tokens)
        self._free_failed_load_slots()
        return delta

    def _dec_receipt(self, receipt: LockReceipt) -> int:
        """Releases the lock of ``receipt`` (all its parts)."""
        return self._dec_lock_ref(receipt.node_id, receipt.mamba_node_id, receipt.swa_lock_tokens)

    def _free_failed_load_slots(self) -> None:
        if self.mamba_pool is not None:
            states = self.tree.take_failed_load_states()
            if states.numel():
                self.mamba_pool.free(states)
        freed = self.tree.take_failed_load_slots()
        if freed.numel():
            self._free_device(freed)
            if self.kv_events is not None:  # a load under the failed one may have been reported
                self.kv_events.on_removed(Medium.GPU, freed)

    # ---- backup (device -> host) ----------------------------------------------------------------

    def _write_through(self, node_id: int) -> None:
        """Queues backups of the unbacked nodes on the path to ``node_id`` (write-through)."""
        if self._write_threshold is None:
            return
        plan = self.tree.backup_plan(node_id, self._write_threshold)
        if plan.num_tokens == 0:
            return
        host = self._alloc_host(plan.num_tokens)
        num_nodes = len(plan.node_ids)
        if host is None:
            # Back up the longest root-first run of nodes that fits: coverage stays a prefix.
            fits = self._host_allocator().available_size() + self.tree.host_evictable_size()
            num_nodes, total = 0, 0
            for length in plan.lengths:
                if total + length > fits:
                    break
                num_nodes, total = num_nodes + 1, total + length
            self.stats.backup_failed_tokens += plan.num_tokens - total
            host = self._alloc_host(total) if total else None
            if host is None:
                return
        start = 0
        states = plan.states or (-1,) * len(plan.node_ids)
        swa = plan.swa or (False,) * len(plan.node_ids)
        for node_id_i, length, state, with_swa in zip(
            plan.node_ids[:num_nodes], plan.lengths, states, swa, strict=False
        ):
            end = start + length
            host_state, transfers = self._state_backup(state)
            host_swa, swa_transfers = self._swa_backup(plan.indices[start:end], with_swa)
            transfers += swa_transfers
            self.tree.commit_backup(node_id_i, host[start:end], host_state, host_swa)
            self._ongoing_writes[node_id_i] = self.tree.inc_lock_ref(node_id_i)
            self._remember_slots("write", node_id_i, plan.indices[start:end], host[start:end])
            self._controller().write(plan.indices[start:end], host[start:end], node_id_i, transfers)
            self.stats.backup_tokens += length
            start = end

    def _write_through_states(self, node_id: int) -> None:
        """Queues the incremental backups of states published on already backed-up nodes.

        SGLang's ``needs_incremental_backup``: a checkpoint published on a node whose KV is on
        host already would otherwise never reach the host tier. Write-through policies only.
        """
        if self._write_threshold is None or self.mamba_host_pool is None:
            return
        plan = self.tree.state_backup_plan(node_id)
        for node, state in zip(plan.node_ids, plan.states, strict=True):
            host_state, transfers = self._state_backup(state)
            if host_state < 0:
                continue
            self.tree.commit_state_backup(node, host_state)
            self._ongoing_writes[node] = self.tree.inc_lock_ref(node)
            self._state_writes.add(node)
            self._controller().write(_empty_slots(), _empty_slots(), node, transfers)

    def _state_backup(self, state: int) -> tuple[int, tuple[PoolTransfer, ...]]:
        """A host slot and the pool transfer for the backup of device state ``state`` (or -1).

        Without a free host state slot the node is backed up without its state (it stays
        matchable from device; from host only where another backup holds its state).
        """
        if state < 0 or self.mamba_host_pool is None:
            return -1, ()
        if self.mamba_host_pool.available_size() == 0:
            self.stats.mamba_backup_skipped += 1
            return -1, ()
        host_state = self.mamba_host_pool.alloc(1)
        device_state = torch.tensor([state], dtype=torch.int64)
        return int(host_state[0]), (PoolTransfer("mamba", host_state, device_state),)

    def _swa_backup(
        self, device_indices: torch.Tensor, with_swa: bool
    ) -> tuple[torch.Tensor | None, tuple[PoolTransfer, ...]]:
        """Host SWA slots and the pool transfer backing up the SWA KV of ``device_indices``.

        (None, ()) when the node's SWA KV is not live or there is no SWA host pool. The SWA host
        pool has as many slots as the host pool and holds a subset of its tokens, so it never
        runs out before the host pool does.
        """
        if not with_swa or self.swa_host_pool is None:
            return None, ()
        host_swa = self.swa_host_pool.allocator.alloc(device_indices.numel())
        device_swa = self._swa().translate(device_indices)
        return host_swa, (PoolTransfer("swa", host_swa, device_swa),)

    def _backup_now(self, node_id: int) -> bool:
        """Backs device node ``node_id`` up synchronously (write-back eviction); False if not."""
        controller = self._controller()
        plan = self.tree.backup_plan(node_id, 0)
        length = plan.lengths[-1]
        host = self._alloc_host(length)
        if host is None:
            self.stats.backup_failed_tokens += length
            return False
        host_state, transfers = self._state_backup(plan.states[-1] if plan.states else -1)
        host_swa, swa_transfers = self._swa_backup(
            plan.indices[-length:], bool(plan.swa and plan.swa[-1])
        )
        transfers += swa_transfers
        self.tree.commit_backup(node_id, host, host_state, host_swa)
        self._ongoing_writes[node_id] = None  # no lock: we wait for the copy right here
        self._remember_slots("write", node_id, plan.indices[-length:], host)
        controller.write(plan.indices[-length:], host, node_id, transfers)
        self.stats.backup_tokens += length
        controller.start_writing()
        errors: list[TransferError] = []
        self._apply_acks(controller.writing_check, self._finish_write, True, errors)
        # A failed copy was undone (and counted): the node is unbacked again and gets dropped.
        return self.tree.node_info(node_id).has_host_value

    # ---- storage (L3): prefetch and backup ------------------------------------------------------

    def prefetch_from_storage(
        self, req_id: object, last_host_node: int, new_input_tokens, extra_key: str | None = None
    ) -> bool:
        """Starts reading a request's next pages from storage into host memory.

        SGLang's ``prefetch_from_storage`` (reference §3.8): ``new_input_tokens`` are the tokens
        after the request's L1 + L2 match, whose anchor is ``last_host_node`` (a match's
        ``last_host_node``: the root, or a node with a host copy). The anchor is host-locked
        until the prefetch ends; the prefetch thread then asks the backend how many leading
        pages it holds, allocates host pages for that hit only (evicting host leaves if
        needed) and reads them in batches. Poll :meth:`check_prefetch_progress` before
        scheduling the request; then match again (the prefetched pages are host hits, loaded
        back by ``match_prefix(load_back=True)``).

        Args:
            req_id: the request's id (hashable); one prefetch per request at a time.
            last_host_node: the match's ``last_host_node``.
            new_input_tokens: ``[num_tokens]`` token ids after the match (list or CPU tensor);
                only whole pages are prefetched.
            extra_key: the request's namespace (as in :meth:`match_prefix`).

        Returns:
            bool: whether a prefetch was queued. False without a storage backend (or after
            :meth:`close`), when the whole pages are fewer than the threshold (256 tokens by
            default), when the prefetches in flight would then ask for more than half the host
            pool (SGLang's ``prefetch_capacity_limit``), or when the anchor has no host copy.

        Raises:
            InvalidArgumentError: ``req_id`` already has a prefetch in flight.
            IndexOutOfRangeError: unknown ``last_host_node``.
        """
        if self.storage is None or self.storage.closed:
            return False
        tokens = torch.as_tensor(new_input_tokens, dtype=torch.int64).reshape(-1)
        aligned = tokens.numel() - tokens.numel() % self.page_size
        with self._lock, profiling.nvtx_range(profiling.PREFETCH, aligned):
            if req_id in self._ongoing_prefetch:
                raise InvalidArgumentError(
                    f"prefetch_from_storage: request {req_id!r} already has a prefetch in flight"
                )
            if aligned < self.storage.threshold_tokens:
                return False
            # SGLang's rate limiter: prefetches in flight take at most half the host pool
            # (prefetch_capacity_limit in cache mode, reference §6.4).
            capacity = self._host_allocator().num_slots // 2
            if self._prefetch_tokens_occupied + aligned > capacity:
                return False
            info = self.tree.node_info(last_host_node)
            if last_host_node == _ROOT_ID:
                previous = namespace_seed(extra_key) if extra_key else None
            elif not info.has_host_value or info.backup_pending:
                return False  # SGLang prefetches only below a backed-up anchor (or the root)
            else:
                previous = self.tree.node_page_hashes(last_host_node)[-1]
            self.tree.inc_host_lock_ref(last_host_node)
            op = PrefetchOperation(
                req_id,
                last_host_node,
                tokens[:aligned].clone(),
                extra_key,
                previous,
                self.page_size,
                needs_state=self.mamba_pool is not None,
                swa_pages=-(-self.sliding_window_size // self.page_size),
            )
            self._ongoing_prefetch[req_id] = op
            self._prefetch_tokens_occupied += aligned
            self._prefetch_loaded.pop(req_id, None)
            self.storage.prefetch(op)
            self.stats.storage_prefetches += 1
            return True

    def check_prefetch_progress(self, req_id: object) -> bool:
        """Whether the request may be scheduled now; ends its prefetch when it may.

        SGLang's ``check_prefetch_progress``: by the prefetch policy, ``best_effort`` ends the
        prefetch at once with whatever pages are read; ``wait_complete`` waits until the
        prefetch thread is done with it (every hit page read, or a failure); ``timeout`` waits
        for that or for ``timeout_base + timeout_per_ki_token * tokens / 1024`` seconds. Ending
        it inserts the read pages as host nodes (:meth:`terminate_prefetch`).

        Returns:
            bool: True when the request may go on (also when it has no prefetch in flight),
            False when it should wait.
        """
        if self.storage is None:
            return True
        with self._lock:
            op = self._ongoing_prefetch.get(req_id)
            if op is None:
                return True
            config = self.storage.config
            if not op.is_finished():
                if config.policy == "wait_complete":
                    return False
                if config.policy == "timeout" and (
                    time.monotonic() - op.created_s < config.timeout_s(op.num_tokens)
                ):
                    return False
            self.terminate_prefetch(req_id)
            return True

    def terminate_prefetch(self, req_id: object) -> int:
        """Ends a request's prefetch now and inserts the pages read so far.

        SGLang's ``terminate_prefetch`` + ``_handle_prefetch_result``: the leading pages read and
        verified become host-only nodes below the anchor (``RadixTree.insert_host``); host pages
        duplicating pages the tree has meanwhile are freed, and so are pages not read (at once,
        or by the prefetch thread when its batch in flight ends); the anchor's host lock is
        released. A request that is aborted calls this too.

        Returns:
            int: tokens inserted in the tree (0 when none, or no prefetch in flight); also kept
            for :meth:`pop_prefetch_loaded_tokens`.
        """
        if self.storage is None:
            return 0
        with self._lock:
            op = self._ongoing_prefetch.pop(req_id, None)
            if op is None:
                return 0
            self._prefetch_tokens_occupied -= op.num_tokens
            with profiling.nvtx_range(profiling.PREFETCH_DONE):
                pages, taken, rest, rest_is_ours = op.terminate()
                inserted = 0
                if taken is not None:
                    assert rest is not None  # both or neither
                    if rest_is_ours:
                        self._prefetch_host.pop(op, None)
                        self._free_host(rest, count=False)
                        if pages == 0:
                            self._free_prefetch_extras(op)
                    else:  # the prefetch thread frees it (_free_prefetch_host)
                        self._prefetch_host[op] = rest
                    inserted = self._insert_prefetched(op, pages, taken)
                self.tree.dec_host_lock_ref(op.anchor)
                self._prefetch_loaded[req_id] = inserted
                return inserted

    def pop_prefetch_loaded_tokens(self, req_id: object) -> int:
        """Tokens the request's last ended prefetch inserted; 0 if none.

        SGLang's ``prefetch_loaded_tokens_by_reqid.pop(rid, 0)``.
        """
        with self._lock:
            return self._prefetch_loaded.pop(req_id, 0)

    def wait_prefetch(self, req_id: object, timeout: float | None = None) -> bool:
        """Blocks until the prefetch thread is done with the request's prefetch (tests, tools).

        Must not be called while holding the cache's lock (the prefetch thread needs it to
        allocate host pages). True when done or when there is no prefetch in flight.
        """
        with self._lock:
            op = self._ongoing_prefetch.get(req_id)
        return True if op is None else op.wait(timeout)

    def _insert_prefetched(self, op: PrefetchOperation, pages: int, taken: torch.Tensor) -> int:
        """Inserts ``pages`` read pages below the anchor; frees the duplicates. Returns tokens."""
        if pages == 0:
            return 0
        num = pages * self.page_size
        state = self._prefetch_state.pop(op, -1)
        swa = self._prefetch_swa.pop(op, None)  # all-or-nothing: the window ending at num
        try:
            result = self.tree.insert_host(
                op.anchor, op.tokens[:num], taken, op.extra_key, state, swa
            )
        except InvalidArgumentError:
            # The anchor's load-back failed meanwhile: nothing goes below garbage.
            self._free_host(taken, count=False)
            if state >= 0:
                self._mamba_host().free(torch.tensor([state], dtype=torch.int64))
            if swa is not None:
                self._free_swa_host(swa)
            return 0
        if state >= 0 and not result.mamba_taken:
            self._mamba_host().free(torch.tensor([state], dtype=torch.int64))
        if result.swa_host_spare.numel():
            self._free_swa_host(result.swa_host_spare)
        if self.kv_events is not None:
            path = self._path_tokens(op.anchor)
            self.kv_events.on_insert(
                Medium.CPU,
                torch.cat((path, op.tokens[: result.cached_len])),
                taken[result.prefix_len : result.cached_len],
                (len(path) + result.prefix_len) // self.page_size,
                op.extra_key,
            )
        duplicates = torch.cat((taken[: result.prefix_len], taken[result.cached_len :]))
        if duplicates.numel():
            self._free_host(duplicates, count=False)
        inserted = result.cached_len - result.prefix_len
        self.stats.storage_hit_tokens += inserted
        return inserted

    def _path_tokens(self, node_id: int) -> torch.Tensor:
        """The tokens from the root to the end of ``node_id`` (KV events only; O(depth))."""
        parts = []
        while node_id != _ROOT_ID:
            parts.append(torch.tensor(self.tree.node_key(node_id), dtype=torch.int64))
            node_id = self.tree.node_info(node_id).parent_id
        return torch.cat(parts[::-1]) if parts else torch.empty(0, dtype=torch.int64)

    def _attach_prefetch_host(
        self, op: PrefetchOperation, num_tokens: int, min_tokens: int
    ) -> torch.Tensor | None:
        """The prefetch thread's host allocation for a storage hit (see StorageController)."""
        with self._lock:
            allocator = self._host_allocator()
            room = allocator.available_size() + self.tree.host_evictable_size()
            room -= room % self.page_size
            take = min(num_tokens, room)
            if take < min_tokens:
                return None
            if op.needs_state and self._mamba_host().available_size() == 0:
                return None  # no host slot for the state: an all-or-nothing prefetch cannot run
            host = self._alloc_host(take)
            if host is None:
                return None
            swa = None
            if op.swa_pages:  # the window's pages, the last ones
                window = min(op.swa_pages * self.page_size, take)
                swa_allocator = self._swa_host().allocator
                # The tree's host SWA slots are a subset of its host slots' tokens, so this
                # holds unless prefetch windows outgrow their pages (never: window <= take).
                if swa_allocator.available_size() < window:
                    self._free_host(host, count=False)
                    return None
                swa = swa_allocator.alloc(window)
            state = -1
            if op.needs_state:
                state = int(self._mamba_host().alloc(1)[0])
            if not op._attach(host, state, swa):  # terminated meanwhile
                self._free_host(host, count=False)
                if state >= 0:
                    self._mamba_host().free(torch.tensor([state], dtype=torch.int64))
                if swa is not None:
                    self._free_swa_host(swa)
                return None
            self._prefetch_host[op] = host
            if state >= 0:
                self._prefetch_state[op] = state
            if swa is not None:
                self._prefetch_swa[op] = swa
            return host

    def _free_prefetch_host(self, op: PrefetchOperation, indices: torch.Tensor) -> None:
        """The prefetch thread hands back host slots (and state) of a terminated prefetch."""
        with self._lock:
            self._prefetch_host.pop(op, None)
            self._free_host(indices, count=False)
            if op.taken_pages() == 0:
                self._free_prefetch_extras(op)

    def _free_prefetch_extras(self, op: PrefetchOperation) -> None:
        """Frees the host state and SWA slots of a hybrid prefetch that inserted nothing."""
        state = self._prefetch_state.pop(op, -1)
        if state >= 0:
            self._mamba_host().free(torch.tensor([state], dtype=torch.int64))
        swa = self._prefetch_swa.pop(op, None)
        if swa is not None:
            self._free_swa_host(swa)

    def _swa_host(self) -> HostKVPool:
        if self.swa_host_pool is None:
            raise InvariantError("a host SWA operation ran on a cache without an SWA host pool")
        return self.swa_host_pool

    def _free_swa_host(self, indices: torch.Tensor) -> None:
        """Frees host SWA slots that no node holds."""
        self._swa_host().allocator.free(indices)

    def _mamba_host(self) -> MambaHostPool:
        if self.mamba_host_pool is None:
            raise InvariantError("a host Mamba state operation ran on a cache without one")
        return self.mamba_host_pool

    def _backup_to_storage(self, node_id: int) -> None:
        """Queues the storage backup of the node whose host copy was just acked.

        SGLang's ``write_backup_storage`` for the node and its split-off fragments: their pages
        keyed by their page hashes, minus keys queued already (the backend skips keys it
        stores); the node is host-locked (a path lock) until the backup thread's ack.
        """
        if self.storage is None:
            return
        plan = self.tree.storage_backup_plan(node_id)
        if not plan.node_ids:
            return
        keys: list[str] = []
        states: list[tuple[str, int]] = []
        swa_keys: list[str] = []  # SWA: the pages of the nodes with a host SWA copy
        swa = plan.swa or (False,) * len(plan.node_ids)
        for n, with_swa in zip(plan.node_ids, swa, strict=True):
            digests = [d.hex() for d in self.tree.node_page_hashes(n)]
            keys += digests
            if self.storage.state_backend is not None:
                info = self.tree.node_info(n)
                if info.has_mamba_host_value:  # stored under the node's last page hash
                    states.append((digests[-1], info.mamba_host_value))
            if with_swa and self.storage.swa_backend is not None:
                swa_keys += digests  # under the same page hashes, in the SWA backend
        self._queue_storage_backup(node_id, keys, plan.indices, states, swa_keys, plan.swa_indices)

    def _backup_state_to_storage(self, node_id: int) -> None:
        """Queues the storage backup of a node state backed up to host on its own (hybrid)."""
        if self.storage is None or self.storage.state_backend is None:
            return
        info = self.tree.node_info(node_id)
        if not info.has_mamba_host_value:
            return
        key = self.tree.node_page_hashes(node_id)[-1].hex()
        self._queue_storage_backup(node_id, [], _empty_slots(), [(key, info.mamba_host_value)])

    def _queue_storage_backup(
        self,
        node_id: int,
        keys: list[str],
        host: torch.Tensor,
        states: list[tuple[str, int]],
        swa_keys: list[str] | None = None,
        swa_host: torch.Tensor | None = None,
    ) -> None:
        """Host-locks ``node_id`` and queues its storage backup (unlocks if nothing is queued)."""
        assert self.storage is not None
        self.tree.inc_host_lock_ref(node_id)
        queued = self.storage.backup(node_id, keys, host, states, swa_keys or (), swa_host)
        if queued == 0 and self.storage.num_queued_extras() == 0:
            self.tree.dec_host_lock_ref(node_id)
            return
        self._storage_backups[node_id] = self._storage_backups.get(node_id, 0) + 1
        self.stats.storage_backup_tokens += queued * self.page_size

    def _apply_storage_acks(self) -> None:
        """Releases the host locks of finished storage backups."""
        assert self.storage is not None
        for node_id, _, failed in self.storage.pop_backup_acks():
            self.stats.storage_backup_failed_tokens += failed * self.page_size
            self.tree.dec_host_lock_ref(node_id)
            left = self._storage_backups[node_id] - 1
            if left:
                self._storage_backups[node_id] = left
            else:
                del self._storage_backups[node_id]

    def _end_storage_work(self) -> None:
        """Ends every prefetch (inserting what was read) and waits for every storage backup.

        Called without the lock held: the prefetch thread may need it to hand pages back.
        """
        if self.storage is None:
            return
        with self._lock:
            for req_id in list(self._ongoing_prefetch):
                self.terminate_prefetch(req_id)
        self.storage.wait_backups()
        deadline = time.monotonic() + 30.0
        while True:  # prefetch threads still reading a terminated prefetch free its pages
            with self._lock:
                if not self._prefetch_host:
                    break
            if time.monotonic() > deadline:
                raise InvariantError("the prefetch thread did not hand back its host pages")
            time.sleep(0.001)
        with self._lock:
            self._apply_storage_acks()

    # ---- slots ----------------------------------------------------------------------------------

    def alloc(self, num_tokens: int) -> torch.Tensor:
        """Allocates device slots for ``num_tokens`` tokens, evicting LRU pages when needed.

        SWA caches: every slot also gets an SWA slot (the full -> SWA mapping), evicting SWA KV
        when the SWA pool is short (SGLang's ``SWATokenToKVPoolAllocator.alloc``).

        Args:
            num_tokens: tokens to hold, >= 0.

        Returns:
            torch.Tensor: ``[ceil(num_tokens / page_size) * page_size]`` int64 CPU tensor of whole
            pages; the request owns them until it frees them or the tree takes them.

        Raises:
            InvalidArgumentError: ``num_tokens < 0``.
            PoolExhaustedError: free plus evictable slots cannot hold the request (after waiting
                for in-flight backups, whose locks make nodes unevictable); nothing was allocated.
            TransferError: a backup it waited for failed (undone in the tree; see
                :meth:`check_hicache_events`); nothing was allocated.
        """
        with self._lock:
            full = self._alloc_full(num_tokens)
            if self.swa_pool is not None:
                try:
                    self._alloc_swa_for(full)
                except BaseException:
                    self.allocator.free(full)
                    raise
            return full

    def _alloc_full(self, num_tokens: int) -> torch.Tensor:
        """:meth:`alloc` without the SWA side."""
        if num_tokens < 0:
            raise InvalidArgumentError(f"alloc: num_tokens must be >= 0, got {num_tokens}")
        need = -(-num_tokens // self.page_size) * self.page_size
        with self._lock:
            free = self.allocator.available_size()
            if need > free and need > free + self.tree.evictable_size() and self._ongoing_writes:
                self.check_hicache_events(block=True)  # backups hold locks: let them finish
            if need > free:
                evictable = self.tree.evictable_size()
                if need > free + evictable:
                    raise PoolExhaustedError(
                        f"alloc: need {need} slots but only {free} are free and {evictable} "
                        f"evictable ({self.tree.protected_size()} locked by running requests, pool "
                        f"of {self.allocator.num_slots})"
                    )
                self.evict(need - free)
                if self.allocator.available_size() < need:
                    raise PoolExhaustedError(
                        f"alloc: need {need} slots but eviction freed only "
                        f"{self.allocator.available_size()} (nodes held by host operations)"
                    )
            return self.allocator.alloc(need)

    def _alloc_swa_for(self, full_indices: torch.Tensor) -> torch.Tensor:
        """Maps ``full_indices`` to fresh SWA slots, evicting SWA KV when the pool is short.

        Raises:
            PoolExhaustedError: free plus evictable SWA slots cannot hold them (the rest are
                locked: running requests' windows); nothing was mapped.
        """
        pool = self._swa()
        missing = full_indices.numel() - pool.available_size()
        if missing > 0:
            if missing > self.tree.swa_evictable_size() and self._ongoing_writes:
                self.check_hicache_events(block=True)  # backups hold locks: let them finish
            self.evict_swa(missing)
            if pool.available_size() < full_indices.numel():
                raise PoolExhaustedError(
                    f"alloc: need {full_indices.numel()} SWA slots but only "
                    f"{pool.available_size()} are free after eviction "
                    f"({self.tree.swa_protected_size()} held by running requests' windows, SWA "
                    f"pool of {pool.num_slots})"
                )
        return pool.alloc_for(full_indices)

    def free(self, indices: torch.Tensor) -> None:
        """Returns request-owned slots (whole pages) to the allocator (and their SWA slots)."""
        with self._lock:
            self._free_device(indices)

    def _free_device(self, indices: torch.Tensor) -> None:
        """Frees full device slots, with the SWA slots of those that have one."""
        if self.swa_pool is not None:
            self.swa_pool.free_full(indices)
        self.allocator.free(indices)

    def free_swa_out_of_window(self, req: Req, seqlen: int | None = None) -> int:
        """SWA caches: frees the SWA KV of the request's own tokens that left its window.

        SGLang's ``free_swa_out_of_window_slots`` (PR #29860): with ``seqlen`` tokens computed
        (default ``len(req.token_ids)``), tokens below
        ``page_floor(seqlen - ceil_align(max(window, page_size), page_size))`` are no longer read
        by the sliding-window layers, so their SWA slots go back to the pool; at least one
        page-aligned window stays live, so the request's last inserted node is never all
        tombstone. Only the request's own slots (``>= req.prefix_len``) are freed; the frontier
        is kept in ``req.swa_evicted_seqlen`` and passed to the insert of
        :meth:`cache_finished_req` / :meth:`cache_unfinished_req`.

        Returns:
            int: SWA tokens freed by this call.

        Raises:
            InvalidArgumentError: no SWA pool.
        """
        if self.swa_pool is None:
            raise InvalidArgumentError("free_swa_out_of_window: this cache has no SWA pool")
        page = self.page_size
        seqlen = len(req.token_ids) if seqlen is None else seqlen
        keep = -(-max(self.sliding_window_size, page) // page) * page
        frontier = max(seqlen - keep, 0) // page * page
        start = max(req.swa_evicted_seqlen, req.prefix_len)
        if frontier <= start:
            return 0
        with self._lock:
            freed = self.swa_pool.free_full(req.kv_indices[start:frontier])
            req.swa_evicted_seqlen = frontier
            self.stats.swa_window_freed_tokens += freed
            return freed

    # ---- Mamba states (hybrid models) -----------------------------------------------------------

    def alloc_mamba(self, num_states: int) -> torch.Tensor:
        """Allocates Mamba state slots, evicting least recently used cached states when needed.

        Args:
            num_states: states to allocate, >= 0.

        Returns:
            torch.Tensor: ``[num_states]`` int64 CPU slot indices, owned by the caller.

        Raises:
            InvalidArgumentError: no Mamba pool, or ``num_states < 0``.
            PoolExhaustedError: free plus evictable states cannot hold them (the rest are locked by
                running requests), after waiting for in-flight backups, whose locks hold states
                too; nothing was allocated.
            TransferError: a backup it waited for failed (undone in the tree); nothing was
                allocated.
        """
        pool = self._mamba()
        if num_states < 0:
            raise InvalidArgumentError(f"alloc_mamba: num_states must be >= 0, got {num_states}")
        with self._lock:
            missing = num_states - pool.available_size()
            if missing > self.tree.mamba_evictable_size() and self._ongoing_writes:
                self.check_hicache_events(block=True)  # backups lock their states: let them land
            if missing > 0:
                if missing > self.tree.mamba_evictable_size():
                    raise PoolExhaustedError(
                        f"alloc_mamba: need {num_states} states but only "
                        f"{pool.available_size()} are free and "
                        f"{self.tree.mamba_evictable_size()} evictable "
                        f"({self.tree.mamba_protected_size()} locked by running requests)"
                    )
                self._evict_states(missing)
            return pool.alloc(num_states)

    def _evict_states(self, num_states: int) -> None:
        """Frees ``num_states`` cached states; under write_back, backs each victim up first.

        A victim without a host copy would lose its state for good (and, for a leaf, its KV):
        it is backed up synchronously, state included, then tombstoned (SGLang PR #28468). When
        the host cannot take it, it is tombstoned anyway.
        """
        remaining = num_states
        while remaining > 0:
            result = self.tree.evict_mamba(remaining, write_back=self._write_back)
            remaining -= int(result.mamba_indices.numel())
            self._free_evicted(result)
            if result.needs_backup < 0:
                return
            if not self._backup_now(result.needs_backup):
                # No host room: tombstone it without a backup (it is still the LRU victim).
                forced = self.tree.evict_mamba(1, write_back=False)
                remaining -= int(forced.mamba_indices.numel())
                self._free_evicted(forced)

    def free_mamba(self, indices: torch.Tensor) -> None:
        """Returns request-owned Mamba state slots to the pool.

        Raises:
            InvalidArgumentError: no Mamba pool, or a double free (nothing is freed).
        """
        pool = self._mamba()
        with self._lock:
            pool.free(indices)

    def fork_mamba(self, node_id: int) -> int:
        """Gives a request its own state slot to continue from the state cached at ``node_id``.

        Copy-on-write (SGLang's ``finalize_match_result_in_cache`` with ``cow_mamba``): the slot
        is a fresh one holding a copy of the node's state, never the node's slot itself, so the
        request can advance it in place. ``node_id`` is a match's ``last_device_node``; the root
        (no state: an empty prefix) gives a zeroed slot, the initial state. The node is locked
        while the slot is allocated, so the eviction that makes room cannot take its state. When
        the match loaded the node back from host, call it after the load's layers are ready
        (:meth:`wait_until_layer_ready`): on CUDA the copy is enqueued on the current stream,
        which then waits for the load; on CPU the worker has copied it.

        Args:
            node_id: a node holding a device state, or the root.

        Returns:
            int: the request's state slot.

        Raises:
            InvalidArgumentError: no Mamba pool, ``node_id`` is neither the root nor a node
                holding a state, or its state's load-back was not started.
            IndexOutOfRangeError: unknown node id.
            PoolExhaustedError: as :meth:`alloc_mamba`.
        """
        pool = self._mamba()
        with self._lock:
            if node_id == _ROOT_ID:
                slot = int(self.alloc_mamba(1)[0])
                pool.init_state(slot)
                return slot
            info = self.tree.node_info(node_id)
            if not info.has_mamba_value:
                raise InvalidArgumentError(
                    f"fork_mamba: node {node_id} holds no Mamba state (a tombstone); fork from a "
                    "match's last_device_node"
                )
            if info.load_pending and any(node_id in op.ack_ids for op in self._load_queue()):
                raise InvalidArgumentError(
                    f"fork_mamba: node {node_id}'s state is loaded back by a load not started "
                    "yet: call ready_to_load_host_cache() and wait_until_layer_ready() first"
                )
            if pool.available_size() == 0:  # the eviction that makes room must spare this state
                receipt = self.tree.inc_lock_ref(node_id)
                try:
                    slot = int(self.alloc_mamba(1)[0])
                finally:
                    self._dec_receipt(receipt)
            else:
                slot = int(self.alloc_mamba(1)[0])
            pool.init_state(slot, info.mamba_value)
            self.stats.mamba_forks += 1
            return slot

    def _load_queue(self) -> list:
        return self.controller.load_queue if self.controller is not None else []

    def _swa(self) -> SWAKVPool:
        if self.swa_pool is None:
            raise InvariantError("an SWA operation ran on a cache without an SWA pool")
        return self.swa_pool

    def _mamba(self) -> MambaStatePool:
        if self.mamba_pool is None:
            raise InvalidArgumentError("this cache has no Mamba pool (HiCache(mamba_pool=...))")
        return self.mamba_pool

    def _alloc_host(self, num_tokens: int) -> torch.Tensor | None:
        """Host slots for ``num_tokens`` tokens, evicting host-only leaves if needed; None: full."""
        allocator = self._host_allocator()
        free = allocator.available_size()
        if num_tokens > free:
            if num_tokens > free + self.tree.host_evictable_size():
                return None
            self.evict_host(num_tokens - free)
            if allocator.available_size() < num_tokens:
                return None
        return allocator.alloc(num_tokens)

    def _controller(self) -> CacheController:
        if self.controller is None:
            raise InvariantError("a host-tier operation ran on a cache without a host pool")
        return self.controller

    def _host_allocator(self) -> PageAllocator:
        if self.host_pool is None:
            raise InvariantError("a host-tier operation ran on a cache without a host pool")
        return self.host_pool.allocator

    def _free_evicted(self, result: EvictResult) -> int:
        """Frees what a tree eviction returned; returns the device tokens freed."""
        n = int(result.device_indices.numel())
        if result.mamba_indices.numel():
            self._mamba().free(result.mamba_indices)
            self.stats.mamba_evicted_states += int(result.mamba_indices.numel())
        if result.swa_indices.numel():  # SWA tombstones: their SWA side only
            self._swa().free_full(result.swa_indices)
            self.stats.swa_tombstoned_tokens += int(result.swa_indices.numel())
        if n:
            self._free_device(result.device_indices)
            if self.kv_events is not None:
                self.kv_events.on_removed(Medium.GPU, result.device_indices)
        self._free_host(result.host_indices)
        self.stats.evicted_tokens += n
        self.stats.demoted_tokens += result.demoted_tokens
        self.stats.dropped_tokens += result.dropped_tokens
        return n

    def _free_host_states(self) -> None:
        """Frees the host states and host SWA slots the tree freed with their nodes' host KV."""
        if self.mamba_host_pool is not None:
            states = self.tree.take_freed_mamba_host_slots()
            if states.numel():
                self.mamba_host_pool.free(states)
        if self.swa_host_pool is not None:
            swa = self.tree.take_freed_swa_host_slots()
            if swa.numel():
                self.swa_host_pool.allocator.free(swa)

    def _check_swa(self, owned: torch.Tensor, request_slots: torch.Tensor | None) -> None:
        """The SWA part of :meth:`check_invariants`."""
        pool = self._swa()
        live = self.tree.all_swa_indices()
        if not bool(pool.is_mapped(live).all()):
            raise InvariantError("a live SWA node's full slot has no SWA slot")
        mapped_in_tree = int(pool.is_mapped(owned).sum())
        if mapped_in_tree != live.numel():
            raise InvariantError(
                f"{mapped_in_tree - live.numel()} full slots of SWA tombstones still hold SWA "
                "slots (leaked SWA KV)"
            )
        if request_slots is not None:
            in_use = live.numel() + int(pool.is_mapped(request_slots).sum())
            if in_use != pool.num_mapped() or in_use + pool.available_size() != pool.num_slots:
                raise InvariantError(
                    f"SWA slot ownership broken: {pool.num_mapped()} mapped, {in_use} held by "
                    f"the tree and requests, {pool.available_size()} free of {pool.num_slots}"
                )
        if self.swa_host_pool is not None:
            _check_partition(
                torch.cat(
                    (
                        self.tree.all_swa_host_indices(),
                        self.swa_host_pool.allocator.free_slot_indices(),
                        *self._prefetch_swa.values(),  # windows of prefetches in flight
                    )
                ),
                self.swa_host_pool.num_slots,
                "host SWA slot",
            )

    def _free_host(self, indices: torch.Tensor, count: bool = True) -> None:
        self._free_host_states()
        if indices.numel():
            self._host_allocator().free(indices)
            if self.kv_events is not None:
                self.kv_events.on_removed(Medium.CPU, indices)
            if count:
                self.stats.host_evicted_tokens += int(indices.numel())

    # ---- engine helpers (SGLang's cache_finished_req / cache_unfinished_req) ---------------------

    def cache_finished_req(self, req: Req) -> InsertResult:
        """Caches a finished request's KV and releases everything it holds.

        Inserts the page-aligned ``token_ids`` with their slots, frees the request's duplicates of
        pages the tree already had (``kv_indices[prefix_len:inserted.prefix_len]``), the slots the
        tree did not take (``kv_indices[inserted.cached_len:]``: its unaligned tail, and what
        follows a node whose load-back is in flight or has failed) and releases its lock (SGLang's
        legacy ``cache_finished_req``). Finished load-backs of nodes the request holds are
        acknowledged first (it has waited for them), so that what it computed past them is cached.

        Mamba caches: each of ``req.mamba_checkpoints`` is published at the node ending its
        prefix (the tree splits there if needed); a state the tree does not take (it has one
        there already, or the prefix was not cached) is freed. Publishing where later matches
        will end (the request's last complete block, its branching point) is what keeps Mamba
        hits close to Full hits.

        Returns:
            InsertResult: the tree's insert result (of the whole key).

        Raises:
            InvalidArgumentError: ``kv_indices`` is shorter than ``token_ids`` or not whole pages;
                checkpoints not page-aligned, ascending and within the aligned tokens, repeating
                a state slot, or given to a cache without a Mamba pool. Nothing changed.
        """
        with self._lock:
            _, result = self._insert_req(req, check_checkpoints=True)
            own = req.prefix_len  # the request owns kv_indices[own:]; the tree the rest
            unused = torch.cat(
                (
                    req.kv_indices[own : result.prefix_len],
                    req.kv_indices[max(own, result.cached_len) :],
                )
            )
            if unused.numel():
                self._free_device(unused)
            self._dec_lock_ref(req.last_node, req.mamba_node_id, req.swa_lock_tokens)
        req.kv_indices = _empty_slots()
        req.last_node = _ROOT_ID
        req.prefix_len = 0
        req.mamba_node_id = -1
        req.swa_lock_tokens = 0
        req.swa_evicted_seqlen = 0
        req.mamba_checkpoints = []
        return result

    def _publish_checkpoints(
        self, key, value: torch.Tensor, extra_key, checkpoints, swa_evicted_seqlen: int = 0
    ) -> None:
        """Inserts each checkpoint's prefix with its state (the KV is in the tree already).

        ``swa_evicted_seqlen``: the key's SWA frontier, as given to the insert of the key (the
        caller's duplicate slots below it hold no SWA KV: no tombstone may take it from them).
        """
        for num_tokens, slot in checkpoints:
            r = self.tree.insert(
                key[:num_tokens],
                value[:num_tokens],
                extra_key,
                slot,
                swa_evicted_seqlen,  # (the tree clamps it to the key)
            )
            if r.prefix_len != min(num_tokens, r.cached_len) or r.adopted_len:
                raise InvariantError(
                    f"a checkpoint insert of {num_tokens} tokens took KV slots (prefix_len "
                    f"{r.prefix_len}, adopted {r.adopted_len}): the key was not cached first"
                )
            if r.mamba_taken:
                self.stats.mamba_published += 1
            else:
                self.stats.mamba_existed += int(r.mamba_exist)
                self._mamba().free(torch.tensor([slot], dtype=torch.int64))

    def cache_unfinished_req(self, req: Req) -> InsertResult:
        """Caches the KV computed so far by a running request (chunked prefill) and keeps it.

        Inserts the page-aligned ``token_ids``, frees the request's duplicate slots, points
        ``req.kv_indices`` at the tree's slots for the cached prefix, and moves the request's lock
        to the new last node (the new lock is taken before the old one is released, so nothing the
        request uses is evictable in between). The unaligned tail stays with the request, and so
        does everything from a node whose load-back is in flight or has failed (the insert stops
        there: the request's own KV is the one known valid); a later call caches it. Finished
        load-backs of nodes the request holds are acknowledged first, as in
        :meth:`cache_finished_req`.

        Returns:
            InsertResult: the tree's insert result.

        Raises:
            InvalidArgumentError: as :meth:`cache_finished_req`; or a cache with a Mamba pool
                (a running request's state checkpoints are not supported yet).
        """
        if self.mamba_pool is not None:
            raise InvalidArgumentError(
                "cache_unfinished_req: not supported with a Mamba pool yet (cache the request "
                "when it finishes, with its mamba_checkpoints)"
            )
        with self._lock:
            _, result = self._insert_req(req)
            cached = result.cached_len
            if cached < req.prefix_len:
                # Stopped inside the prefix the request already holds: nothing changed hands.
                return result
            duplicates = req.kv_indices[req.prefix_len : result.prefix_len]
            if duplicates.numel():
                self._free_device(duplicates)
            match = self.tree.match_prefix(req.token_ids[:cached], req.extra_key)
            if match.device_prefix_len != cached:
                raise InvariantError(
                    f"cache_unfinished_req: re-match found {match.device_prefix_len} of the "
                    f"{cached} tokens just inserted"
                )
            receipt = self.tree.inc_lock_ref(match.last_device_node)
            self._dec_lock_ref(req.last_node, req.mamba_node_id, req.swa_lock_tokens)
        kv = req.kv_indices.clone()
        kv[:cached] = match.device_indices
        req.kv_indices = kv
        req.last_node = receipt.node_id
        req.mamba_node_id = receipt.mamba_node_id
        req.swa_lock_tokens = receipt.swa_lock_tokens
        req.prefix_len = cached
        req.swa_evicted_seqlen = max(req.swa_evicted_seqlen, cached)
        return result

    def _insert_req(self, req: Req, check_checkpoints: bool = False) -> tuple[int, InsertResult]:
        """Validates ``req`` and inserts its page-aligned tokens; returns (aligned len, result)."""
        aligned = self._check_req(req)
        if check_checkpoints:
            self._check_checkpoints(req, aligned)
        elif req.mamba_checkpoints:
            raise InvalidArgumentError(
                "req.mamba_checkpoints are published by cache_finished_req only"
            )
        if self._ongoing_loads:
            self._apply_loads_held_by(req)
        result = self._insert(
            req.token_ids[:aligned],
            req.kv_indices[:aligned],
            req.extra_key,
            req.mamba_checkpoints if check_checkpoints else (),
            req.swa_evicted_seqlen if self.swa_pool is not None else 0,
        )
        # The request's locked prefix is on device; only a stop at a load-pending or load-failed
        # node inside it (the request matched it while in flight) leaves it uncounted.
        if result.prefix_len < req.prefix_len and result.cached_len == aligned:
            raise InvariantError(
                f"the tree caches {result.prefix_len} tokens of a prefix the request locked at "
                f"{req.prefix_len}"
            )
        return aligned, result

    def _apply_loads_held_by(self, req: Req) -> None:
        """Applies the acks of the finished loads whose nodes ``req`` holds, oldest batch first.

        An insert stops at a load-pending node, so a request that loaded (part of) its prefix in
        this batch would not get the rest cached until the next :meth:`check_hicache_events`.
        It has waited for those copies' layers, so they are done: applying their acks now costs
        no wait. Stops at a failed batch, which stays for :meth:`check_hicache_events` to undo
        and raise (the insert then stops at its nodes: nothing derived from them is cached).
        """
        controller = self._controller()
        # Loads are acknowledged in submission order and a chained load comes after the loads
        # above it, so the request holds a load-pending node iff its lock's node is one.
        if not self.tree.node_info(req.last_node).load_pending:
            return
        with profiling.nvtx_range(profiling.ACK):  # ack processing, as check_hicache_events
            while self.tree.node_info(req.last_node).load_pending:
                ack_ids = controller.pop_oldest_load()
                if not ack_ids:
                    return  # failed, or never started: the insert stops there
                for ack_id in ack_ids:
                    self._finish_load(ack_id, ok=True)

    def _check_checkpoints(self, req: Req, aligned: int) -> None:
        if not req.mamba_checkpoints:
            return
        num_states = self._mamba().num_slots
        previous = 0
        seen: set[int] = set()
        for num_tokens, slot in req.mamba_checkpoints:
            if num_tokens % self.page_size or not previous < num_tokens <= aligned:
                raise InvalidArgumentError(
                    f"req.mamba_checkpoints: {num_tokens} tokens is not a page-aligned prefix "
                    f"after {previous} and within the {aligned} aligned tokens"
                )
            if not 0 <= slot < num_states:
                raise InvalidArgumentError(f"req.mamba_checkpoints: state slot {slot} out of range")
            if slot in seen:
                # Two nodes would own one state: evicting either frees it under the other.
                raise InvalidArgumentError(
                    f"req.mamba_checkpoints: state slot {slot} is given twice"
                )
            seen.add(slot)
            previous = num_tokens

    def _check_req(self, req: Req) -> int:
        num_tokens = len(req.token_ids)
        kv = req.kv_indices
        if not isinstance(kv, torch.Tensor) or kv.dtype != torch.int64 or kv.device.type != "cpu":
            raise InvalidArgumentError("req.kv_indices must be an int64 CPU tensor")
        if kv.numel() < num_tokens or kv.numel() % self.page_size:
            raise InvalidArgumentError(
                f"req.kv_indices has {kv.numel()} slots for {num_tokens} tokens; it must cover "
                f"them in whole pages of {self.page_size}"
            )
        if req.prefix_len % self.page_size or req.prefix_len > num_tokens:
            raise InvalidArgumentError(
                f"req.prefix_len {req.prefix_len} is not a page-aligned "
                f"prefix of the {num_tokens} tokens"
            )
        return num_tokens - num_tokens % self.page_size

    # ---- whole-cache operations -----------------------------------------------------------------

    def reset(self) -> None:
        """Empties the tree and frees every slot it held (SGLang's ``flush_cache``).

        Waits for in-flight transfers first.

        Raises:
            InvalidArgumentError: a running request still holds a lock.
        """
        if self.storage is not None:
            with self._lock:
                self.flush()  # applies the acks that queue the last storage backups
            self._end_storage_work()
        with self._lock:
            self.flush()
            self._free_failed_load_slots()  # empty the tree's outboxes first
            self._free_host_states()
            host = self.tree.all_host_indices()
            states = self.tree.all_mamba_indices()
            host_states = self.tree.all_mamba_host_indices()
            host_swa = self.tree.all_swa_host_indices()
            freed = self.tree.reset()
            if host_swa.numel() and self.swa_host_pool is not None:
                self.swa_host_pool.allocator.free(host_swa)
            if states.numel():
                self._mamba().free(states)
            if host_states.numel() and self.mamba_host_pool is not None:
                self.mamba_host_pool.free(host_states)
            if freed.numel():
                self._free_device(freed)
            if host.numel():
                self._host_allocator().free(host)
            self.stats = CacheStats()
            if self.kv_events is not None:
                self.kv_events.on_cleared()

    def close(self) -> None:
        """Finishes in-flight transfers and stops the controller's workers. Idempotent.

        With storage: ends every prefetch (inserting what was read), waits for the storage
        backups, and stops the storage threads (the backend stays open: its owner closes it).
        """
        if self.storage is not None and not self.storage.closed:
            try:
                with self._lock:
                    self.flush()  # applies the acks that queue the last storage backups
                self._end_storage_work()
            finally:
                self.storage.close()
        with self._lock:
            if self.controller is not None:
                try:
                    self.flush()
                finally:
                    self.controller.close()

    def __enter__(self) -> HiCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def check_invariants(
        self, request_slots: torch.Tensor | None = None, request_states: torch.Tensor | None = None
    ) -> None:
        """Checks the tree's invariants and slot ownership (DESIGN.md invariant 3).

        Device: tree slots are never free; with ``request_slots``, tree slots, free slots and
        ``request_slots`` partition the pool exactly. Host: tree host slots, free host slots and
        the host slots of prefetches from storage in flight always partition the host pool
        exactly (in-flight transfers are committed in the tree).
        Mamba: tree states are never free; with ``request_states``, tree states, free states and
        ``request_states`` partition the state pool exactly.

        Args:
            request_slots: int64 CPU tensor of every device slot that running requests own.
            request_states: int64 CPU tensor of every Mamba state slot running requests own.

        SWA: the full slots of the tree's live SWA nodes are mapped and those of its SWA
        tombstones are not; with ``request_slots``, the SWA slots in use are exactly those of the
        tree's live nodes and of the requests' mapped slots; host SWA slots held by the tree, free
        ones and those of prefetches in flight partition the SWA host pool.

        Raises:
            InvariantError: a slot is owned twice, leaked, or a tree invariant is broken.
        """
        with self._lock:
            self.tree.check_invariants()
            if self.mamba_host_pool is not None:
                prefetch_states = torch.tensor(
                    list(self._prefetch_state.values()), dtype=torch.int64
                )
                _check_partition(
                    torch.cat(
                        (
                            self.tree.all_mamba_host_indices(),
                            self.mamba_host_pool.allocator.free_slot_indices(),
                            prefetch_states,
                        )
                    ),
                    self.mamba_host_pool.num_slots,
                    "host Mamba state slot",
                )
            if self.mamba_pool is not None:
                states = self.tree.all_mamba_indices()
                if self.mamba_pool.allocator.is_free(states).any():
                    raise InvariantError("a Mamba state held by the tree is also free")
                if request_states is not None:
                    _check_partition(
                        torch.cat(
                            (states, self.mamba_pool.allocator.free_slot_indices(), request_states)
                        ),
                        self.mamba_pool.num_slots,
                        "Mamba state slot",
                    )
            owned = self.tree.all_device_indices()
            if self.allocator.is_free(owned).any():
                raise InvariantError("a slot held by the tree is also in the allocator's free list")
            if self.swa_pool is not None:
                self._check_swa(owned, request_slots)
            if self.host_pool is not None:
                host_owned = self.tree.all_host_indices()
                free_host = self.host_pool.allocator.free_slot_indices()
                prefetching = list(self._prefetch_host.values())  # storage reads in flight
                _check_partition(
                    torch.cat((host_owned, free_host, *prefetching)),
                    self.host_pool.num_slots,
                    "host slot",
                )
            if request_slots is None:
                return
            all_slots = torch.cat((owned, self.allocator.free_slot_indices(), request_slots))
            _check_partition(all_slots, self.allocator.num_slots, "device slot")


def _flagged(device_indices: torch.Tensor, plan) -> torch.Tensor:
    """The slots of ``device_indices`` (laid out like ``plan``) of the nodes ``plan.swa`` flags."""
    parts, start = [], 0
    for length, flag in zip(plan.lengths, plan.swa, strict=True):
        if flag:
            parts.append(device_indices[start : start + length])
        start += length
    return torch.cat(parts) if parts else _empty_slots()


def _check_swa_pools(
    device_pool: DeviceKVPool,
    page_size: int,
    host_pool: HostKVPool | None,
    swa_pool: SWAKVPool | None,
    swa_host_pool: HostKVPool | None,
    sliding_window_size: int,
) -> None:
    """Raises InvalidArgumentError unless the SWA pools fit the cache (see :class:`HiCache`)."""
    if swa_pool is None:
        if swa_host_pool is not None or sliding_window_size:
            raise InvalidArgumentError(
                "HiCache: swa_host_pool and sliding_window_size need a swa_pool"
            )
        return
    if sliding_window_size <= 0:
        raise InvalidArgumentError(
            f"HiCache: sliding_window_size must be > 0 with a swa_pool, got {sliding_window_size}"
        )
    if swa_pool.num_full_slots != device_pool.num_slots or swa_pool.page_size != page_size:
        raise InvalidArgumentError(
            f"HiCache: swa_pool maps {swa_pool.num_full_slots} full slots with page size "
            f"{swa_pool.page_size}; the device pool has {device_pool.num_slots} slots and the "
            f"cache page size {page_size}"
        )
    if (host_pool is not None) != (swa_host_pool is not None):
        raise InvalidArgumentError(
            "HiCache: a host pool with a swa_pool needs a swa_host_pool (the host tier keeps "
            "each node's SWA KV with its KV), and a swa_host_pool needs a host pool"
        )
    if (
        swa_host_pool is not None
        and host_pool is not None
        and (swa_host_pool.num_slots != host_pool.num_slots or swa_host_pool.page_size != page_size)
    ):
        raise InvalidArgumentError(
            f"HiCache: swa_host_pool has {swa_host_pool.num_slots} slots of page size "
            f"{swa_host_pool.page_size}; it needs the host pool's {host_pool.num_slots} and "
            f"{page_size}"
        )


def _check_partition(slots: torch.Tensor, num_slots: int, what: str) -> None:
    """Raises InvariantError unless ``slots`` holds every index of ``[0, num_slots)`` once."""
    counts = torch.bincount(slots, minlength=num_slots)
    if counts.numel() != num_slots or bool((counts != 1).any()):
        leaked = int((counts == 0).sum())
        doubled = int((counts > 1).sum())
        raise InvariantError(
            f"{what} ownership broken: {leaked} slots owned by nobody, "
            f"{doubled} owned more than once"
        )
