"""Tests of :class:`hicache.memory.host_pool.HostKVPool`: layouts, sizing, read/write."""

from __future__ import annotations

import pytest
import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from hicache.memory import DeviceKVPool, PageAllocator
from hicache.memory.host_pool import HostKVPool, HostLayout
from tests.memory.kv_helpers import page_indices, random_kv

NUM_LAYERS, NUM_HEADS, HEAD_DIM = 3, 2, 8
DEVICE_SLOTS, HOST_SLOTS = 64, 96
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LAYOUTS = list(HostLayout)
SENTINEL = -7.0


def _device(kind: str = "mha", dtype: torch.dtype = torch.float16) -> DeviceKVPool:
    heads = NUM_HEADS if kind == "mha" else 1
    return DeviceKVPool(
        DEVICE_SLOTS, NUM_LAYERS, heads, HEAD_DIM, dtype=dtype, device="cpu", kind=kind
    )


# --- construction and layouts --------------------------------------------------------------------


def test_layout_values_are_sglang_strings() -> None:
    assert [m.value for m in HostLayout] == ["layer_first", "page_first", "page_first_direct"]
    assert HostLayout("page_first") is HostLayout.PAGE_FIRST


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        ("layer_first", (2, NUM_LAYERS, HOST_SLOTS, NUM_HEADS, HEAD_DIM)),
        ("page_first", (2, HOST_SLOTS, NUM_LAYERS, NUM_HEADS, HEAD_DIM)),
        ("page_first_direct", (2, HOST_SLOTS // 16, NUM_LAYERS, 16, NUM_HEADS, HEAD_DIM)),
    ],
)
def test_mha_shapes(layout: str, shape: tuple[int, ...]) -> None:
    host = HostKVPool(_device("mha", torch.bfloat16), HOST_SLOTS, 16, layout)
    assert host.kv_buffer.shape == shape
    assert host.kv_buffer.dtype == torch.bfloat16 and host.dtype == torch.bfloat16
    assert host.kv_buffer.device.type == "cpu" and host.device.type == "cpu"
    assert host.layout is HostLayout(layout)
    assert (host.num_slots, host.page_size, host.num_pages) == (HOST_SLOTS, 16, HOST_SLOTS // 16)
    assert (host.num_layers, host.num_heads, host.head_dim, host.kind) == (
        NUM_LAYERS,
        NUM_HEADS,
        HEAD_DIM,
        "mha",
    )
    assert host.size_bytes == 2 * NUM_LAYERS * HOST_SLOTS * NUM_HEADS * HEAD_DIM * 2
    assert not host.kv_buffer.any()
    assert len(host.flat_buffers) == 2
    for i, flat in enumerate(host.flat_buffers):
        assert flat.shape == (NUM_LAYERS * HOST_SLOTS, NUM_HEADS * HEAD_DIM)
        assert flat.data_ptr() == host.kv_buffer[i].data_ptr()  # a view, not a copy


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        (HostLayout.LAYER_FIRST, (1, NUM_LAYERS, HOST_SLOTS, 1, HEAD_DIM)),
        (HostLayout.PAGE_FIRST, (1, HOST_SLOTS, NUM_LAYERS, 1, HEAD_DIM)),
        (HostLayout.PAGE_FIRST_DIRECT, (1, HOST_SLOTS // 4, NUM_LAYERS, 4, 1, HEAD_DIM)),
    ],
)
def test_mla_shapes(layout: HostLayout, shape: tuple[int, ...]) -> None:
    host = HostKVPool(_device("mla", torch.float32), HOST_SLOTS, 4, layout)
    assert host.kv_buffer.shape == shape
    assert host.kind == "mla" and len(host.flat_buffers) == 1
    assert host.size_bytes == NUM_LAYERS * HOST_SLOTS * HEAD_DIM * 4


def test_allocator_and_pinning_defaults() -> None:
    host = HostKVPool(_device(), HOST_SLOTS, 16)
    assert host.layout is HostLayout.LAYER_FIRST
    assert isinstance(host.allocator, PageAllocator)
    assert (host.allocator.num_slots, host.allocator.page_size) == (HOST_SLOTS, 16)
    assert host.allocator.available_size() == HOST_SLOTS
    assert host.is_pinned == torch.cuda.is_available()
    assert host.kv_buffer.is_pinned() == host.is_pinned


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_pin_memory_without_cuda_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="pin_memory"):
        HostKVPool(_device(), HOST_SLOTS, 16, pin_memory=True)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((HOST_SLOTS, 0, "layer_first"), "page_size"),
        ((0, 16, "layer_first"), "num_slots"),
        ((HOST_SLOTS + 1, 16, "layer_first"), "num_slots"),
        ((HOST_SLOTS, 16, "page_head"), "layout"),
        ((HOST_SLOTS, 16, "LAYER_FIRST"), "layout"),
    ],
)
def test_init_rejects(args: tuple, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        HostKVPool(_device(), *args, pin_memory=False)


def test_init_rejects_non_pool() -> None:
    with pytest.raises(InvalidArgumentError, match="device_pool"):
        HostKVPool("pool", HOST_SLOTS, 16)  # type: ignore[arg-type]


# --- sizing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "page_size", "expected"),
    [(2.0, 16, 128), (1.5, 16, 96), (1.1, 16, 64), (0.3, 1, 19), (0.3, 4, 16), (0.25, 16, 16)],
)
def test_from_ratio(ratio: float, page_size: int, expected: int) -> None:
    host = HostKVPool.from_ratio(_device(), ratio, page_size, "page_first")
    assert host.num_slots == expected and host.page_size == page_size
    assert host.layout is HostLayout.PAGE_FIRST


