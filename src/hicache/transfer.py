"""Transfer backends between the device and host KV pools (SGLang's ``io_backend``).

Only the ``"direct"`` backend exists so far: torch index ops and ``Tensor.copy_``, on the CPU and
on CUDA (the ``"kernel"`` backend, hicache's own CUDA kernels, comes with the CUDA extension).
SGLang's direct backend copies one run of consecutive indices per layer at a time
(``transfer_kv_direct``); this one gathers and scatters every layer with one index op per K/V
buffer, through the host layout's offset function :meth:`HostKVPool.row_indices`.

Streams and lifetimes. Every function enqueues its work on the *current* CUDA stream and returns
without synchronising: the controller runs them under ``torch.cuda.stream(side_stream)`` and
waits on an event. When the device pool is on CUDA and the host pool is pinned, every host/device
copy is ``non_blocking=True``:

- host -> device (:func:`load_layer`, :func:`load_all_layers`): the host rows are gathered on the
  CPU into a pinned staging tensor, copied asynchronously, then scattered on the device. torch's
  pinned allocator keeps the staging memory until the copy has run.
- device -> host (:func:`backup_all_layers`): a CPU scatter cannot wait for an asynchronous copy,
  so the device gathers the rows in ascending host-row order and each run of consecutive host
  rows is one asynchronous ``copy_`` into the host buffer: one copy per run of consecutive host
  slots (``page_first``) or pages (``page_first_direct``), times ``num_layers`` for
  ``layer_first``. Never one per token.

Index tensors: ``host_indices`` are read on the CPU before the function returns. ``device_indices``
already on the device are used as they are by kernels on the current stream: the caller must keep
them alive until that stream has run the copies (``tensor.record_stream(stream)`` when they were
made on another stream), see DESIGN.md failure class 2. CPU ``device_indices`` are copied to the
device (through pinned memory) by these functions, which own that copy.

Without CUDA or without pinned memory, the copies are synchronous and correct.
"""

from __future__ import annotations

import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from hicache.memory.device_pool import DeviceKVPool
from hicache.memory.host_pool import HostKVPool, check_slot_indices

__all__ = [
    "IO_BACKEND_DIRECT",
    "available_backends",
    "backup_all_layers",
    "load_all_layers",
    "load_layer",
]

IO_BACKEND_DIRECT = "direct"


def available_backends() -> list[str]:
    """Lists the transfer backends this build provides.

    Returns:
        Backend names (SGLang's ``--hicache-io-backend`` values); ``["direct"]`` for now.
    """
    return [IO_BACKEND_DIRECT]


