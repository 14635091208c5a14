"""Tests of the "direct" transfer backend, :mod:`hicache.transfer`, against pool reads."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from hicache import transfer
from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from hicache.memory import DeviceKVPool
from hicache.memory.host_pool import HostKVPool, HostLayout
from tests.memory.kv_helpers import page_indices, random_kv

NUM_LAYERS, NUM_HEADS, HEAD_DIM = 3, 2, 8
DEVICE_SLOTS, HOST_SLOTS = 64, 96
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LAYOUTS = list(HostLayout)
SENTINEL = -7.0

# Both device -> host strategies: the public function (batched on CPU) and the run-by-run copies
# it uses on CUDA with a pinned host pool, run synchronously here so that CPU machines test it.
BACKUPS: dict[str, Callable[..., None]] = {
    "batched": transfer.backup_all_layers,
    "runs": functools.partial(transfer._backup_by_runs, non_blocking=False),
}


def _pools(
    layout: HostLayout,
    kind: str,
    dtype: torch.dtype,
    page_size: int,
    device: str = "cpu",
    pin_memory: bool = False,
) -> tuple[DeviceKVPool, HostKVPool]:
    heads = NUM_HEADS if kind == "mha" else 1
    dev = DeviceKVPool(
        DEVICE_SLOTS, NUM_LAYERS, heads, HEAD_DIM, dtype=dtype, device=device, kind=kind
    )
    return dev, HostKVPool(dev, HOST_SLOTS, page_size, layout, pin_memory=pin_memory)


def _index_sets(page_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-length (device, host) index sets of whole pages, unsorted, with each last page."""
    num_pages = 3 if page_size > 1 else 24
    return (
        page_indices(DEVICE_SLOTS, page_size, num_pages, seed),
        page_indices(HOST_SLOTS, page_size, num_pages, seed + 1),
    )


def _device_buffers(pool: DeviceKVPool) -> list[torch.Tensor]:
    return [pool.k_buffer, pool.v_buffer] if pool.kind == "mha" else [pool.kv_buffer]


def _poison(dev: DeviceKVPool, host: HostKVPool) -> None:
    for buf in _device_buffers(dev):
        buf.fill_(SENTINEL)
    host.kv_buffer.fill_(SENTINEL)


def _num_written(tensors: list[torch.Tensor]) -> int:
    return sum(int((t != SENTINEL).sum()) for t in tensors)


def _complement(indices: torch.Tensor, num_slots: int) -> torch.Tensor:
    mask = torch.ones(num_slots, dtype=torch.bool)
    mask[indices.cpu()] = False
    return torch.nonzero(mask).flatten()


def _check_backup(dev: DeviceKVPool, host: HostKVPool, backup: Callable[..., None]) -> None:
    dev_idx, host_idx = _index_sets(host.page_size)
    _poison(dev, host)
    values = random_kv(dev, dev_idx.numel(), seed=3)
    dev.write(dev_idx, *values)
    backup(dev, host, dev_idx.to(dev.device), host_idx)
    if dev.device.type == "cuda":
        torch.cuda.synchronize()
    for got, want in zip(host.read(host_idx), dev.read(dev_idx), strict=True):
        assert torch.equal(got, want.cpu())  # bit-exact
    per_token = NUM_LAYERS * host.num_heads * HEAD_DIM * len(values)
    assert _num_written([host.kv_buffer]) == host_idx.numel() * per_token
    for got in host.read(_complement(host_idx, HOST_SLOTS)):
        assert bool((got == SENTINEL).all())


def _check_load_layer(dev: DeviceKVPool, host: HostKVPool, layer: int) -> None:
    dev_idx, host_idx = _index_sets(host.page_size, seed=5)
    _poison(dev, host)
    host.write(host_idx, *random_kv(host, host_idx.numel(), seed=6))
    transfer.load_layer(host, dev, host_idx, dev_idx.to(dev.device), layer)
    if dev.device.type == "cuda":
        torch.cuda.synchronize()
    for got, want in zip(dev.read_layer(layer, dev_idx), host.read(host_idx), strict=True):
        assert torch.equal(got.cpu(), want[layer])
    per_token = host.num_heads * HEAD_DIM
    assert _num_written(_device_buffers(dev)) == dev_idx.numel() * per_token * len(
        host.flat_buffers
    )


def _check_round_trip(dev: DeviceKVPool, host: HostKVPool) -> None:
    dev_idx, host_idx = _index_sets(host.page_size, seed=7)
    _poison(dev, host)
    dev.write(dev_idx, *random_kv(dev, dev_idx.numel(), seed=8))
    before = [t.clone() for t in dev.read(dev_idx)]
    transfer.backup_all_layers(dev, host, dev_idx, host_idx)
    if dev.device.type == "cuda":
        # The backup's ack: the direct load reads the host rows on the CPU right away.
        torch.cuda.synchronize()
    for buf in _device_buffers(dev):
        buf.fill_(SENTINEL)
    # Load into other device slots: reversed page order of the same set.
    target = dev_idx.view(-1, host.page_size).flip(0).reshape(-1)
    transfer.load_all_layers(host, dev, host_idx, target.to(dev.device))
    if dev.device.type == "cuda":
        torch.cuda.synchronize()
    for got, want in zip(dev.read(target), before, strict=True):
        assert torch.equal(got, want)
    for got in dev.read(_complement(target, DEVICE_SLOTS)):
        assert bool((got == SENTINEL).all())


