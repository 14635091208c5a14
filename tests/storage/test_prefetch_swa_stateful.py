"""Random traffic through an SWA cache with a storage tier, its threads running concurrently.

``StorageTraffic`` (``test_prefetch_stateful.py``) on a cache with a sliding-window pool: every
request writes both pools and drops the SWA KV that left its window; host windows go to the SWA
backend with their pages; prefetches are all-or-nothing (the window's SWA pages with the KV). The
faults hit both backends. After every step: the tree's invariants and every host and host SWA slot
owned exactly once (tree, free list, or one prefetch in flight); every hit's KV and the SWA KV of
its last window equal what was written. At the end: no host or host SWA slot leaked.
"""

from __future__ import annotations

import threading

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from hicache.cache import HiCache
from hicache.memory import DeviceKVPool, HostKVPool, SWAKVPool
from hicache.storage import PrefetchConfig, StorageIdentity
from tests.storage.test_prefetch import FaultyFile
from tests.storage.test_prefetch_stateful import PAGE, StorageTraffic, key_tokens
from tests.test_cache_swa import WINDOW, check_hit, serve


class SwaStorageTraffic(StorageTraffic):
    def __init__(self) -> None:  # noqa: D107 (a test machine)
        super().__init__()
        self.cache.close()
        pool = DeviceKVPool(96, 2, 1, 4, torch.float32, "cpu")
        swa = SWAKVPool(64, 1, 1, 4, torch.float32, "cpu", num_full_slots=96, page_size=PAGE)
        host = HostKVPool(pool, 64, PAGE, "page_first")  # prefetch limit: 32 tokens
        swa_host = HostKVPool(swa, 64, PAGE, "page_first")
        self.backend = FaultyFile(StorageIdentity.from_host_pool(host, "m"), self.dir.name)
        self.swa_backend = FaultyFile(
            StorageIdentity.from_host_pool(swa_host, "m", kind="swa"), self.dir.name
        )
        self.cache = HiCache(
            pool,
            PAGE,
            host,
            "write_through",
            swa_pool=swa,
            swa_host_pool=swa_host,
            sliding_window_size=WINDOW,
            storage_backend=self.backend,
            prefetch_config=PrefetchConfig("timeout", 8, timeout_base_s=0.05),
            swa_storage_backend=self.swa_backend,
        )
        self.cache.storage.batch_pages = 2

    def _serve(self, tokens: torch.Tensor) -> None:
        serve(self.cache, tokens)  # verifies the KV and the window of every hit, L3 ones included
        self.cache.flush()  # its backups acked: its pages and window queued for storage

    @rule(blocks=StorageTraffic.blocks_st)
    def serve_evict_and_serve_again(self, blocks: list[int]) -> None:
        # Stored, pushed out of both upper tiers, then served again (from L3 where a window is).
        tokens = key_tokens(blocks)
        self._serve(tokens)
        self.cache.evict(self.cache.device_pool.num_slots)
        self.cache.evict_host(self.cache.host_pool.num_slots)
        req_id = self._start(tokens)
        if req_id is not None:
            self.cache.wait_prefetch(req_id, 5)
            self.cache.terminate_prefetch(req_id)
            del self.in_flight[req_id]
        self._serve(tokens)

    def _check_hit(self, tokens: torch.Tensor, device_indices: torch.Tensor) -> None:
        """The hit's KV and the SWA KV of its last window are those written for its tokens."""
        check_hit(self.cache, tokens, device_indices)

    @rule(
        ops=st.sampled_from([(), (), ("exists",), ("get",), ("set",), ("exists", "get", "set")]),
        stall=st.booleans(),
        swa_only=st.booleans(),
    )
    def faults(self, ops: tuple[str, ...], stall: bool, swa_only: bool) -> None:
        """The same faults on both backends, or on the SWA backend only (windows fail)."""
        self.backend.fail = set() if swa_only else set(ops)
        self.swa_backend.fail = set(ops)
        for backend in (self.swa_backend,) if swa_only else (self.backend, self.swa_backend):
            if stall and backend.get_gate is None:
                backend.get_gate = threading.Event()
                threading.Timer(0.05, backend.get_gate.set).start()  # a slow backend
            elif not stall:
                backend.get_gate = None

    def teardown(self) -> None:
        """Ends everything; no host or host SWA slot leaked."""
        self.swa_backend.fail = set()
        if self.swa_backend.get_gate is not None:
            self.swa_backend.get_gate.set()
        super().teardown()
        cache = self.cache
        assert not cache._prefetch_swa
        swa_host = cache.swa_host_pool
        held = cache.tree.swa_host_size()
        assert swa_host.allocator.available_size() + held == swa_host.num_slots


def test_swa_storage_traffic() -> None:
    case = SwaStorageTraffic.TestCase
    case.settings = settings(settings(), max_examples=30, stateful_step_count=30, deadline=None)
    case().runTest()
