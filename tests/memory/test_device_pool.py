"""Tests of :class:`hicache.memory.DeviceKVPool`."""

from __future__ import annotations

import pytest
import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from hicache.memory import DeviceKVPool

NUM_SLOTS, NUM_LAYERS, NUM_HEADS, HEAD_DIM = 16, 3, 2, 8
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _pool(
    kind: str = "mha", dtype: torch.dtype = torch.float16, device: str = "cpu"
) -> DeviceKVPool:
    heads = NUM_HEADS if kind == "mha" else 1
    return DeviceKVPool(
        NUM_SLOTS, NUM_LAYERS, heads, HEAD_DIM, dtype=dtype, device=device, kind=kind
    )


def _values(
    pool: DeviceKVPool, n: int, *, seed: int = 0, layer: bool = False
) -> list[torch.Tensor]:
    """Random K and V (mha) or KV (mla) for ``n`` tokens, all layers or one (``layer=True``)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (
        (n, pool.num_heads, pool.head_dim)
        if layer
        else (pool.num_layers, n, pool.num_heads, pool.head_dim)
    )
    count = 2 if pool.kind == "mha" else 1
    # Nonzero everywhere, so a value read back from an unwritten (zero) slot cannot pass.
    return [
        (torch.rand(shape, generator=gen) + 1.0).to(pool.dtype).to(pool.device)
        for _ in range(count)
    ]


def _buffers(pool: DeviceKVPool) -> list[torch.Tensor]:
    """The pool's buffers, in the order ``read`` returns them."""
    return [pool.k_buffer, pool.v_buffer] if pool.kind == "mha" else [pool.kv_buffer]


# --- construction -------------------------------------------------------------------------------


def test_mha_buffers_and_size() -> None:
    pool = _pool("mha", torch.bfloat16)
    assert pool.k_buffer.shape == (NUM_LAYERS, NUM_SLOTS, NUM_HEADS, HEAD_DIM)
    assert pool.v_buffer.shape == pool.k_buffer.shape
    assert pool.k_buffer.dtype == torch.bfloat16
    assert not hasattr(pool, "kv_buffer")
    assert pool.size_bytes == 2 * NUM_LAYERS * NUM_SLOTS * NUM_HEADS * HEAD_DIM * 2
    assert (pool.num_slots, pool.num_layers, pool.num_heads, pool.head_dim) == (
        NUM_SLOTS,
        NUM_LAYERS,
        NUM_HEADS,
        HEAD_DIM,
    )
    assert pool.kind == "mha" and pool.dtype == torch.bfloat16
    assert pool.device == torch.device("cpu")


def test_mla_buffer_and_size() -> None:
    pool = _pool("mla", torch.float32)
    assert pool.kv_buffer.shape == (NUM_LAYERS, NUM_SLOTS, 1, HEAD_DIM)
    assert not hasattr(pool, "k_buffer") and not hasattr(pool, "v_buffer")
    assert pool.size_bytes == NUM_LAYERS * NUM_SLOTS * HEAD_DIM * 4


