"""Tests of :mod:`hicache.memory.mamba_pool`: the Mamba state pools and their transfers.

The round trips check that a state that goes device -> host -> device comes back bit-identical
(SGLang issues #33713 / #39830: hybrid-state host round trips returned wrong output).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError, PoolExhaustedError
from hicache.memory import (
    HostLayout,
    MambaHostPool,
    MambaStatePool,
    MambaTransferIndices,
    PageAllocator,
    PoolTransfer,
    mamba_pool,
)
from tests.memory.kv_helpers import bits, page_indices, random_bits

NUM_LAYERS = 3
DEVICE_SLOTS, HOST_SLOTS = 12, 16
CONV_SHAPE = (6, 3)  # (conv_dim, kernel_size - 1)
TEMPORAL_SHAPE = (2, 4, 5)  # (heads, head_dim, state_size)
# (conv_dtype, temporal_dtype): conv fp16/bf16, temporal fp32/bf16.
DTYPES = [
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.bfloat16),
]
LAYOUTS = [HostLayout.PAGE_FIRST, HostLayout.PAGE_FIRST_DIRECT]
SENTINEL = -7.0

# Both device -> host strategies: the synchronous gather/scatter and the run-by-run copies used
# on CUDA with a pinned host pool, run synchronously here so that CPU machines test it.
BACKUPS: dict[str, Callable[[MambaHostPool, MambaTransferIndices], None]] = {
    "public": MambaHostPool.backup_all_layers,
    "batched": lambda host, ind: mamba_pool._backup_batched(
        host, ind.device_indices, ind.host_indices
    ),
    "runs": lambda host, ind: mamba_pool._backup_by_runs(
        host, ind.device_indices, ind.host_indices, non_blocking=False
    ),
}


def _device_pool(
    dtypes: tuple[torch.dtype, torch.dtype] = DTYPES[0], device: str = "cpu"
) -> MambaStatePool:
    conv_dtype, temporal_dtype = dtypes
    return MambaStatePool(
        DEVICE_SLOTS, NUM_LAYERS, CONV_SHAPE, TEMPORAL_SHAPE, conv_dtype, temporal_dtype, device
    )


def _pools(
    layout: HostLayout,
    dtypes: tuple[torch.dtype, torch.dtype] = DTYPES[0],
    device: str = "cpu",
    pin_memory: bool = False,
) -> tuple[MambaStatePool, MambaHostPool]:
    dev = _device_pool(dtypes, device)
    return dev, MambaHostPool(dev, HOST_SLOTS, layout, pin_memory=pin_memory)


def _random_states(
    pool: MambaStatePool | MambaHostPool, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv, temporal)`` of ``n`` states with random finite bit patterns, on the pool."""
    gen = torch.Generator().manual_seed(seed)
    conv = random_bits((pool.num_layers, n, *pool.conv_shape), pool.conv_dtype, gen)
    temporal = random_bits((pool.num_layers, n, *pool.temporal_shape), pool.temporal_dtype, gen)
    return conv.to(pool.device), temporal.to(pool.device)


def _assert_bit_equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(bits(g), bits(w))


def _poison_device(dev: MambaStatePool) -> None:
    dev.conv_state.fill_(SENTINEL)
    dev.temporal_state.fill_(SENTINEL)


def _poison_host(host: MambaHostPool) -> None:
    host.conv_buffer.fill_(SENTINEL)
    host.temporal_buffer.fill_(SENTINEL)


def _all_sentinel(states: tuple[torch.Tensor, ...]) -> bool:
    return all(bool((t == SENTINEL).all()) for t in states)


def _complement(indices: torch.Tensor, num_slots: int) -> torch.Tensor:
    mask = torch.ones(num_slots, dtype=torch.bool)
    mask[indices.cpu()] = False
    return torch.nonzero(mask).flatten()


