"""Host-tier KV pool, the L2 of HiCache (SGLang's MHA and MLA ``TokenToKVPoolHost``).

The host pool keeps backups of device pages in (pinned) CPU memory, in one of SGLang's three host
layouts. It mirrors the shape of the :class:`~hicache.memory.DeviceKVPool` it backs up, owns a
:class:`~hicache.memory.PageAllocator` for its slots, and reads and writes slots through one
offset function per layout (:meth:`HostKVPool.row_indices`), which the transfer backends in
:mod:`hicache.transfer` use too.
"""

from __future__ import annotations

import enum

import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from hicache.memory.allocator import PageAllocator
from hicache.memory.device_pool import DeviceKVPool, check_kv_values

__all__ = ["HostKVPool", "HostLayout", "check_slot_indices", "check_transfer_indices"]

# SGLang's ``--hicache-size`` is in GB of 1e9 bytes, not GiB.
_BYTES_PER_GB = 1_000_000_000


class HostLayout(enum.Enum):
    """Memory layout of the host KV buffer; values are SGLang's ``--hicache-mem-layout`` strings."""

    LAYER_FIRST = "layer_first"
    PAGE_FIRST = "page_first"
    PAGE_FIRST_DIRECT = "page_first_direct"


def check_slot_indices(
    indices: torch.Tensor, name: str, num_slots: int, *, require_cpu: bool
) -> None:
    """Checks ``[n]`` int64 slot indices of a pool of ``num_slots`` tokens.

    Args:
        indices: the tensor to check.
        name: the argument name used in error messages, e.g. ``"load_layer: host_indices"``.
        num_slots: pool size in tokens; valid slots are ``[0, num_slots)``.
        require_cpu: if True, ``indices`` must be on the CPU.

    Raises:
        InvalidArgumentError: not a tensor, wrong dtype, dim or device.
        IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.

    Note:
        The range check reads ``min``/``max`` back to the host, which waits for the producer of
        a CUDA ``indices`` tensor.
    """
    if not isinstance(indices, torch.Tensor):
        raise InvalidArgumentError(f"{name}: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise InvalidArgumentError(f"{name}: expected dtype torch.int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise InvalidArgumentError(f"{name}: expected a 1-D tensor, got {indices.dim()}-D")
    if require_cpu and indices.device.type != "cpu":
        raise InvalidArgumentError(f"{name}: expected a CPU tensor, got device {indices.device}")
    if indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_slots:
            bad = lo if lo < 0 else hi
            raise IndexOutOfRangeError(f"{name}: slot index {bad} out of range [0, {num_slots})")


def check_transfer_indices(
    device_indices: torch.Tensor,
    host_indices: torch.Tensor,
    num_device_slots: int,
    num_host_slots: int,
    fn: str,
    device_on_cpu: bool = False,
) -> None:
    """Checks the paired slot indices of one host <-> device transfer.

    Slot ``device_indices[i]`` pairs with ``host_indices[i]``; both are :func:`check_slot_indices`
    checked against their pool's size, and their lengths must agree.

    Args:
        device_indices: ``[n]`` int64 device slot indices (any device unless ``device_on_cpu``).
        host_indices: ``[n]`` int64 CPU host slot indices.
        num_device_slots: the device pool's size, slots.
        num_host_slots: the host pool's size, slots.
        fn: the caller's name, for error messages.
        device_on_cpu: require ``device_indices`` on the CPU too.

    Raises:
        InvalidArgumentError: wrong type, dtype, dim or device, or lengths that differ.
        IndexOutOfRangeError: a slot is out of its pool's range.
    """
    check_slot_indices(host_indices, f"{fn}: host_indices", num_host_slots, require_cpu=True)
    check_slot_indices(
        device_indices, f"{fn}: device_indices", num_device_slots, require_cpu=device_on_cpu
    )
    if host_indices.numel() != device_indices.numel():
        raise InvalidArgumentError(
            f"{fn}: device_indices: length {device_indices.numel()} differs from host_indices "
            f"length {host_indices.numel()}"
        )


class HostKVPool:
    """KV buffers of the host tier, in CPU memory (pinned where CUDA exists), in one of 3 layouts.

    The pool has the ``num_layers``, ``num_heads``, ``head_dim``, ``dtype`` and ``kind`` of the
    device pool it backs up. ``kv_buffer`` holds K at ``[0]`` and V at ``[1]`` for ``mha``, the
    latent KV at ``[0]`` for ``mla`` (``kv = 2`` or ``1``). With ``L = num_layers``,
    ``N = num_slots``, ``P = num_pages``, ``S = page_size``, ``H = num_heads``, ``D = head_dim``:

    - ``layer_first``: ``kv_buffer`` is ``[kv, L, N, H, D]``; each layer is contiguous, as on the
      device. Slot ``s`` of layer ``l`` is row ``l * N + s``.
    - ``page_first``: ``kv_buffer`` is ``[kv, N, L, H, D]``; token-major, one token's KV of all
      layers is contiguous (and so is a page's). Slot ``s`` of layer ``l`` is row ``s * L + l``.
    - ``page_first_direct``: ``kv_buffer`` is ``[kv, P, L, S, H, D]``; page, then layer, then
      token in page, so one layer of one page is contiguous. Slot ``s`` of layer ``l`` is row
      ``((s // S) * L + l) * S + s % S``.

    A "row" is one token of one layer, ``H * D`` elements: the rows of each K/V buffer are those of
    its ``[rows, H * D]`` view in :attr:`flat_buffers`. SGLang's ``MLATokenToKVPoolHost`` drops the
    leading ``kv`` dim for MLA; here it is kept (``kv = 1``) so that both kinds index alike.

    Slots are handed out by :attr:`allocator`, a :class:`PageAllocator` over ``num_slots``. Unlike
    SGLang, the pool has no extra padding page: ``num_slots`` is exactly what was asked for.

    Every method validates its arguments before it writes: a call that raises has no effect.
    """

    # ``[kv, ...]`` per the layout (see the class docstring), CPU, pinned when ``is_pinned``.
    # Written by ``write`` and the transfer functions of ``hicache.transfer`` only.
    kv_buffer: torch.Tensor
    # Owner of the slots: the cache allocates and frees host slots here, nobody else.
    allocator: PageAllocator

    def __init__(
        self,
        device_pool: DeviceKVPool,
        num_slots: int,
        page_size: int,
        layout: str | HostLayout = HostLayout.LAYER_FIRST,
        pin_memory: bool | None = None,
    ) -> None:
        """Allocates a zeroed host buffer shaped like ``device_pool``, with ``num_slots`` slots.

        Args:
            device_pool: the device pool this pool backs up; only its shape, dtype and kind are
                used.
            num_slots: pool size in tokens; a positive multiple of ``page_size``.
            page_size: tokens per page, at least 1.
            layout: a :class:`HostLayout` or its string value.
            pin_memory: allocate page-locked memory (needed for asynchronous copies); ``None``
                pins when ``torch.cuda.is_available()``.

        Raises:
            InvalidArgumentError: ``device_pool`` is not a :class:`DeviceKVPool`; ``page_size`` or
                ``num_slots`` is invalid (see :class:`PageAllocator`); ``layout`` is unknown;
                ``pin_memory=True`` without CUDA.
        """
        if not isinstance(device_pool, DeviceKVPool):
            raise InvalidArgumentError(
                "HostKVPool: device_pool: expected a DeviceKVPool, got "
                f"{type(device_pool).__name__}"
            )
        try:
            self._layout = HostLayout(layout)
        except ValueError:
            values = [m.value for m in HostLayout]
            raise InvalidArgumentError(
                f"HostKVPool: layout: expected one of {values}, got {layout!r}"
            ) from None
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if pin_memory and not torch.cuda.is_available():
            raise InvalidArgumentError(
                "HostKVPool: pin_memory: True needs CUDA (torch.cuda.is_available() is False)"
            )
        # Validates page_size and num_slots, so that an invalid pool allocates nothing.
        self.allocator = PageAllocator(num_slots, page_size)
        self._num_slots = num_slots
        self._page_size = page_size
        self._num_layers = device_pool.num_layers
        self._num_heads = device_pool.num_heads
        self._head_dim = device_pool.head_dim
        self._dtype = device_pool.dtype
        self._kind = device_pool.kind
        num_kv = 2 if self._kind == "mha" else 1
        layers, heads, dim = self._num_layers, self._num_heads, self._head_dim
        if self._layout is HostLayout.LAYER_FIRST:
            shape: tuple[int, ...] = (num_kv, layers, num_slots, heads, dim)
        elif self._layout is HostLayout.PAGE_FIRST:
            shape = (num_kv, num_slots, layers, heads, dim)
        else:
            shape = (num_kv, num_slots // page_size, layers, page_size, heads, dim)
        self.kv_buffer = torch.zeros(shape, dtype=self._dtype, pin_memory=bool(pin_memory))
        self._is_pinned = bool(pin_memory)
        # ``[num_layers * num_slots, heads * dim]`` views of kv_buffer[i], in read() order.
        self._flat_buffers = tuple(buf.view(-1, heads * dim) for buf in self.kv_buffer)

    @classmethod
    def from_ratio(
        cls,
        device_pool: DeviceKVPool,
        ratio: float,
        page_size: int,
        layout: str | HostLayout = HostLayout.LAYER_FIRST,
        pin_memory: bool | None = None,
    ) -> HostKVPool:
        """Creates a pool ``ratio`` times the device pool's size (SGLang's ``--hicache-ratio``).

        ``num_slots = int(device_pool.num_slots * ratio)``, rounded down to whole pages.

        Args:
            device_pool: the device pool to back up.
            ratio: host size over device size, in tokens; positive.
            page_size: tokens per page, at least 1.
            layout: a :class:`HostLayout` or its string value.
            pin_memory: as in :meth:`__init__`.

        Returns:
            The new pool.

        Raises:
            InvalidArgumentError: ``ratio`` is not positive; the result is smaller than one page;
                or as in :meth:`__init__`.
        """
        if not ratio > 0:
            raise InvalidArgumentError(f"HostKVPool.from_ratio: ratio: expected > 0, got {ratio}")
        num_slots = cls._floor_to_pages(
            int(device_pool.num_slots * ratio), page_size, "from_ratio", f"ratio={ratio}"
        )
        return cls(device_pool, num_slots, page_size, layout, pin_memory)

    @classmethod
    def from_size_gb(
        cls,
        device_pool: DeviceKVPool,
        size_gb: float,
        page_size: int,
        layout: str | HostLayout = HostLayout.LAYER_FIRST,
        pin_memory: bool | None = None,
    ) -> HostKVPool:
        """Creates a pool of about ``size_gb`` GB of KV (SGLang's ``--hicache-size``).

        ``num_slots = int(size_gb * 1e9) // bytes_per_token``, rounded down to whole pages, where
        ``bytes_per_token`` is one token's KV across all layers (K and V for ``mha``):
        ``kv * num_layers * num_heads * head_dim * itemsize``. GB means 1e9 bytes, as in SGLang.

        Args:
            device_pool: the device pool to back up.
            size_gb: host buffer size in GB (1e9 bytes); positive.
            page_size: tokens per page, at least 1.
            layout: a :class:`HostLayout` or its string value.
            pin_memory: as in :meth:`__init__`.

        Returns:
            The new pool.

        Raises:
            InvalidArgumentError: ``size_gb`` is not positive; the result is smaller than one
                page; or as in :meth:`__init__`.
        """
        if not size_gb > 0:
            raise InvalidArgumentError(
                f"HostKVPool.from_size_gb: size_gb: expected > 0, got {size_gb}"
            )
        bytes_per_token = device_pool.size_bytes // device_pool.num_slots
        num_tokens = int(size_gb * _BYTES_PER_GB) // bytes_per_token
        num_slots = cls._floor_to_pages(
            num_tokens,
            page_size,
            "from_size_gb",
            f"size_gb={size_gb} at {bytes_per_token} bytes per token",
        )
        return cls(device_pool, num_slots, page_size, layout, pin_memory)

    @staticmethod
    def _floor_to_pages(num_tokens: int, page_size: int, fn: str, what: str) -> int:
        """Rounds ``num_tokens`` down to whole pages; raises if that leaves no page."""
        if page_size < 1:
            raise InvalidArgumentError(
                f"HostKVPool.{fn}: page_size: expected >= 1, got {page_size}"
            )
        num_slots = num_tokens // page_size * page_size
        if num_slots < page_size:
            raise InvalidArgumentError(
                f"HostKVPool.{fn}: {what} gives {num_tokens} tokens, less than one page "
                f"(page_size={page_size})"
            )
        return num_slots

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
        return self._num_slots // self._page_size

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return self._num_layers

    @property
    def num_heads(self) -> int:
        """KV heads per token (1 for ``mla``)."""
        return self._num_heads

    @property
    def head_dim(self) -> int:
        """Elements per head."""
        return self._head_dim

    @property
    def dtype(self) -> torch.dtype:
        """Element dtype of the buffer."""
        return self._dtype

    @property
    def kind(self) -> str:
        """``"mha"`` or ``"mla"``."""
        return self._kind

    @property
    def layout(self) -> HostLayout:
        """Memory layout of :attr:`kv_buffer`."""
        return self._layout

    @property
    def device(self) -> torch.device:
        """Always the CPU."""
        return self.kv_buffer.device

    @property
    def is_pinned(self) -> bool:
        """Whether :attr:`kv_buffer` is page-locked memory."""
        return self._is_pinned

    @property
    def size_bytes(self) -> int:
        """Size of :attr:`kv_buffer`, in bytes."""
        return self.kv_buffer.numel() * self.kv_buffer.element_size()

    @property
    def flat_buffers(self) -> tuple[torch.Tensor, ...]:
        """Row views of the K and V buffers (one latent buffer for ``mla``).

        Returns:
            ``(k, v)`` for ``mha``, ``(kv,)`` for ``mla``: views (not copies) of ``kv_buffer[i]``,
            each ``[num_layers * num_slots, num_heads * head_dim]``, pool dtype, CPU. Row numbers
            come from :meth:`row_indices`.
        """
        return self._flat_buffers

    def row_indices(self, host_indices: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The layout's offset function: rows of :attr:`flat_buffers` that hold some slots.

        Args:
            host_indices: ``[n]`` int64 CPU slot indices, already validated.
            layer: one layer id, or ``None`` for all layers.

        Returns:
            int64 CPU row indices: ``[num_layers * n]`` layer-major (all ``n`` slots of layer 0,
            then of layer 1, ...) when ``layer`` is None, else ``[n]``.

        Note:
            Neither argument is checked; callers validate them first.
        """
        layers = (
            torch.arange(self._num_layers, dtype=torch.int64)[:, None]
            if layer is None
            else torch.tensor([[layer]], dtype=torch.int64)
        )
        slots = host_indices[None, :]
        if self._layout is HostLayout.LAYER_FIRST:
            rows = layers * self._num_slots + slots
        elif self._layout is HostLayout.PAGE_FIRST:
            rows = slots * self._num_layers + layers
        else:
            size = self._page_size
            rows = ((slots // size) * self._num_layers + layers) * size + slots % size
        return rows.reshape(-1)

    def read(self, host_indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reads the KV of slots ``host_indices``, all layers, whatever the layout.

        Args:
            host_indices: ``[n]`` int64 CPU slot indices.

        Returns:
            ``(k, v)`` for ``mha``, ``(kv,)`` for ``mla``; each a new
            ``[num_layers, n, num_heads, head_dim]`` CPU tensor of the pool's dtype (the
            convention of :meth:`DeviceKVPool.read`).

        Raises:
            InvalidArgumentError: ``host_indices`` has the wrong dtype, dim or device.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.
        """
        check_slot_indices(host_indices, "read: host_indices", self._num_slots, require_cpu=True)
        rows = self.row_indices(host_indices)
        shape = (self._num_layers, host_indices.numel(), self._num_heads, self._head_dim)
        return tuple(flat.index_select(0, rows).view(shape) for flat in self._flat_buffers)

    def write(
        self, host_indices: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None
    ) -> None:
        """Writes the KV of ``n`` tokens, all layers, into slots ``host_indices``.

        Args:
            host_indices: ``[n]`` int64 CPU slot indices.
            k: ``[num_layers, n, num_heads, head_dim]``, pool dtype, CPU: K for ``mha``, the
                latent KV for ``mla``.
            v: same shape as ``k``: V for ``mha``; must be ``None`` for ``mla``.

        Raises:
            InvalidArgumentError: wrong dtype, device, dim or shape of an argument, or ``v`` given
                for ``mla`` / missing for ``mha``.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.

        Note:
            Repeated slots in ``host_indices`` are not checked; which value lands there is
            unspecified.
        """
        check_slot_indices(host_indices, "write: host_indices", self._num_slots, require_cpu=True)
        shape = (self._num_layers, host_indices.numel(), self._num_heads, self._head_dim)
        values = check_kv_values(self._kind, self._dtype, self.device, k, v, shape, "write")
        rows = self.row_indices(host_indices)
        for flat, val in zip(self._flat_buffers, values, strict=True):
            flat.index_copy_(0, rows, val.reshape(rows.numel(), flat.shape[1]))
