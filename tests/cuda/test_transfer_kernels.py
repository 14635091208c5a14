"""The CUDA transfer kernels (``cuda/``, ``hicache._cuda_ops``) against a torch reference.

Every case runs twice: ``engine="emulate"`` runs the kernel's own row decomposition and layout
offset functions on the CPU (``emulate_transfer``, compiled from the same header), so that CPU-only
machines test the offsets with exactly the parameters a launch gets; ``engine="cuda"`` launches
the kernel on a GPU (marked ``cuda``). The reference is independent of both: the host pool's
Python offset function (:meth:`HostKVPool.row_indices`) and torch byte indexing.

Destinations are poisoned before each call and compared bit-exact as bytes, whole buffers: the
rows the transfer names must hold the source bytes, every other byte must still be poison.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hicache import transfer
from hicache.errors import InvalidArgumentError
from hicache.memory import DeviceKVPool, HostKVPool
from hicache.memory.host_pool import HostLayout

cuda_ops = pytest.importorskip(
    "hicache._cuda_ops", reason="hicache._cuda_ops is not built (no CUDA compiler at build time)"
)

NUM_LAYERS = 3
DEVICE_PAGES, HOST_PAGES = 5, 7
POISON = 0xA5
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]
# (heads, head_dim): a regular head (16-byte rows for every dtype) and an odd one whose rows
# force narrow accesses (6, 3 or 12 bytes).
SHAPES = [(2, 8), (1, 3)]
ENGINES = ["emulate", pytest.param("cuda", marks=pytest.mark.cuda)]


def _pools(kind, dtype, page_size, layout, shape, device):
    heads, dim = (1, shape[1]) if kind == "mla" else shape
    dev = DeviceKVPool(
        DEVICE_PAGES * page_size, NUM_LAYERS, heads, dim, dtype=dtype, device=device, kind=kind
    )
    host = HostKVPool(dev, HOST_PAGES * page_size, page_size, layout, pin_memory=device == "cuda")
    return dev, host


def _device_bytes(pool: DeviceKVPool) -> list[torch.Tensor]:
    """``[layers, slots, row_bytes]`` uint8 views of the device buffers."""
    bufs = [pool.k_buffer, pool.v_buffer] if pool.kind == "mha" else [pool.kv_buffer]
    return [b.view(torch.uint8).view(pool.num_layers, pool.num_slots, -1) for b in bufs]


def _host_bytes(pool: HostKVPool) -> list[torch.Tensor]:
    """``[rows, row_bytes]`` uint8 views of the host flat buffers."""
    return [b.view(torch.uint8) for b in pool.flat_buffers]


def _fill_random(tensors: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=gen).to(t.device))


def _index_sets(page_size: int, num_pages: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial (device, host) slot sets of whole pages.

    Unsorted pages with gaps, always both pools' first and last page (so the last slot of each
    pool is copied), page boundaries on both sides; for page size 1, unsorted single slots.
    """
    gen = torch.Generator().manual_seed(seed)

    def pages(total: int) -> torch.Tensor:
        middle = torch.randperm(total - 2, generator=gen)[: num_pages - 2] + 1
        chosen = torch.cat((torch.tensor([0, total - 1]), middle))
        chosen = chosen[torch.randperm(chosen.numel(), generator=gen)]
        return (chosen[:, None] * page_size + torch.arange(page_size)).reshape(-1)

    return pages(DEVICE_PAGES), pages(HOST_PAGES)


def _reference(dev, host, dev_idx, host_idx, direction, layers) -> list[torch.Tensor]:
    """Expected destination bytes after the transfer, computed with torch indexing."""
    dev_bytes, host_bytes = _device_bytes(dev), _host_bytes(host)
    if direction == "device_to_host":
        expected = [h.cpu().clone() for h in host_bytes]
        for d, e in zip(dev_bytes, expected, strict=True):
            for layer in layers:
                e[host.row_indices(host_idx, layer)] = d[layer].cpu()[dev_idx]
    else:
        expected = [d.cpu().clone() for d in dev_bytes]
        for h, e in zip(host_bytes, expected, strict=True):
            for layer in layers:
                e[layer][dev_idx] = h[host.row_indices(host_idx, layer)]
    return expected


