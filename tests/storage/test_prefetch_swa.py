"""SWA (sliding-window) caches with a storage tier: windows stored beside the pages, and a
prefetch that is all-or-nothing (reference §3.11).

A node's host SWA copy is stored page by page under its page hashes in a third backend (the SWA
host pool's identity, kind ``"swa"``). A prefetch is cut back to the deepest stored page whose
window (the ``ceil(window / page)`` pages ending there) has stored SWA pages, reads that window
into host SWA slots with the pages, and inserts them only when everything was read: the window's
nodes then carry host SWA copies, and a load-back brings them to device bit-identical to what the
writer computed. Real file backends in ``tmp_path``. (Two replays in two processes, each window
verified: ``tests/replay/test_replay_storage.py``.)
"""

from __future__ import annotations

import threading

import pytest
import torch

from hicache.cache import HiCache
from hicache.errors import InvalidArgumentError
from hicache.memory import DeviceKVPool, HostKVPool, SWAKVPool
from hicache.storage import FileStorage, StorageIdentity, page_hashes
from hicache.storage.controller import PrefetchConfig, PrefetchOperation, StorageController
from tests.storage.conftest import corrupt_value
from tests.storage.test_prefetch import FaultyFile
from tests.test_cache_concurrency import NO_SLOTS
from tests.test_cache_swa import PAGE, WINDOW, check_hit, serve

TOKENS = torch.arange(1, 41, dtype=torch.int32)  # 10 pages; the window is the last 2


def make_cache(tmp_path, policy: str = "wait_complete") -> HiCache:
    pool = DeviceKVPool(160, 2, 1, 4, torch.float32, "cpu")
    swa = SWAKVPool(96, 1, 1, 4, torch.float32, "cpu", num_full_slots=160, page_size=PAGE)
    host = HostKVPool(pool, 256, PAGE, "page_first")
    swa_host = HostKVPool(swa, 256, PAGE, "page_first")
    return HiCache(
        pool,
        PAGE,
        host,
        "write_through",
        swa_pool=swa,
        swa_host_pool=swa_host,
        sliding_window_size=WINDOW,
        storage_backend=FileStorage(StorageIdentity.from_host_pool(host, "m"), tmp_path),
        prefetch_config=PrefetchConfig(policy, threshold_tokens=8),
        swa_storage_backend=FileStorage(
            StorageIdentity.from_host_pool(swa_host, "m", kind="swa"), tmp_path
        ),
    )


def store(tmp_path, *requests: torch.Tensor) -> None:
    """Serves ``requests`` in a cache over ``tmp_path`` and waits for their storage backups."""
    cache = make_cache(tmp_path)
    for tokens in requests:
        serve(cache, tokens)
    cache.flush()
    assert cache.storage.counters.backup_swa_pages > 0
    cache.close()


def prefetch(cache: HiCache, tokens: torch.Tensor = TOKENS) -> int:
    m = cache.match_prefix(tokens)
    assert cache.prefetch_from_storage("r", m.last_host_node, tokens[m.device_prefix_len :])
    cache.wait_prefetch("r", 10)
    assert cache.check_prefetch_progress("r")
    cache.check_invariants(NO_SLOTS)
    return cache.pop_prefetch_loaded_tokens("r")


def assert_no_leaks(cache: HiCache) -> None:
    cache.check_invariants(NO_SLOTS)  # host and host SWA slots: tree + free, nothing else
    assert not cache._prefetch_host and not cache._prefetch_swa


def swa_keys(tokens: torch.Tensor) -> list[str]:
    return [d.hex() for d in page_hashes(tokens.tolist(), PAGE)]


def test_a_fresh_cache_hits_the_stored_window_bit_identical(tmp_path):
    store(tmp_path, TOKENS)
    cache = make_cache(tmp_path)
    assert prefetch(cache) == 40
    assert cache.storage.counters.prefetch_swa_pages == WINDOW // PAGE
    # Only the window's node has a host SWA copy; the match validates the whole path through it.
    assert cache.tree.swa_host_size() == WINDOW
    m = cache.match_prefix(TOKENS, load_back=True)
    cache.flush()
    assert m.device_prefix_len == 40
    check_hit(cache, TOKENS, m.device_indices)  # Full KV and the SWA window read back intact
    assert_no_leaks(cache)
    cache.close()


def test_the_prefetch_stops_at_the_deepest_stored_window(tmp_path):
    short = TOKENS[:24]
    store(tmp_path, short, TOKENS)  # windows stored at token 24 and at token 40
    backend = FileStorage(
        StorageIdentity.from_host_pool(make_cache(tmp_path).swa_host_pool, "m", kind="swa"),
        tmp_path,
    )
    backend._discard(backend.storage_key(swa_keys(TOKENS)[-1]))  # the last window is gone
    cache = make_cache(tmp_path)
    assert prefetch(cache) == 24
    assert cache.storage.counters.prefetch_swa_cut_pages == 4
    m = cache.match_prefix(TOKENS, load_back=True)
    cache.flush()
    assert m.device_prefix_len == 24
    check_hit(cache, TOKENS, m.device_indices)
    assert_no_leaks(cache)
    cache.close()