def backup_all_layers(
    device_pool: DeviceKVPool,
    host_pool: HostKVPool,
    device_indices: torch.Tensor,
    host_indices: torch.Tensor,
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

    Raises:
        InvalidArgumentError: a pool of the wrong type or shape; an index tensor of the wrong
            type, dtype, dim or device; ``n`` differs between the two. Nothing is copied.
        IndexOutOfRangeError: a slot is out of its pool's range. Nothing is copied.

    Note:
        Asynchronous on CUDA with a pinned host pool and does not synchronise: see the module
        docstring for the stream and index-lifetime rules (DESIGN.md failure class 2). Repeated
        host slots are not checked; which value lands there is unspecified.
    """
    host_idx, device_idx = _prepare(
        device_pool, host_pool, device_indices, host_indices, "backup_all_layers"
    )
    if host_idx.numel() == 0:
        return
    if _is_async(device_pool, host_pool):
        _backup_by_runs(device_pool, host_pool, device_idx, host_idx, non_blocking=True)
    else:
        _backup_batched(device_pool, host_pool, device_idx, host_idx)


def load_layer(
    host_pool: HostKVPool,
    device_pool: DeviceKVPool,
    host_indices: torch.Tensor,
    device_indices: torch.Tensor,
    layer: int,
) -> None:
    """Copies one layer's KV of ``n`` host slots into ``n`` device slots (host -> device).

    SGLang's ``load_to_device_per_layer``: the layer-wise load-back, where layer ``i`` computes
    while layer ``i + 1`` loads. Slot ``host_indices[i]`` goes to ``device_indices[i]`` in layer
    ``layer`` only; no other device slot or layer changes.

    Args:
        host_pool: the source pool.
        device_pool: the destination pool; same kind, layers, heads, head_dim and dtype.
        host_indices: ``[n]`` int64 CPU host slot indices.
        device_indices: ``[n]`` int64 device slot indices, any device.
        layer: layer id in ``[0, num_layers)``.

    Raises:
        InvalidArgumentError: as in :func:`backup_all_layers`, or ``layer`` is not an int.
        IndexOutOfRangeError: ``layer`` or a slot is out of range. Nothing is copied.

    Note:
        Asynchronous on CUDA with a pinned host pool and does not synchronise: see the module
        docstring (DESIGN.md failure class 2).
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise InvalidArgumentError(
            f"load_layer: layer: expected an int, got {type(layer).__name__}"
        )
    if not 0 <= layer < device_pool.num_layers:
        raise IndexOutOfRangeError(
            f"load_layer: layer {layer} out of range [0, {device_pool.num_layers})"
        )
    host_idx, device_idx = _prepare(
        device_pool, host_pool, device_indices, host_indices, "load_layer"
    )
    if host_idx.numel() > 0:
        _load(host_pool, device_pool, host_idx, device_idx, layer)


def load_all_layers(
    host_pool: HostKVPool,
    device_pool: DeviceKVPool,
    host_indices: torch.Tensor,
    device_indices: torch.Tensor,
) -> None:
    """Copies the KV of ``n`` host slots, all layers, into ``n`` device slots (host -> device).

    Args:
        host_pool: the source pool.
        device_pool: the destination pool; same kind, layers, heads, head_dim and dtype.
        host_indices: ``[n]`` int64 CPU host slot indices.
        device_indices: ``[n]`` int64 device slot indices, any device.

    Raises:
        InvalidArgumentError: as in :func:`backup_all_layers`.
        IndexOutOfRangeError: a slot is out of range. Nothing is copied.

    Note:
        Asynchronous on CUDA with a pinned host pool and does not synchronise: see the module
        docstring (DESIGN.md failure class 2). Repeated device slots are not checked.
    """
    host_idx, device_idx = _prepare(
        device_pool, host_pool, device_indices, host_indices, "load_all_layers"
    )
    if host_idx.numel() > 0:
        _load(host_pool, device_pool, host_idx, device_idx, None)


def _is_async(device_pool: DeviceKVPool, host_pool: HostKVPool) -> bool:
    """Whether copies between the pools can be ``non_blocking`` (CUDA device, pinned host)."""
    return device_pool.device.type == "cuda" and host_pool.is_pinned


def _device_buffers(device_pool: DeviceKVPool) -> tuple[torch.Tensor, ...]:
    """The device pool's ``[num_layers, num_slots, heads, head_dim]`` buffers, K/V order."""
    if device_pool.kind == "mha":
        return (device_pool.k_buffer, device_pool.v_buffer)
    return (device_pool.kv_buffer,)


def _prepare(
    device_pool: DeviceKVPool,
    host_pool: HostKVPool,
    device_indices: torch.Tensor,
    host_indices: torch.Tensor,
    fn: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates a transfer's arguments; returns ``(host_indices, device_indices on device)``."""
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
    check_slot_indices(host_indices, f"{fn}: host_indices", host_pool.num_slots, require_cpu=True)
    check_slot_indices(
        device_indices, f"{fn}: device_indices", device_pool.num_slots, require_cpu=False
    )
    if host_indices.numel() != device_indices.numel():
        raise InvalidArgumentError(
            f"{fn}: device_indices: length {device_indices.numel()} differs from host_indices "
            f"length {host_indices.numel()}"
        )
    return host_indices, _to_device(device_indices, device_pool.device)


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


def _load(
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
