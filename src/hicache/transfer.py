"""Transfer backends between the device and host KV pools (SGLang's ``--hicache-io-backend``).

Two backends move the same bytes:

- ``"kernel"``: hicache's own CUDA kernels (``hicache._cuda_ops``, built from ``cuda/``). One
  launch copies every row of a batch (all layers, or one layer of a layer-wise load) of K and V,
  reading or writing the pinned host pool through its device mapping with 16-byte accesses. Needs
  the module, a CUDA device pool and a pinned host pool.
- ``"direct"``: torch index ops and ``Tensor.copy_``, on the CPU and on CUDA: the fallback where
  the kernels are not built or there is no GPU. SGLang's direct backend copies one run of
  consecutive indices per layer at a time (``transfer_kv_direct``); this one gathers and scatters
  every layer with one index op per K/V buffer, through the host layout's offset function
  :meth:`HostKVPool.row_indices`.

``"auto"`` (:func:`resolve_backend`) picks ``"kernel"`` where it can run on the given pools and
``"direct"`` otherwise, and logs which (and why) on the ``hicache`` logger.

:class:`KVTransfer` binds a backend to a pair of pools; :meth:`KVTransfer.prepare` validates a
batch's indices once and moves them where the backend reads them, so that a layer-wise load of
``L`` layers validates and uploads its indices once, not ``L`` times. The module-level functions
are one-shot conveniences over it.

Streams and lifetimes. Every copy is enqueued on the *current* CUDA stream and nothing
synchronises: the controller runs them under ``torch.cuda.stream(side_stream)`` and waits on an
event. With the direct backend, when the device pool is on CUDA and the host pool is pinned,
every host/device copy is ``non_blocking=True``:

- host -> device: the host rows are gathered on the CPU into a pinned staging tensor, copied
  asynchronously, then scattered on the device. torch's pinned allocator keeps the staging memory
  until the copy has run.
- device -> host: a CPU scatter cannot wait for an asynchronous copy, so the device gathers the
  rows in ascending host-row order and each run of consecutive host rows is one asynchronous
  ``copy_`` into the host buffer: one copy per run of consecutive host slots (``page_first``) or
  pages (``page_first_direct``), times ``num_layers`` for ``layer_first``. Never one per token.

Index tensors: the device copies that :meth:`KVTransfer.prepare` makes are allocated on the
current stream, so torch's caching allocator cannot reuse them before that stream has run the
copies. ``device_indices`` passed in already on the device are used as they are: the caller must
keep them alive until the stream has run the copies (``tensor.record_stream(stream)`` when they
were made on another stream), see DESIGN.md failure class 2.

Without CUDA or without pinned memory, the direct copies are synchronous and correct.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any

import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from hicache.memory.device_pool import DeviceKVPool
from hicache.memory.host_pool import HostKVPool, check_transfer_indices

_cuda_ops: types.ModuleType | None
try:  # built by CMake where a CUDA compiler was found (HICACHE_CUDA=AUTO|ON)
    import hicache._cuda_ops as _cuda_ops
except ImportError as exc:  # pragma: no cover - depends on the build
    _cuda_ops = None
    _CUDA_OPS_IMPORT_ERROR = str(exc)
else:
    _CUDA_OPS_IMPORT_ERROR = ""

__all__ = [
    "IO_BACKEND_AUTO",
    "IO_BACKEND_DIRECT",
    "IO_BACKEND_KERNEL",
    "KVTransfer",
    "TransferIndices",
    "available_backends",
    "backup_all_layers",
    "kernel_unavailable_reason",
    "load_all_layers",
    "load_layer",
    "resolve_backend",
]

IO_BACKEND_DIRECT = "direct"
IO_BACKEND_KERNEL = "kernel"
IO_BACKEND_AUTO = "auto"

logger = logging.getLogger("hicache")


def kernel_unavailable_reason(
    device_pool: DeviceKVPool | None = None, host_pool: HostKVPool | None = None
) -> str:
    """Says why the ``"kernel"`` backend cannot run (on these pools, when given).

    Args:
        device_pool: if given, the kernel must be able to reach it (a CUDA pool).
        host_pool: if given, the kernel must be able to map it (a pinned pool).

    Returns:
        ``""`` when the kernels can run, else a sentence naming what is missing: the module was
        not built, no CUDA device or driver, a CPU device pool, an unpinned host pool.
    """
    if _cuda_ops is None:
        return (
            "hicache._cuda_ops is not built (no CUDA compiler at build time, or HICACHE_CUDA=OFF): "
            + _CUDA_OPS_IMPORT_ERROR
        )
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    if _cuda_ops.device_count() <= 0:
        return f"the CUDA runtime of hicache._cuda_ops cannot start: {_cuda_ops.device_error()}"
    if device_pool is not None and device_pool.device.type != "cuda":
        return f"the device pool is on {device_pool.device}, not on a CUDA device"
    if host_pool is not None and not host_pool.is_pinned:
        return "the host pool is not pinned (HostKVPool(pin_memory=True))"
    return ""


def available_backends() -> list[str]:
    """Lists the transfer backends this build and machine can run.

    Returns:
        Backend names (SGLang's ``--hicache-io-backend`` values): ``"direct"`` always,
        ``"kernel"`` when :func:`kernel_unavailable_reason` is empty. ``"auto"`` is accepted by
        :func:`resolve_backend` too, but it is a choice, not a backend.
    """
    backends = [IO_BACKEND_DIRECT]
    if not kernel_unavailable_reason():
        backends.append(IO_BACKEND_KERNEL)
    return backends


def resolve_backend(io_backend: str, device_pool: DeviceKVPool, host_pool: HostKVPool) -> str:
    """Turns an ``--hicache-io-backend`` value into the backend that runs on these pools.

    Args:
        io_backend: ``"auto"``, ``"kernel"`` or ``"direct"``.
        device_pool: the device pool.
        host_pool: the host pool.

    Returns:
        ``"kernel"`` or ``"direct"``. ``"auto"`` gives ``"kernel"`` when
        :func:`kernel_unavailable_reason` is empty for these pools, else ``"direct"``; the choice
        (and why ``"direct"``) is logged at INFO on the ``hicache`` logger.

    Raises:
        InvalidArgumentError: an unknown name, or ``"kernel"`` where the kernels cannot run (the
            message says why).
    """
    known = [IO_BACKEND_AUTO, IO_BACKEND_KERNEL, IO_BACKEND_DIRECT]
    if io_backend not in known:
        raise InvalidArgumentError(f"io_backend: expected one of {known}, got {io_backend!r}")
    if io_backend == IO_BACKEND_DIRECT:
        return IO_BACKEND_DIRECT
    reason = kernel_unavailable_reason(device_pool, host_pool)
    if io_backend == IO_BACKEND_KERNEL:
        if reason:
            raise InvalidArgumentError(f"io_backend: 'kernel' cannot run here: {reason}")
        return IO_BACKEND_KERNEL
    if reason:
        logger.info("hicache io_backend auto -> direct (%s)", reason)
        return IO_BACKEND_DIRECT
    logger.info("hicache io_backend auto -> kernel (hicache._cuda_ops)")
    return IO_BACKEND_KERNEL


@dataclass(frozen=True)
class TransferIndices:
    """The validated indices of one transfer, where its backend reads them.

    Made by :meth:`KVTransfer.prepare`; immutable and never aliased with tree state (DESIGN.md
    failure class 1). Slot ``device_indices[i]`` pairs with slot ``host_indices[i]``.

    Attributes:
        host_indices: ``[n]`` int64 CPU host slot indices.
        device_indices: ``[n]`` int64 contiguous device slot indices, on the device pool's device.
        host_indices_on_device: ``[n]`` int64 contiguous copy of ``host_indices`` on the device
            pool's device for the kernel backend (the kernel reads both arrays); ``None`` for
            ``"direct"``.
    """

    host_indices: torch.Tensor
    device_indices: torch.Tensor
    host_indices_on_device: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        """Slots in the transfer."""
        return self.host_indices.numel()


class KVTransfer:
    """Moves KV between one device pool and one host pool with one backend.

    Args:
        device_pool: the device pool.
        host_pool: the host pool; same kind, layers, heads, head_dim and dtype.
        io_backend: ``"direct"``, ``"kernel"`` or ``"auto"`` (see :func:`resolve_backend`).

    Raises:
        InvalidArgumentError: a pool of the wrong type or shape, an unknown backend, or
            ``"kernel"`` where it cannot run.
    """

    def __init__(
        self, device_pool: DeviceKVPool, host_pool: HostKVPool, io_backend: str = IO_BACKEND_DIRECT
    ) -> None:
        _check_pools(device_pool, host_pool, "KVTransfer")
        self.device_pool = device_pool
        self.host_pool = host_pool
        # The backend that runs, never "auto"; fixed at construction.
        self.io_backend = resolve_backend(io_backend, device_pool, host_pool)

    @property
    def num_slots(self) -> int:
        """Host slots of the pair (the controller's extra-pool interface)."""
        return self.host_pool.num_slots

    def prepare(
        self, device_indices: torch.Tensor, host_indices: torch.Tensor, fn: str = "prepare"
    ) -> TransferIndices:
        """Validates one transfer's indices and puts them where the backend reads them.

        Index copies to the device are enqueued on the current stream, through pinned memory.

        Args:
            device_indices: ``[n]`` int64 device slot indices, any device.
            host_indices: ``[n]`` int64 CPU host slot indices.
            fn: the caller's name, for error messages.

        Returns:
            The :class:`TransferIndices` to pass to the copy methods.

        Raises:
            InvalidArgumentError: an index tensor of the wrong type, dtype, dim or device, or
                lengths that differ.
            IndexOutOfRangeError: a slot is out of its pool's range.

        Note:
            The range check of CUDA ``device_indices`` reads them back to the host (a sync).
        """
        check_transfer_indices(
            device_indices,
            host_indices,
            self.device_pool.num_slots,
            self.host_pool.num_slots,
            fn,
        )
        device = self.device_pool.device
        host_on_device = None
        if self.io_backend == IO_BACKEND_KERNEL:
            host_on_device = _to_device(host_indices, device).contiguous()
        device_idx = _to_device(device_indices, device).contiguous()
        return TransferIndices(host_indices, device_idx, host_on_device)

    def backup_all_layers(self, indices: TransferIndices) -> None:
        """Copies the KV of the batch's device slots, all layers, into its host slots.

        SGLang's ``backup_from_device_all_layer``; no other host slot changes. Repeated host
        slots are not checked; which value lands there is unspecified.

        Args:
            indices: from :meth:`prepare`.
        """
        if indices.num_tokens == 0:
            return
        dev, host = self.device_pool, self.host_pool
        if self.io_backend == IO_BACKEND_KERNEL:
            self._launch(indices, "device_to_host", 0, dev.num_layers)
        elif _is_async(dev, host):
            _backup_by_runs(
                dev, host, indices.device_indices, indices.host_indices, non_blocking=True
            )
        else:
            _backup_batched(dev, host, indices.device_indices, indices.host_indices)

    def load_layer(self, indices: TransferIndices, layer: int) -> None:
        """Copies one layer's KV of the batch's host slots into its device slots.

        SGLang's ``load_to_device_per_layer``: the layer-wise load-back, where layer ``i``
        computes while layer ``i + 1`` loads. No other device slot or layer changes.

        Args:
            indices: from :meth:`prepare`.
            layer: layer id in ``[0, num_layers)``.

        Raises:
            InvalidArgumentError: ``layer`` is not an int.
            IndexOutOfRangeError: ``layer`` is out of range. Nothing is copied.
        """
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise InvalidArgumentError(
                f"load_layer: layer: expected an int, got {type(layer).__name__}"
            )
        if not 0 <= layer < self.device_pool.num_layers:
            raise IndexOutOfRangeError(
                f"load_layer: layer {layer} out of range [0, {self.device_pool.num_layers})"
            )
        self._load(indices, layer)

    def load_all_layers(self, indices: TransferIndices) -> None:
        """Copies the KV of the batch's host slots, all layers, into its device slots.

        Repeated device slots are not checked; which value lands there is unspecified.

        Args:
            indices: from :meth:`prepare`.
        """
        self._load(indices, None)

    def _load(self, indices: TransferIndices, layer: int | None) -> None:
        """Host -> device of one layer, or of all layers when ``layer`` is None."""
        if indices.num_tokens == 0:
            return
        if self.io_backend == IO_BACKEND_KERNEL:
            begin, end = (0, self.device_pool.num_layers) if layer is None else (layer, layer + 1)
            self._launch(indices, "host_to_device", begin, end)
        else:
            _load_direct(
                self.host_pool,
                self.device_pool,
                indices.host_indices,
                indices.device_indices,
                layer,
            )

    def _launch(
        self, indices: TransferIndices, direction: str, layer_begin: int, layer_end: int
    ) -> None:
        """One kernel launch on the current stream of the device pool's device."""
        assert _cuda_ops is not None
        params = kernel_params(self.device_pool, self.host_pool, indices, layer_begin, layer_end)
        layout = _cuda_ops.HostLayout.__members__[self.host_pool.layout.value]
        with torch.cuda.device(self.device_pool.device):
            stream = torch.cuda.current_stream().cuda_stream
            _cuda_ops.transfer(params, layout, _cuda_ops.Direction.__members__[direction], stream)


def kernel_params(
    device_pool: DeviceKVPool,
    host_pool: HostKVPool,
    indices: TransferIndices,
    layer_begin: int,
    layer_end: int,
) -> Any:
    """The kernel's ``TransferParams`` (``cuda/transfer.h``) for one batch and layer range.

    Exposed so that tests can run the kernel's offset functions on the CPU
    (``hicache._cuda_ops.emulate_transfer``) with exactly the arguments a launch gets.

    Args:
        device_pool: the device pool (its buffers' addresses are taken).
        host_pool: the host pool (its flat buffers' addresses are taken).
        indices: ``host_indices_on_device`` must be set (the kernel backend's
            :meth:`KVTransfer.prepare` sets it).
        layer_begin: first layer copied.
        layer_end: one past the last layer copied.

    Returns:
        A ``hicache._cuda_ops.TransferParams``.

    Raises:
        InvalidArgumentError: the CUDA module is not built, or ``indices`` has no
            ``host_indices_on_device``.
    """
    if _cuda_ops is None:
        raise InvalidArgumentError(f"kernel_params: {kernel_unavailable_reason()}")
    if indices.host_indices_on_device is None:
        raise InvalidArgumentError("kernel_params: indices: host_indices_on_device is not set")
    params = _cuda_ops.TransferParams()
    params.device_buffers = [buf.data_ptr() for buf in _device_buffers(device_pool)]
    params.host_buffers = [buf.data_ptr() for buf in host_pool.flat_buffers]
    params.device_indices = indices.device_indices.data_ptr()
    params.host_indices = indices.host_indices_on_device.data_ptr()
    params.num_tokens = indices.num_tokens
    params.row_bytes = device_pool.num_heads * device_pool.head_dim * device_pool.dtype.itemsize
    params.device_num_slots = device_pool.num_slots
    params.host_num_slots = host_pool.num_slots
    params.num_layers = device_pool.num_layers
    params.layer_begin = layer_begin
    params.layer_end = layer_end
    params.page_size = host_pool.page_size
    return params


def backup_all_layers(
    device_pool: DeviceKVPool,
    host_pool: HostKVPool,
    device_indices: torch.Tensor,
    host_indices: torch.Tensor,
    io_backend: str = IO_BACKEND_DIRECT,
) -> None:
    """Copies the KV of ``n`` device slots, all layers, into ``n`` host slots (device -> host).

    SGLang's ``backup_from_device_all_layer``. Slot ``device_indices[i]`` goes to slot
    ``host_indices[i]``; no other host slot changes.

    Args:
        device_pool: the source pool.
        host_pool: the destination pool; same kind, layers, heads, head_dim and dtype.
        device_indices: ``[n]`` int64 device slot indices, any device (copied to the device pool's
            device when elsewhere).
        host_indices: ``[n]`` int64 CPU host slot indices.
        io_backend: ``"direct"``, ``"kernel"`` or ``"auto"``.

    Raises:
        InvalidArgumentError: a pool of the wrong type or shape; an index tensor of the wrong
            type, dtype, dim or device; ``n`` differs between the two; a backend that cannot
            run. Nothing is copied.
        IndexOutOfRangeError: a slot is out of its pool's range. Nothing is copied.

    Note:
        Asynchronous on CUDA with a pinned host pool and does not synchronise: see the module
        docstring for the stream and index-lifetime rules (DESIGN.md failure class 2). Repeated
        host slots are not checked; which value lands there is unspecified.
    """
    engine = KVTransfer(device_pool, host_pool, io_backend)
    engine.backup_all_layers(engine.prepare(device_indices, host_indices, "backup_all_layers"))


def load_layer(
    host_pool: HostKVPool,
    device_pool: DeviceKVPool,
    host_indices: torch.Tensor,
    device_indices: torch.Tensor,
    layer: int,
    io_backend: str = IO_BACKEND_DIRECT,
) -> None:
    """Copies one layer's KV of ``n`` host slots into ``n`` device slots (host -> device).

    SGLang's ``load_to_device_per_layer``. Slot ``host_indices[i]`` goes to
    ``device_indices[i]`` in layer ``layer`` only; no other device slot or layer changes.

    Args:
        host_pool: the source pool.
        device_pool: the destination pool; same kind, layers, heads, head_dim and dtype.
        host_indices: ``[n]`` int64 CPU host slot indices.
        device_indices: ``[n]`` int64 device slot indices, any device.
        layer: layer id in ``[0, num_layers)``.
        io_backend: ``"direct"``, ``"kernel"`` or ``"auto"``.

    Raises:
        InvalidArgumentError: as in :func:`backup_all_layers`, or ``layer`` is not an int.
        IndexOutOfRangeError: ``layer`` or a slot is out of range. Nothing is copied.

    Note:
        Asynchronous on CUDA with a pinned host pool and does not synchronise: see the module
        docstring (DESIGN.md failure class 2).
    """
    engine = KVTransfer(device_pool, host_pool, io_backend)
    engine.load_layer(engine.prepare(device_indices, host_indices, "load_layer"), layer)


def load_all_layers(
    host_pool: HostKVPool,
    device_pool: DeviceKVPool,
    host_indices: torch.Tensor,
    device_indices: torch.Tensor,
    io_backend: str = IO_BACKEND_DIRECT,
) -> None:
    """Copies the KV of ``n`` host slots, all layers, into ``n`` device slots (host -> device).

    Args:
        host_pool: the source pool.
        device_pool: the destination pool; same kind, layers, heads, head_dim and dtype.
        host_indices: ``[n]`` int64 CPU host slot indices.
        device_indices: ``[n]`` int64 device slot indices, any device.
        io_backend: ``"direct"``, ``"kernel"`` or ``"auto"``.

    Raises:
        InvalidArgumentError: as in :func:`backup_all_layers`.
        IndexOutOfRangeError: a slot is out of range. Nothing is copied.

    Note:
        Asynchronous on CUDA with a pinned host pool and does not synchronise: see the module
        docstring (DESIGN.md failure class 2). Repeated device slots are not checked.
    """
    engine = KVTransfer(device_pool, host_pool, io_backend)
    engine.load_all_layers(engine.prepare(device_indices, host_indices, "load_all_layers"))


def _check_pools(device_pool: DeviceKVPool, host_pool: HostKVPool, fn: str) -> None:
    """Raises InvalidArgumentError unless the pools are a matching device/host pair."""
    if not isinstance(device_pool, DeviceKVPool):
        raise InvalidArgumentError(
            f"{fn}: device_pool: expected a DeviceKVPool, got {type(device_pool).__name__}"
        )
    if not isinstance(host_pool, HostKVPool):
        raise InvalidArgumentError(
            f"{fn}: host_pool: expected a HostKVPool, got {type(host_pool).__name__}"
        )
    for attr in ("kind", "num_layers", "num_heads", "head_dim", "dtype"):
        dev, host = getattr(device_pool, attr), getattr(host_pool, attr)
        if dev != host:
            raise InvalidArgumentError(
                f"{fn}: host_pool: {attr} {host} does not match the device pool's {dev}"
            )


def _is_async(device_pool: DeviceKVPool, host_pool: HostKVPool) -> bool:
    """Whether copies between the pools can be ``non_blocking`` (CUDA device, pinned host)."""
    return device_pool.device.type == "cuda" and host_pool.is_pinned


def _device_buffers(device_pool: DeviceKVPool) -> tuple[torch.Tensor, ...]:
    """The device pool's ``[num_layers, num_slots, heads, head_dim]`` buffers, K/V order."""
    if device_pool.kind == "mha":
        return (device_pool.k_buffer, device_pool.v_buffer)
    return (device_pool.kv_buffer,)


def _to_device(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Returns ``indices`` on ``device``; a CPU -> CUDA copy goes through pinned memory.

    Copying from pageable memory may synchronise with the stream, so CPU indices are pinned first;
    torch's pinned allocator keeps that memory until the copy has run.
    """
    if indices.device == device:
        return indices
    if device.type == "cuda" and indices.device.type == "cpu":
        return indices.pin_memory().to(device, non_blocking=True)
    return indices.to(device)


def _backup_batched(
    device_pool: DeviceKVPool,
    host_pool: HostKVPool,
    device_idx: torch.Tensor,
    host_idx: torch.Tensor,
) -> None:
    """Device -> host with one gather and one scatter per buffer (synchronous on CUDA)."""
    rows = host_pool.row_indices(host_idx)
    for dev_buf, host_flat in zip(
        _device_buffers(device_pool), host_pool.flat_buffers, strict=True
    ):
        # ``[num_layers, n, heads, dim]`` -> layer-major rows, the order of ``rows``.
        src = dev_buf.index_select(1, device_idx).reshape(rows.numel(), host_flat.shape[1])
        host_flat.index_copy_(0, rows, src.cpu())


def _backup_by_runs(
    device_pool: DeviceKVPool,
    host_pool: HostKVPool,
    device_idx: torch.Tensor,
    host_idx: torch.Tensor,
    non_blocking: bool,
) -> None:
    """Device -> host with one ``copy_`` per run of consecutive host rows (asynchronous on CUDA).

    The device gathers the rows already sorted by destination row, so that each run of
    consecutive host rows is one contiguous source slice and one contiguous destination slice.
    """
    host_rows = host_pool.row_indices(host_idx)
    sorted_rows, order = torch.sort(host_rows)
    num_rows = sorted_rows.numel()
    breaks = torch.nonzero(sorted_rows[1:] != sorted_rows[:-1] + 1).flatten() + 1
    zero = torch.zeros(1, dtype=torch.int64)
    starts = torch.cat((zero, breaks))
    ends = torch.cat((breaks, zero + num_rows))
    runs = list(zip(starts.tolist(), ends.tolist(), sorted_rows[starts].tolist(), strict=True))
    device = device_pool.device
    # Device rows of the ``[num_layers * num_slots, heads * dim]`` view, layer-major like
    # ``host_rows``, then put in ascending host-row order.
    layers = torch.arange(device_pool.num_layers, dtype=torch.int64, device=device)[:, None]
    dev_rows = (layers * device_pool.num_slots + device_idx[None, :]).reshape(-1)
    dev_rows = dev_rows.index_select(0, _to_device(order, device))
    for dev_buf, host_flat in zip(
        _device_buffers(device_pool), host_pool.flat_buffers, strict=True
    ):
        src = dev_buf.view(dev_buf.shape[0] * dev_buf.shape[1], -1).index_select(0, dev_rows)
        for start, end, row in runs:
            host_flat[row : row + end - start].copy_(src[start:end], non_blocking=non_blocking)


def _load_direct(
    host_pool: HostKVPool,
    device_pool: DeviceKVPool,
    host_idx: torch.Tensor,
    device_idx: torch.Tensor,
    layer: int | None,
) -> None:
    """Host -> device for one layer or all (``layer=None``): gather, copy, scatter per buffer."""
    rows = host_pool.row_indices(host_idx, layer)
    non_blocking = _is_async(device_pool, host_pool)
    n = host_idx.numel()
    shape = (n, device_pool.num_heads, device_pool.head_dim)
    for host_flat, dev_buf in zip(
        host_pool.flat_buffers, _device_buffers(device_pool), strict=True
    ):
        # Pinned when the copy is asynchronous: the CPU gather fills it before the copy is queued.
        staging = torch.empty(
            (rows.numel(), host_flat.shape[1]), dtype=host_flat.dtype, pin_memory=non_blocking
        )
        torch.index_select(host_flat, 0, rows, out=staging)
        src = staging.to(device_pool.device, non_blocking=non_blocking)
        if layer is None:
            dev_buf.index_copy_(1, device_idx, src.view(device_pool.num_layers, *shape))
        else:
            dev_buf[layer].index_copy_(0, device_idx, src.view(shape))