@pytest.mark.parametrize(("ratio", "page_size"), [(0.2, 16), (0.0, 1), (-1.0, 1)])
def test_from_ratio_rejects(ratio: float, page_size: int) -> None:
    with pytest.raises(InvalidArgumentError, match="ratio"):
        HostKVPool.from_ratio(_device(), ratio, page_size)


@pytest.mark.parametrize(("kind", "dtype"), [("mha", torch.float16), ("mla", torch.float32)])
def test_from_size_gb(kind: str, dtype: torch.dtype) -> None:
    device = _device(kind, dtype)
    heads = NUM_HEADS if kind == "mha" else 1
    bytes_per_token = (2 if kind == "mha" else 1) * NUM_LAYERS * heads * HEAD_DIM * dtype.itemsize
    assert bytes_per_token == device.size_bytes // device.num_slots
    size_gb = 1e-6  # 1000 bytes
    host = HostKVPool.from_size_gb(device, size_gb, 4, pin_memory=False)
    assert host.num_slots == 1000 // bytes_per_token // 4 * 4
    assert host.size_bytes <= 1000
    host = HostKVPool.from_size_gb(device, 1e-5, 1, "page_first_direct")
    assert host.num_slots == 10_000 // bytes_per_token


@pytest.mark.parametrize(("size_gb", "page_size"), [(1e-7, 16), (0.0, 1), (-1.0, 1)])
def test_from_size_gb_rejects(size_gb: float, page_size: int) -> None:
    with pytest.raises(InvalidArgumentError, match="size_gb"):
        HostKVPool.from_size_gb(_device(), size_gb, page_size)


def test_sizing_rejects_bad_page_size() -> None:
    with pytest.raises(InvalidArgumentError, match="page_size"):
        HostKVPool.from_ratio(_device(), 1.0, 0)