# --- correctness over layouts x kinds x dtypes x page sizes ---------------------------------------


@pytest.mark.parametrize("strategy", list(BACKUPS))
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backup_all_layers(
    layout: HostLayout, kind: str, dtype: torch.dtype, page_size: int, strategy: str
) -> None:
    _check_backup(*_pools(layout, kind, dtype, page_size), BACKUPS[strategy])


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_layer_moves_only_that_layer(
    layout: HostLayout, kind: str, dtype: torch.dtype, page_size: int
) -> None:
    dev, host = _pools(layout, kind, dtype, page_size)
    for layer in (0, NUM_LAYERS - 1):
        _check_load_layer(dev, host, layer)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_all_layers_round_trip(
    layout: HostLayout, kind: str, dtype: torch.dtype, page_size: int
) -> None:
    _check_round_trip(*_pools(layout, kind, dtype, page_size))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_by_layer_equals_all_layers(layout: HostLayout) -> None:
    dev, host = _pools(layout, "mha", torch.bfloat16, 16)
    dev_idx, host_idx = _index_sets(16, seed=9)
    host.write(host_idx, *random_kv(host, host_idx.numel()))
    for layer in range(NUM_LAYERS):
        transfer.load_layer(host, dev, host_idx, dev_idx, layer)
    for got, want in zip(dev.read(dev_idx), host.read(host_idx), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_indices_are_a_no_op(layout: HostLayout) -> None:
    dev, host = _pools(layout, "mla", torch.float16, 4)
    empty = torch.empty(0, dtype=torch.int64)
    transfer.backup_all_layers(dev, host, empty, empty)
    transfer.load_layer(host, dev, empty, empty, 1)
    transfer.load_all_layers(host, dev, empty, empty)
    assert not host.kv_buffer.any() and not dev.kv_buffer.any()


def test_available_backends() -> None:
    assert transfer.IO_BACKEND_DIRECT == "direct"
    assert transfer.available_backends() == ["direct"]


# --- errors: raised before any copy, naming the argument -----------------------------------------

I64 = torch.int64
GOOD = torch.tensor([16, 17, 18, 19], dtype=I64)


@pytest.mark.parametrize(
    ("dev_idx", "host_idx", "exc", "match"),
    [
        (GOOD, GOOD[:2], InvalidArgumentError, "device_indices: length 4 differs.* 2"),
        (GOOD.int(), GOOD, InvalidArgumentError, "device_indices: expected dtype torch.int64"),
        (GOOD, GOOD.int(), InvalidArgumentError, "host_indices: expected dtype torch.int64"),
        (GOOD.float(), GOOD, InvalidArgumentError, "device_indices: .*float32"),
        (GOOD, GOOD.double(), InvalidArgumentError, "host_indices: .*float64"),
        (GOOD.view(2, 2), GOOD, InvalidArgumentError, "device_indices: expected a 1-D"),
        (GOOD, GOOD.view(1, 4), InvalidArgumentError, "host_indices: expected a 1-D"),
        (GOOD, GOOD.tolist(), InvalidArgumentError, "host_indices: expected a torch.Tensor"),
        (GOOD + 48, GOOD, IndexOutOfRangeError, f"device_indices: slot index 67 .*{DEVICE_SLOTS}"),
        (GOOD, GOOD + 80, IndexOutOfRangeError, f"host_indices: slot index 99 .*{HOST_SLOTS}"),
        (GOOD - 17, GOOD, IndexOutOfRangeError, "device_indices: slot index -1"),
        (GOOD, GOOD - 20, IndexOutOfRangeError, "host_indices: slot index -4"),
    ],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bad_indices_change_nothing(
    layout: HostLayout, dev_idx, host_idx, exc: type, match: str
) -> None:
    dev, host = _pools(layout, "mha", torch.float16, 4)
    dev.write(torch.arange(DEVICE_SLOTS), *random_kv(dev, DEVICE_SLOTS, seed=1))
    host.write(torch.arange(HOST_SLOTS), *random_kv(host, HOST_SLOTS, seed=2))
    dev_before = [b.clone() for b in _device_buffers(dev)]
    host_before = host.kv_buffer.clone()
    with pytest.raises(exc, match=f"backup_all_layers: {match}"):
        transfer.backup_all_layers(dev, host, dev_idx, host_idx)
    with pytest.raises(exc, match=f"load_layer: {match}"):
        transfer.load_layer(host, dev, host_idx, dev_idx, 0)
    with pytest.raises(exc, match=f"load_all_layers: {match}"):
        transfer.load_all_layers(host, dev, host_idx, dev_idx)
    assert torch.equal(host.kv_buffer, host_before)
    for buf, before in zip(_device_buffers(dev), dev_before, strict=True):
        assert torch.equal(buf, before)


def test_bad_layer() -> None:
    dev, host = _pools(HostLayout.PAGE_FIRST, "mla", torch.float32, 4)
    with pytest.raises(IndexOutOfRangeError, match=f"layer {NUM_LAYERS} out of range"):
        transfer.load_layer(host, dev, GOOD, GOOD, NUM_LAYERS)
    with pytest.raises(IndexOutOfRangeError, match="layer -1"):
        transfer.load_layer(host, dev, GOOD, GOOD, -1)
    with pytest.raises(InvalidArgumentError, match="layer: expected an int"):
        transfer.load_layer(host, dev, GOOD, GOOD, 1.0)  # type: ignore[arg-type]
    assert not dev.kv_buffer.any()


@pytest.mark.parametrize(
    ("other", "match"),
    [
        ({"dtype": torch.bfloat16}, "dtype"),
        ({"kind": "mla", "num_heads": 1}, "kind"),
        ({"num_layers": 2}, "num_layers"),
        ({"head_dim": 4}, "head_dim"),
        ({"num_heads": 4}, "num_heads"),
    ],
)
def test_mismatched_pools(other: dict, match: str) -> None:
    dev, _ = _pools(HostLayout.LAYER_FIRST, "mha", torch.float16, 4)
    args = {
        "num_slots": DEVICE_SLOTS,
        "num_layers": NUM_LAYERS,
        "num_heads": NUM_HEADS,
        "head_dim": HEAD_DIM,
        "dtype": torch.float16,
        "device": "cpu",
        "kind": "mha",
    }
    args.update(other)
    host = HostKVPool(DeviceKVPool(**args), HOST_SLOTS, 4)
    with pytest.raises(InvalidArgumentError, match=f"host_pool: {match}"):
        transfer.backup_all_layers(dev, host, GOOD, GOOD)
    with pytest.raises(InvalidArgumentError, match=f"host_pool: {match}"):
        transfer.load_all_layers(host, dev, GOOD, GOOD)
    assert not dev.k_buffer.any() and not host.kv_buffer.any()


def test_swapped_pools_rejected() -> None:
    dev, host = _pools(HostLayout.LAYER_FIRST, "mha", torch.float16, 4)
    with pytest.raises(InvalidArgumentError, match="device_pool: expected a DeviceKVPool"):
        transfer.backup_all_layers(host, dev, GOOD, GOOD)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="host_pool: expected a HostKVPool"):
        transfer.load_all_layers(dev, dev, GOOD, GOOD)  # type: ignore[arg-type]


# --- CUDA: asynchronous copies with a pinned host pool ------------------------------------------


@pytest.mark.cuda
class TestCuda:
    """The same checks with the device pool on CUDA and a pinned host pool (non_blocking)."""

    @pytest.mark.parametrize("page_size", [1, 16])
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("kind", ["mha", "mla"])
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_backup_load_round_trip(
        self, layout: HostLayout, kind: str, dtype: torch.dtype, page_size: int
    ) -> None:
        dev, host = _pools(layout, kind, dtype, page_size, device="cuda", pin_memory=True)
        assert host.is_pinned and transfer._is_async(dev, host)
        _check_backup(dev, host, transfer.backup_all_layers)
        _check_load_layer(dev, host, NUM_LAYERS - 1)
        _check_round_trip(dev, host)

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_unpinned_host_is_synchronous_and_correct(self, layout: HostLayout) -> None:
        dev, host = _pools(layout, "mha", torch.float16, 16, device="cuda", pin_memory=False)
        assert not transfer._is_async(dev, host)
        _check_backup(dev, host, transfer.backup_all_layers)
        _check_round_trip(dev, host)

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_side_stream(self, layout: HostLayout) -> None:
        """Copies issued on a side stream with CUDA device indices, waited on with an event."""
        dev, host = _pools(layout, "mha", torch.bfloat16, 16, device="cuda", pin_memory=True)
        dev_idx, host_idx = _index_sets(16, seed=11)
        dev.write(dev_idx, *random_kv(dev, dev_idx.numel(), seed=12))
        dev_idx_cuda = dev_idx.cuda()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dev_idx_cuda.record_stream(stream)  # DESIGN.md failure class 2
            transfer.backup_all_layers(dev, host, dev_idx_cuda, host_idx)
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
        for got, want in zip(host.read(host_idx), dev.read(dev_idx), strict=True):
            assert torch.equal(got, want.cpu())

    def test_device_indices_on_cuda_out_of_range(self) -> None:
        dev, host = _pools(HostLayout.PAGE_FIRST, "mla", torch.float16, 4, device="cuda")
        with pytest.raises(IndexOutOfRangeError, match="device_indices"):
            transfer.backup_all_layers(dev, host, (GOOD + 48).cuda(), GOOD)
        with pytest.raises(InvalidArgumentError, match="host_indices: expected a CPU tensor"):
            transfer.load_all_layers(host, dev, GOOD.cuda(), GOOD)
        assert not host.kv_buffer.any() and not dev.kv_buffer.any()
