"""Mamba state pools, device and host (L2): SGLang's ``MambaPool`` and ``MambaPoolHost``.

A Mamba (SSM, linear-attention) layer carries no per-token KV: per sequence it keeps a recurrent
state of fixed size, a *conv* state (the last inputs of its short convolution) and a *temporal*
state (the SSM state). One slot of these pools holds one such state for every Mamba layer: the
state of one sequence at one point, a node of the radix tree or a running request. Slots are
allocated one at a time (a :class:`PageAllocator` with ``page_size=1``), as SGLang's
``MambaSlotAllocator`` does.

Copy-on-write. A request that continues from a cached state must not advance the node's state in
place: the node (and every other request matching it) would then see a state from a longer
prefix. :meth:`MambaStatePool.fork_from` gives the request a fresh slot filled with a copy; the
node's slot itself is never handed out (SGLang's ``fork_from`` / ``copy_from``; PR #30986 shows
what a request slot whose copy never ran costs: silently wrong output).

Transfers between the two pools use the torch "direct" backend and follow the stream and lifetime
rules of :mod:`hicache.transfer`: every copy is enqueued on the current CUDA stream, nothing
synchronises, copies are ``non_blocking`` when the device pool is on CUDA and the host pool is
pinned, and the index copies made on the device are allocated on the stream that uses them
(DESIGN.md failure class 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from hicache.memory.allocator import PageAllocator
from hicache.memory.host_pool import HostLayout, check_slot_indices, check_transfer_indices

__all__ = ["MambaHostPool", "MambaStatePool", "MambaTransferIndices"]

# Host layouts SGLang's ``MambaPoolHost`` supports (``pool_host/mamba.py`` asserts them).
_HOST_LAYOUTS = (HostLayout.PAGE_FIRST, HostLayout.PAGE_FIRST_DIRECT)


def _check_shape(shape: object, name: str, fn: str) -> tuple[int, ...]:
    """Returns ``shape`` as a tuple of positive ints, or raises InvalidArgumentError."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise InvalidArgumentError(
            f"{fn}: {name}: expected a sequence of positive ints, got {type(shape).__name__}"
        )
    dims = tuple(shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
        raise InvalidArgumentError(f"{fn}: {name}: expected positive ints, got {list(dims)}")
    return dims


def _check_count(value: object, name: str, fn: str) -> int:
    """Returns ``value`` if it is a non-bool int, else raises InvalidArgumentError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{fn}: {name}: expected an int, got {type(value).__name__}")
    return value


def _check_num_states(num_states: object) -> int:
    """Returns the ``num_states`` argument of ``alloc`` if it is a non-negative int, else raises."""
    count = _check_count(num_states, "num_states", "alloc")
    if count < 0:
        raise InvalidArgumentError(f"alloc: num_states: expected >= 0, got {count}")
    return count


def _check_states(
    pool: MambaStatePool | MambaHostPool,
    conv: torch.Tensor,
    temporal: torch.Tensor,
    num_states: int,
    device: torch.device,
    fn: str,
) -> None:
    """Checks the ``[num_layers, n, *shape]`` conv and temporal tensors of a write."""
    expected = (
        ("conv", conv, pool.conv_shape, pool.conv_dtype),
        ("temporal", temporal, pool.temporal_shape, pool.temporal_dtype),
    )
    for name, val, state_shape, dtype in expected:
        if not isinstance(val, torch.Tensor):
            raise InvalidArgumentError(
                f"{fn}: {name}: expected a torch.Tensor, got {type(val).__name__}"
            )
        shape = (pool.num_layers, num_states, *state_shape)
        if tuple(val.shape) != shape:
            raise InvalidArgumentError(
                f"{fn}: {name}: expected shape {list(shape)}, got {list(val.shape)}"
            )
        if val.dtype != dtype:
            raise InvalidArgumentError(f"{fn}: {name}: expected dtype {dtype}, got {val.dtype}")
        if val.device != device:
            raise InvalidArgumentError(f"{fn}: {name}: expected device {device}, got {val.device}")


def _check_allocated(allocator: PageAllocator, indices: torch.Tensor, name: str) -> None:
    """Raises InvalidArgumentError if a slot of ``indices`` (CPU, in range) is free."""
    if indices.numel() == 0:
        return
    free = allocator.is_free(indices)
    if bool(free.any()):
        slot = int(indices[free][0])
        raise InvalidArgumentError(f"{name}: slot {slot} is not allocated")


def _first_repeat(indices: torch.Tensor) -> int | None:
    """The smallest value that occurs twice in ``indices`` (CPU int64), or None."""
    if indices.numel() < 2:
        return None
    values = np.sort(indices.numpy())
    repeated = values[1:][values[1:] == values[:-1]]
    return int(repeated[0]) if repeated.size else None


class MambaStatePool:
    """Conv and temporal states of every Mamba layer, one slot per sequence, on the device.

    ``conv_state`` is ``[num_layers, num_slots, *conv_shape]`` and ``temporal_state`` is
    ``[num_layers, num_slots, *temporal_shape]`` (SGLang's ``mamba_cache.conv[0]`` and
    ``mamba_cache.temporal``; SGLang allows several conv states per layer, this pool keeps one).
    ``layer`` here is a Mamba layer's position among the model's Mamba layers, not its model layer
    id. Unlike SGLang, there is no padding slot: every slot in ``[0, num_slots)`` can be allocated.

    Slots are owned through :attr:`allocator`; :meth:`alloc`, :meth:`free` and :meth:`fork_from`
    are the only callers that should change it. Not thread-safe: the cache's lock serialises
    every call, as for the KV pools.

    Every method validates its arguments before it changes anything: a call that raises has no
    effect.
    """

    # ``[num_layers, num_slots, *conv_shape]``, ``conv_dtype``, on ``device``. Written by the model,
    # ``write``, ``copy_slots``/``fork_from`` and the host pool's loads.
    conv_state: torch.Tensor
    # ``[num_layers, num_slots, *temporal_shape]``, ``temporal_dtype``, on ``device``. Same writers.
    temporal_state: torch.Tensor
    # Owner of the slots (page size 1): one allocated slot is one state held by a node or request.
    allocator: PageAllocator

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        conv_shape: Sequence[int],
        temporal_shape: Sequence[int],
        conv_dtype: torch.dtype = torch.bfloat16,
        temporal_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        """Allocates zeroed state buffers with every slot free.

        Args:
            num_slots: number of states the pool holds; positive.
            num_layers: number of Mamba layers; positive.
            conv_shape: shape of one layer's conv state, e.g. ``(conv_dim, kernel_size - 1)``;
                positive ints.
            temporal_shape: shape of one layer's temporal (SSM) state, e.g.
                ``(num_heads, head_dim, state_size)``; positive ints.
            conv_dtype: element dtype of the conv state.
            temporal_dtype: element dtype of the temporal state (often float32).
            device: where the buffers live; ``None`` picks ``"cuda"`` if available, else
                ``"cpu"``.

        Raises:
            InvalidArgumentError: a count is not a positive int, a shape is not a non-empty
                sequence of positive ints, or a dtype is not a ``torch.dtype``.
        """
        fn = "MambaStatePool"
        for name, value in (("num_slots", num_slots), ("num_layers", num_layers)):
            if _check_count(value, name, fn) <= 0:
                raise InvalidArgumentError(f"{fn}: {name}: expected > 0, got {value}")
        self._conv_shape = _check_shape(conv_shape, "conv_shape", fn)
        self._temporal_shape = _check_shape(temporal_shape, "temporal_shape", fn)
        for name, dtype in (("conv_dtype", conv_dtype), ("temporal_dtype", temporal_dtype)):
            if not isinstance(dtype, torch.dtype):
                raise InvalidArgumentError(
                    f"{fn}: {name}: expected a torch.dtype, got {type(dtype).__name__}"
                )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._num_slots = num_slots
        self._num_layers = num_layers
        self.allocator = PageAllocator(num_slots, 1)
        self.conv_state = torch.zeros(
            (num_layers, num_slots, *self._conv_shape), dtype=conv_dtype, device=device
        )
        self.temporal_state = torch.zeros(
            (num_layers, num_slots, *self._temporal_shape), dtype=temporal_dtype, device=device
        )
        # The buffer's device, not the argument (``"cuda"`` becomes ``cuda:0``).
        self._device = self.conv_state.device

    @property
    def num_slots(self) -> int:
        """Number of states the pool holds."""
        return self._num_slots

    @property
    def num_layers(self) -> int:
        """Number of Mamba layers."""
        return self._num_layers

    @property
    def conv_shape(self) -> tuple[int, ...]:
        """Shape of one layer's conv state."""
        return self._conv_shape

    @property
    def temporal_shape(self) -> tuple[int, ...]:
        """Shape of one layer's temporal state."""
        return self._temporal_shape

    @property
    def conv_dtype(self) -> torch.dtype:
        """Element dtype of the conv state."""
        return self.conv_state.dtype

    @property
    def temporal_dtype(self) -> torch.dtype:
        """Element dtype of the temporal state."""
        return self.temporal_state.dtype

    @property
    def device(self) -> torch.device:
        """Device of the buffers."""
        return self._device

    @property
    def bytes_per_slot(self) -> int:
        """Size of one state (conv and temporal, all layers), in bytes."""
        return (self.conv_state[:, 0].numel() * self.conv_state.element_size()) + (
            self.temporal_state[:, 0].numel() * self.temporal_state.element_size()
        )

    @property
    def size_bytes(self) -> int:
        """Total size of both buffers, in bytes."""
        return self.bytes_per_slot * self._num_slots

    def available_size(self) -> int:
        """Returns the number of free slots."""
        return self.allocator.available_size()

    def alloc(self, num_states: int) -> torch.Tensor:
        """Allocates ``num_states`` slots; their contents are whatever the last owner left.

        Args:
            num_states: number of slots; a non-negative int.

        Returns:
            ``[num_states]`` int64 CPU slot indices.

        Raises:
            InvalidArgumentError: ``num_states`` is not a non-negative int.
            PoolExhaustedError: fewer free slots than ``num_states``; nothing is allocated.
        """
        return self.allocator.alloc(_check_num_states(num_states))

    def free(self, indices: torch.Tensor) -> None:
        """Returns slots to the pool.

        Args:
            indices: ``[n]`` int64 CPU slot indices, any order.

        Raises:
            InvalidArgumentError: wrong dtype, device or dim; a slot that is already free or
                repeated in ``indices`` (double free). Nothing is freed.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``. Nothing is freed.
        """
        self.allocator.free(indices)

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads the states in slots ``indices``, all layers.

        Args:
            indices: ``[n]`` int64 slot indices, any device (moved to the pool's device).

        Returns:
            ``(conv, temporal)``: new tensors ``[num_layers, n, *conv_shape]`` of ``conv_dtype``
            and ``[num_layers, n, *temporal_shape]`` of ``temporal_dtype``, on the pool's device.

        Raises:
            InvalidArgumentError: ``indices`` has the wrong type, dtype or dim.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.
        """
        idx = self._prepare_indices(indices, "read: indices")
        return self.conv_state.index_select(1, idx), self.temporal_state.index_select(1, idx)

    def write(self, indices: torch.Tensor, conv: torch.Tensor, temporal: torch.Tensor) -> None:
        """Writes ``n`` states, all layers, into slots ``indices``.

        Args:
            indices: ``[n]`` int64 slot indices, any device (moved to the pool's device).
            conv: ``[num_layers, n, *conv_shape]``, ``conv_dtype``, on the pool's device.
            temporal: ``[num_layers, n, *temporal_shape]``, ``temporal_dtype``, on the pool's
                device.

        Raises:
            InvalidArgumentError: wrong type, dtype, device, dim or shape of an argument.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.

        Note:
            Repeated slots in ``indices`` are not checked; which state lands there is
            unspecified. Whether the slots are allocated is not checked either: the model writes
            the slots its requests own.
        """
        check_slot_indices(indices, "write: indices", self._num_slots, require_cpu=False)
        _check_states(self, conv, temporal, indices.numel(), self._device, "write")
        idx = indices.to(self._device, non_blocking=True)
        self.conv_state.index_copy_(1, idx, conv)
        self.temporal_state.index_copy_(1, idx, temporal)

    def copy_slots(self, src_indices: torch.Tensor, dst_indices: torch.Tensor) -> None:
        """Copies the states of slots ``src_indices`` into slots ``dst_indices``, all layers.

        SGLang's ``MambaPool.copy_from``: the copy of copy-on-write. Slot ``src_indices[i]`` goes
        to ``dst_indices[i]``; the sources are not changed. Enqueued on the current stream.

        Args:
            src_indices: ``[n]`` int64 CPU slot indices, allocated; may repeat (one state forked
                into several slots).
            dst_indices: ``[n]`` int64 CPU slot indices, allocated, distinct, and none of them a
                source slot.

        Raises:
            InvalidArgumentError: wrong dtype, device or dim; lengths differ; a repeated
                destination; a slot that is both a source and a destination; a slot that is not
                allocated. Nothing is copied.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``. Nothing is copied.
        """
        self._check_copy(src_indices, dst_indices, "copy_slots")
        self._copy(src_indices, dst_indices)

    def fork_from(self, src_indices: torch.Tensor) -> torch.Tensor:
        """Allocates new slots holding copies of the states in ``src_indices`` (copy-on-write).

        SGLang's ``MambaPool.fork_from``. A request that continues from a node's cached state
        gets the returned slot and advances it; the node's slot is never handed out, so the
        node keeps the state of its own prefix.

        Args:
            src_indices: ``[n]`` int64 CPU slot indices, allocated; may repeat.

        Returns:
            ``[n]`` int64 CPU indices of new allocated slots, in the order of ``src_indices``,
            disjoint from them.

        Raises:
            InvalidArgumentError: wrong dtype, device or dim; a source slot that is not
                allocated. Nothing is allocated or copied.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``. Nothing is allocated.
            PoolExhaustedError: fewer free slots than ``n``. Nothing is allocated.
        """
        check_slot_indices(src_indices, "fork_from: src_indices", self._num_slots, require_cpu=True)
        _check_allocated(self.allocator, src_indices, "fork_from: src_indices")
        dst = self.allocator.alloc(src_indices.numel())
        self._copy(src_indices, dst)
        return dst

    def _check_copy(self, src: torch.Tensor, dst: torch.Tensor, fn: str) -> None:
        """Validates the slot pairs of :meth:`copy_slots`."""
        check_slot_indices(src, f"{fn}: src_indices", self._num_slots, require_cpu=True)
        check_slot_indices(dst, f"{fn}: dst_indices", self._num_slots, require_cpu=True)
        if src.numel() != dst.numel():
            raise InvalidArgumentError(
                f"{fn}: dst_indices: length {dst.numel()} differs from src_indices length "
                f"{src.numel()}"
            )
        repeat = _first_repeat(dst)
        if repeat is not None:
            raise InvalidArgumentError(f"{fn}: dst_indices: slot {repeat} is repeated")
        both = dst[torch.isin(dst, src)]
        if both.numel() > 0:
            raise InvalidArgumentError(
                f"{fn}: dst_indices: slot {int(both[0])} is also a source slot (src != dst)"
            )
        _check_allocated(self.allocator, src, f"{fn}: src_indices")
        _check_allocated(self.allocator, dst, f"{fn}: dst_indices")

    def init_state(self, dst: int, src: int | None = None) -> None:
        """Fills slot ``dst`` with a copy of slot ``src``'s state, or zeroes (the initial state).

        The one-slot copy-on-write of :meth:`HiCache.fork_mamba`, on the current stream, without
        the allocation checks of :meth:`copy_slots` (the cache owns both slots: the tree's and
        one it has just allocated), so it costs two slice copies.

        Args:
            dst: the slot to fill.
            src: the slot to copy, or None for a zeroed state.

        Raises:
            IndexOutOfRangeError: a slot outside ``[0, num_slots)``.
            InvalidArgumentError: ``src == dst``.
        """
        for slot in (dst,) if src is None else (dst, src):
            if not 0 <= slot < self._num_slots:
                raise IndexOutOfRangeError(
                    f"init_state: slot {slot} out of range [0, {self._num_slots})"
                )
        if src == dst:
            raise InvalidArgumentError(f"init_state: src and dst are the same slot {dst}")
        for buf in (self.conv_state, self.temporal_state):
            if src is None:
                buf[:, dst].zero_()
            else:
                buf[:, dst].copy_(buf[:, src])

    def _copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Gathers the source states, then scatters them: one op of each per buffer."""
        if src.numel() == 0:
            return
        src_dev = _to_device(src, self._device)
        dst_dev = _to_device(dst, self._device)
        for buf in (self.conv_state, self.temporal_state):
            buf.index_copy_(1, dst_dev, buf.index_select(1, src_dev))

    def _prepare_indices(self, indices: torch.Tensor, name: str) -> torch.Tensor:
        """Validates ``[n]`` int64 slot indices and returns them on the pool's device."""
        check_slot_indices(indices, name, self._num_slots, require_cpu=False)
        return _to_device(indices, self._device)


@dataclass(frozen=True)
class MambaTransferIndices:
    """The validated indices of one Mamba state transfer, where the direct backend reads them.

    Made by :meth:`MambaHostPool.prepare`; immutable and never aliased with tree state or the
    caller's tensors (DESIGN.md failure class 1). Slot ``device_indices[i]`` pairs with slot
    ``host_indices[i]``.

    Attributes:
        host_indices: ``[n]`` int64 contiguous CPU host slot indices.
        device_indices: ``[n]`` int64 contiguous device slot indices, on the device pool's device.
            Copied there on the stream that was current in ``prepare``; see
            :meth:`MambaHostPool.prepare` for who keeps them alive.
    """

    host_indices: torch.Tensor
    device_indices: torch.Tensor

    @property
    def num_states(self) -> int:
        """States in the transfer."""
        return int(self.host_indices.numel())


class MambaHostPool:
    """Conv and temporal states of the host tier, in CPU memory (pinned where CUDA exists).

    It mirrors the layers, shapes and dtypes of the :class:`MambaStatePool` it backs up, owns a
    :class:`PageAllocator` (page size 1) for its slots, and copies states to and from that pool.
    With ``N = num_slots`` and ``L = num_layers``, per state kind (conv, temporal):

    - ``page_first``: ``[N, L, *shape]``: one slot's state of all layers is contiguous (a storage
      page of the L3 tier is one slot).
    - ``page_first_direct``: ``[N, L, 1, *shape]``: page, then layer, then slot in page, with one
      slot per page (the page size of a state pool is always 1). The bytes sit at the same
      offsets as in ``page_first``: SGLang allocates both as ``(size, L, 1, *shape)`` and tells
      them apart only by the copy routine it pairs with each (``page_first`` with its ``kernel``
      io backend, ``page_first_direct`` with per-page ``direct`` copies). Here the same direct
      torch copies serve both; the layout only decides the buffers' shapes.

    ``layer_first`` is rejected, as in SGLang's ``MambaPoolHost``. Unlike SGLang, the pool has no
    extra padding slot: ``num_slots`` is exactly what was asked for.

    Not thread-safe (the cache's lock serialises calls). Every method validates its arguments
    before it changes anything: a call that raises has no effect.
    """

    # Per the layout (see the class docstring), CPU, pinned when ``is_pinned``. Written by
    # ``write`` and ``backup_all_layers`` only.
    conv_buffer: torch.Tensor
    temporal_buffer: torch.Tensor
    # Owner of the host slots: the cache allocates and frees them here, nobody else.
    allocator: PageAllocator
    # The pool this one backs up and loads into; fixed at construction.
    device_pool: MambaStatePool

    def __init__(
        self,
        device_pool: MambaStatePool,
        num_slots: int,
        layout: str | HostLayout = HostLayout.PAGE_FIRST,
        pin_memory: bool | None = None,
    ) -> None:
        """Allocates zeroed host buffers shaped like ``device_pool``, with ``num_slots`` slots.

        Args:
            device_pool: the device pool to back up.
            num_slots: number of states the host pool holds; positive.
            layout: ``page_first`` or ``page_first_direct`` (a :class:`HostLayout` or its
                string value).
            pin_memory: allocate page-locked memory (needed for asynchronous copies); ``None``
                pins when ``torch.cuda.is_available()``.

        Raises:
            InvalidArgumentError: ``device_pool`` is not a :class:`MambaStatePool`; ``num_slots``
                is not a positive int; ``layout`` is unknown or ``layer_first`` (the message
                names the supported layouts); ``pin_memory=True`` without CUDA.
        """
        fn = "MambaHostPool"
        if not isinstance(device_pool, MambaStatePool):
            raise InvalidArgumentError(
                f"{fn}: device_pool: expected a MambaStatePool, got {type(device_pool).__name__}"
            )
        supported = [m.value for m in _HOST_LAYOUTS]
        try:
            self._layout = HostLayout(layout)
        except ValueError:
            raise InvalidArgumentError(
                f"{fn}: layout: expected one of {supported}, got {layout!r}"
            ) from None
        if self._layout not in _HOST_LAYOUTS:
            raise InvalidArgumentError(
                f"{fn}: layout: {self._layout.value!r} is not supported for Mamba states; "
                f"expected one of {supported} (as SGLang's MambaPoolHost)"
            )
        if _check_count(num_slots, "num_slots", fn) <= 0:
            raise InvalidArgumentError(f"{fn}: num_slots: expected > 0, got {num_slots}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if pin_memory and not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"{fn}: pin_memory: True needs CUDA (torch.cuda.is_available() is False)"
            )
        self.device_pool = device_pool
        self.allocator = PageAllocator(num_slots, 1)
        self._num_slots = num_slots
        self._is_pinned = bool(pin_memory)
        unit = (1,) if self._layout is HostLayout.PAGE_FIRST_DIRECT else ()
        layers = device_pool.num_layers
        self.conv_buffer = torch.zeros(
            (num_slots, layers, *unit, *device_pool.conv_shape),
            dtype=device_pool.conv_dtype,
            pin_memory=self._is_pinned,
        )
        self.temporal_buffer = torch.zeros(
            (num_slots, layers, *unit, *device_pool.temporal_shape),
            dtype=device_pool.temporal_dtype,
            pin_memory=self._is_pinned,
        )
        # ``[N, L, *shape]`` views (not copies) of the buffers, whatever the layout: the only
        # offset function the transfers need (slot ``s`` of layer ``l`` is ``view[s, l]``).
        self._slot_views = (
            self.conv_buffer.view(num_slots, layers, *device_pool.conv_shape),
            self.temporal_buffer.view(num_slots, layers, *device_pool.temporal_shape),
        )

    @property
    def num_slots(self) -> int:
        """Number of states the pool holds."""
        return self._num_slots

    @property
    def num_layers(self) -> int:
        """Number of Mamba layers."""
        return self.device_pool.num_layers

    @property
    def conv_shape(self) -> tuple[int, ...]:
        """Shape of one layer's conv state."""
        return self.device_pool.conv_shape

    @property
    def temporal_shape(self) -> tuple[int, ...]:
        """Shape of one layer's temporal state."""
        return self.device_pool.temporal_shape

    @property
    def conv_dtype(self) -> torch.dtype:
        """Element dtype of the conv state."""
        return self.conv_buffer.dtype

    @property
    def temporal_dtype(self) -> torch.dtype:
        """Element dtype of the temporal state."""
        return self.temporal_buffer.dtype

    @property
    def layout(self) -> HostLayout:
        """Memory layout of the buffers."""
        return self._layout

    @property
    def device(self) -> torch.device:
        """Always the CPU."""
        return self.conv_buffer.device

    @property
    def is_pinned(self) -> bool:
        """Whether the buffers are page-locked memory."""
        return self._is_pinned

    @property
    def size_bytes(self) -> int:
        """Size of both buffers, in bytes."""
        return sum(buf.numel() * buf.element_size() for buf in self._slot_views)

    def available_size(self) -> int:
        """Returns the number of free host slots."""
        return self.allocator.available_size()

    def alloc(self, num_states: int) -> torch.Tensor:
        """Allocates ``num_states`` host slots.

        Args:
            num_states: number of slots; a non-negative int.

        Returns:
            ``[num_states]`` int64 CPU host slot indices.

        Raises:
            InvalidArgumentError: ``num_states`` is not a non-negative int.
            PoolExhaustedError: fewer free slots than ``num_states``; nothing is allocated.
        """
        return self.allocator.alloc(_check_num_states(num_states))

    def free(self, indices: torch.Tensor) -> None:
        """Returns host slots to the pool.

        Args:
            indices: ``[n]`` int64 CPU host slot indices, any order.

        Raises:
            InvalidArgumentError: wrong dtype, device or dim; a double free. Nothing is freed.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``. Nothing is freed.
        """
        self.allocator.free(indices)

    def read(self, host_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads the states in host slots ``host_indices``, all layers, whatever the layout.

        Args:
            host_indices: ``[n]`` int64 CPU host slot indices.

        Returns:
            ``(conv, temporal)``: new CPU tensors ``[num_layers, n, *conv_shape]`` and
            ``[num_layers, n, *temporal_shape]`` (the convention of
            :meth:`MambaStatePool.read`).

        Raises:
            InvalidArgumentError: ``host_indices`` has the wrong type, dtype, dim or device.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.
        """
        check_slot_indices(host_indices, "read: host_indices", self._num_slots, require_cpu=True)
        conv, temporal = (
            view.index_select(0, host_indices).transpose(0, 1).contiguous()
            for view in self._slot_views
        )
        return conv, temporal

    def write(self, host_indices: torch.Tensor, conv: torch.Tensor, temporal: torch.Tensor) -> None:
        """Writes ``n`` states, all layers, into host slots ``host_indices``.

        Args:
            host_indices: ``[n]`` int64 CPU host slot indices.
            conv: ``[num_layers, n, *conv_shape]``, ``conv_dtype``, CPU.
            temporal: ``[num_layers, n, *temporal_shape]``, ``temporal_dtype``, CPU.

        Raises:
            InvalidArgumentError: wrong type, dtype, device, dim or shape of an argument.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.

        Note:
            Repeated slots in ``host_indices`` are not checked; which state lands there is
            unspecified.
        """
        check_slot_indices(host_indices, "write: host_indices", self._num_slots, require_cpu=True)
        _check_states(self, conv, temporal, host_indices.numel(), self.device, "write")
        for view, val in zip(self._slot_views, (conv, temporal), strict=True):
            view.index_copy_(0, host_indices, val.transpose(0, 1))

    # --- transfers ------------------------------------------------------------------------------

    def prepare(
        self, device_indices: torch.Tensor, host_indices: torch.Tensor, fn: str = "prepare"
    ) -> MambaTransferIndices:
        """Validates one transfer's indices and puts them where the copies read them.

        Validating once lets a layer-wise load of ``L`` layers check and upload its indices once,
        not ``L`` times (as :meth:`hicache.transfer.KVTransfer.prepare`). Both index tensors are
        copied, so the result never aliases the caller's tensors (DESIGN.md failure class 1).

        Streams and lifetimes (DESIGN.md failure class 2): the copy of CPU ``device_indices`` to a
        CUDA device is made through pinned memory on the *current* stream, so the caching
        allocator does not reuse it before that stream has run the transfer's copies: call
        ``prepare`` under the same ``torch.cuda.stream(side_stream)`` as the copies. CUDA
        ``device_indices`` passed in are copied on the current stream too; the caller must only
        make sure they were complete when ``prepare`` ran.

        Args:
            device_indices: ``[n]`` int64 device slot indices, any device.
            host_indices: ``[n]`` int64 CPU host slot indices.
            fn: the caller's name, for error messages.

        Returns:
            The :class:`MambaTransferIndices` to pass to the copy methods.

        Raises:
            InvalidArgumentError: an index tensor of the wrong type, dtype, dim or device, or
                lengths that differ.
            IndexOutOfRangeError: a slot is out of its pool's range.

        Note:
            The range check of CUDA ``device_indices`` reads them back to the host (a sync).
            Whether the slots are allocated is not checked: the cache owns both sets.
        """
        check_transfer_indices(
            device_indices, host_indices, self.device_pool.num_slots, self._num_slots, fn
        )
        host = host_indices.clone(memory_format=torch.contiguous_format)
        device = self.device_pool.device
        if device_indices.device == device:
            device_idx = device_indices.clone(memory_format=torch.contiguous_format)
        else:
            device_idx = _to_device(device_indices, device).contiguous()
        return MambaTransferIndices(host, device_idx)

    def backup_all_layers(self, indices: MambaTransferIndices) -> None:
        """Copies the states of the batch's device slots, all layers, into its host slots.

        SGLang's ``backup_from_device_all_layer``. No other host slot changes. On CUDA with a
        pinned host pool the copies are asynchronous: the device gathers the states in ascending
        host-slot order and each run of consecutive host slots is one ``copy_`` (never one per
        state). Otherwise one gather and one scatter per buffer, synchronous.

        Args:
            indices: from :meth:`prepare`.

        Raises:
            InvalidArgumentError: ``indices`` is not a :class:`MambaTransferIndices`.

        Note:
            Repeated host slots are not checked; which state lands there is unspecified.
        """
        self._check_indices(indices, "backup_all_layers")
        if indices.num_states == 0:
            return
        if self._is_async():
            _backup_by_runs(self, indices.device_indices, indices.host_indices, non_blocking=True)
        else:
            _backup_batched(self, indices.device_indices, indices.host_indices)

    def load_layer(self, indices: MambaTransferIndices, layer: int) -> None:
        """Copies one layer's states of the batch's host slots into its device slots.

        SGLang's ``load_to_device_per_layer``: the layer-wise load-back, where layer ``i``
        computes while layer ``i + 1`` loads. No other device slot or layer changes.

        Args:
            indices: from :meth:`prepare`.
            layer: Mamba layer in ``[0, num_layers)``.

        Raises:
            InvalidArgumentError: ``indices`` is not a :class:`MambaTransferIndices`, or
                ``layer`` is not an int.
            IndexOutOfRangeError: ``layer`` is out of range. Nothing is copied.
        """
        self._check_indices(indices, "load_layer")
        _check_count(layer, "layer", "load_layer")
        if not 0 <= layer < self.num_layers:
            raise IndexOutOfRangeError(
                f"load_layer: layer {layer} out of range [0, {self.num_layers})"
            )
        _load(self, indices.host_indices, indices.device_indices, layer)

    def load_all_layers(self, indices: MambaTransferIndices) -> None:
        """Copies the states of the batch's host slots, all layers, into its device slots.

        No other device slot changes.

        Args:
            indices: from :meth:`prepare`.

        Raises:
            InvalidArgumentError: ``indices`` is not a :class:`MambaTransferIndices`.

        Note:
            Repeated device slots are not checked; which state lands there is unspecified.
        """
        self._check_indices(indices, "load_all_layers")
        _load(self, indices.host_indices, indices.device_indices, None)

    def _is_async(self) -> bool:
        """Whether copies can be ``non_blocking`` (CUDA device pool, pinned host pool)."""
        return self.device_pool.device.type == "cuda" and self._is_pinned

    @staticmethod
    def _check_indices(indices: object, fn: str) -> None:
        if not isinstance(indices, MambaTransferIndices):
            raise InvalidArgumentError(
                f"{fn}: indices: expected MambaTransferIndices (from prepare), got "
                f"{type(indices).__name__}"
            )


def _to_device(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Returns ``indices`` on ``device``; a CPU -> CUDA copy goes through pinned memory.

    Copying from pageable memory may synchronise with the stream; torch's pinned allocator keeps
    the pinned copy until the asynchronous copy has run.
    """
    if indices.device == device:
        return indices
    if device.type == "cuda" and indices.device.type == "cpu":
        return indices.pin_memory().to(device, non_blocking=True)
    return indices.to(device)


def _device_buffers(pool: MambaStatePool) -> tuple[torch.Tensor, torch.Tensor]:
    """The device pool's ``[L, N, *shape]`` buffers, in the order of the host slot views."""
    return pool.conv_state, pool.temporal_state


def _backup_batched(
    host_pool: MambaHostPool, device_idx: torch.Tensor, host_idx: torch.Tensor
) -> None:
    """Device -> host with one gather and one scatter per buffer (synchronous on CUDA)."""
    for dev_buf, view in zip(
        _device_buffers(host_pool.device_pool), host_pool._slot_views, strict=True
    ):
        # ``[L, n, *shape]`` -> ``[n, L, *shape]``, the host's slot-major order.
        src = dev_buf.index_select(1, device_idx).transpose(0, 1)
        view.index_copy_(0, host_idx, src.cpu())


def _runs(sorted_slots: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of consecutive values of a sorted array, as ``(start, end, first_value)``."""
    breaks = np.flatnonzero(sorted_slots[1:] != sorted_slots[:-1] + 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [sorted_slots.size]))
    return list(zip(starts.tolist(), ends.tolist(), sorted_slots[starts].tolist(), strict=True))


def _backup_by_runs(
    host_pool: MambaHostPool,
    device_idx: torch.Tensor,
    host_idx: torch.Tensor,
    non_blocking: bool,
) -> None:
    """Device -> host with one ``copy_`` per run of consecutive host slots (async on CUDA).

    A CPU scatter cannot wait for an asynchronous copy, so the device gathers the states already
    in ascending host-slot order: each run of consecutive host slots is then one contiguous
    source slice and one contiguous destination slice (all layers of a slot are contiguous in
    both host layouts).
    """
    sorted_host, order = torch.sort(host_idx)
    runs = _runs(sorted_host.numpy())
    device = host_pool.device_pool.device
    dev_order = device_idx.index_select(0, _to_device(order, device))
    for dev_buf, view in zip(
        _device_buffers(host_pool.device_pool), host_pool._slot_views, strict=True
    ):
        # Allocated on the current stream, which runs the copies below: the caching allocator
        # does not hand this memory out before they have run.
        src = dev_buf.index_select(1, dev_order).transpose(0, 1).contiguous()
        for start, end, slot in runs:
            view[slot : slot + end - start].copy_(src[start:end], non_blocking=non_blocking)


def _load(
    host_pool: MambaHostPool,
    host_idx: torch.Tensor,
    device_idx: torch.Tensor,
    layer: int | None,
) -> None:
    """Host -> device of one layer, or of all layers when ``layer`` is None.

    Per buffer: a CPU gather into a staging tensor (pinned when the copy is asynchronous; torch's
    pinned allocator keeps it until the copy has run), one copy to the device, one scatter there.
    """
    if host_idx.numel() == 0:
        return
    non_blocking = host_pool._is_async()
    device = host_pool.device_pool.device
    for view, dev_buf in zip(
        host_pool._slot_views, _device_buffers(host_pool.device_pool), strict=True
    ):
        src_view = view if layer is None else view[:, layer]
        staging = torch.empty(
            (host_idx.numel(), *src_view.shape[1:]), dtype=view.dtype, pin_memory=non_blocking
        )
        torch.index_select(src_view, 0, host_idx, out=staging)
        src = staging.to(device, non_blocking=non_blocking)
        if layer is None:
            dev_buf.index_copy_(1, device_idx, src.transpose(0, 1))
        else:
            dev_buf[layer].index_copy_(0, device_idx, src)