def _index_sets(seed: int, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-length (device, host) slot sets, unsorted, each with its pool's last slot."""
    return page_indices(DEVICE_SLOTS, 1, n, seed), page_indices(HOST_SLOTS, 1, n, seed + 1)


def _snapshot(pool: MambaStatePool | MambaHostPool) -> tuple[torch.Tensor, ...]:
    if isinstance(pool, MambaStatePool):
        return (pool.conv_state.clone(), pool.temporal_state.clone())
    return (pool.conv_buffer.clone(), pool.temporal_buffer.clone())


def _unchanged(pool: MambaStatePool | MambaHostPool, before: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(bits(a), bits(b)) for a, b in zip(_snapshot(pool), before, strict=True))


# --- MambaStatePool: construction ----------------------------------------------------------------


def test_device_pool_shapes_and_sizes() -> None:
    dev = _device_pool((torch.bfloat16, torch.float32))
    assert dev.conv_state.shape == (NUM_LAYERS, DEVICE_SLOTS, *CONV_SHAPE)
    assert dev.temporal_state.shape == (NUM_LAYERS, DEVICE_SLOTS, *TEMPORAL_SHAPE)
    assert dev.conv_state.dtype == dev.conv_dtype == torch.bfloat16
    assert dev.temporal_state.dtype == dev.temporal_dtype == torch.float32
    assert dev.device.type == "cpu"
    assert (dev.num_slots, dev.num_layers) == (DEVICE_SLOTS, NUM_LAYERS)
    assert (dev.conv_shape, dev.temporal_shape) == (CONV_SHAPE, TEMPORAL_SHAPE)
    per_slot = NUM_LAYERS * (6 * 3 * 2 + 2 * 4 * 5 * 4)
    assert dev.bytes_per_slot == per_slot and dev.size_bytes == per_slot * DEVICE_SLOTS
    assert not dev.conv_state.any() and not dev.temporal_state.any()
    assert isinstance(dev.allocator, PageAllocator) and dev.allocator.page_size == 1
    assert dev.available_size() == DEVICE_SLOTS


def test_device_pool_default_device() -> None:
    pool = MambaStatePool(2, 1, [3], [4])
    assert pool.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pool.conv_shape == (3,) and pool.temporal_shape == (4,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_slots": 0}, "num_slots"),
        ({"num_slots": 2.0}, "num_slots"),
        ({"num_layers": -1}, "num_layers"),
        ({"num_layers": True}, "num_layers"),
        ({"conv_shape": ()}, "conv_shape"),
        ({"conv_shape": (4, 0)}, "conv_shape"),
        ({"conv_shape": "43"}, "conv_shape"),
        ({"temporal_shape": (2, -4)}, "temporal_shape"),
        ({"temporal_shape": 5}, "temporal_shape"),
        ({"conv_dtype": "float16"}, "conv_dtype"),
        ({"temporal_dtype": None}, "temporal_dtype"),
    ],
)
def test_device_pool_rejects(kwargs: dict, match: str) -> None:
    args = {
        "num_slots": 4,
        "num_layers": 2,
        "conv_shape": (4, 3),
        "temporal_shape": (2, 2),
        "conv_dtype": torch.float16,
        "temporal_dtype": torch.float32,
        "device": "cpu",
    }
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        MambaStatePool(**args)


# --- MambaStatePool: allocation ------------------------------------------------------------------


def test_alloc_and_free() -> None:
    dev = _device_pool()
    first = dev.alloc(5)
    assert first.dtype == torch.int64 and first.device.type == "cpu" and first.dim() == 1
    assert first.unique().numel() == 5
    assert dev.available_size() == DEVICE_SLOTS - 5
    second = dev.alloc(DEVICE_SLOTS - 5)
    assert not bool(torch.isin(second, first).any())
    assert dev.available_size() == 0
    dev.free(first[[3, 0]])  # any order
    assert dev.available_size() == 2
    assert dev.alloc(0).numel() == 0


def test_exhaustion_raises_and_allocates_nothing() -> None:
    dev = _device_pool()
    dev.alloc(DEVICE_SLOTS - 2)
    free_before = dev.allocator.free_slot_indices()
    with pytest.raises(PoolExhaustedError):
        dev.alloc(3)
    assert dev.available_size() == 2
    assert torch.equal(dev.allocator.free_slot_indices(), free_before)
    assert dev.alloc(2).numel() == 2


@pytest.mark.parametrize("case", ["already_free", "repeated", "never_allocated"])
def test_double_free_raises_and_frees_nothing(case: str) -> None:
    dev = _device_pool()
    slots = dev.alloc(4)
    if case == "already_free":
        dev.free(slots[:1])
        bad = slots[:2]
    elif case == "repeated":
        bad = torch.cat((slots[1:], slots[1:2]))
    else:
        bad = torch.tensor([int(slots[0]), DEVICE_SLOTS - 1])
    available = dev.available_size()
    with pytest.raises(InvalidArgumentError, match="double free"):
        dev.free(bad)
    assert dev.available_size() == available


