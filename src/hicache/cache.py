"""The public cache API: the radix tree, the device KV pool and its allocator, kept consistent.

``HiCache`` is what an engine's scheduler talks to. It mirrors SGLang's radix cache API
(``match_prefix``, ``insert``, ``inc_lock_ref``/``dec_lock_ref``, ``evict``,
``cache_finished_req``/``cache_unfinished_req``) and adds the slot allocation that SGLang leaves to
its ``token_to_kv_pool_allocator``, so that "every slot is owned exactly once" (DESIGN.md invariant
3) is checked in one place. The tree decides, the cache executes: tree calls return freed slots and
the cache hands them back to the allocator.

Threading: the C++ tree is single-threaded; one re-entrant lock serialises every tree call
(DESIGN.md, threading contract).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from hicache._tree import RadixTree
from hicache.errors import InvalidArgumentError, InvariantError, PoolExhaustedError
from hicache.memory import DeviceKVPool, PageAllocator
from hicache.results import InsertResult, LockReceipt, MatchResult

__all__ = ["HiCache", "Req"]

_ROOT_ID = 0


def _empty_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


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
    """

    token_ids: torch.Tensor
    extra_key: str | None = None
    kv_indices: torch.Tensor = field(default_factory=_empty_slots)
    last_node: int = _ROOT_ID
    prefix_len: int = 0