def test_a_corrupt_window_page_aborts_the_prefetch_without_leaks(tmp_path):
    store(tmp_path, TOKENS)
    cache = make_cache(tmp_path)
    swa_backend = cache.storage.swa_backend
    corrupt_value(swa_backend, swa_keys(TOKENS)[-1], 40)
    assert prefetch(cache) == 0  # every page was read, the window was not: nothing published
    counters = cache.storage.counters
    assert counters.prefetch_failed_ops == 1 and counters.prefetch_states == 0
    assert swa_backend.stats_snapshot().corrupt_pages == 1
    assert cache.tree.host_total_size() == 0 and cache.tree.swa_host_size() == 0
    assert cache.host_pool.allocator.available_size() == cache.host_pool.num_slots
    assert cache.swa_host_pool.allocator.available_size() == cache.swa_host_pool.num_slots
    assert_no_leaks(cache)
    # The corrupt page was dropped from storage: the next prefetch finds no window and is cut.
    assert prefetch(cache) == 0
    assert counters.prefetch_revoked_ops == 1
    assert_no_leaks(cache)
    cache.close()


def test_an_swa_pool_with_storage_needs_an_swa_backend(tmp_path):
    pool = DeviceKVPool(16, 1, 1, 4, torch.float32, "cpu")
    swa = SWAKVPool(16, 1, 1, 4, torch.float32, "cpu", num_full_slots=16, page_size=PAGE)
    host = HostKVPool(pool, 32, PAGE, "page_first")
    swa_host = HostKVPool(swa, 32, PAGE, "page_first")
    with pytest.raises(InvalidArgumentError, match="swa_storage_backend"):
        HiCache(
            pool,
            PAGE,
            host,
            swa_pool=swa,
            swa_host_pool=swa_host,
            sliding_window_size=WINDOW,
            storage_backend=FileStorage(StorageIdentity.from_host_pool(host, "m"), tmp_path),
        )


def test_best_effort_takes_all_or_nothing_while_the_window_is_read(tmp_path):
    store(tmp_path, TOKENS)
    cache = make_cache(tmp_path, policy="best_effort")
    identity = cache.storage.swa_backend.identity
    gated = cache.storage.swa_backend = FaultyFile(identity, tmp_path)
    gated.get_gate = threading.Event()  # the pages are read, the window's get stalls
    m = cache.match_prefix(TOKENS)
    assert cache.prefetch_from_storage("r", m.last_host_node, TOKENS)
    assert gated.get_started.wait(10)
    assert cache.check_prefetch_progress("r")  # now: the window is in flight, nothing published
    assert cache.pop_prefetch_loaded_tokens("r") == 0
    cache.check_invariants(NO_SLOTS)  # the thread's host and host SWA slots are accounted for
    gated.get_gate.set()
    cache._end_storage_work()  # the thread frees them once its get is done
    assert cache.tree.host_total_size() == 0
    assert_no_leaks(cache)
    assert cache.swa_host_pool.allocator.available_size() == cache.swa_host_pool.num_slots
    cache.close()


class Present:
    """A backend stub whose ``exists`` answers from a set of page indices of ``keys``."""

    def __init__(self, keys: list[str], pages: set[int]) -> None:
        self.stored = {keys[p] for p in pages}

    def exists(self, keys: list[str]) -> int:
        return next((i for i, k in enumerate(keys) if k not in self.stored), len(keys))


@pytest.mark.parametrize(
    ("states", "windows", "expected"),
    [
        ({10}, {8, 9}, 10),  # both at the end
        ({10, 6}, {4, 5, 8}, 6),  # the last window lacks page 9: back to the state at 6
        ({10, 7}, {4, 5, 8, 9}, 10),
        ({7}, {4, 5, 8, 9}, 0),  # the state's window [5, 7) lacks page 6; 6 has no state
        (set(), set(range(10)), 0),  # no state anywhere
        ({3}, {0, 1, 2}, 3),  # the window [1, 3) is stored
        ({2}, {1}, 0),  # the window [0, 2) lacks page 0, and below 2 pages is the threshold
    ],
)
def test_a_swa_mamba_prefetch_is_cut_where_both_a_state_and_its_window_are_stored(
    states, windows, expected
):
    pool = DeviceKVPool(64, 1, 1, 4, torch.float32, "cpu")
    host = HostKVPool(pool, 64, PAGE, "page_first")
    keys = swa_keys(TOKENS)
    controller = StorageController(
        Present(keys, set(range(10))),
        host,
        PAGE,
        PrefetchConfig(threshold_tokens=8),
        lambda *args: None,
        lambda *args: None,
    )
    try:
        controller.state_backend = Present(keys, {p - 1 for p in states})  # stored at page ends
        controller.swa_backend = Present(keys, windows)
        op = PrefetchOperation("r", 0, TOKENS.to(torch.int64), None, None, PAGE, True, 2)
        op.keys = keys
        assert controller._deepest_usable(op, 10) == expected
        assert controller.counters.prefetch_swa_cut_pages == 10 - expected
    finally:
        controller.close()
