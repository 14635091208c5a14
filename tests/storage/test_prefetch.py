"""HiCache with a storage (L3) tier: backup after the host ack, prefetch, policies and faults.

Every test runs the real file backend in ``tmp_path``; faults are injected the way SGLang's
``SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE`` wrapper does it, by a FileStorage subclass that
raises, stalls or refuses before doing the real I/O. A stored page is corrupted by flipping a
byte of its file. After every scenario: the tree's invariants hold, no host page leaked (free +
tree-held == capacity once drained) and every hit's KV equals what was written.
"""

from __future__ import annotations

import threading

import pytest
import torch

from hicache import metrics
from hicache.cache import HiCache, Req
from hicache.errors import InvalidArgumentError, StorageError
from hicache.memory import DeviceKVPool, HostKVPool, MambaHostPool, MambaStatePool
from hicache.storage import FileStorage, StorageIdentity, page_hashes
from hicache.storage.controller import PrefetchConfig
from tests.regressions.helpers import NO_REQUEST_SLOTS, run_request

PAGE = 4
TOKENS = torch.arange(0, 64)  # 16 pages


class FaultyFile(FileStorage):
    """The file backend with injected faults: failing ops, a gate that stalls ``get``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail: set[str] = set()
        self.get_gate: threading.Event | None = None
        self.get_started = threading.Event()

    def _exists(self, storage_keys):
        if "exists" in self.fail:
            raise StorageError(f"{self.description}: exists: injected failure", self.description)
        return super()._exists(storage_keys)

    def _get(self, storage_keys, value_nbytes):
        self.get_started.set()
        if self.get_gate is not None:
            self.get_gate.wait(10)
        if "get" in self.fail:
            raise StorageError(f"{self.description}: get: injected failure", self.description)
        yield from super()._get(storage_keys, value_nbytes)

    def _set(self, storage_keys, encode, page_nbytes):
        if "set" in self.fail:
            return 0, StorageError(f"{self.description}: set: injected failure", self.description)
        return super()._set(storage_keys, encode, page_nbytes)


def make_cache(
    tmp_path,
    policy: str = "best_effort",
    threshold: int = 8,
    host_slots: int = 256,
    device_slots: int = 128,
    batch_pages: int | None = None,
    enable_kv_events: bool = False,
    **backend_kwargs,
) -> tuple[HiCache, FaultyFile]:
    pool = DeviceKVPool(device_slots, 2, 2, 8, torch.float16, "cpu")
    host = HostKVPool(pool, host_slots, PAGE, "page_first")
    backend = FaultyFile(
        StorageIdentity.from_host_pool(host, "test-model"), tmp_path, **backend_kwargs
    )
    config = PrefetchConfig(policy, threshold, timeout_base_s=0.2, timeout_per_ki_token_s=0.0)
    cache = HiCache(
        pool,
        PAGE,
        host,
        "write_through",
        enable_kv_events=enable_kv_events,
        storage_backend=backend,
        prefetch_config=config,
    )
    if batch_pages is not None:
        cache.storage.batch_pages = batch_pages
    return cache, backend


def store(tmp_path, tokens: torch.Tensor = TOKENS, **backend_kwargs) -> None:
    """Another cache (another process, as far as storage knows) computes and stores ``tokens``."""
    cache, backend = make_cache(tmp_path, **backend_kwargs)
    run_request(cache, tokens)
    cache.flush()
    assert cache.stats.storage_backup_tokens == len(tokens) - len(tokens) % PAGE
    cache.close()


def start_prefetch(cache: HiCache, req_id, tokens: torch.Tensor, extra_key=None) -> bool:
    m = cache.match_prefix(tokens, extra_key)
    matched = m.device_prefix_len + m.host_hit_length
    return cache.prefetch_from_storage(req_id, m.last_host_node, tokens[matched:], extra_key)


def assert_no_leaks(cache: HiCache) -> None:
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    host = cache.host_pool
    assert not cache._prefetch_host, "prefetch host pages still held"
    assert host.allocator.available_size() + cache.tree.host_total_size() == host.num_slots


def test_a_fresh_cache_prefetches_what_another_stored_and_serves_the_same_kv(tmp_path):
    store(tmp_path)
    cache, backend = make_cache(tmp_path)
    assert start_prefetch(cache, "r", TOKENS)
    assert cache.wait_prefetch("r", 10)
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    assert cache.check_prefetch_progress("r")
    assert cache.pop_prefetch_loaded_tokens("r") == 64
    assert cache.stats.storage_hit_tokens == 64
    m = cache.match_prefix(TOKENS)
    assert (m.device_prefix_len, m.host_hit_length) == (0, 64)
    assert run_request(cache, TOKENS) == 64  # loaded back; run_request compares the KV bytes
    assert backend.stats_snapshot().get_pages == 16
    assert_no_leaks(cache)
    cache.close()
    assert_no_leaks(cache)


def test_prefetch_continues_the_chain_below_a_host_anchor(tmp_path):
    store(tmp_path)
    cache, _ = make_cache(tmp_path)
    run_request(cache, TOKENS[:24])  # the first 6 pages computed here, the rest in storage
    assert start_prefetch(cache, "r", TOKENS)
    cache.wait_prefetch("r", 10)
    assert cache.check_prefetch_progress("r")
    assert cache.pop_prefetch_loaded_tokens("r") == 40
    assert run_request(cache, TOKENS) == 64
    assert_no_leaks(cache)
    cache.close()


def test_host_pages_are_allocated_for_the_storage_hit_only(tmp_path):
    store(tmp_path, TOKENS[:32])  # 8 of the 16 pages are in storage
    cache, backend = make_cache(tmp_path)
    free_before = cache.host_pool.allocator.available_size()
    seen = []
    attach = cache.storage._alloc_host

    def spy(op, num_tokens, min_tokens):
        seen.append(num_tokens)
        return attach(op, num_tokens, min_tokens)

    cache.storage._alloc_host = spy
    assert start_prefetch(cache, "r", TOKENS)
    cache.wait_prefetch("r", 10)
    assert seen == [32]  # exists first, then the hit's 8 pages, not the request's 16
    assert cache.check_prefetch_progress("r")
    assert cache.pop_prefetch_loaded_tokens("r") == 32
    assert cache.host_pool.allocator.available_size() == free_before - 32
    assert_no_leaks(cache)
    cache.close()


def test_threshold_declines_short_requests_and_revokes_small_hits(tmp_path):
    store(tmp_path, TOKENS[:8])
    cache, _ = make_cache(tmp_path, threshold=16)
    assert not start_prefetch(cache, "short", TOKENS[:12])  # 3 pages < 16 tokens: not even asked
    assert start_prefetch(cache, "small", TOKENS)  # asks; storage holds 8 tokens < 16
    cache.wait_prefetch("small", 10)
    assert cache.storage.counters.prefetch_revoked_ops == 1
    assert cache.check_prefetch_progress("small")
    assert cache.pop_prefetch_loaded_tokens("small") == 0
    assert cache.tree.host_total_size() == 0
    assert_no_leaks(cache)
    cache.close()


def test_sglang_defaults():
    config = PrefetchConfig()
    assert (config.policy, config.threshold_tokens) == ("best_effort", 256)
    assert config.timeout_s(2048) == pytest.approx(1.0 + 0.5)
    parsed = PrefetchConfig.from_extra_config(
        "timeout", {"prefetch_threshold": 64, "prefetch_timeout_base": 2, "path": "/x"}
    )
    assert (parsed.threshold_tokens, parsed.timeout_base_s, parsed.timeout_s(1024)) == (64, 2, 2.25)
    with pytest.raises(InvalidArgumentError, match="policy"):
        PrefetchConfig("eager")


def test_best_effort_takes_what_is_read_and_the_thread_frees_the_rest(tmp_path):
    store(tmp_path)
    cache, backend = make_cache(tmp_path, batch_pages=4)
    backend.get_gate = threading.Event()  # the first get stalls
    assert start_prefetch(cache, "r", TOKENS)
    assert backend.get_started.wait(10)
    assert cache.check_prefetch_progress("r")  # best_effort: proceed now, with nothing read
    assert cache.pop_prefetch_loaded_tokens("r") == 0
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)  # the thread still holds its pages
    assert cache._prefetch_host
    backend.get_gate.set()
    cache._end_storage_work()
    assert_no_leaks(cache)
    assert run_request(cache, TOKENS) == 0
    cache.close()


def test_wait_complete_waits_for_every_page(tmp_path):
    store(tmp_path)
    cache, backend = make_cache(tmp_path, policy="wait_complete", batch_pages=4)
    backend.get_gate = threading.Event()
    assert start_prefetch(cache, "r", TOKENS)
    assert backend.get_started.wait(10)
    assert not cache.check_prefetch_progress("r")
    backend.get_gate.set()
    cache.wait_prefetch("r", 10)
    assert cache.check_prefetch_progress("r")
    assert cache.pop_prefetch_loaded_tokens("r") == 64
    assert run_request(cache, TOKENS) == 64
    assert_no_leaks(cache)
    cache.close()


def test_timeout_gives_up_on_a_slow_backend(tmp_path):
    store(tmp_path)
    cache, backend = make_cache(tmp_path, policy="timeout", batch_pages=4)
    backend.get_gate = threading.Event()  # stalls until released
    assert start_prefetch(cache, "r", TOKENS)
    assert backend.get_started.wait(10)
    assert not cache.check_prefetch_progress("r")  # within the 0.2 s timeout
    threading.Event().wait(0.3)
    assert cache.check_prefetch_progress("r")  # timed out: the request recomputes
    assert cache.pop_prefetch_loaded_tokens("r") == 0
    backend.get_gate.set()
    cache._end_storage_work()
    assert_no_leaks(cache)
    assert run_request(cache, TOKENS) == 0
    cache.close()


@pytest.mark.parametrize("op", ["exists", "get"])
def test_a_failing_backend_means_recompute_counted_no_crash(tmp_path, op):
    store(tmp_path)
    cache, backend = make_cache(tmp_path)
    backend.fail.add(op)
    assert start_prefetch(cache, "r", TOKENS)
    cache.wait_prefetch("r", 10)
    assert cache.check_prefetch_progress("r")
    assert cache.pop_prefetch_loaded_tokens("r") == 0
    assert cache.storage.counters.prefetch_failed_ops == 1
    assert backend.stats_snapshot().failed_ops == 1
    assert run_request(cache, TOKENS) == 0
    assert_no_leaks(cache)
    cache.close()


def test_a_corrupt_page_ends_the_prefetch_before_it(tmp_path):
    store(tmp_path)
    cache, backend = make_cache(tmp_path)
    # Page 5 of the chain (its key is the page hash): flip a payload byte of its file.
    digest = page_hashes(TOKENS, PAGE)[5].hex()
    path = backend._path(backend.storage_key(digest))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert start_prefetch(cache, "r", TOKENS)
    cache.wait_prefetch("r", 10)
    assert cache.check_prefetch_progress("r")
    assert cache.pop_prefetch_loaded_tokens("r") == 20  # pages 0-4; the corrupt one is a miss
    assert backend.stats_snapshot().corrupt_pages == 1
    assert cache.storage.counters.prefetch_failed_ops == 1
    assert run_request(cache, TOKENS) == 20  # KV of the 5 pages verified; the rest recomputed
    assert_no_leaks(cache)
    cache.close()


def test_backups_store_each_page_once_and_a_full_backend_is_counted(tmp_path):
    cache, backend = make_cache(tmp_path / "full", max_bytes=6 * (32 + PAGE * 2 * 2 * 2 * 8 * 2))
    run_request(cache, TOKENS)
    cache.flush()
    assert cache.stats.storage_backup_tokens == 64
    assert cache.stats.storage_backup_failed_tokens == 40  # 6 of 16 pages fit under the cap
    assert cache.storage.counters.backup_failed_ops == 1
    assert_no_leaks(cache)  # every storage backup's host lock was released
    cache.close()

    cache, backend = make_cache(tmp_path / "dedup")
    run_request(cache, TOKENS)
    run_request(cache, torch.cat((TOKENS, torch.arange(500, 516))))  # extends the stored path
    cache.flush()
    counters = cache.storage.counters
    assert counters.backup_pages == 20  # the shared prefix is not queued again
    assert cache.stats.storage_backup_tokens == 80
    assert backend.stats_snapshot().set_pages == 20
    assert_no_leaks(cache)
    cache.close()


def test_a_failing_set_is_counted_and_releases_the_host_lock(tmp_path):
    cache, backend = make_cache(tmp_path)
    backend.fail.add("set")
    run_request(cache, TOKENS)
    cache.flush()
    assert cache.stats.storage_backup_failed_tokens == 64
    assert cache.tree.host_evictable_size() == 0  # on device too: not host-evictable, unlocked
    cache.evict(64)
    assert cache.tree.host_evictable_size() == 64  # demoted and host-unlocked
    assert_no_leaks(cache)
    cache.close()


def test_pages_inserted_meanwhile_are_freed_as_duplicates(tmp_path):
    store(tmp_path)
    cache, backend = make_cache(tmp_path, policy="wait_complete")
    assert start_prefetch(cache, "r", TOKENS)
    cache.wait_prefetch("r", 10)
    run_request(cache, TOKENS[:32])  # another request computes the first half meanwhile
    assert cache.check_prefetch_progress("r")
    assert cache.pop_prefetch_loaded_tokens("r") == 32
    assert_no_leaks(cache)
    assert run_request(cache, TOKENS) == 64
    cache.close()


def test_namespaces_never_share_stored_pages(tmp_path):
    cache, _ = make_cache(tmp_path)
    slots = cache.alloc(64)
    cache.cache_finished_req(Req(TOKENS, "tenant-a", kv_indices=slots))
    cache.flush()
    assert cache.stats.storage_backup_tokens == 64
    cache.close()
    cache, _ = make_cache(tmp_path)
    for req_id, extra_key, expected in (
        ("b", "tenant-b", 0),
        ("none", None, 0),
        ("a", "tenant-a", 64),
    ):
        assert start_prefetch(cache, req_id, TOKENS, extra_key)
        cache.wait_prefetch(req_id, 10)
        assert cache.check_prefetch_progress(req_id)
        assert cache.pop_prefetch_loaded_tokens(req_id) == expected, extra_key
    assert cache.match_prefix(TOKENS, "tenant-a").host_hit_length == 64
    assert_no_leaks(cache)
    cache.close()


def test_metrics_report_l3_hits_and_storage_faults(tmp_path):
    store(tmp_path)
    cache, backend = make_cache(tmp_path)
    assert start_prefetch(cache, "r", TOKENS)
    cache.wait_prefetch("r", 10)
    cache.check_prefetch_progress("r")
    values = metrics.as_dict(metrics.collect(cache))
    assert values["hicache_hit_tokens_total{component=full,tier=L3}"] == 64
    assert values["hicache_storage_pages_total{op=read}"] == 16
    assert values["hicache_storage_failures_total{kind=corrupt_pages}"] == 0
    cache.close()


def test_storage_needs_a_host_pool_and_a_state_backend_with_mamba(tmp_path):
    pool = DeviceKVPool(64, 2, 2, 8, torch.float16, "cpu")
    host = HostKVPool(pool, 64, PAGE, "page_first")
    backend = FileStorage(StorageIdentity.from_host_pool(host, "m"), tmp_path)
    with pytest.raises(InvalidArgumentError, match="host pool"):
        HiCache(pool, PAGE, storage_backend=backend)
    mamba = MambaStatePool(4, 2, (3, 2), (2, 2), torch.float32, torch.float32, "cpu")
    mamba_host = MambaHostPool(mamba, 4)
    with pytest.raises(InvalidArgumentError, match="mamba_storage_backend"):
        HiCache(
            pool, PAGE, host, mamba_pool=mamba, mamba_host_pool=mamba_host, storage_backend=backend
        )
    with pytest.raises(InvalidArgumentError, match="mamba_storage_backend"):
        HiCache(pool, PAGE, host, mamba_storage_backend=backend)
    plain = HiCache(pool, PAGE, host)
    assert not plain.prefetch_from_storage("r", 0, TOKENS)
    assert plain.check_prefetch_progress("r") and plain.terminate_prefetch("r") == 0
    plain.close()


def test_kv_events_report_prefetched_pages_as_host_stores(tmp_path):
    from tests.test_events import Rebuilt, tree_contents

    store(tmp_path)
    cache, _ = make_cache(tmp_path, enable_kv_events=True)
    rebuilt = Rebuilt()
    cache.kv_events.subscribe(rebuilt)
    run_request(cache, TOKENS[:24])
    assert start_prefetch(cache, "r", TOKENS)
    cache.wait_prefetch("r", 10)
    assert cache.check_prefetch_progress("r")
    assert cache.pop_prefetch_loaded_tokens("r") == 40
    assert rebuilt.media == tree_contents(cache)
    run_request(cache, TOKENS)
    assert rebuilt.media == tree_contents(cache)
    cache.close()


def test_reset_and_close_end_prefetches_and_storage_backups(tmp_path):
    store(tmp_path)
    cache, backend = make_cache(tmp_path, policy="wait_complete", batch_pages=4)
    run_request(cache, TOKENS[:8])
    backend.get_gate = threading.Event()
    assert start_prefetch(cache, "r", TOKENS)
    assert backend.get_started.wait(10)
    threading.Timer(0.05, backend.get_gate.set).start()  # the get in flight ends after reset began
    cache.reset()
    assert cache.tree.num_nodes() == 0 and not cache._ongoing_prefetch
    assert_no_leaks(cache)
    run_request(cache, torch.arange(300, 340))  # the cache still works, storage backups too
    cache.close()
    cache.close()
    assert_no_leaks(cache)
    assert not cache.prefetch_from_storage("late", 0, TOKENS)


def test_prefetches_in_flight_take_at_most_half_the_host_pool(tmp_path):
    store(tmp_path)
    cache, backend = make_cache(tmp_path, policy="wait_complete", host_slots=96)
    backend.get_gate = threading.Event()
    assert start_prefetch(cache, "a", TOKENS[:40])  # 40 of the 48-token limit
    assert not start_prefetch(cache, "b", TOKENS[:16])  # would exceed SGLang's capacity limit
    backend.get_gate.set()
    cache.wait_prefetch("a", 10)
    assert cache.check_prefetch_progress("a")
    assert start_prefetch(cache, "b", torch.arange(500, 540))  # room again (nothing stored)
    cache.wait_prefetch("b", 10)
    assert cache.check_prefetch_progress("b")
    assert_no_leaks(cache)
    cache.close()
