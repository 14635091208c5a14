"""KV events: which blocks (pages) are stored where, as SGLang's and vLLM's KV event streams.

An engine's router or a KV-aware load balancer follows these events to know what each worker
caches. Three kinds, as SGLang 0.5.23's ``KVCacheEventRecorder`` (reference §3.10) and vLLM's
``kv_events``:

- :class:`BlockStored`: consecutive pages became present on a medium. ``block_hashes[i]`` is page
  ``i``'s block hash (:func:`hicache.storage.block_hash` of its SHA-256 chain digest, so a hash
  names a whole prefix); ``parent_block_hash`` is the page before the first one (None at the
  root); ``token_ids`` are the pages' tokens.
- :class:`BlockRemoved`: pages left a medium.
- :class:`AllBlocksCleared`: every medium was emptied (:meth:`HiCache.reset`).

Media: ``GPU`` (the device pool, L1), ``CPU`` (the host pool, L2), ``STORAGE`` (L3). A page is
reported stored on a medium when its KV there is complete: at insert (GPU), at a backup's ack
(CPU), at a load-back's ack (GPU); removed when its slots are freed (eviction, demotion, a dropped
leaf, host eviction). A subscriber that applies the events in order holds the cache's contents
per medium (tested by rebuilding them from a replay's events alone).

The publisher keeps, per medium, the block hash, parent hash, tokens and namespace of every page
it reported stored, indexed by the page's first slot, so that evictions, which the tree reports
as freed slots, become :class:`BlockRemoved` events without asking the tree for keys.
Events are opt-in (``HiCache(enable_kv_events=True)``): hashing every inserted page costs about a
microsecond per page, which a cache without subscribers should not pay.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from hicache.errors import InvalidArgumentError
from hicache.storage.page_hash import block_hash, namespace_seed, page_hashes

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
    "KVEventPublisher",
    "Medium",
]


class Medium(enum.Enum):
    """Where a block is stored; values are the ``medium`` strings of the events."""

    GPU = "GPU"
    CPU = "CPU"
    STORAGE = "STORAGE"


@dataclass(frozen=True)
class BlockStored:
    """Consecutive pages, each the child of the one before, became present on ``medium``.

    Attributes:
        block_hashes: one signed int64 block hash per page, root-side first.
        parent_block_hash: block hash of the page before the first one; None at the root.
        token_ids: the pages' tokens, ``len(block_hashes) * block_size`` of them.
        block_size: tokens per page (the cache's page_size).
        medium: where the pages are now.
        extra_key: the namespace (LoRA id, tenant) the pages belong to; None for none.
    """

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: Medium
    extra_key: str | None = None


@dataclass(frozen=True)
class BlockRemoved:
    """Pages left ``medium`` (their KV there is gone).

    Attributes:
        block_hashes: the removed pages' block hashes.
        medium: where they were.
    """

    block_hashes: tuple[int, ...]
    medium: Medium


@dataclass(frozen=True)
class AllBlocksCleared:
    """Every block left every medium (a cache reset)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class _Page(NamedTuple):
    """What the publisher remembers of one stored page on one medium."""

    block_hash: int
    parent_hash: int | None
    tokens: tuple[int, ...]
    extra_key: str | None


class KVEventPublisher:
    """Turns the cache's page movements into KV events and hands them to subscribers.

    :class:`hicache.cache.HiCache` calls the ``on_*`` methods with slot indices under its lock;
    subscribers are called synchronously, in order, on that thread, and must not call back into
    the cache (queue the event and return, as SGLang's ZMQ publisher does).

    Args:
        page_size: tokens per page.
    """

    def __init__(self, page_size: int) -> None:
        if page_size < 1:
            raise InvalidArgumentError(
                f"KVEventPublisher: page_size: expected >= 1, got {page_size}"
            )
        self.page_size = page_size
        self._subscribers: list[Callable[[KVEvent], None]] = []
        self._subscribers_lock = threading.Lock()
        # Per medium: first slot of a stored page -> what was stored there. Written only by the
        # on_* methods, under the cache's lock.
        self._pages: dict[Medium, dict[int, _Page]] = {m: {} for m in Medium}

    def subscribe(self, callback: Callable[[KVEvent], None]) -> Callable[[], None]:
        """Calls ``callback(event)`` for every event from now on.

        Args:
            callback: receives :class:`BlockStored`, :class:`BlockRemoved` or
                :class:`AllBlocksCleared`; an exception it raises propagates to the cache call
                that produced the event, after the cache's own state change is complete.

        Returns:
            A function that unsubscribes ``callback``.
        """
        with self._subscribers_lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._subscribers_lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def num_pages(self, medium: Medium) -> int:
        """Pages currently reported stored on ``medium``."""
        return len(self._pages[medium])

    def _emit(self, event: KVEvent) -> None:
        with self._subscribers_lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback(event)

    def _first_slots(self, slots: torch.Tensor) -> list[int]:
        """The first slot of each page in ``slots`` (whole pages, in order)."""
        return slots.reshape(-1, self.page_size)[:, 0].tolist() if slots.numel() else []

    def on_device_insert(
        self, key: torch.Tensor, slots: torch.Tensor, first_page: int, extra_key: str | None
    ) -> None:
        """Pages ``first_page..`` of ``key`` were inserted on device in ``slots``.

        Args:
            key: ``[num_pages * page_size]`` tokens of the whole inserted path (from the root).
            slots: device slots of pages ``first_page..`` (whole pages, in order).
            first_page: pages of ``key`` that were already on device (not reported again).
            extra_key: the key's namespace.
        """
        self.on_insert(Medium.GPU, key, slots, first_page, extra_key)

    def on_insert(
        self,
        medium: Medium,
        key: torch.Tensor,
        slots: torch.Tensor,
        first_page: int,
        extra_key: str | None,
    ) -> None:
        """Pages ``first_page..`` of ``key`` were inserted on ``medium`` in ``slots``.

        :meth:`on_device_insert` for any medium: the host (CPU) one when pages prefetched from
        storage are inserted as host-only nodes. Arguments as there.
        """
        if slots.numel() == 0:
            return
        tokens = np.asarray(key, dtype=np.int64)
        digests = page_hashes(tokens, self.page_size, namespace_seed(extra_key))
        hashes = [block_hash(d) for d in digests]
        pages = self._pages[medium]
        ps = self.page_size
        parent = hashes[first_page - 1] if first_page > 0 else None
        for i, slot in enumerate(self._first_slots(slots), start=first_page):
            page_tokens = tuple(tokens[i * ps : (i + 1) * ps].tolist())
            pages[slot] = _Page(hashes[i], hashes[i - 1] if i > 0 else None, page_tokens, extra_key)
        self._emit(
            BlockStored(
                tuple(hashes[first_page:]),
                parent,
                tuple(tokens[first_page * ps : len(hashes) * ps].tolist()),
                ps,
                medium,
                extra_key,
            )
        )

    def on_copied(
        self, src: Medium, src_slots: torch.Tensor, dst: Medium, dst_slots: torch.Tensor
    ) -> None:
        """A copy finished: the pages at ``src_slots`` on ``src`` are now at ``dst_slots`` too.

        A backup's ack is GPU -> CPU, a load-back's ack CPU -> GPU. Pages the publisher never
        saw stored on ``src`` are skipped. Consecutive chained pages become one event.
        """
        known = self._pages[src]
        copies = [
            (known[s], d)
            for s, d in zip(self._first_slots(src_slots), self._first_slots(dst_slots), strict=True)
            if s in known
        ]
        target = self._pages[dst]
        for page, slot in copies:
            target[slot] = page
        run: list[_Page] = []
        for page, _ in copies:
            if run and (
                page.parent_hash != run[-1].block_hash or page.extra_key != run[0].extra_key
            ):
                self._emit_run(run, dst)
                run = []
            run.append(page)
        if run:
            self._emit_run(run, dst)

    def _emit_run(self, run: list[_Page], medium: Medium) -> None:
        self._emit(
            BlockStored(
                tuple(p.block_hash for p in run),
                run[0].parent_hash,
                tuple(t for p in run for t in p.tokens),
                self.page_size,
                medium,
                run[0].extra_key,
            )
        )

    def on_removed(self, medium: Medium, slots: torch.Tensor) -> None:
        """The pages at ``slots`` on ``medium`` were freed; reported ones become one event."""
        pages = self._pages[medium]
        removed = [pages.pop(s) for s in self._first_slots(slots) if s in pages]
        if removed:
            self._emit(BlockRemoved(tuple(p.block_hash for p in removed), medium))

    def on_cleared(self) -> None:
        """Every medium was emptied."""
        for pages in self._pages.values():
            pages.clear()
        self._emit(AllBlocksCleared())
