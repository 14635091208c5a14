"""Failure class 1 (DESIGN.md): shared transfer state mutated in place.

Field scenario (SGLang, hybrid HiCache): a queued transfer moved its index tensors to the GPU in
place; the tree node that still referenced the same object then held GPU indices, and a later host
eviction freed them in the host pool -> device mismatch crash. Rule: operations own copies of
their indices, the tree's slots are never aliased by queued work, and moving indices to a device
makes new tensors.
"""

from __future__ import annotations

import pytest
import torch

from hicache.controller import CacheController, CacheOperation
from hicache.memory import DeviceKVPool, HostKVPool
from hicache.replay.runner import expected_kv
from tests.regressions.helpers import NO_REQUEST_SLOTS, make_cache, run_request


def test_queued_operation_does_not_alias_caller_tensors():
    host, device = torch.arange(8), torch.arange(8, 16)
    op = CacheOperation.create(host, device, ack_id=3)
    host.fill_(-1)
    device.add_(100)
    assert op.host_indices.tolist() == list(range(8))
    assert op.device_indices.tolist() == list(range(8, 16))
    merged = CacheOperation.merge([op, CacheOperation.create(torch.arange(2), torch.arange(2), 4)])
    assert merged.ack_ids == (3, 4)
    assert op.host_indices.tolist() == list(range(8))  # merging made new tensors


def test_mutating_indices_after_queueing_changes_nothing_copied():
    pool = DeviceKVPool(32, 2, 2, 8, torch.float16, "cpu")
    host_pool = HostKVPool(pool, 32, 4)
    tokens = torch.arange(8)
    pool.write(torch.arange(8), *expected_kv(tokens, pool))
    with CacheController(pool, host_pool) as controller:
        device_indices, host_indices = torch.arange(8), torch.arange(16, 24)
        controller.write(device_indices, host_indices, ack_id=1)
        host_indices.zero_()  # the caller (or a tree split) reuses its tensors at once
        device_indices.fill_(31)
        controller.start_writing()
        assert controller.writing_check(block=True) == [1]
    got = host_pool.read(torch.arange(16, 24))
    want = expected_kv(tokens, pool)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert not host_pool.read(torch.arange(0, 8))[0].any()  # nothing went to slots 0..7


def test_tree_slots_stay_cpu_and_valid_through_backup_load_and_host_eviction():
    """The field crash: after transfers, host eviction frees exactly the tree's CPU host slots."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = make_cache("write_through", device_slots=32, host_slots=64, device=device)
    key_a, key_b = torch.arange(0, 24), torch.arange(500, 524)
    run_request(cache, key_a)
    run_request(cache, key_b)  # pushes most of key_a to host
    assert run_request(cache, key_a) == 24  # loaded back, then verified bytes
    for slots in (cache.tree.all_host_indices(), cache.tree.all_device_indices()):
        assert slots.device.type == "cpu" and slots.dtype == torch.int64
    # Everything host-evictable goes back to the host allocator without a complaint.
    cache.evict(10_000)
    cache.evict_host(10_000)
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    assert cache.tree.host_total_size() == 0
    assert cache.host_pool.allocator.available_size() == cache.host_pool.num_slots


@pytest.mark.cuda
def test_device_copies_of_indices_are_new_tensors_on_cuda():
    pool = DeviceKVPool(32, 2, 2, 8, torch.float16, "cuda")
    host_pool = HostKVPool(pool, 32, 4)
    with CacheController(pool, host_pool) as controller:
        host, device = torch.arange(8), torch.arange(8)
        controller.load(host, device, ack_id=7)
        queued = controller.load_queue[0]
        controller.start_loading()
        assert controller.loading_check(block=True) == [7]
        # The operation's own indices stayed on the CPU; the GPU copy was a new tensor.
        assert queued.device_indices.device.type == "cpu"
        assert device.device.type == "cpu"


def test_a_queued_mamba_state_transfer_owns_its_indices():
    """Hybrid: the extra pool's transfer (the Mamba state) must not alias caller or tree tensors."""
    from hicache.memory import MambaHostPool, MambaStatePool, PoolTransfer

    pool = DeviceKVPool(32, 2, 2, 8, torch.float16, "cpu")
    states = MambaStatePool(4, 2, (2,), (2, 2), torch.float32, torch.float32, "cpu")
    host_states = MambaHostPool(states, 4)
    conv = torch.arange(4, dtype=torch.float32).view(2, 1, 2) + 1
    temporal = torch.arange(8, dtype=torch.float32).view(2, 1, 2, 2) + 1
    states.write(torch.tensor([1]), conv, temporal)
    with CacheController(pool, HostKVPool(pool, 32, 4), extra_pools={"mamba": host_states}) as c:
        device_state, host_state = torch.tensor([1]), torch.tensor([2])
        transfer = PoolTransfer("mamba", host_state, device_state)
        c.write(torch.arange(4), torch.arange(4), 5, (transfer,))
        device_state.fill_(3)  # a node's tensor reused at once: the queued copy is unaffected
        host_state.fill_(0)
        c.start_writing()
        assert c.writing_check(block=True) == [5]
    got = host_states.read(torch.tensor([2]))
    assert torch.equal(got[0].flatten(), conv.flatten())
    assert torch.equal(got[1].flatten(), temporal.flatten())
    assert not host_states.read(torch.tensor([0]))[0].any()  # slot 0 untouched
