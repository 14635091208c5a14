"""Failure class 2 (DESIGN.md): index tensors not kept alive on the side stream.

Field scenario (SGLang): index tensors used by an asynchronous copy on another stream were freed
(and their memory reused) before the copy ran -> illegal memory access. Rule: every tensor a
batch's copies use stays alive until its ack is popped (and, on CUDA, is recorded on the side
stream), for every pool.
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
    original = transfer.load_layer

    def slow_load_layer(*args, **kwargs):
        release.wait(10)  # the copy runs late, after the caller dropped everything
        original(*args, **kwargs)

    monkeypatch.setattr(transfer, "load_layer", slow_load_layer)
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
def test_cuda_side_stream_records_device_indices(monkeypatch):
    pool, host_pool = _pools("cuda")
    recorded: list[torch.cuda.Stream] = []
    original = torch.Tensor.record_stream

    def spy(self, stream):
        recorded.append(stream)
        return original(self, stream)

    monkeypatch.setattr(torch.Tensor, "record_stream", spy)
    tokens = torch.arange(8)
    pool.write(torch.arange(8), *expected_kv(tokens, pool))
    with CacheController(pool, host_pool) as controller:
        controller.write(torch.arange(8), torch.arange(8), ack_id=1)
        controller.start_writing()
        assert controller.writing_check(block=True) == [1]
        controller.load(torch.arange(8), torch.arange(16, 24), ack_id=2)
        controller.start_loading()
        for layer in range(pool.num_layers):
            controller.wait_until_layer_ready(layer)
        assert controller.loading_check(block=True) == [2]
    assert len(recorded) >= 2
    assert all(s != torch.cuda.current_stream() for s in recorded)  # the side streams
    got = pool.read(torch.arange(16, 24))
    assert all(torch.equal(g, w) for g, w in zip(got, expected_kv(tokens, pool), strict=True))
