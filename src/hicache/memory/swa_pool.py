"""Sliding-window KV pool with its full -> SWA slot mapping.

SGLang's ``SWAKVPool`` and the SWA side of its ``SWATokenToKVPoolAllocator``.

A hybrid SWA model has full-attention layers, whose KV every later token reads, and
sliding-window layers, whose KV only the last ``sliding_window_size`` tokens read. The SWA layers'
KV therefore lives in a smaller pool of its own, and a token's slot in it is found through the
token's slot in the full pool: ``full_to_swa[full_slot]``. The radix tree stores full slot
indices only; the SWA side of a node is valid while its full slots are mapped, and is dropped
(the node becomes an SWA tombstone) by freeing the mapped SWA slots while the full KV stays.

Host backups of the SWA KV need nothing new: :class:`SWAKVPool` *is* a :class:`DeviceKVPool`
(same buffers, same shape conventions), so a :class:`~hicache.memory.HostKVPool` built over it
backs it up and :mod:`hicache.transfer` moves it, with SWA slot indices from :meth:`translate`.
"""

from __future__ import annotations

import numpy as np
import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from hicache.memory.allocator import PageAllocator, _check_index_tensor
from hicache.memory.device_pool import DeviceKVPool

__all__ = ["SWAKVPool"]

# ``full_to_swa`` value of a full slot whose token has no SWA slot. SGLang uses 0 and reserves
# SWA slot 0 as padding; -1 keeps every SWA slot usable and can never be a valid index.
_UNMAPPED = -1


