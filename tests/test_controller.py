"""CacheController: round trips, ordered acks, per-layer readiness, errors, NVTX stage names."""

from __future__ import annotations

import threading

import pytest
import torch

from hicache import profiling, transfer
from hicache.controller import CacheController, CacheOperation
from hicache.errors import IndexOutOfRangeError, InvalidArgumentError, TransferError
from hicache.memory import DeviceKVPool, HostKVPool
from tests.memory.kv_helpers import page_indices, random_kv

LAYOUTS = ["layer_first", "page_first", "page_first_direct"]


def _pools(kind: str = "mha", layout: str = "layer_first", device: str = "cpu"):
    heads = 1 if kind == "mla" else 2
    pool = DeviceKVPool(64, 3, heads, 8, torch.float16, device, kind)
    return pool, HostKVPool(pool, 64, 4, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_round_trip_through_host_restores_kv(kind, layout):
    pool, host_pool = _pools(kind, layout)
    src = page_indices(64, 4, 5, seed=1)
    kv = random_kv(pool, 20, seed=2)
    pool.write(src, *kv)
    host_slots = page_indices(64, 4, 5, seed=3)
    dst = page_indices(64, 4, 5, seed=4)
    with CacheController(pool, host_pool) as controller:
        controller.write(src[:8], host_slots[:8], ack_id=10)
        controller.write(src[8:], host_slots[8:], ack_id=11)  # two ops, one merged batch
        controller.start_writing()
        assert controller.writing_check(block=True) == [10, 11]
        for buf in pool.k_buffer if kind == "mha" else pool.kv_buffer:
            buf.zero_()
        controller.load(host_slots, dst, ack_id=12)
        consumer = controller.start_loading()
        assert consumer == 0
        for layer in range(pool.num_layers):
            controller.wait_until_layer_ready(layer, consumer)
        assert controller.loading_check(block=True) == [12]
        assert controller.num_pending_loads() == controller.num_pending_writes() == 0
    got = pool.read(dst)
    assert all(torch.equal(g, w) for g, w in zip(got, kv, strict=True))


def test_acks_come_back_in_submission_order():
    pool, host_pool = _pools()
    with CacheController(pool, host_pool) as controller:
        for batch in range(4):
            for i in range(3):
                slot = torch.arange(4) + 4 * (3 * batch + i) % 64
                controller.write(slot, slot, ack_id=100 * batch + i)
            controller.start_writing()
        acks = controller.writing_check(block=True)
    assert acks == [100 * b + i for b in range(4) for i in range(3)]


def test_layer_zero_is_ready_while_layer_one_still_loads(monkeypatch):
    pool, host_pool = _pools()
    kv = random_kv(pool, 8, seed=5)
    host_pool.write(torch.arange(8), *kv)
    gate = threading.Event()
    original = transfer.KVTransfer.load_layer

    def gated_load_layer(self, indices, layer):
        if layer >= 1:
            assert gate.wait(10)
        original(self, indices, layer)

    monkeypatch.setattr(transfer.KVTransfer, "load_layer", gated_load_layer)
    with CacheController(pool, host_pool) as controller:
        controller.load(torch.arange(8), torch.arange(16, 24), ack_id=1)
        consumer = controller.start_loading()
        controller.wait_until_layer_ready(0, consumer)
        assert torch.equal(pool.read_layer(0, torch.arange(16, 24))[0], kv[0][0])
        assert controller.loading_check() == []  # layer 1 is still loading
        assert controller.num_pending_loads() == 1
        waiter = threading.Thread(target=controller.wait_until_layer_ready, args=(1, consumer))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # blocked on layer 1
        gate.set()
        waiter.join(10)
        assert not waiter.is_alive()
        assert torch.equal(pool.read_layer(1, torch.arange(16, 24))[0], kv[0][1])
        assert controller.loading_check(block=True) == [1]
        controller.wait_until_layer_ready(2, consumer)  # acknowledged batch: no wait


def test_operation_owns_its_indices():
    host, device = torch.arange(4), torch.arange(4, 8)
    op = CacheOperation.create(host, device, 1)
    host.zero_()
    device.zero_()
    assert op.host_indices.tolist() == [0, 1, 2, 3]
    assert op.device_indices.tolist() == [4, 5, 6, 7]
    assert op.num_tokens == 4


@pytest.mark.parametrize(
    ("device_indices", "host_indices", "error", "match"),
    [
        (torch.arange(4, dtype=torch.int32), torch.arange(4), InvalidArgumentError, "int64"),
        (torch.arange(4), torch.arange(8), InvalidArgumentError, "length 4 differs"),
        (torch.arange(4).reshape(2, 2), torch.arange(4), InvalidArgumentError, "1-D"),
        (torch.arange(62, 66), torch.arange(4), IndexOutOfRangeError, "out of range"),
        (torch.arange(4), torch.arange(4) - 1, IndexOutOfRangeError, "out of range"),
    ],
)
def test_bad_indices_are_rejected_and_nothing_is_queued(device_indices, host_indices, error, match):
    pool, host_pool = _pools()
    with CacheController(pool, host_pool) as controller:
        with pytest.raises(error, match=match):
            controller.write(device_indices, host_indices, ack_id=1)
        with pytest.raises(error, match=match):
            controller.load(host_indices, device_indices, ack_id=1)
        assert controller.write_queue == controller.load_queue == []
        assert controller.start_loading() == -1


def test_bad_configuration_and_layers_are_rejected():
    pool, host_pool = _pools()
    with pytest.raises(InvalidArgumentError, match="io_backend"):
        CacheController(pool, host_pool, io_backend="kernel-that-does-not-exist")
    other = DeviceKVPool(64, 2, 2, 8, torch.float16, "cpu")
    with pytest.raises(InvalidArgumentError, match="num_layers"):
        CacheController(pool, HostKVPool(other, 64, 4))
    with CacheController(pool, host_pool) as controller:
        assert controller.io_backend == "direct"
        with pytest.raises(IndexOutOfRangeError, match="layer 3"):
            controller.wait_until_layer_ready(3)
        with pytest.raises(InvalidArgumentError, match="never returned"):
            controller.wait_until_layer_ready(0, consumer_index=5)


def test_failed_batch_raises_transfer_error_and_controller_stays_usable(monkeypatch):
    pool, host_pool = _pools()
    original = transfer.KVTransfer.backup_all_layers
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated copy failure")
        original(*args, **kwargs)

    monkeypatch.setattr(transfer.KVTransfer, "backup_all_layers", failing_once)
    with CacheController(pool, host_pool) as controller:
        for ack in (1, 2, 3):
            controller.write(torch.arange(4) + 4 * ack, torch.arange(4) + 4 * ack, ack_id=ack)
            controller.start_writing()
        assert controller.writing_check(block=True) == [1]  # successes before the failure first
        with pytest.raises(TransferError, match="simulated copy failure") as info:
            controller.writing_check(block=True)
        assert info.value.ack_ids == (2,)
        assert controller.writing_check(block=True) == [3]
        controller.write(torch.arange(4), torch.arange(4), ack_id=4)
        controller.start_writing()
        assert controller.writing_check(block=True) == [4]


def test_waiting_for_a_layer_a_failed_load_never_copied_raises(monkeypatch):
    pool, host_pool = _pools()
    original = transfer.KVTransfer.load_layer

    def fail_at_layer_1(self, indices, layer):
        if layer == 1:
            raise RuntimeError("simulated failure at layer 1")
        original(self, indices, layer)

    monkeypatch.setattr(transfer.KVTransfer, "load_layer", fail_at_layer_1)
    with CacheController(pool, host_pool) as controller:
        controller.load(torch.arange(4), torch.arange(4), ack_id=9)
        consumer = controller.start_loading()
        controller.wait_until_layer_ready(0, consumer)  # layer 0 was copied
        for layer in (1, 2):
            with pytest.raises(TransferError, match="never copied") as info:
                controller.wait_until_layer_ready(layer, consumer)
            assert info.value.ack_ids == (9,)
        with pytest.raises(TransferError):
            controller.loading_check(block=True)


def test_pop_oldest_load_pops_a_success_and_leaves_a_failure_to_loading_check(monkeypatch):
    pool, host_pool = _pools()
    original = transfer.KVTransfer.load_layer
    calls = []

    def second_batch_fails(self, indices, layer):
        calls.append(layer)
        if len(calls) > pool.num_layers:
            raise RuntimeError("simulated failure in batch 2")
        original(self, indices, layer)

    monkeypatch.setattr(transfer.KVTransfer, "load_layer", second_batch_fails)
    with CacheController(pool, host_pool) as controller:
        assert controller.pop_oldest_load() == []  # nothing submitted
        controller.load(torch.arange(4), torch.arange(4), ack_id=1)
        controller.start_loading()
        controller.load(torch.arange(4, 8), torch.arange(4, 8), ack_id=2)
        controller.start_loading()
        assert controller.pop_oldest_load() == [1]
        assert controller.pop_oldest_load() == []  # failed: not popped
        assert controller.num_pending_loads() == 1
        with pytest.raises(TransferError, match="batch 2") as info:
            controller.loading_check(block=True)
        assert info.value.ack_ids == (2,)
        assert controller.num_pending_loads() == 0


def test_ack_ids_must_be_ints_and_merge_needs_operations():
    pool, host_pool = _pools()
    with CacheController(pool, host_pool) as controller:
        with pytest.raises(InvalidArgumentError, match="ack_id"):
            controller.write(torch.arange(4), torch.arange(4), ack_id=3.7)
        with pytest.raises(InvalidArgumentError, match="ack_id"):
            controller.load(torch.arange(4), torch.arange(4), ack_id=True)
    with pytest.raises(InvalidArgumentError, match="no operations"):
        CacheOperation.merge([])


def test_close_is_idempotent_and_refuses_new_work():
    pool, host_pool = _pools()
    controller = CacheController(pool, host_pool)
    controller.close()
    controller.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        controller.write(torch.arange(4), torch.arange(4), ack_id=1)


def test_every_range_the_controller_opens_is_a_listed_stage(monkeypatch):
    opened: list[str] = []
    original = profiling.nvtx_range

    def spy(name, payload=None):
        opened.append(name)
        return original(name, payload)

    monkeypatch.setattr(profiling, "nvtx_range", spy)
    pool, host_pool = _pools()
    with CacheController(pool, host_pool) as controller:
        controller.write(torch.arange(4), torch.arange(4), ack_id=1)
        controller.start_writing()
        controller.writing_check(block=True)
        controller.load(torch.arange(4), torch.arange(4, 8), ack_id=2)
        controller.start_loading()
        controller.loading_check(block=True)
    assert set(opened) <= set(profiling.STAGES)
    expected = {"enqueue_write", "write_batch", "ack_write", "enqueue_load", "load_batch"}
    assert expected | {"load_layer", "ack_load"} <= set(opened)
    assert opened.count("load_layer") == pool.num_layers
    assert len(set(profiling.STAGES)) == len(profiling.STAGES)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_stream_round_trip(layout):
    pool, host_pool = _pools("mha", layout, "cuda")
    assert host_pool.is_pinned
    kv = random_kv(pool, 16, seed=7)
    src = page_indices(64, 4, 4, seed=8)
    pool.write(src, *kv)
    with CacheController(pool, host_pool) as controller:
        controller.write(src, torch.arange(16), ack_id=1)
        controller.start_writing()
        assert controller.writing_check(block=True) == [1]
        controller.load(torch.arange(16), torch.arange(32, 48), ack_id=2)
        consumer = controller.start_loading()
        for layer in range(pool.num_layers):
            controller.wait_until_layer_ready(layer, consumer)  # the current stream waits
        got = pool.read(torch.arange(32, 48))  # on the current stream, after the waits
        assert all(torch.equal(g, w) for g, w in zip(got, kv, strict=True))
        assert controller.loading_check(block=True) == [2]


def test_transfer_counters_count_bytes_time_and_failures(monkeypatch):
    pool, host_pool = _pools()
    bytes_per_token = pool.size_bytes // pool.num_slots
    original = transfer.KVTransfer.backup_all_layers
    calls = {"n": 0}

    def failing_second(self, indices):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated copy failure")
        original(self, indices)

    monkeypatch.setattr(transfer.KVTransfer, "backup_all_layers", failing_second)
    with CacheController(pool, host_pool) as controller:
        controller.write(torch.arange(8), torch.arange(8), ack_id=1)
        controller.start_writing()
        controller.write(torch.arange(8, 12), torch.arange(8, 12), ack_id=2)
        controller.start_writing()
        assert controller.writing_check(block=True) == [1]
        with pytest.raises(TransferError):
            controller.writing_check(block=True)
        controller.load(torch.arange(4), torch.arange(16, 20), ack_id=3)
        controller.start_loading()
        assert controller.loading_check(block=True) == [3]
    backup, load = controller.backup_counters, controller.load_counters
    assert (backup.batches, backup.tokens, backup.failed_batches) == (1, 8, 1)
    assert backup.bytes == 8 * bytes_per_token and backup.seconds > 0 and backup.gb_per_s > 0
    assert (load.batches, load.tokens, load.bytes) == (1, 4, 4 * bytes_per_token)
    assert load.failed_batches == 0 and load.seconds > 0