class HiCache:
    """A prefix KV cache over a device KV pool (the L1 tier of SGLang's HiCache).

    Args:
        device_pool: the KV pool whose slots the tree indexes.
        page_size: tokens per page, >= 1; ``device_pool.num_slots`` must be a multiple of it.

    Raises:
        InvalidArgumentError: bad ``page_size`` or a pool size that is not whole pages.
    """

    def __init__(self, device_pool: DeviceKVPool, page_size: int = 1) -> None:
        self.device_pool = device_pool
        self.page_size = page_size
        self.allocator = PageAllocator(device_pool.num_slots, page_size)
        self.tree = RadixTree(page_size, device_pool.num_slots)
        self._lock = threading.RLock()
        self.num_evicted_tokens = 0  # tokens freed by eviction since construction / reset

    # ---- tree operations ------------------------------------------------------------------------

    def match_prefix(self, key, extra_key: str | None = None) -> MatchResult:
        """Finds the longest cached prefix of ``key`` (see :meth:`RadixTree.match_prefix`).

        Args:
            key: ``[num_tokens]`` token ids (list, int32/int64 CPU tensor, numpy array).
            extra_key: namespace; keys with different extra keys never share pages.

        Returns:
            MatchResult: ``device_indices`` is an int64 CPU tensor of the tree's slots.
        """
        with self._lock:
            return self.tree.match_prefix(key, extra_key)

    def insert(self, key, value: torch.Tensor, extra_key: str | None = None) -> InsertResult:
        """Inserts ``key`` with device slots ``value`` (see :meth:`RadixTree.insert`).

        The caller keeps ownership of ``value[:prefix_len]`` (already cached: free them) and of the
        unaligned tail ``value[floor(len/page_size)*page_size:]``.
        """
        with self._lock:
            return self.tree.insert(key, value, extra_key)

    def inc_lock_ref(self, node_id: int) -> LockReceipt:
        """Protects ``node_id`` and its ancestors from eviction; returns the lock's receipt."""
        with self._lock:
            return self.tree.inc_lock_ref(node_id)

    def dec_lock_ref(self, node_id: int) -> int:
        """Releases a lock from :meth:`inc_lock_ref`; returns tokens that became evictable."""
        with self._lock:
            return self.tree.dec_lock_ref(node_id)

    def evict(self, num_tokens: int) -> int:
        """Evicts ``ceil(num_tokens / page_size)`` LRU pages and frees their slots.

        Returns:
            int: tokens freed (fewer than asked when too little is evictable).
        """
        with self._lock:
            freed = self.tree.evict(num_tokens).device_indices
            if freed.numel():
                self.allocator.free(freed)
            self.num_evicted_tokens += int(freed.numel())
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

    # ---- slots ----------------------------------------------------------------------------------

    def alloc(self, num_tokens: int) -> torch.Tensor:
        """Allocates device slots for ``num_tokens`` tokens, evicting LRU pages when needed.

        Args:
            num_tokens: tokens to hold, >= 0.

        Returns:
            torch.Tensor: ``[ceil(num_tokens / page_size) * page_size]`` int64 CPU tensor of whole
            pages; the request owns them until it frees them or the tree takes them.

        Raises:
            InvalidArgumentError: ``num_tokens < 0``.
            PoolExhaustedError: free plus evictable slots cannot hold the request; nothing was
                evicted or allocated.
        """
        if num_tokens < 0:
            raise InvalidArgumentError(f"alloc: num_tokens must be >= 0, got {num_tokens}")
        need = -(-num_tokens // self.page_size) * self.page_size
        with self._lock:
            free = self.allocator.available_size()
            if need > free:
                evictable = self.tree.evictable_size()
                if need > free + evictable:
                    raise PoolExhaustedError(
                        f"alloc: need {need} slots but only {free} are free and {evictable} "
                        f"evictable ({self.tree.protected_size()} locked by running requests, pool "
                        f"of {self.allocator.num_slots})"
                    )
                self.evict(need - free)
            return self.allocator.alloc(need)

    def free(self, indices: torch.Tensor) -> None:
        """Returns request-owned slots (whole pages) to the allocator."""
        with self._lock:
            self.allocator.free(indices)

    # ---- engine helpers (SGLang's cache_finished_req / cache_unfinished_req) ---------------------

    def cache_finished_req(self, req: Req) -> InsertResult:
        """Caches a finished request's KV and releases everything it holds.

        Inserts the page-aligned ``token_ids`` with their slots, frees the request's duplicates of
        pages the tree already had (``kv_indices[prefix_len:inserted.prefix_len]``) and its
        unaligned tail, and releases its lock (SGLang's legacy ``cache_finished_req``).

        Returns:
            InsertResult: the tree's insert result.

        Raises:
            InvalidArgumentError: ``kv_indices`` is shorter than ``token_ids`` or not whole pages.
        """
        with self._lock:
            aligned, result = self._insert_req(req)
            unused = torch.cat(
                (req.kv_indices[req.prefix_len : result.prefix_len], req.kv_indices[aligned:])
            )
            if unused.numel():
                self.allocator.free(unused)
            self.tree.dec_lock_ref(req.last_node)
        req.kv_indices = _empty_slots()
        req.last_node = _ROOT_ID
        req.prefix_len = 0
        return result

    def cache_unfinished_req(self, req: Req) -> InsertResult:
        """Caches the KV computed so far by a running request (chunked prefill) and keeps it.

        Inserts the page-aligned ``token_ids``, frees the request's duplicate slots, points
        ``req.kv_indices`` at the tree's slots for the cached prefix, and moves the request's lock
        to the new last node (the new lock is taken before the old one is released, so nothing the
        request uses is evictable in between). The unaligned tail stays with the request.

        Returns:
            InsertResult: the tree's insert result.
        """
        with self._lock:
            aligned, result = self._insert_req(req)
            duplicates = req.kv_indices[req.prefix_len : result.prefix_len]
            if duplicates.numel():
                self.allocator.free(duplicates)
            match = self.tree.match_prefix(req.token_ids[:aligned], req.extra_key)
            if match.device_prefix_len != aligned:
                raise InvariantError(
                    f"cache_unfinished_req: re-match found {match.device_prefix_len} of the "
                    f"{aligned} tokens just inserted"
                )
            self.tree.inc_lock_ref(match.last_device_node)
            self.tree.dec_lock_ref(req.last_node)
        kv = req.kv_indices.clone()
        kv[:aligned] = match.device_indices
        req.kv_indices = kv
        req.last_node = match.last_device_node
        req.prefix_len = aligned
        return result

    def _insert_req(self, req: Req) -> tuple[int, InsertResult]:
        """Validates ``req`` and inserts its page-aligned tokens; returns (aligned len, result)."""
        aligned = self._check_req(req)
        result = self.tree.insert(req.token_ids[:aligned], req.kv_indices[:aligned], req.extra_key)
        if result.prefix_len < req.prefix_len:
            raise InvariantError(
                f"the tree caches {result.prefix_len} tokens of a prefix the request locked at "
                f"{req.prefix_len}"
            )
        return aligned, result

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

        Raises:
            InvalidArgumentError: a running request still holds a lock.
        """
        with self._lock:
            freed = self.tree.reset()
            if freed.numel():
                self.allocator.free(freed)
            self.num_evicted_tokens = 0

    def check_invariants(self, request_slots: torch.Tensor | None = None) -> None:
        """Checks the tree's invariants and slot ownership (DESIGN.md invariant 3).

        Args:
            request_slots: int64 CPU tensor of every slot that running requests own. When given,
                tree slots, free slots and ``request_slots`` must partition the pool exactly; when
                omitted, only "no tree slot is free" is checked.

        Raises:
            InvariantError: a slot is owned twice, leaked, or a tree invariant is broken.
        """
        with self._lock:
            self.tree.check_invariants()
            owned = self.tree.all_device_indices()
            if self.allocator.is_free(owned).any():
                raise InvariantError("a slot held by the tree is also in the allocator's free list")
            if request_slots is None:
                return
            all_slots = torch.cat((owned, self.allocator.free_slot_indices(), request_slots))
            counts = torch.bincount(all_slots, minlength=self.allocator.num_slots)
            if counts.numel() != self.allocator.num_slots or bool((counts != 1).any()):
                leaked = int((counts == 0).sum())
                doubled = int((counts > 1).sum())
                raise InvariantError(
                    f"slot ownership broken: {leaked} slots owned by nobody, "
                    f"{doubled} owned more than once"
                )