def test_default_device() -> None:
    pool = DeviceKVPool(4, 1, 1, 4)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pool.device.type == expected
    assert pool.dtype == torch.float16 and pool.kind == "mha"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_slots": 0}, "num_slots"),
        ({"num_layers": -1}, "num_layers"),
        ({"num_heads": 0}, "num_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"kind": "gqa"}, "kind"),
        ({"kind": "mla", "num_heads": 2}, "num_heads"),
    ],
)
def test_init_rejects(kwargs: dict, match: str) -> None:
    args = {"num_slots": 4, "num_layers": 1, "num_heads": 1, "head_dim": 4, "device": "cpu"}
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        DeviceKVPool(**args)


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_write_read_round_trip(kind: str, dtype: torch.dtype) -> None:
    pool = _pool(kind, dtype)
    indices = torch.tensor([9, 2, 15, 4, 5], dtype=torch.int64)
    values = _values(pool, indices.numel())
    pool.write(indices, *values)
    got = pool.read(indices)
    assert len(got) == len(values)
    for g, v in zip(got, values, strict=True):
        assert g.dtype == dtype
        assert torch.equal(g, v)  # bit-exact
    # Unwritten slots are untouched (still zero); written ones hold the values at their slot.
    written = torch.zeros(NUM_SLOTS, dtype=torch.bool)
    written[indices] = True
    for buf, v in zip(_buffers(pool), values, strict=True):
        assert not buf[:, ~written].any()
        assert torch.equal(buf[:, indices], v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_write_read_layer_round_trip(kind: str, dtype: torch.dtype) -> None:
    pool = _pool(kind, dtype)
    indices = torch.tensor([7, 0, 11], dtype=torch.int64)
    values = _values(pool, indices.numel(), layer=True)
    pool.write_layer(1, indices, *values)
    for g, v in zip(pool.read_layer(1, indices), values, strict=True):
        assert torch.equal(g, v)
    for buf in _buffers(pool):
        assert not buf[0].any() and not buf[2].any()  # other layers untouched
    for g in pool.read(indices):
        assert not g[0].any() and not g[2].any()


def test_overwrite_and_read_order() -> None:
    pool = _pool("mha", torch.float32)
    first = _values(pool, 4, seed=1)
    pool.write(torch.arange(4, dtype=torch.int64), *first)
    second = _values(pool, 2, seed=2)
    pool.write(torch.tensor([3, 1], dtype=torch.int64), *[v[:, :2] for v in second])
    k, v = pool.read(torch.tensor([1, 3, 0], dtype=torch.int64))
    assert torch.equal(k[:, 0], second[0][:, 1])
    assert torch.equal(k[:, 1], second[0][:, 0])
    assert torch.equal(v[:, 2], first[1][:, 0])


def test_empty_indices() -> None:
    pool = _pool("mha")
    empty = torch.empty(0, dtype=torch.int64)
    pool.write(empty, *_values(pool, 0))
    k, v = pool.read(empty)
    assert k.shape == (NUM_LAYERS, 0, NUM_HEADS, HEAD_DIM)
    assert not pool.k_buffer.any()


def test_read_returns_copies() -> None:
    pool = _pool("mla", torch.float32)
    idx = torch.tensor([1], dtype=torch.int64)
    (kv,) = pool.read(idx)
    kv.fill_(5.0)
    assert not pool.kv_buffer.any()


# --- validation: each failed call leaves the buffers unchanged ------------------------------------


def _assert_unchanged(pool: DeviceKVPool) -> None:
    for buf in _buffers(pool):
        assert not buf.any()


@pytest.mark.parametrize(
    ("indices", "exc", "match"),
    [
        (torch.tensor([0, 1], dtype=torch.int32), InvalidArgumentError, "int64"),
        (torch.tensor([[0, 1]], dtype=torch.int64), InvalidArgumentError, "1-D"),
        (torch.tensor([0, 16], dtype=torch.int64), IndexOutOfRangeError, "16"),
        (torch.tensor([-1, 3], dtype=torch.int64), IndexOutOfRangeError, "-1"),
    ],
)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_bad_indices(kind: str, indices: torch.Tensor, exc: type, match: str) -> None:
    pool = _pool(kind)
    n = indices.numel()
    with pytest.raises(exc, match=match):
        pool.write(indices, *_values(pool, n))
    with pytest.raises(exc, match=match):
        pool.write_layer(0, indices, *_values(pool, n, layer=True))
    with pytest.raises(exc, match=match):
        pool.read(indices)
    with pytest.raises(exc, match=match):
        pool.read_layer(0, indices)
    _assert_unchanged(pool)


def test_bad_values_mha() -> None:
    pool = _pool("mha")
    idx = torch.tensor([0, 1], dtype=torch.int64)
    k, v = _values(pool, 2)
    cases = [
        ((idx, k, None), "expected a tensor"),
        ((idx, k[:, :1], v), r"k: expected shape \[3, 2, 2, 8\], got \[3, 1, 2, 8\]"),
        ((idx, k, v[:, :, :1]), "v: expected shape"),
        ((idx, k.float(), v), "k: expected dtype torch.float16, got torch.float32"),
        ((idx, k, v.to(torch.bfloat16)), "v: expected dtype"),
        ((torch.tensor([0], dtype=torch.int64), k, v), "expected shape"),
    ]
    for args, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            pool.write(*args)
    _assert_unchanged(pool)


def test_bad_values_mla() -> None:
    pool = _pool("mla")
    idx = torch.tensor([0, 1], dtype=torch.int64)
    (kv,) = _values(pool, 2)
    with pytest.raises(InvalidArgumentError, match="v: expected None"):
        pool.write(idx, kv, kv)
    with pytest.raises(InvalidArgumentError, match="v: expected None"):
        pool.write_layer(0, idx, kv[0], kv[0])
    with pytest.raises(InvalidArgumentError, match="expected shape"):
        pool.write(idx, kv.expand(-1, -1, 2, -1))
    _assert_unchanged(pool)


def test_bad_values_layer() -> None:
    pool = _pool("mha")
    idx = torch.tensor([0, 1], dtype=torch.int64)
    k, v = _values(pool, 2)  # all-layer shape, wrong for write_layer
    with pytest.raises(InvalidArgumentError, match=r"expected shape \[2, 2, 8\]"):
        pool.write_layer(0, idx, k, v)
    _assert_unchanged(pool)


@pytest.mark.parametrize("layer", [-1, NUM_LAYERS])
def test_layer_out_of_range(layer: int) -> None:
    pool = _pool("mha")
    idx = torch.tensor([0], dtype=torch.int64)
    with pytest.raises(IndexOutOfRangeError, match="layer"):
        pool.write_layer(layer, idx, *_values(pool, 1, layer=True))
    with pytest.raises(IndexOutOfRangeError, match="layer"):
        pool.read_layer(layer, idx)
    _assert_unchanged(pool)


def test_wrong_value_device() -> None:
    # The meta device stands in for "another device" on machines without CUDA.
    pool = _pool("mla")
    idx = torch.tensor([0], dtype=torch.int64)
    kv = torch.empty((NUM_LAYERS, 1, 1, HEAD_DIM), dtype=torch.float16, device="meta")
    with pytest.raises(InvalidArgumentError, match="expected device cpu, got meta"):
        pool.write(idx, kv)
    _assert_unchanged(pool)


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_cuda_round_trip_with_cpu_indices(kind: str) -> None:
    pool = _pool(kind, torch.bfloat16, device="cuda")
    assert pool.device.type == "cuda"
    indices = torch.tensor([3, 8, 1], dtype=torch.int64)  # CPU indices, moved by the pool
    values = _values(pool, 3)
    pool.write(indices, *values)
    for g, v in zip(pool.read(indices.cuda()), values, strict=True):
        assert g.device.type == "cuda"
        assert torch.equal(g, v)


@pytest.mark.cuda
@needs_cuda
def test_cuda_rejects_cpu_values() -> None:
    pool = _pool("mha", device="cuda")
    idx = torch.tensor([0], dtype=torch.int64)
    k, v = (t.cpu() for t in _values(pool, 1))
    with pytest.raises(InvalidArgumentError, match="expected device cuda"):
        pool.write(idx, k, v)
