"""Device-tier KV pool (SGLang's ``MHATokenToKVPool`` / ``MLATokenToKVPool``, simplified).

The pool owns the KV tensors the model reads; slot indices from a :class:`PageAllocator` address
them. It does no allocation bookkeeping of its own: it only reads and writes slots.
"""

from __future__ import annotations

import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError

__all__ = ["DeviceKVPool", "check_kv_values"]

_KINDS = ("mha", "mla")


class DeviceKVPool:
    """Per-layer KV buffers indexed by token slot, on the device (or the CPU where there is none).

    ``kind="mha"`` keeps separate K and V buffers (``k_buffer``, ``v_buffer``); ``kind="mla"`` keeps
    one latent buffer (``kv_buffer``) with a single head, as SGLang's MLA pool does. The buffers of
    the other kind are absent (not attributes at all), so a caller that mixes them up fails loudly.

    Every method validates its arguments before it writes: a call that raises has no effect.
    """

    # ``[num_layers, num_slots, num_heads, head_dim]``, present for ``kind == "mha"`` only.
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    # ``[num_layers, num_slots, 1, head_dim]``, present for ``kind == "mla"`` only.
    kv_buffer: torch.Tensor

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: str | torch.device | None = None,
        kind: str = "mha",
    ) -> None:
        """Allocates zeroed buffers.

        Args:
            num_slots: pool size in tokens.
            num_layers: number of attention layers.
            num_heads: KV heads per token; must be 1 for ``mla``.
            head_dim: elements per head (for ``mla``: the latent size, including any rope part).
            dtype: element dtype of the buffers.
            device: where the buffers live; ``None`` picks ``"cuda"`` if available, else ``"cpu"``.
            kind: ``"mha"`` or ``"mla"``.

        Raises:
            InvalidArgumentError: a size is not positive, ``kind`` is unknown, or ``num_heads != 1``
                for ``mla``.
        """
        sizes = {
            "num_slots": num_slots,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "head_dim": head_dim,
        }
        for name, value in sizes.items():
            if value <= 0:
                raise InvalidArgumentError(f"DeviceKVPool: {name}: expected > 0, got {value}")
        if kind not in _KINDS:
            raise InvalidArgumentError(
                f"DeviceKVPool: kind: expected one of {_KINDS}, got {kind!r}"
            )
        if kind == "mla" and num_heads != 1:
            raise InvalidArgumentError(
                f"DeviceKVPool: num_heads: expected 1 for kind 'mla', got {num_heads}"
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._num_slots = num_slots
        self._num_layers = num_layers
        self._num_heads = num_heads
        self._head_dim = head_dim
        self._dtype = dtype
        self._kind = kind
        shape = (num_layers, num_slots, num_heads, head_dim)
        if kind == "mha":
            self.k_buffer = torch.zeros(shape, dtype=dtype, device=device)
            self.v_buffer = torch.zeros(shape, dtype=dtype, device=device)
            self._buffers: tuple[torch.Tensor, ...] = (self.k_buffer, self.v_buffer)
        else:
            self.kv_buffer = torch.zeros(shape, dtype=dtype, device=device)
            self._buffers = (self.kv_buffer,)
        # The buffer's device, not the argument: ``"cuda"`` becomes ``cuda:0``, so that device
        # comparisons with caller tensors are exact.
        self._device = self._buffers[0].device

    @property
    def num_slots(self) -> int:
        """Pool size in tokens."""
        return self._num_slots

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
        """Element dtype of the buffers."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the buffers."""
        return self._device

    @property
    def kind(self) -> str:
        """``"mha"`` or ``"mla"``."""
        return self._kind

    @property
    def size_bytes(self) -> int:
        """Total size of all buffers, in bytes."""
        return sum(buf.numel() * buf.element_size() for buf in self._buffers)

    def write(self, indices: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Writes the KV of ``n`` tokens, all layers, into slots ``indices``.

        Args:
            indices: ``[n]`` int64 slot indices, any device (moved to the pool's device).
            k: ``[num_layers, n, num_heads, head_dim]``, pool dtype and device: K for ``mha``, the
                latent KV for ``mla``.
            v: same shape as ``k``: V for ``mha``; must be ``None`` for ``mla``.

        Raises:
            InvalidArgumentError: wrong dtype, device, dim or shape of an argument, or ``v`` given
                for ``mla`` / missing for ``mha``.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.

        Note:
            Repeated slots in ``indices`` are not checked; which value lands there is unspecified.
        """
        idx = self._prepare_indices(indices, "write")
        shape = (self._num_layers, idx.numel(), self._num_heads, self._head_dim)
        values = check_kv_values(self._kind, self._dtype, self._device, k, v, shape, "write")
        for buf, val in zip(self._buffers, values, strict=True):
            buf.index_copy_(1, idx, val)

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reads the KV of slots ``indices``, all layers.

        Args:
            indices: ``[n]`` int64 slot indices, any device (moved to the pool's device).

        Returns:
            ``(k, v)`` for ``mha``, ``(kv,)`` for ``mla``; each a new
            ``[num_layers, n, num_heads, head_dim]`` tensor of the pool's dtype and device.

        Raises:
            InvalidArgumentError: ``indices`` has the wrong dtype or dim.
            IndexOutOfRangeError: a slot is outside ``[0, num_slots)``.
        """
        idx = self._prepare_indices(indices, "read")
        return tuple(buf.index_select(1, idx) for buf in self._buffers)

    def write_layer(
        self, layer: int, indices: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None
    ) -> None:
        """Writes the KV of ``n`` tokens of one layer into slots ``indices``.

        Args:
            layer: layer id in ``[0, num_layers)``.
            indices: ``[n]`` int64 slot indices, any device (moved to the pool's device).
            k: ``[n, num_heads, head_dim]``, pool dtype and device: K for ``mha``, the latent KV
                for ``mla``.
            v: same shape as ``k``: V for ``mha``; must be ``None`` for ``mla``.

        Raises:
            InvalidArgumentError: as in :meth:`write`.
            IndexOutOfRangeError: ``layer`` or a slot is out of range.
        """
        self._check_layer(layer, "write_layer")
        idx = self._prepare_indices(indices, "write_layer")
        shape = (idx.numel(), self._num_heads, self._head_dim)
        values = check_kv_values(self._kind, self._dtype, self._device, k, v, shape, "write_layer")
        for buf, val in zip(self._buffers, values, strict=True):
            buf[layer].index_copy_(0, idx, val)

    def read_layer(self, layer: int, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reads the KV of slots ``indices`` of one layer.

        Args:
            layer: layer id in ``[0, num_layers)``.
            indices: ``[n]`` int64 slot indices, any device (moved to the pool's device).

        Returns:
            ``(k, v)`` for ``mha``, ``(kv,)`` for ``mla``; each a new ``[n, num_heads, head_dim]``
            tensor of the pool's dtype and device.

        Raises:
            InvalidArgumentError: ``indices`` has the wrong dtype or dim.
            IndexOutOfRangeError: ``layer`` or a slot is out of range.
        """
        self._check_layer(layer, "read_layer")
        idx = self._prepare_indices(indices, "read_layer")
        return tuple(buf[layer].index_select(0, idx) for buf in self._buffers)

    def _check_layer(self, layer: int, fn: str) -> None:
        """Raises IndexOutOfRangeError unless ``0 <= layer < num_layers``."""
        if not 0 <= layer < self._num_layers:
            raise IndexOutOfRangeError(f"{fn}: layer {layer} out of range [0, {self._num_layers})")

    def _prepare_indices(self, indices: torch.Tensor, fn: str) -> torch.Tensor:
        """Validates ``[n]`` int64 slot indices and returns them on the pool's device."""
        if not isinstance(indices, torch.Tensor):
            raise InvalidArgumentError(
                f"{fn}: indices: expected a torch.Tensor, got {type(indices).__name__}"
            )
        if indices.dtype != torch.int64:
            raise InvalidArgumentError(
                f"{fn}: indices: expected dtype torch.int64, got {indices.dtype}"
            )
        if indices.dim() != 1:
            raise InvalidArgumentError(
                f"{fn}: indices: expected a 1-D tensor, got {indices.dim()}-D"
            )
        if indices.numel() > 0:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self._num_slots:
                bad = lo if lo < 0 else hi
                raise IndexOutOfRangeError(
                    f"{fn}: slot index {bad} out of range [0, {self._num_slots})"
                )
        return indices.to(self._device, non_blocking=True)


def check_kv_values(
    kind: str,
    dtype: torch.dtype,
    device: torch.device,
    k: torch.Tensor,
    v: torch.Tensor | None,
    shape: tuple[int, ...],
    fn: str,
) -> tuple[torch.Tensor, ...]:
    """Checks the K/V tensors of a pool write and returns them in buffer order.

    Shared by the device and host pools.

    Args:
        kind: ``"mha"`` (``k`` and ``v`` required) or ``"mla"`` (``v`` must be None).
        dtype: the pool's dtype.
        device: the pool's device.
        k: K (MHA) or the latent KV (MLA), of shape ``shape``.
        v: V (MHA) or None (MLA).
        shape: the expected shape of each tensor.
        fn: the calling method's name, for error messages.

    Returns:
        ``(k, v)`` for MHA, ``(k,)`` for MLA.

    Raises:
        InvalidArgumentError: a missing or extra tensor, or a wrong type, shape, dtype or device.
    """
    if kind == "mla":
        if v is not None:
            raise InvalidArgumentError(f"{fn}: v: expected None for kind 'mla', got a tensor")
        values: tuple[tuple[str, torch.Tensor], ...] = (("k", k),)
    else:
        if v is None:
            raise InvalidArgumentError(f"{fn}: v: expected a tensor for kind 'mha', got None")
        values = (("k", k), ("v", v))
    for name, val in values:
        if not isinstance(val, torch.Tensor):
            raise InvalidArgumentError(
                f"{fn}: {name}: expected a torch.Tensor, got {type(val).__name__}"
            )
        if tuple(val.shape) != shape:
            raise InvalidArgumentError(
                f"{fn}: {name}: expected shape {list(shape)}, got {list(val.shape)}"
            )
        if val.dtype != dtype:
            raise InvalidArgumentError(f"{fn}: {name}: expected dtype {dtype}, got {val.dtype}")
        if val.device != device:
            raise InvalidArgumentError(f"{fn}: {name}: expected device {device}, got {val.device}")
    return tuple(val for _, val in values)