def _run(engine, dev, host, dev_idx, host_idx, direction, layer_begin, layer_end) -> int:
    """Runs one transfer through the kernel's parameters; returns the access width (cuda)."""
    device = dev.device
    indices = transfer.TransferIndices(
        host_idx, dev_idx.to(device), host_idx.to(device) if engine == "cuda" else host_idx
    )
    params = transfer.kernel_params(dev, host, indices, layer_begin, layer_end)
    layout = cuda_ops.HostLayout.__members__[host.layout.value]
    direction_enum = cuda_ops.Direction.__members__[direction]
    if engine == "emulate":
        cuda_ops.emulate_transfer(params, layout, direction_enum)
        return 0
    stream = torch.cuda.current_stream().cuda_stream
    width = cuda_ops.transfer(params, layout, direction_enum, stream)
    torch.cuda.synchronize()
    return width


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("layout", list(HostLayout), ids=lambda x: x.value)
@pytest.mark.parametrize("direction", ["device_to_host", "host_to_device"])
def test_kernel_matches_torch_reference(engine, page_size, dtype, kind, layout, direction):
    device = "cuda" if engine == "cuda" else "cpu"
    for shape, layers in itertools.product(SHAPES, ["all", 0, NUM_LAYERS - 1]):
        dev, host = _pools(kind, dtype, page_size, layout, shape, device)
        dev_idx, host_idx = _index_sets(page_size, 4, seed=page_size + len(str(layers)))
        if page_size == 1:  # more single slots, still with gaps and both last slots
            dev_idx, host_idx = _index_sets(1, DEVICE_PAGES, seed=3)
        src, dst = (
            (_device_bytes(dev), _host_bytes(host))
            if direction == "device_to_host"
            else (_host_bytes(host), _device_bytes(dev))
        )
        _fill_random(src, seed=11)
        for t in dst:
            t.fill_(POISON)
        begin, end = (0, NUM_LAYERS) if layers == "all" else (layers, layers + 1)
        expected = _reference(dev, host, dev_idx, host_idx, direction, range(begin, end))
        width = _run(engine, dev, host, dev_idx, host_idx, direction, begin, end)
        for got, want in zip(dst, expected, strict=True):
            assert torch.equal(got.cpu(), want), (shape, layers)
        if engine == "cuda":
            row_bytes = shape[1] * (shape[0] if kind == "mha" else 1) * dtype.itemsize
            assert width == max(w for w in (1, 2, 4, 8, 16) if row_bytes % w == 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_tokens_copy_nothing(engine):
    device = "cuda" if engine == "cuda" else "cpu"
    dev, host = _pools("mha", torch.float16, 4, HostLayout.PAGE_FIRST, (2, 8), device)
    for t in _host_bytes(host):
        t.fill_(POISON)
    empty = torch.empty(0, dtype=torch.int64)
    assert _run(engine, dev, host, empty, empty, "device_to_host", 0, NUM_LAYERS) == 0
    assert all(bool((t == POISON).all()) for t in _host_bytes(host))


def _valid_params() -> tuple:
    dev, host = _pools("mha", torch.float16, 4, HostLayout.LAYER_FIRST, (2, 8), "cpu")
    idx = torch.arange(4)
    params = transfer.kernel_params(dev, host, transfer.TransferIndices(idx, idx, idx), 0, 1)
    return params, (dev, host, idx)  # keep the buffers alive while params point into them


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_tokens", -1, "num_tokens: expected >= 0"),
        ("row_bytes", 0, "row_bytes: expected > 0"),
        ("device_num_slots", 0, "device_num_slots"),
        ("host_num_slots", -4, "host_num_slots"),
        ("num_layers", 0, "num_layers"),
        ("layer_begin", 1, r"0 <= layer_begin < layer_end"),
        ("layer_end", 4, r"0 <= layer_begin < layer_end <= num_layers \(3\), got \[0, 4\)"),
        ("page_size", 0, "page_size"),
        ("device_indices", 0, "index pointer is null"),
        ("host_indices", 12, "8-byte aligned"),
        ("host_buffers", [0, 0], r"host_buffers\[0\] is null"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(field, value, match):
    params, keep = _valid_params()
    if field == "host_indices":
        value = params.host_indices + 4  # misaligned
    setattr(params, field, value)
    with pytest.raises(ValueError, match=match):
        cuda_ops.emulate_transfer(
            params, cuda_ops.HostLayout.layer_first, cuda_ops.Direction.device_to_host
        )
    del keep


def test_buffer_lists_are_checked():
    params = cuda_ops.TransferParams()
    with pytest.raises(ValueError, match="expected 1 .MLA. or 2"):
        params.device_buffers = [1, 2, 3]
    with pytest.raises(ValueError, match="expected 1 .MLA. or 2"):
        params.host_buffers = []
    params.device_buffers = [16]
    params.host_buffers = [32]
    assert (params.num_buffers, params.device_buffers, params.host_buffers) == (1, [16], [32])


def test_page_first_direct_needs_whole_host_pages():
    params, keep = _valid_params()
    params.page_size = 3  # host_num_slots is 28 tokens
    with pytest.raises(ValueError, match="not a multiple of page_size 3"):
        cuda_ops.emulate_transfer(
            params, cuda_ops.HostLayout.page_first_direct, cuda_ops.Direction.host_to_device
        )
    del keep


def test_kernel_params_require_the_module_inputs():
    dev, host = _pools("mla", torch.float32, 4, HostLayout.PAGE_FIRST, (1, 8), "cpu")
    idx = torch.arange(4)
    with pytest.raises(InvalidArgumentError, match="host_indices_on_device"):
        transfer.kernel_params(dev, host, transfer.TransferIndices(idx, idx, None), 0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_a_gpu_auto_picks_direct_and_kernel_says_why(caplog):
    dev, host = _pools("mha", torch.float16, 4, HostLayout.LAYER_FIRST, (2, 8), "cpu")
    assert transfer.available_backends() == ["direct"]
    assert cuda_ops.device_count() < 0 and cuda_ops.device_error()
    with pytest.raises(InvalidArgumentError, match="'kernel' cannot run here: torch.cuda"):
        transfer.KVTransfer(dev, host, "kernel")
    with caplog.at_level("INFO", logger="hicache"):
        assert transfer.KVTransfer(dev, host, "auto").io_backend == "direct"
    assert "auto -> direct" in caplog.text


# ---- GPU only: the launch path, its pointer checks and the backend in the controller ---------


@pytest.mark.cuda
@pytest.mark.parametrize("layout", list(HostLayout), ids=lambda x: x.value)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_kernel_backend_round_trip_through_the_controller(layout, kind):
    from hicache.controller import CacheController
    from tests.memory.kv_helpers import page_indices, random_kv

    dev, host = _pools(kind, torch.bfloat16, 16, layout, (8, 128), "cuda")
    src = page_indices(dev.num_slots, 16, 3, seed=1)
    kv = random_kv(dev, src.numel(), seed=2)
    dev.write(src.cuda(), *kv)
    host_slots = page_indices(host.num_slots, 16, 3, seed=3)
    dst = page_indices(dev.num_slots, 16, 3, seed=4)
    with CacheController(dev, host, io_backend="auto") as controller:
        assert controller.io_backend == "kernel"
        controller.write(src, host_slots, ack_id=1)
        controller.start_writing()
        assert controller.writing_check(block=True) == [1]
        for buf in _device_bytes(dev):
            buf.fill_(POISON)
        controller.load(host_slots, dst, ack_id=2)
        consumer = controller.start_loading()
        for layer in range(dev.num_layers):
            controller.wait_until_layer_ready(layer, consumer)
        assert controller.loading_check(block=True) == [2]
    got = dev.read(dst.cuda())
    assert all(torch.equal(g, w) for g, w in zip(got, kv, strict=True))


@pytest.mark.cuda
def test_launch_rejects_pageable_host_memory_and_host_device_buffers():
    dev, host = _pools("mha", torch.float16, 4, HostLayout.LAYER_FIRST, (2, 8), "cuda")
    idx = torch.arange(4)
    indices = transfer.TransferIndices(idx, idx.cuda(), idx.cuda())
    layout, direction = cuda_ops.HostLayout.layer_first, cuda_ops.Direction.device_to_host
    stream = torch.cuda.current_stream().cuda_stream
    pageable = torch.zeros(host.kv_buffer.shape, dtype=host.dtype)  # not pinned
    params = transfer.kernel_params(dev, host, indices, 0, NUM_LAYERS)
    params.host_buffers = [b.data_ptr() for b in pageable.view(2, -1, 16)]
    with pytest.raises(ValueError, match=r"host_buffers\[0\] is not pinned host memory"):
        cuda_ops.transfer(params, layout, direction, stream)
    params = transfer.kernel_params(dev, host, indices, 0, NUM_LAYERS)
    params.device_buffers = [pageable.data_ptr(), pageable.data_ptr()]
    with pytest.raises(ValueError, match=r"device_buffers\[0\] is neither device memory"):
        cuda_ops.transfer(params, layout, direction, stream)
    cpu_idx = torch.arange(4)  # pageable CPU indices cannot be read by the kernel
    params = transfer.kernel_params(
        dev, host, transfer.TransferIndices(idx, idx.cuda(), cpu_idx), 0, NUM_LAYERS
    )
    with pytest.raises(ValueError, match="host_indices is neither device memory"):
        cuda_ops.transfer(params, layout, direction, stream)


@pytest.mark.cuda
def test_kernel_backend_needs_a_pinned_host_pool():
    dev = DeviceKVPool(16, 2, 2, 8, torch.float16, "cuda")
    host = HostKVPool(dev, 16, 4, pin_memory=False)
    with pytest.raises(InvalidArgumentError, match="not pinned"):
        transfer.KVTransfer(dev, host, "kernel")
    assert transfer.KVTransfer(dev, host, "auto").io_backend == "direct"