def test_free_and_alloc_reject_bad_arguments() -> None:
    dev = _device_pool()
    dev.alloc(2)
    with pytest.raises(IndexOutOfRangeError):
        dev.free(torch.tensor([DEVICE_SLOTS]))
    with pytest.raises(InvalidArgumentError, match="int64"):
        dev.free(torch.tensor([0], dtype=torch.int32))
    with pytest.raises(InvalidArgumentError, match="num_states"):
        dev.alloc(2.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="num_states"):
        dev.alloc(-1)
    assert dev.available_size() == DEVICE_SLOTS - 2


# --- MambaStatePool: read / write ----------------------------------------------------------------


@pytest.mark.parametrize("dtypes", DTYPES)
def test_device_write_read(dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    dev = _device_pool(dtypes)
    _poison_device(dev)
    idx = page_indices(DEVICE_SLOTS, 1, 5, seed=1)
    values = _random_states(dev, idx.numel(), seed=2)
    dev.write(idx, *values)
    _assert_bit_equal(dev.read(idx), values)
    for layer in range(NUM_LAYERS):  # slot i of layer l is buffer[l, slot]
        for i, slot in enumerate(idx.tolist()):
            assert torch.equal(bits(dev.conv_state[layer, slot]), bits(values[0][layer, i]))
    assert _all_sentinel(dev.read(_complement(idx, DEVICE_SLOTS)))


@pytest.mark.parametrize(
    ("make_args", "error", "match"),
    [
        (lambda v: (torch.tensor([0, DEVICE_SLOTS]), *v), IndexOutOfRangeError, "out of range"),
        (lambda v: (torch.tensor([0, 1], dtype=torch.int32), *v), InvalidArgumentError, "int64"),
        (
            lambda v: (torch.tensor([0, 1]), v[0][:, :1], v[1]),
            InvalidArgumentError,
            "conv: .*shape",
        ),
        (lambda v: (torch.tensor([0, 1]), v[0], v[1].double()), InvalidArgumentError, "dtype"),
        (lambda v: (torch.tensor([0, 1]), v[0], None), InvalidArgumentError, "temporal"),
    ],
)
def test_device_write_rejects_and_changes_nothing(
    make_args: Callable, error: type, match: str
) -> None:
    dev = _device_pool()
    values = _random_states(dev, 2, seed=3)
    before = _snapshot(dev)
    with pytest.raises(error, match=match):
        dev.write(*make_args(values))
    assert _unchanged(dev, before)


# --- MambaStatePool: copy-on-write ---------------------------------------------------------------


@pytest.mark.parametrize("dtypes", DTYPES)
def test_fork_from_gives_an_equal_but_distinct_slot(
    dtypes: tuple[torch.dtype, torch.dtype],
) -> None:
    dev = _device_pool(dtypes)
    node_slots = dev.alloc(3)
    values = _random_states(dev, 3, seed=4)
    dev.write(node_slots, *values)
    free_before = dev.allocator.free_slot_indices()
    forked = dev.fork_from(node_slots[[2, 0]])
    assert forked.numel() == 2 and forked.unique().numel() == 2
    assert not bool(torch.isin(forked, node_slots).any())  # never the node's slot itself
    assert bool(torch.isin(forked, free_before).all())  # fresh slots, free before the fork
    assert not bool(dev.allocator.is_free(forked).any())
    assert dev.available_size() == DEVICE_SLOTS - 5
    _assert_bit_equal(dev.read(forked), tuple(v[:, [2, 0]] for v in values))

    # The request advances its copy; the node's state stays intact.
    new_values = _random_states(dev, 2, seed=5)
    dev.write(forked, *new_values)
    _assert_bit_equal(dev.read(node_slots), values)
    _assert_bit_equal(dev.read(forked), new_values)


def test_fork_from_the_same_state_twice() -> None:
    dev = _device_pool()
    node = dev.alloc(1)
    dev.write(node, *_random_states(dev, 1, seed=6))
    a, b = dev.fork_from(node), dev.fork_from(node.repeat(2))
    assert torch.cat((node, a, b)).unique().numel() == 4
    want = dev.read(node.repeat(3))
    _assert_bit_equal(dev.read(torch.cat((a, b))), want)


def test_fork_from_rejects_and_allocates_nothing() -> None:
    dev = _device_pool()
    node = dev.alloc(DEVICE_SLOTS - 1)
    before = _snapshot(dev)
    with pytest.raises(PoolExhaustedError):
        dev.fork_from(node[:2])
    free_slot = _complement(node, DEVICE_SLOTS)
    with pytest.raises(InvalidArgumentError, match="not allocated"):
        dev.fork_from(free_slot)
    with pytest.raises(IndexOutOfRangeError):
        dev.fork_from(torch.tensor([DEVICE_SLOTS]))
    with pytest.raises(InvalidArgumentError, match="int64"):
        dev.fork_from(node[:1].int())
    assert dev.available_size() == 1
    assert _unchanged(dev, before)


def test_copy_slots() -> None:
    dev = _device_pool()
    _poison_device(dev)
    src, dst = dev.alloc(3), dev.alloc(3)
    values = _random_states(dev, 3, seed=7)
    dev.write(src, *values)
    dev.copy_slots(src[[1, 1, 0]], dst)  # a source may repeat
    _assert_bit_equal(dev.read(dst), tuple(v[:, [1, 1, 0]] for v in values))
    _assert_bit_equal(dev.read(src), values)
    assert _all_sentinel(dev.read(_complement(torch.cat((src, dst)), DEVICE_SLOTS)))
    dev.copy_slots(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("same_slot", InvalidArgumentError, "also a source slot"),
        ("overlap", InvalidArgumentError, "also a source slot"),
        ("repeated_dst", InvalidArgumentError, "repeated"),
        ("lengths", InvalidArgumentError, "differs"),
        ("free_src", InvalidArgumentError, "src_indices: slot .* not allocated"),
        ("free_dst", InvalidArgumentError, "dst_indices: slot .* not allocated"),
        ("range", IndexOutOfRangeError, "out of range"),
        ("cuda_or_dtype", InvalidArgumentError, "int64"),
    ],
)
def test_copy_slots_rejects_and_changes_nothing(case: str, error: type, match: str) -> None:
    dev = _device_pool()
    a, b = dev.alloc(2), dev.alloc(2)
    dev.write(a, *_random_states(dev, 2, seed=8))
    free = _complement(torch.cat((a, b)), DEVICE_SLOTS)[:2]
    src, dst = {
        "same_slot": (a, torch.stack((b[0], a[1]))),
        "overlap": (a, torch.stack((a[1], b[0]))),
        "repeated_dst": (a, b[[0, 0]]),
        "lengths": (a, b[:1]),
        "free_src": (free, b),
        "free_dst": (a, free),
        "range": (a, torch.tensor([b[0], DEVICE_SLOTS])),
        "cuda_or_dtype": (a.int(), b),
    }[case]
    before = _snapshot(dev)
    available = dev.available_size()
    with pytest.raises(error, match=match):
        dev.copy_slots(src, dst)
    assert _unchanged(dev, before)
    assert dev.available_size() == available