class SWAKVPool(DeviceKVPool):
    """KV buffers of the sliding-window layers, their allocator, and the full -> SWA mapping.

    The buffers are those of a :class:`DeviceKVPool` with ``num_slots`` SWA slots
    (``k_buffer``/``v_buffer`` for ``mha``, ``kv_buffer`` for ``mla``; ``num_layers`` counts the
    SWA layers only). :attr:`allocator` owns the SWA slots; :attr:`full_to_swa` says which SWA
    slot holds the token of each full slot. Allocation is in whole pages on both sides, and a full
    page maps to one SWA page offset by offset, so paged attention can translate page by page.

    Frees clear the mapping *before* they free SWA slots, and skip unmapped full slots (SGLang's
    ``free_swa``). PR #27586: a free through a stale mapping, one never cleared after an earlier
    free, released an SWA slot that had meanwhile been reused by another full slot; that slot
    then had two owners. With the mapping cleared, a second free of the same full slot finds
    nothing to free.

    Not thread-safe (the cache's lock serialises calls). Every method validates its arguments
    before it changes anything: a call that raises has no effect.
    """

    # Owner of the SWA slots: only ``alloc_for``, ``free_full`` and ``reset`` change it.
    allocator: PageAllocator
    # ``[num_full_slots]`` int64 CPU: the SWA slot of each full slot's token, or -1 when it has
    # none. The bookkeeping copy, beside the radix tree (attention kernels that need it on the
    # device get a copy). Written by ``alloc_for``, ``free_full`` and ``reset`` only.
    full_to_swa: torch.Tensor

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: str | torch.device | None = None,
        kind: str = "mha",
        *,
        num_full_slots: int,
        page_size: int = 1,
    ) -> None:
        """Allocates zeroed SWA buffers, every SWA slot free and every full slot unmapped.

        Args:
            num_slots: SWA pool size in tokens; a positive multiple of ``page_size``, at most
                ``num_full_slots`` (every SWA slot in use backs one full slot).
            num_layers: number of sliding-window layers.
            num_heads: KV heads per token; must be 1 for ``mla``.
            head_dim: elements per head.
            dtype: element dtype of the buffers.
            device: where the buffers live; ``None`` picks ``"cuda"`` if available, else
                ``"cpu"``.
            kind: ``"mha"`` or ``"mla"``.
            num_full_slots: size of the full-attention pool in tokens; a positive multiple of
                ``page_size``.
            page_size: tokens per page, at least 1; the full pool's page size.

        Raises:
            InvalidArgumentError: a size is invalid (see :class:`DeviceKVPool` and
                :class:`PageAllocator`), or ``num_slots > num_full_slots``.
        """
        if isinstance(num_full_slots, bool) or not isinstance(num_full_slots, int):
            raise InvalidArgumentError(
                f"SWAKVPool: num_full_slots: expected an int, got {type(num_full_slots).__name__}"
            )
        if num_full_slots <= 0 or num_full_slots % max(page_size, 1) != 0:
            raise InvalidArgumentError(
                f"SWAKVPool: num_full_slots: expected a positive multiple of page_size="
                f"{page_size}, got {num_full_slots}"
            )
        if num_slots > num_full_slots:
            raise InvalidArgumentError(
                f"SWAKVPool: num_slots: expected at most num_full_slots={num_full_slots}, "
                f"got {num_slots}"
            )
        # Validates num_slots and page_size before any buffer is allocated.
        allocator = PageAllocator(num_slots, page_size)
        super().__init__(num_slots, num_layers, num_heads, head_dim, dtype, device, kind)
        self.allocator = allocator
        self._page_size = page_size
        self._num_full_slots = num_full_slots
        self._page_offsets = np.arange(page_size, dtype=np.int64)
        self.full_to_swa = torch.full((num_full_slots,), _UNMAPPED, dtype=torch.int64)
        # The same memory as numpy: the request-path bookkeeping runs on small index arrays,
        # where a numpy op costs a fraction of a torch op's dispatch.
        self._map = self.full_to_swa.numpy()

    @property
    def num_full_slots(self) -> int:
        """Size of the full-attention pool in tokens (the length of :attr:`full_to_swa`)."""
        return self._num_full_slots

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return self._page_size

    def available_size(self) -> int:
        """Returns the number of free SWA slots, in tokens."""
        return self.allocator.available_size()

    def num_mapped(self) -> int:
        """Returns the number of full slots that have an SWA slot (= SWA slots in use)."""
        return int(np.count_nonzero(self._map != _UNMAPPED))

    def is_mapped(self, full_indices: torch.Tensor) -> torch.Tensor:
        """Tells, per full slot, whether its token has an SWA slot.

        Args:
            full_indices: ``[n]`` int64 CPU full slot indices.

        Returns:
            ``[n]`` bool CPU tensor.

        Raises:
            InvalidArgumentError: wrong type, dtype, dim or device.
            IndexOutOfRangeError: a slot is outside ``[0, num_full_slots)``.
        """
        full = self._full_array(full_indices, "is_mapped")
        return torch.from_numpy(self._map[full] != _UNMAPPED)

    def alloc_for(self, full_indices: torch.Tensor) -> torch.Tensor:
        """Allocates SWA slots for the tokens of ``full_indices`` and records the mapping.

        SGLang's ``SWATokenToKVPoolAllocator.alloc`` (SWA side), or the rebuild of the mapping
        after a load-back (``RebuildFullToSWAMapping``): ``full_to_swa[full_indices[i]]`` becomes
        the ``i``-th returned SWA slot.

        Args:
            full_indices: ``[n]`` int64 CPU full slot indices, ``n`` a multiple of
                ``page_size``; each run of ``page_size`` entries one whole full page in
                ascending order (as a paged allocator returns them); none repeated or already
                mapped.

        Returns:
            ``[n]`` int64 CPU SWA slot indices, whole SWA pages, in the order of
            ``full_indices``.

        Raises:
            InvalidArgumentError: wrong type, dtype, dim or device; a run that is not one whole
                page; a repeated full slot; a full slot that is already mapped (its SWA slot
                would leak). Nothing is allocated or mapped.
            IndexOutOfRangeError: a slot is outside ``[0, num_full_slots)``.
            PoolExhaustedError: fewer free SWA slots than ``n``; nothing is allocated or mapped.
        """
        full = self._full_array(full_indices, "alloc_for")
        self._check_whole_pages(full, "alloc_for")
        sorted_full = np.sort(full)
        repeated = sorted_full[1:][sorted_full[1:] == sorted_full[:-1]]
        if repeated.size:
            raise InvalidArgumentError(
                f"alloc_for: full_indices: full slot {int(repeated[0])} is repeated"
            )
        mapped = full[self._map[full] != _UNMAPPED]
        if mapped.size > 0:
            slot = int(mapped[0])
            raise InvalidArgumentError(
                f"alloc_for: full_indices: full slot {slot} is already mapped to SWA slot "
                f"{int(self._map[slot])}; free_full it first"
            )
        swa_indices = self.allocator.alloc(full.size)
        self._map[full] = swa_indices.numpy()
        return swa_indices

    def translate(self, full_indices: torch.Tensor, skip_unmapped: bool = False) -> torch.Tensor:
        """Returns the SWA slots of the tokens of ``full_indices``.

        SGLang's ``translate_loc_from_full_to_swa``.

        Args:
            full_indices: ``[n]`` int64 CPU full slot indices.
            skip_unmapped: leave out the full slots without an SWA slot (tombstoned tokens)
                instead of raising.

        Returns:
            ``[n]`` int64 CPU SWA slot indices in the order of ``full_indices`` (``[m]``, the
            mapped ones in order, with ``skip_unmapped``). A new tensor, not a view of the
            mapping.

        Raises:
            InvalidArgumentError: wrong type, dtype, dim or device; a full slot without an SWA
                slot (unless ``skip_unmapped``).
            IndexOutOfRangeError: a slot is outside ``[0, num_full_slots)``.
        """
        full = self._full_array(full_indices, "translate")
        swa = self._map[full]
        unmapped = swa == _UNMAPPED
        if unmapped.any():
            if skip_unmapped:
                return torch.from_numpy(swa[~unmapped])
            slot = int(full[unmapped][0])
            raise InvalidArgumentError(
                f"translate: full_indices: full slot {slot} has no SWA slot "
                "(pass skip_unmapped=True to leave such slots out)"
            )
        return torch.from_numpy(swa)

    def free_full(self, full_indices: torch.Tensor) -> int:
        """Frees the SWA slots of the tokens of ``full_indices``; the full slots stay allocated.

        SGLang's ``free_swa``: it drops the SWA KV of tokens that left the window (tombstoning
        the SWA side of a node), or the SWA side of tokens whose full slots are freed too. The
        mapping of every given full slot is cleared *before* any SWA slot is freed (PR #27586);
        full slots without an SWA slot are skipped, so freeing a full slot twice frees its SWA
        slot once, never the slot a later :meth:`alloc_for` gave to another full slot.

        Args:
            full_indices: ``[n]`` int64 CPU full slot indices, any order. The mapped ones must
                cover whole SWA pages (they do when whole full pages are given, or when the
                window frontier frees in whole pages).

        Returns:
            The number of SWA slots freed.

        Raises:
            InvalidArgumentError: wrong type, dtype, dim or device; a repeated full slot; mapped
                slots that cover part of an SWA page. Nothing is cleared or freed.
            IndexOutOfRangeError: a slot is outside ``[0, num_full_slots)``. Nothing changes.
        """
        full = self._full_array(full_indices, "free_full")
        sorted_full = np.sort(full)
        repeated = sorted_full[1:][sorted_full[1:] == sorted_full[:-1]]
        if repeated.size:
            raise InvalidArgumentError(
                f"free_full: full_indices: full slot {int(repeated[0])} is repeated"
            )
        swa = self._map[full]
        mapped = swa != _UNMAPPED
        swa_indices = self._whole_swa_pages(swa[mapped], "free_full")
        self._map[full[mapped]] = _UNMAPPED
        # Cannot fail: distinct, in range, whole pages, and mapped slots are allocated ones.
        self.allocator.free(torch.from_numpy(swa_indices))
        return int(swa_indices.size)

    def move_mapping(self, dst_full: torch.Tensor, src_full: torch.Tensor) -> None:
        """Gives the tokens of ``dst_full`` the SWA slots of ``src_full`` and unmaps ``src_full``.

        SGLang's ``RecoverSWAWithLockedFull``: a cached node that lost its SWA KV (an SWA
        tombstone) takes a request's SWA KV of the same tokens while keeping its own full slots;
        the request's duplicate full slots are then freed full-only. Nothing is allocated or
        freed; the mapping of ``src_full`` is cleared in the same step, so no SWA slot ever has
        two owners.

        Args:
            dst_full: ``[n]`` int64 CPU full slots, unmapped, distinct.
            src_full: ``[n]`` int64 CPU full slots, mapped, distinct, disjoint from ``dst_full``;
                ``src_full[i]``'s SWA slot goes to ``dst_full[i]``.

        Raises:
            InvalidArgumentError: wrong type, dtype, dim or device; lengths differ; a ``dst``
                slot already mapped or a ``src`` slot unmapped; repeated or shared slots.
                Nothing changes.
            IndexOutOfRangeError: a slot is outside ``[0, num_full_slots)``.
        """
        dst = self._full_array(dst_full, "move_mapping")
        src = self._full_array(src_full, "move_mapping")
        if dst.size != src.size:
            raise InvalidArgumentError(
                f"move_mapping: {dst.size} dst slots but {src.size} src slots"
            )
        both = np.sort(np.concatenate((dst, src)))
        if (both[1:] == both[:-1]).any():
            raise InvalidArgumentError("move_mapping: repeated or shared full slots")
        if (self._map[dst] != _UNMAPPED).any():
            raise InvalidArgumentError("move_mapping: a dst full slot already has an SWA slot")
        swa = self._map[src]
        if (swa == _UNMAPPED).any():
            raise InvalidArgumentError("move_mapping: a src full slot has no SWA slot")
        self._map[src] = _UNMAPPED
        self._map[dst] = swa

    def reset(self) -> None:
        """Frees every SWA slot and clears the whole mapping (the cache's reset)."""
        self._map[:] = _UNMAPPED
        self.allocator.reset()

    def _full_array(self, full_indices: torch.Tensor, fn: str) -> np.ndarray:
        """Checks ``[n]`` int64 CPU full slot indices; returns them as a numpy view."""
        _check_index_tensor(full_indices, f"{fn}: full_indices")
        full = full_indices.numpy()
        if full.size and (full.min() < 0 or full.max() >= self._num_full_slots):
            bad = int(full.min()) if full.min() < 0 else int(full.max())
            raise IndexOutOfRangeError(
                f"{fn}: full_indices: slot index {bad} out of range [0, {self._num_full_slots})"
            )
        return full

    def _check_whole_pages(self, full: np.ndarray, fn: str) -> None:
        """Raises InvalidArgumentError unless ``full`` is a list of whole pages."""
        size = self._page_size
        if full.size % size != 0:
            raise InvalidArgumentError(
                f"{fn}: full_indices: expected a length that is a multiple of page_size={size}, "
                f"got {full.size}"
            )
        if size == 1:
            return
        rows = full.reshape(-1, size)
        starts = rows[:, :1]
        bad = (rows != starts + self._page_offsets).any(axis=1) | (starts[:, 0] % size != 0)
        if bad.any():
            page = int(np.flatnonzero(bad)[0])
            raise InvalidArgumentError(
                f"{fn}: full_indices[{page * size}:{(page + 1) * size}] = "
                f"{rows[page].tolist()} is not one whole page of page_size={size} in order"
            )

    def _whole_swa_pages(self, swa_indices: np.ndarray, fn: str) -> np.ndarray:
        """Orders mapped SWA slots page by page; raises if they cover part of a page.

        Args:
            swa_indices: ``[m]`` int64 SWA slots, distinct (their full slots are distinct and the
                mapping is injective).
            fn: the caller's name, for error messages.

        Returns:
            ``[m]`` the same slots sorted ascending: whole pages in order, as the allocator's
            ``free`` takes them.
        """
        ordered = np.sort(swa_indices)
        size = self._page_size
        if size == 1:
            return ordered
        rows = ordered.reshape(-1, size) if ordered.size % size == 0 else None
        if (
            rows is None
            or (rows != rows[:, :1] + self._page_offsets).any()
            or (rows[:, 0] % size != 0).any()
        ):
            pages, counts = np.unique(ordered // size, return_counts=True)
            partial = pages[counts != size]
            page = int(partial[0]) if partial.size else int(ordered[0] // size)
            raise InvalidArgumentError(
                f"{fn}: full_indices: the mapped slots cover part of SWA page {page} "
                f"(page_size={size}); free the full slots of whole pages"
            )
        return ordered
