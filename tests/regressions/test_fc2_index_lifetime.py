"""Failure class 2 (DESIGN.md): index tensors not kept alive on the side stream.

Field scenario (SGLang): index tensors used by an asynchronous copy on another stream were freed
(and their memory reused) before the copy ran -> illegal memory access. Rule: every tensor a
batch's copies use stays alive until its ack is popped, and on CUDA the device copies of indices
are made on the side stream that uses them (what ``record_stream`` restores for tensors made on
another stream), for every pool.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from hicache import transfer
from hicache.controller import CacheController
from hicache.memory import DeviceKVPool, HostKVPool
from hicache.replay.runner import expected_kv


def _pools(device: str):
    pool = DeviceKVPool(32, 2, 2, 8, torch.float16, device)
    return pool, HostKVPool(pool, 32, 4)


def test_batch_keeps_its_indices_alive_until_the_ack(monkeypatch):
    pool, host_pool = _pools("cpu")
    release = threading.Event()
    original = transfer.KVTransfer.load_layer

    def slow_load_layer(*args, **kwargs):
        release.wait(10)  # the copy runs late, after the caller dropped everything
        original(*args, **kwargs)

    monkeypatch.setattr(transfer.KVTransfer, "load_layer", slow_load_layer)
    tokens = torch.arange(8)
    host_pool.write(torch.arange(8), *expected_kv(tokens, pool))
    with CacheController(pool, host_pool) as controller:
        controller.load(torch.arange(8), torch.arange(8, 16), ack_id=1)
        op_ref = weakref.ref(controller.load_queue[0].host_indices)
        controller.start_loading()
        gc.collect()
        assert op_ref() is not None  # owned by the in-flight batch
        assert controller.loading_check() == []  # not done: nothing acknowledged
        release.set()
        assert controller.loading_check(block=True) == [1]
        gc.collect()
        assert op_ref() is None  # released with the ack, not before
    got = pool.read(torch.arange(8, 16))
    assert all(torch.equal(g, w) for g, w in zip(got, expected_kv(tokens, pool), strict=True))


@pytest.mark.cuda
def test_cuda_copies_survive_allocator_churn_behind_the_forward_fence():
    """The side stream waits behind a long forward kernel while the forward stream frees and
    reuses memory: the batch's index copies must not be handed out meanwhile (they were allocated
    on the side stream that uses them), and the loaded KV must be exact."""
    pool, host_pool = _pools("cuda")
    tokens = torch.arange(16)
    kv = expected_kv(tokens, pool)
    host_pool.write(torch.arange(16), *(t.cpu() for t in kv))
    with CacheController(pool, host_pool) as controller:
        torch.cuda._sleep(200_000_000)  # the forward pass is still running ...
        controller.load(torch.arange(16), torch.arange(16, 32), ack_id=1)
        controller.start_loading()  # ... so the load stream waits behind it (the fence)
        for _ in range(200):  # the forward stream churns the caching allocator meanwhile
            junk = torch.full((4096,), 31, dtype=torch.int64, device="cuda")
            del junk
        for layer in range(pool.num_layers):
            controller.wait_until_layer_ready(layer)
        got = pool.read(torch.arange(16, 32))
        assert controller.loading_check(block=True) == [1]
    assert all(torch.equal(g, w) for g, w in zip(got, kv, strict=True))


def test_a_batch_keeps_its_mamba_state_indices_alive_until_the_ack(monkeypatch):
    """For every pool: the Mamba state transfer's indices live as long as the batch."""
    from hicache.memory import MambaHostPool, MambaStatePool, PoolTransfer

    pool, host_pool = _pools("cpu")
    states = MambaStatePool(4, 2, (2,), (2,), torch.float32, torch.float32, "cpu")
    host_states = MambaHostPool(states, 4)
    release = threading.Event()
    original = MambaHostPool.load_all_layers

    def slow(self, indices):
        release.wait(10)
        original(self, indices)

    monkeypatch.setattr(MambaHostPool, "load_all_layers", slow)
    with CacheController(pool, host_pool, extra_pools={"mamba": host_states}) as controller:
        t = PoolTransfer("mamba", torch.tensor([1]), torch.tensor([2]))
        controller.load(torch.arange(4), torch.arange(4), 9, (t,))
        ref = weakref.ref(controller.load_queue[0].pool_transfers[0].host_indices)
        del t
        controller.start_loading()
        gc.collect()
        assert ref() is not None  # owned by the in-flight batch
        release.set()
        assert controller.loading_check(block=True) == [9]
        gc.collect()
        assert ref() is None