# --- MambaHostPool: construction -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "conv", "temporal"),
    [
        (
            "page_first",
            (HOST_SLOTS, NUM_LAYERS, *CONV_SHAPE),
            (HOST_SLOTS, NUM_LAYERS, *TEMPORAL_SHAPE),
        ),
        (
            "page_first_direct",
            (HOST_SLOTS, NUM_LAYERS, 1, *CONV_SHAPE),
            (HOST_SLOTS, NUM_LAYERS, 1, *TEMPORAL_SHAPE),
        ),
    ],
)
def test_host_pool_shapes(layout: str, conv: tuple, temporal: tuple) -> None:
    dev, host = _pools(HostLayout(layout), (torch.bfloat16, torch.float32))
    assert host.layout is HostLayout(layout)
    assert host.conv_buffer.shape == conv and host.temporal_buffer.shape == temporal
    assert host.conv_dtype == torch.bfloat16 and host.temporal_dtype == torch.float32
    assert host.device.type == "cpu" and host.conv_buffer.device.type == "cpu"
    assert (host.num_slots, host.num_layers) == (HOST_SLOTS, NUM_LAYERS)
    assert (host.conv_shape, host.temporal_shape) == (CONV_SHAPE, TEMPORAL_SHAPE)
    assert host.size_bytes == dev.bytes_per_slot * HOST_SLOTS
    assert host.device_pool is dev
    assert not host.conv_buffer.any() and not host.temporal_buffer.any()
    assert isinstance(host.allocator, PageAllocator)
    assert (host.allocator.num_slots, host.allocator.page_size) == (HOST_SLOTS, 1)


