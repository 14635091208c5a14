"""Hybrid (Mamba + attention) caches with a storage tier: states stored beside the pages, and a
prefetch that is all-or-nothing (reference §3.11).

A node's host state is stored under its last page's hash in a second backend (the Mamba host
pool's identity). A prefetch is cut back to the deepest stored page whose state is stored too,
and inserts its pages only when every page and that state were read; a request then continues
from the prefetched state, bit-identical to the one the writer published. Real file backends in
``tmp_path``.
"""

from __future__ import annotations

import threading

import torch

from hicache.cache import HiCache
from hicache.memory import DeviceKVPool, HostKVPool, MambaHostPool, MambaStatePool
from hicache.replay import ReplayConfig, bundled_trace_path, load_trace, run_replay
from hicache.storage import FileStorage, StorageIdentity
from hicache.storage.controller import PrefetchConfig
from tests.storage.test_prefetch import FaultyFile
from tests.test_cache_mamba import PAGE, serve, state_of

NONE = torch.empty(0, dtype=torch.int64)
TOKENS = list(range(1, 33))  # 8 pages


def make_cache(tmp_path, policy: str = "wait_complete") -> HiCache:
    pool = DeviceKVPool(128, 1, 1, 4, torch.float16, "cpu")
    states = MambaStatePool(8, 2, (3, 2), (2, 2), torch.float32, torch.float32, "cpu")
    host = HostKVPool(pool, 256, PAGE, "page_first")
    host_states = MambaHostPool(states, 8)
    return HiCache(
        pool,
        PAGE,
        host,
        "write_through",
        mamba_pool=states,
        mamba_host_pool=host_states,
        storage_backend=FaultyFile(StorageIdentity.from_host_pool(host, "m"), tmp_path),
        prefetch_config=PrefetchConfig(policy, threshold_tokens=8),
        mamba_storage_backend=FileStorage(
            StorageIdentity.from_host_pool(host_states, "m"), tmp_path
        ),
    )


def store(tmp_path, checkpoints: dict[int, float]) -> None:
    cache = make_cache(tmp_path)
    serve(cache, TOKENS, checkpoints)
    cache.flush()
    cache.close()


def prefetch(cache: HiCache) -> int:
    m = cache.match_prefix(torch.tensor(TOKENS))
    assert cache.prefetch_from_storage("r", m.last_host_node, TOKENS)
    cache.wait_prefetch("r", 10)
    assert cache.check_prefetch_progress("r")
    cache.check_invariants(NONE, NONE)
    return cache.pop_prefetch_loaded_tokens("r")


def assert_no_leaks(cache: HiCache) -> None:
    cache.check_invariants(NONE, NONE)
    assert not cache._prefetch_host and not cache._prefetch_state
    host_states = cache.mamba_host_pool
    held = cache.tree.all_mamba_host_indices().numel()
    assert host_states.available_size() + held == host_states.num_slots


def test_a_fresh_cache_continues_from_the_stored_state(tmp_path):
    store(tmp_path, {32: 7.0})
    cache = make_cache(tmp_path)
    assert prefetch(cache) == 32
    assert cache.storage.counters.prefetch_states == 1
    m = cache.match_prefix(torch.tensor(TOKENS), load_back=True)
    cache.flush()
    assert m.device_prefix_len == 32
    working = cache.fork_mamba(m.last_device_node)
    assert torch.equal(state_of(cache, working), torch.tensor([7.0] * 12 + [7.5] * 8))  # 2 layers
    cache.free_mamba(torch.tensor([working]))
    assert_no_leaks(cache)
    cache.close()


def test_the_prefetch_stops_at_the_deepest_stored_state(tmp_path):
    store(tmp_path, {16: 3.0})  # 8 pages stored, the state after page 4 only
    cache = make_cache(tmp_path)
    assert prefetch(cache) == 16
    assert cache.match_prefix(torch.tensor(TOKENS)).host_hit_length == 16
    assert_no_leaks(cache)
    cache.close()


def test_without_a_stored_state_nothing_is_prefetched(tmp_path):
    store(tmp_path, {})
    cache = make_cache(tmp_path)
    assert prefetch(cache) == 0
    assert cache.storage.counters.prefetch_revoked_ops == 1
    assert cache.tree.host_total_size() == 0
    assert_no_leaks(cache)
    cache.close()


def test_best_effort_takes_all_or_nothing(tmp_path):
    store(tmp_path, {32: 7.0})
    cache = make_cache(tmp_path, policy="best_effort")
    cache.storage.batch_pages = 4
    backend = cache.storage.backend
    backend.get_gate = threading.Event()  # the first batch of pages stalls
    m = cache.match_prefix(torch.tensor(TOKENS))
    assert cache.prefetch_from_storage("r", m.last_host_node, TOKENS)
    assert backend.get_started.wait(10)
    assert cache.check_prefetch_progress("r")  # now: pages are in flight, none published
    assert cache.pop_prefetch_loaded_tokens("r") == 0
    cache.check_invariants(NONE, NONE)  # the thread's pages and state slot are accounted for
    backend.get_gate.set()
    cache._end_storage_work()
    assert cache.tree.host_total_size() == 0
    assert_no_leaks(cache)
    cache.close()


def test_a_second_hybrid_replay_hits_l3_and_every_state_verifies(tmp_path):
    requests = load_trace(bundled_trace_path(), 150)
    config = ReplayConfig(
        device_ratio=0.2,
        hicache_ratio=1.0,
        host_layout="page_first",
        check_every=25,
        model="mamba-hybrid",
        storage_backend="file",
        storage_extra_config={"path": str(tmp_path), "prefetch_threshold": 16},
        prefetch_policy="wait_complete",
    )
    first = run_replay(requests, config, "first")
    assert first.storage_stats["controller"]["backup_states"] > 0
    second = run_replay(requests, config, "second")
    assert second.storage_hit_blocks > 0
    assert second.mamba_verified_states == second.requests  # each forked state was checked
    assert second.verified_tokens == second.hit_blocks * config.block_tokens
    assert second.storage_stats["controller"]["prefetch_states"] > 0
