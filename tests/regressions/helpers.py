"""A small two-tier cache and a request helper for the field-scenario regression tests."""

from __future__ import annotations

import torch

from hicache.cache import HiCache, Req
from hicache.memory import DeviceKVPool, HostKVPool
from hicache.replay.runner import expected_kv

NO_REQUEST_SLOTS = torch.empty(0, dtype=torch.int64)


def make_cache(
    write_policy: str,
    device_slots: int = 64,
    host_slots: int = 128,
    page_size: int = 4,
    device: str = "cpu",
    layout: str = "layer_first",
    enable_kv_events: bool = False,
) -> HiCache:
    """A HiCache over a 2-layer MHA device pool and a host pool, for scenario tests."""
    pool = DeviceKVPool(device_slots, 2, 2, 8, torch.float16, device)
    host = HostKVPool(pool, host_slots, page_size, layout)
    return HiCache(pool, page_size, host, write_policy, enable_kv_events=enable_kv_events)


def run_request(cache: HiCache, tokens: torch.Tensor) -> int:
    """One request through the cache as the replay runs it; returns the tokens it hit.

    The KV of every hit (device or loaded back from host) is checked against what was written.
    """
    match = cache.match_prefix(tokens, load_back=True)
    cache.flush()
    hit = match.device_prefix_len
    pool = cache.device_pool
    got, want = pool.read(match.device_indices), expected_kv(tokens[:hit], pool)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), "a hit returned KV that differs from what was written"
    receipt = cache.inc_lock_ref(match.last_device_node)
    slots = cache.alloc(len(tokens) - hit)
    pool.write(slots[: len(tokens) - hit], *expected_kv(tokens[hit:], pool))
    req = Req(tokens, kv_indices=torch.cat((match.device_indices, slots)), prefix_len=hit)
    req.last_node = receipt.node_id
    cache.cache_finished_req(req)
    cache.flush()
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    return hit