def test_host_pool_defaults() -> None:
    host = MambaHostPool(_device_pool(), HOST_SLOTS)
    assert host.layout is HostLayout.PAGE_FIRST
    assert host.is_pinned == torch.cuda.is_available()
    assert host.conv_buffer.is_pinned() == host.is_pinned
    assert host.temporal_buffer.is_pinned() == host.is_pinned


def test_layer_first_is_rejected_naming_the_supported_layouts() -> None:
    with pytest.raises(
        InvalidArgumentError,
        match=r"'layer_first' is not supported .*\['page_first', 'page_first_direct'\]",
    ):
        MambaHostPool(_device_pool(), HOST_SLOTS, "layer_first")
    with pytest.raises(InvalidArgumentError, match="layout"):
        MambaHostPool(_device_pool(), HOST_SLOTS, HostLayout.LAYER_FIRST)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("pool", HOST_SLOTS), "device_pool"),
        ((None, 0), "num_slots"),
        ((None, 4.0), "num_slots"),
        ((None, HOST_SLOTS, "page_head"), "layout"),
    ],
)
def test_host_pool_rejects(args: tuple, match: str) -> None:
    dev = _device_pool()
    args = (dev if args[0] is None else args[0], *args[1:])
    with pytest.raises(InvalidArgumentError, match=match):
        MambaHostPool(*args, pin_memory=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_host_pin_memory_without_cuda_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="pin_memory"):
        MambaHostPool(_device_pool(), HOST_SLOTS, pin_memory=True)


def test_host_alloc_free() -> None:
    host = MambaHostPool(_device_pool(), HOST_SLOTS, pin_memory=False)
    slots = host.alloc(HOST_SLOTS)
    with pytest.raises(PoolExhaustedError):
        host.alloc(1)
    host.free(slots[5:6])
    with pytest.raises(InvalidArgumentError, match="double free"):
        host.free(slots[4:6])
    assert host.available_size() == 1


