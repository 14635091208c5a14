"""Paged slot allocator of the device tier (SGLang's ``PagedTokenToKVPoolAllocator``, simplified).

The allocator hands out token slot indices of a KV pool in whole pages. It knows nothing of the
pool's tensors: it only decides which slots are owned. Slot indices are CPU ``int64`` tensors,
because the radix tree that stores them lives on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError, PoolExhaustedError

__all__ = ["PageAllocator"]


def _check_index_tensor(indices: torch.Tensor, name: str) -> None:
    """Checks that ``indices`` is a 1-D CPU ``int64`` tensor.

    Args:
        indices: the tensor to check.
        name: the argument name used in the error message.

    Raises:
        InvalidArgumentError: ``indices`` is not a tensor, or has the wrong dtype, device or dim.
    """
    if not isinstance(indices, torch.Tensor):
        raise InvalidArgumentError(f"{name}: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise InvalidArgumentError(f"{name}: expected dtype torch.int64, got {indices.dtype}")
    if indices.device.type != "cpu":
        raise InvalidArgumentError(f"{name}: expected a CPU tensor, got device {indices.device}")
    if indices.dim() != 1:
        raise InvalidArgumentError(f"{name}: expected a 1-D tensor, got {indices.dim()}-D")


class PageAllocator:
    """Allocates token slots of a pool in whole pages.

    Page ``p`` owns slots ``p * page_size`` to ``p * page_size + page_size - 1``. Free pages wait
    in a FIFO queue: ``alloc`` takes pages from its front and ``free`` appends them at its back, as
    SGLang's paged allocator does, so the order of returned slots is deterministic for a given call
    sequence.

    Every method validates its arguments before it changes anything: a call that raises has no
    effect.
    """

    def __init__(self, num_slots: int, page_size: int) -> None:
        """Creates an allocator with every page free.

        Args:
            num_slots: pool size in tokens; a positive multiple of ``page_size``.
            page_size: tokens per page, at least 1.

        Raises:
            InvalidArgumentError: ``page_size < 1``, ``num_slots <= 0`` or ``num_slots`` is not a
                multiple of ``page_size``.
        """
        if page_size < 1:
            raise InvalidArgumentError(f"page_size: expected >= 1, got {page_size}")
        if num_slots <= 0 or num_slots % page_size != 0:
            raise InvalidArgumentError(
                f"num_slots: expected a positive multiple of page_size={page_size}, got {num_slots}"
            )
        self._num_slots = num_slots
        self._page_size = page_size
        self._num_pages = num_slots // page_size
        # Slot offsets inside a page; added to page starts to expand pages into slots with one op.
        self._page_offsets = np.arange(page_size, dtype=np.int64)
        # FIFO of free page ids as a ring buffer over ``[num_pages]`` int64: alloc takes
        # ``_num_free`` pages from ``_head``, free appends behind them. numpy, not torch: these are
        # small arrays on every request, and a numpy op costs ~1 µs where a torch CPU op costs
        # ~5-10 µs. Mutated only by alloc/free/reset.
        self._ring = np.empty(self._num_pages, dtype=np.int64)
        self._head = 0
        self._num_free = 0
        # ``[num_pages]`` bool, True where the page is free. Mirrors the ring so that double-free
        # and ``is_free`` checks are one vectorised gather instead of a queue search.
        self._page_is_free = np.ones(self._num_pages, dtype=bool)
        self.reset()

    @property
    def num_slots(self) -> int:
        """Pool size in tokens."""
        return self._num_slots

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return self._page_size

    @property
    def num_pages(self) -> int:
        """Pool size in pages."""
        return self._num_pages

    @property
    def num_free_pages(self) -> int:
        """Number of free pages."""
        return self._num_free

    @property
    def _free_pages(self) -> np.ndarray:
        """The free-page queue in allocation order (a copy; for tests and debugging)."""
        return self._ring_slice(self._head, self._num_free)

    def available_size(self) -> int:
        """Returns the number of free slots, in tokens."""
        return self.num_free_pages * self._page_size

    def reset(self) -> None:
        """Frees every page; the free queue is back in ascending page order."""
        self._ring[:] = np.arange(self._num_pages, dtype=np.int64)
        self._head = 0
        self._num_free = self._num_pages
        self._page_is_free[:] = True

    def alloc(self, num_tokens: int) -> torch.Tensor:
        """Allocates ``num_tokens`` slots in whole pages from the front of the free queue.

        Args:
            num_tokens: number of slots to allocate, in tokens; a non-negative multiple of
                ``page_size``.

        Returns:
            ``[num_tokens]`` int64 CPU slot indices; each run of ``page_size`` entries is one whole
            page in ascending slot order. Empty when ``num_tokens == 0``.

        Raises:
            InvalidArgumentError: ``num_tokens`` is negative or not a multiple of ``page_size``.
            PoolExhaustedError: fewer free pages than needed; nothing is allocated.
        """
        if num_tokens < 0 or num_tokens % self._page_size != 0:
            raise InvalidArgumentError(
                f"alloc: num_tokens: expected a non-negative multiple of page_size="
                f"{self._page_size}, got {num_tokens}"
            )
        num_pages = num_tokens // self._page_size
        if num_pages > self.num_free_pages:
            raise PoolExhaustedError(
                f"alloc: need {num_pages} pages ({num_tokens} tokens), "
                f"only {self.num_free_pages} pages free"
            )
        pages = self._ring_slice(self._head, num_pages)
        self._head = (self._head + num_pages) % self._num_pages
        self._num_free -= num_pages
        self._page_is_free[pages] = False
        return self._pages_to_slots(pages)

    def free(self, indices: torch.Tensor) -> None:
        """Returns whole pages to the back of the free queue.

        Args:
            indices: ``[num_tokens]`` int64 CPU slot indices, ``num_tokens`` a multiple of
                ``page_size``; each run of ``page_size`` entries must be one whole page in
                ascending order, as ``alloc`` returns them.

        Raises:
            InvalidArgumentError: wrong dtype, device or dim; length not a multiple of
                ``page_size``; a run that is not one whole page (the message names the first
                offending position); a page that is already free or repeated in ``indices``
                (double free). Nothing is freed.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``. Nothing is freed.
        """
        pages = self._validate_pages(indices, "free")
        if pages.size == 0:
            return
        sorted_pages = np.sort(pages)
        repeated = sorted_pages[1:][sorted_pages[1:] == sorted_pages[:-1]]
        if repeated.size > 0:
            raise InvalidArgumentError(f"free: double free of page {int(repeated[0])}")
        already_free = pages[self._page_is_free[pages]]
        if already_free.size > 0:
            raise InvalidArgumentError(f"free: double free of page {int(already_free[0])}")
        self._page_is_free[pages] = True
        tail = (self._head + self._num_free) % self._num_pages
        first = min(pages.size, self._num_pages - tail)
        self._ring[tail : tail + first] = pages[:first]
        self._ring[: pages.size - first] = pages[first:]
        self._num_free += pages.size

    def is_free(self, indices: torch.Tensor) -> torch.Tensor:
        """Tells, per slot, whether its page is free.

        Args:
            indices: ``[n]`` int64 CPU slot indices, any order, pages need not be whole.

        Returns:
            ``[n]`` bool CPU tensor, True where the slot's page is free.

        Raises:
            InvalidArgumentError: wrong dtype, device or dim.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.
        """
        _check_index_tensor(indices, "is_free: indices")
        slots = indices.numpy()
        self._check_range(slots, "is_free")
        return torch.from_numpy(self._page_is_free[slots // self._page_size])

    def free_slot_indices(self) -> torch.Tensor:
        """Returns every free slot.

        Returns:
            ``[available_size()]`` int64 CPU slot indices, sorted ascending.
        """
        return self._pages_to_slots(np.flatnonzero(self._page_is_free))

    def _ring_slice(self, start: int, count: int) -> np.ndarray:
        """Copies ``count`` entries of the ring starting at ``start``, wrapping around."""
        end = start + count
        if end <= self._num_pages:
            return self._ring[start:end].copy()
        return np.concatenate((self._ring[start:], self._ring[: end - self._num_pages]))

    def _pages_to_slots(self, pages: np.ndarray) -> torch.Tensor:
        """Expands ``[p]`` page ids into ``[p * page_size]`` int64 CPU slot indices."""
        return torch.from_numpy((pages[:, None] * self._page_size + self._page_offsets).reshape(-1))

    def _check_range(self, indices: np.ndarray, fn: str) -> None:
        """Raises IndexOutOfRangeError if a slot of ``indices`` is outside ``[0, num_slots)``."""
        if indices.size == 0:
            return
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= self._num_slots:
            bad = lo if lo < 0 else hi
            raise IndexOutOfRangeError(
                f"{fn}: slot index {bad} out of range [0, {self._num_slots})"
            )

    def _validate_pages(self, indices: torch.Tensor, fn: str) -> np.ndarray:
        """Checks that ``indices`` is a list of whole pages and returns their page ids.

        Args:
            indices: ``[num_tokens]`` int64 CPU slot indices.
            fn: the calling method's name, for error messages.

        Returns:
            ``[num_tokens // page_size]`` int64 page ids (numpy), in the order of ``indices``.

        Raises:
            InvalidArgumentError: see ``free``.
            IndexOutOfRangeError: see ``free``.
        """
        _check_index_tensor(indices, f"{fn}: indices")
        if indices.numel() % self._page_size != 0:
            raise InvalidArgumentError(
                f"{fn}: indices: expected a length that is a multiple of page_size="
                f"{self._page_size}, got {indices.numel()}"
            )
        slots = indices.numpy()
        self._check_range(slots, fn)
        rows = slots.reshape(-1, self._page_size)
        expected = rows[:, :1] + self._page_offsets
        bad = (rows != expected).reshape(-1)
        bad[:: self._page_size] |= rows[:, 0] % self._page_size != 0
        if bool(bad.any()):
            pos = int(np.flatnonzero(bad)[0])
            raise InvalidArgumentError(
                f"{fn}: indices[{pos}] = {int(slots[pos])} breaks a whole page: each run of "
                f"page_size={self._page_size} entries must be p*page_size, p*page_size+1, ..."
            )
        return rows[:, 0] // self._page_size