# --- offset functions ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_indices_address_the_right_element(layout: HostLayout) -> None:
    """Row ``r`` of the flat view is the element the layout's shape puts at (layer, slot)."""
    host = HostKVPool(_device("mla", torch.float32), 32, 4, layout, pin_memory=False)
    flat = host.flat_buffers[0]
    flat.copy_(torch.arange(flat.numel(), dtype=torch.float32).view(flat.shape))
    slots = torch.tensor([5, 31, 0, 12], dtype=torch.int64)
    rows = host.row_indices(slots).view(NUM_LAYERS, -1)
    buf = host.kv_buffer[0]
    for layer in range(NUM_LAYERS):
        for i, slot in enumerate(slots.tolist()):
            if layout is HostLayout.LAYER_FIRST:
                expected = buf[layer, slot]
            elif layout is HostLayout.PAGE_FIRST:
                expected = buf[slot, layer]
            else:
                expected = buf[slot // 4, layer, slot % 4]
            assert torch.equal(flat[rows[layer, i]].view(expected.shape), expected)
        assert torch.equal(host.row_indices(slots, layer), rows[layer])


# --- read / write --------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_read_round_trip(layout: HostLayout, kind: str, dtype: torch.dtype, page_size: int):
    host = HostKVPool(_device(kind, dtype), HOST_SLOTS, page_size, layout)
    host.kv_buffer.fill_(SENTINEL)
    idx = page_indices(HOST_SLOTS, page_size, 3, seed=page_size)
    values = random_kv(host, idx.numel())
    host.write(idx, *values)
    got = host.read(idx)
    assert len(got) == len(values)
    for g, v in zip(got, values, strict=True):
        assert g.shape == (NUM_LAYERS, idx.numel(), host.num_heads, HEAD_DIM)
        assert g.dtype == dtype and torch.equal(g, v)
    # Exactly the written elements changed, and other slots read back as the sentinel.
    per_token = NUM_LAYERS * host.num_heads * HEAD_DIM * len(values)
    assert int((host.kv_buffer != SENTINEL).sum()) == idx.numel() * per_token
    others = torch.ones(HOST_SLOTS, dtype=torch.bool)
    others[idx] = False
    for g in host.read(torch.nonzero(others).flatten()):
        assert bool((g == SENTINEL).all())


def test_read_returns_copies_and_empty() -> None:
    host = HostKVPool(_device("mla"), HOST_SLOTS, 16, "page_first")
    (kv,) = host.read(torch.tensor([3], dtype=torch.int64))
    kv.fill_(5.0)
    assert not host.kv_buffer.any()
    empty = torch.empty(0, dtype=torch.int64)
    host.write(empty, *random_kv(host, 0))
    (kv,) = host.read(empty)
    assert kv.shape == (NUM_LAYERS, 0, 1, HEAD_DIM)


@pytest.mark.parametrize(
    ("indices", "exc", "match"),
    [
        (torch.tensor([0, 1], dtype=torch.int32), InvalidArgumentError, "int64"),
        (torch.tensor([0.0, 1.0]), InvalidArgumentError, "int64"),
        (torch.tensor([[0, 1]], dtype=torch.int64), InvalidArgumentError, "1-D"),
        (torch.tensor([0, HOST_SLOTS], dtype=torch.int64), IndexOutOfRangeError, str(HOST_SLOTS)),
        (torch.tensor([-1, 3], dtype=torch.int64), IndexOutOfRangeError, "-1"),
        ([0, 1], InvalidArgumentError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bad_indices(layout: HostLayout, indices, exc: type, match: str) -> None:
    host = HostKVPool(_device("mha"), HOST_SLOTS, 16, layout)
    n = len(indices)
    with pytest.raises(exc, match=f"host_indices.*{match}"):
        host.write(indices, *random_kv(host, n))
    with pytest.raises(exc, match=match):
        host.read(indices)
    assert not host.kv_buffer.any()


def test_bad_values() -> None:
    mha = HostKVPool(_device("mha"), HOST_SLOTS, 16)
    mla = HostKVPool(_device("mla"), HOST_SLOTS, 16)
    idx = torch.tensor([1, 2], dtype=torch.int64)
    k, v = random_kv(mha, 2)
    with pytest.raises(InvalidArgumentError, match="v: expected a tensor"):
        mha.write(idx, k)
    with pytest.raises(InvalidArgumentError, match="shape"):
        mha.write(idx, k[:, :1], v)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        mha.write(idx, k, v.float())
    with pytest.raises(InvalidArgumentError, match="torch.Tensor"):
        mha.write(idx, k, v.tolist())
    (kv,) = random_kv(mla, 2)
    with pytest.raises(InvalidArgumentError, match="v: expected None"):
        mla.write(idx, kv, kv)
    assert not mha.kv_buffer.any() and not mla.kv_buffer.any()