# --- MambaHostPool: read / write and layouts -----------------------------------------------------


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_write_read(layout: HostLayout, dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    _, host = _pools(layout, dtypes)
    _poison_host(host)
    idx = page_indices(HOST_SLOTS, 1, 6, seed=9)
    values = _random_states(host, idx.numel(), seed=10)
    host.write(idx, *values)
    _assert_bit_equal(host.read(idx), values)
    # Where the layout puts slot s of layer l.
    for layer in range(NUM_LAYERS):
        for i, slot in enumerate(idx.tolist()):
            if layout is HostLayout.PAGE_FIRST:
                conv, temporal = host.conv_buffer[slot, layer], host.temporal_buffer[slot, layer]
            else:
                conv = host.conv_buffer[slot, layer, 0]
                temporal = host.temporal_buffer[slot, layer, 0]
            assert torch.equal(bits(conv), bits(values[0][layer, i]))
            assert torch.equal(bits(temporal), bits(values[1][layer, i]))
    assert _all_sentinel(host.read(_complement(idx, HOST_SLOTS)))


def test_layouts_hold_the_same_bytes() -> None:
    """page_first and page_first_direct differ only in a unit page dim (page size 1)."""
    dev = _device_pool()
    a = MambaHostPool(dev, HOST_SLOTS, "page_first", pin_memory=False)
    b = MambaHostPool(dev, HOST_SLOTS, "page_first_direct", pin_memory=False)
    idx = page_indices(HOST_SLOTS, 1, 5, seed=11)
    values = _random_states(a, idx.numel(), seed=12)
    a.write(idx, *values)
    b.write(idx, *values)
    assert torch.equal(bits(a.conv_buffer).flatten(), bits(b.conv_buffer).flatten())
    assert torch.equal(bits(a.temporal_buffer).flatten(), bits(b.temporal_buffer).flatten())


def test_host_write_rejects_and_changes_nothing() -> None:
    _, host = _pools(HostLayout.PAGE_FIRST)
    values = _random_states(host, 2, seed=13)
    before = _snapshot(host)
    with pytest.raises(IndexOutOfRangeError):
        host.write(torch.tensor([1, HOST_SLOTS]), *values)
    with pytest.raises(InvalidArgumentError, match="temporal: expected shape"):
        host.write(torch.tensor([1, 2]), values[0], values[1][:1])
    with pytest.raises(InvalidArgumentError, match="conv: expected dtype"):
        host.write(torch.tensor([1, 2]), values[0].float(), values[1])
    with pytest.raises(InvalidArgumentError, match="host_indices: expected dtype"):
        host.read(torch.tensor([1.0]))
    assert _unchanged(host, before)


# --- transfers -----------------------------------------------------------------------------------


def _check_backup(
    dev: MambaStatePool,
    host: MambaHostPool,
    backup: Callable[[MambaHostPool, MambaTransferIndices], None],
) -> None:
    dev_idx, host_idx = _index_sets(seed=20)
    _poison_device(dev)
    _poison_host(host)
    dev.write(dev_idx.to(dev.device), *_random_states(dev, dev_idx.numel(), seed=21))
    backup(host, host.prepare(dev_idx, host_idx))
    if dev.device.type == "cuda":
        torch.cuda.synchronize()
    _assert_bit_equal(host.read(host_idx), tuple(t.cpu() for t in dev.read(dev_idx)))
    assert _all_sentinel(host.read(_complement(host_idx, HOST_SLOTS)))


def _check_load_layer(dev: MambaStatePool, host: MambaHostPool, layer: int) -> None:
    dev_idx, host_idx = _index_sets(seed=22)
    _poison_device(dev)
    _poison_host(host)
    values = _random_states(host, host_idx.numel(), seed=23)
    host.write(host_idx, *values)
    host.load_layer(host.prepare(dev_idx, host_idx), layer)
    if dev.device.type == "cuda":
        torch.cuda.synchronize()
    got = dev.read(dev_idx.to(dev.device))
    _assert_bit_equal(tuple(t[layer] for t in got), tuple(v[layer] for v in values))
    others = [i for i in range(NUM_LAYERS) if i != layer]
    assert _all_sentinel(tuple(t[others] for t in got))
    assert _all_sentinel(dev.read(_complement(dev_idx, DEVICE_SLOTS).to(dev.device)))


def _check_round_trip(dev: MambaStatePool, host: MambaHostPool, layer_wise: bool) -> None:
    """Device -> host -> other device slots: every state comes back bit-identical."""
    dev_idx, host_idx = _index_sets(seed=24)
    _poison_device(dev)
    _poison_host(host)
    dev.write(dev_idx.to(dev.device), *_random_states(dev, dev_idx.numel(), seed=25))
    before = tuple(t.cpu().clone() for t in dev.read(dev_idx))
    host.backup_all_layers(host.prepare(dev_idx, host_idx))
    if dev.device.type == "cuda":
        # The backup's ack: the load gathers host rows on the CPU, which must not race the
        # asynchronous device -> host copies (the cache loads only acked backups).
        torch.cuda.synchronize()
    _poison_device(dev)
    # Load into other device slots: the same set in reverse order, so every state moves.
    target = dev_idx.flip(0)
    indices = host.prepare(target, host_idx)
    if layer_wise:
        for layer in range(NUM_LAYERS):
            host.load_layer(indices, layer)
    else:
        host.load_all_layers(indices)
    if dev.device.type == "cuda":
        torch.cuda.synchronize()
    _assert_bit_equal(tuple(t.cpu() for t in dev.read(target)), before)
    assert _all_sentinel(dev.read(_complement(target, DEVICE_SLOTS).to(dev.device)))


@pytest.mark.parametrize("strategy", list(BACKUPS))
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backup_all_layers(
    layout: HostLayout, dtypes: tuple[torch.dtype, torch.dtype], strategy: str
) -> None:
    dev, host = _pools(layout, dtypes)
    _check_backup(dev, host, BACKUPS[strategy])


@pytest.mark.parametrize("layer", range(NUM_LAYERS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_layer_moves_only_that_layer(layout: HostLayout, layer: int) -> None:
    dev, host = _pools(layout, (torch.bfloat16, torch.float32))
    _check_load_layer(dev, host, layer)


@pytest.mark.parametrize("layer_wise", [False, True])
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_is_bit_identical(
    layout: HostLayout, dtypes: tuple[torch.dtype, torch.dtype], layer_wise: bool
) -> None:
    dev, host = _pools(layout, dtypes)
    _check_round_trip(dev, host, layer_wise)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_driven_by_pool_transfers(layout: HostLayout) -> None:
    """The cache's flow: allocate, back up and load back through PoolTransfer records."""
    dev, host = _pools(layout, (torch.bfloat16, torch.float32))
    _poison_device(dev)
    node_slots = dev.alloc(4)[[2, 0, 3, 1]]
    dev.write(node_slots, *_random_states(dev, 4, seed=26))
    before = dev.read(node_slots)
    host_slots = host.alloc(4)
    backup = PoolTransfer("mamba", host_slots, node_slots)
    node_slots.fill_(0)  # tree state changes after queueing: the transfer is unaffected
    host.backup_all_layers(host.prepare(backup.device_indices, backup.host_indices))
    dev.free(backup.device_indices)  # the node's device state is evicted
    _poison_device(dev)
    request_slots = dev.alloc(4)
    load = PoolTransfer("mamba", backup.host_indices, request_slots)
    host.load_all_layers(host.prepare(load.device_indices, load.host_indices))
    _assert_bit_equal(dev.read(request_slots), before)


def test_prepare_owns_its_indices() -> None:
    dev, host = _pools(HostLayout.PAGE_FIRST)
    dev_idx, host_idx = _index_sets(seed=27, n=3)
    dev.write(dev_idx, *_random_states(dev, 3, seed=28))
    indices = host.prepare(dev_idx, host_idx)
    assert isinstance(indices, MambaTransferIndices) and indices.num_states == 3
    want_host = host_idx.clone()
    dev_idx.zero_()
    host_idx.zero_()
    host.backup_all_layers(indices)
    assert torch.equal(indices.host_indices, want_host)
    assert host.read(want_host)[0].ne(0).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_transfer_is_a_no_op(layout: HostLayout) -> None:
    dev, host = _pools(layout)
    empty = torch.empty(0, dtype=torch.int64)
    indices = host.prepare(empty, empty)
    host.backup_all_layers(indices)
    host.load_all_layers(indices)
    host.load_layer(indices, 0)
    assert not host.conv_buffer.any() and not dev.conv_state.any()


@pytest.mark.parametrize(
    ("dev_idx", "host_idx", "error", "match"),
    [
        (torch.tensor([0, 1]), torch.tensor([0]), InvalidArgumentError, "differs"),
        (torch.tensor([DEVICE_SLOTS]), torch.tensor([0]), IndexOutOfRangeError, "device_indices"),
        (torch.tensor([0]), torch.tensor([HOST_SLOTS]), IndexOutOfRangeError, "host_indices"),
        (
            torch.tensor([0]),
            torch.tensor([[0]]),
            InvalidArgumentError,
            "host_indices: expected a 1-D",
        ),
        (
            torch.tensor([0.0]),
            torch.tensor([0]),
            InvalidArgumentError,
            "device_indices: expected dtype",
        ),
    ],
)
def test_prepare_rejects(
    dev_idx: torch.Tensor, host_idx: torch.Tensor, error: type, match: str
) -> None:
    _, host = _pools(HostLayout.PAGE_FIRST)
    with pytest.raises(error, match=match):
        host.prepare(dev_idx, host_idx)


def test_bad_layer_or_indices_copy_nothing() -> None:
    dev, host = _pools(HostLayout.PAGE_FIRST_DIRECT)
    dev_idx, host_idx = _index_sets(seed=29, n=2)
    host.write(host_idx, *_random_states(host, 2, seed=30))
    indices = host.prepare(dev_idx, host_idx)
    with pytest.raises(IndexOutOfRangeError, match="layer"):
        host.load_layer(indices, NUM_LAYERS)
    with pytest.raises(IndexOutOfRangeError, match="layer"):
        host.load_layer(indices, -1)
    with pytest.raises(InvalidArgumentError, match="layer"):
        host.load_layer(indices, 1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="MambaTransferIndices"):
        host.load_all_layers((dev_idx, host_idx))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="MambaTransferIndices"):
        host.backup_all_layers(PoolTransfer("mamba", host_idx, dev_idx))  # type: ignore[arg-type]
    assert not dev.conv_state.any() and not dev.temporal_state.any()


def test_runs_are_coalesced() -> None:
    """One copy per run of consecutive host slots, never one per state."""
    assert mamba_pool._runs(np.array([3, 4, 5, 9, 10, 15])) == [(0, 3, 3), (3, 5, 9), (5, 6, 15)]
    assert mamba_pool._runs(np.array([7])) == [(0, 1, 7)]


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.cuda
class TestCuda:
    """The same round trips with the device pool on CUDA and a pinned host pool (non_blocking)."""

    @pytest.mark.parametrize("dtypes", DTYPES)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_backup_load_round_trip(
        self, layout: HostLayout, dtypes: tuple[torch.dtype, torch.dtype]
    ) -> None:
        dev, host = _pools(layout, dtypes, device="cuda", pin_memory=True)
        assert host.is_pinned and host._is_async()
        _check_backup(dev, host, MambaHostPool.backup_all_layers)
        _check_load_layer(dev, host, NUM_LAYERS - 1)
        _check_round_trip(dev, host, layer_wise=False)
        _check_round_trip(dev, host, layer_wise=True)

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_unpinned_host_is_synchronous_and_correct(self, layout: HostLayout) -> None:
        dev, host = _pools(layout, DTYPES[1], device="cuda", pin_memory=False)
        assert not host._is_async()
        _check_backup(dev, host, MambaHostPool.backup_all_layers)
        _check_round_trip(dev, host, layer_wise=True)

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_side_stream_with_pool_transfers(self, layout: HostLayout) -> None:
        """Backup and layer-wise load on a side stream, indices prepared there, event-waited."""
        dev, host = _pools(layout, DTYPES[1], device="cuda", pin_memory=True)
        dev_idx, host_idx = _index_sets(seed=31)
        dev.write(dev_idx.cuda(), *_random_states(dev, dev_idx.numel(), seed=32))
        before = tuple(t.cpu() for t in dev.read(dev_idx))
        backup = PoolTransfer("mamba", host_idx, dev_idx)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            host.backup_all_layers(host.prepare(backup.device_indices, backup.host_indices))
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
        _assert_bit_equal(host.read(host_idx), before)

        _poison_device(dev)
        target = dev_idx.flip(0)
        load = PoolTransfer("mamba", host_idx, target)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            indices = host.prepare(load.device_indices, load.host_indices)
            for layer in range(NUM_LAYERS):
                host.load_layer(indices, layer)
            done = torch.cuda.Event()
            done.record(stream)
        torch.cuda.current_stream().wait_event(done)
        _assert_bit_equal(tuple(t.cpu() for t in dev.read(target.cuda())), before)
        assert load.device_indices.device.type == "cpu"  # the record was never moved

    def test_fork_from_on_cuda(self) -> None:
        dev = _device_pool(DTYPES[0], device="cuda")
        node = dev.alloc(2)
        values = _random_states(dev, 2, seed=33)
        dev.write(node, *values)
        forked = dev.fork_from(node)
        _assert_bit_equal(dev.read(forked), values)
        dev.write(forked, *_random_states(dev, 2, seed=34))
        _assert_bit_equal(dev.read(node), values)

    def test_device_indices_on_cuda(self) -> None:
        dev, host = _pools(HostLayout.PAGE_FIRST, device="cuda", pin_memory=True)
        with pytest.raises(IndexOutOfRangeError, match="device_indices"):
            host.prepare(torch.tensor([DEVICE_SLOTS]).cuda(), torch.tensor([0]))
        with pytest.raises(InvalidArgumentError, match="host_indices: expected a CPU tensor"):
            host.prepare(torch.tensor([0]), torch.tensor([0]).cuda())
        dev_idx, host_idx = _index_sets(seed=35)
        dev.write(dev_idx.cuda(), *_random_states(dev, dev_idx.numel(), seed=36))
        host.backup_all_layers(host.prepare(dev_idx.cuda(), host_idx))
        torch.cuda.synchronize()
        _assert_bit_equal(host.read(host_idx), tuple(t.cpu() for t in dev.read(dev_idx)))


def test_init_state_copies_one_slot_or_zeroes_it():
    pool = MambaStatePool(4, 2, (3,), (2, 2), torch.float32, torch.float32, "cpu")
    slots = pool.alloc(3)
    conv = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3) + 1
    temporal = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 2, 2) + 1
    pool.write(slots, conv, temporal)
    pool.init_state(int(slots[1]), int(slots[0]))
    got = pool.read(slots)
    assert torch.equal(got[0][:, 1], conv[:, 0]) and torch.equal(got[1][:, 1], temporal[:, 0])
    assert torch.equal(got[0][:, 0], conv[:, 0])  # the source is untouched
    pool.init_state(int(slots[2]))
    assert not pool.read(slots[2:])[0].any() and not pool.read(slots[2:])[1].any()
    with pytest.raises(IndexOutOfRangeError, match="slot 4 out of range"):
        pool.init_state(4, 0)
    with pytest.raises(InvalidArgumentError, match="same slot"):
        pool.init_state(1, 1)
