"""Random traffic through a HiCache with a storage tier, its threads running concurrently.

A hypothesis state machine serves requests (prefetch from storage, load back, verify the hit KV,
compute the rest, cache), leaves prefetches in flight while other requests run, ends them by
policy or aborts them, evicts device and host KV, applies acks, and turns backend failures on
and off (every operation raising, or ``get`` stalling so prefetches are cut mid-batch). The host
pool is small, so pages go to storage, fall out of the host tier and come back through
prefetches. After every step: the tree's invariants, and every host slot owned exactly once by the
tree, the free list or one prefetch in flight; every hit's KV equals what was written. At the end
(close): nothing in flight, no host slot leaked.
"""

from __future__ import annotations

import threading

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache.cache import HiCache
from hicache.memory import DeviceKVPool, HostKVPool
from hicache.replay.runner import expected_kv
from hicache.storage import PrefetchConfig, StorageIdentity, page_hashes
from tests.regressions.helpers import NO_REQUEST_SLOTS, run_request
from tests.storage.test_prefetch import FaultyFile

PAGE = 4
BLOCKS = 4  # distinct page-sized blocks keys are made of


def key_tokens(blocks: list[int]) -> torch.Tensor:
    """Tokens of a key; a token id depends on its whole prefix (a wrong page never passes)."""
    ids = []
    for k in range(len(blocks)):
        h = hash(tuple(blocks[: k + 1])) & 0xFFFF
        ids += [h * PAGE + i for i in range(PAGE)]
    return torch.tensor(ids, dtype=torch.int64)


class StorageTraffic(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        pool = DeviceKVPool(64, 2, 2, 8, torch.float16, "cpu")
        host = HostKVPool(pool, 64, PAGE, "page_first")  # prefetch limit: 32 tokens
        self.backend = FaultyFile(StorageIdentity.from_host_pool(host, "m"), self.dir.name)
        self.cache = HiCache(
            pool,
            PAGE,
            host,
            "write_through",
            storage_backend=self.backend,
            prefetch_config=PrefetchConfig("timeout", 8, timeout_base_s=0.05),
        )
        self.cache.storage.batch_pages = 2
        self.in_flight: dict[int, torch.Tensor] = {}  # req id -> tokens
        self.next_id = 0

    blocks_st = st.lists(st.integers(0, BLOCKS - 1), min_size=2, max_size=8)

    def _start(self, tokens: torch.Tensor) -> int | None:
        m = self.cache.match_prefix(tokens)
        matched = m.device_prefix_len + m.host_hit_length
        req_id, self.next_id = self.next_id, self.next_id + 1
        if self.cache.prefetch_from_storage(req_id, m.last_host_node, tokens[matched:]):
            self.in_flight[req_id] = tokens
            return req_id
        return None

    def _serve(self, tokens: torch.Tensor) -> None:
        run_request(self.cache, tokens)  # verifies the KV of every hit, L3 ones included

    @rule(blocks=blocks_st, wait=st.booleans())
    def request(self, blocks: list[int], wait: bool) -> None:
        tokens = key_tokens(blocks)
        req_id = self._start(tokens)
        if req_id is not None:
            if wait:
                self.cache.wait_prefetch(req_id, 5)
            self.cache.terminate_prefetch(req_id)
            del self.in_flight[req_id]
        self._serve(tokens)

    @rule(blocks=blocks_st)
    def serve_evict_and_serve_again(self, blocks: list[int]) -> None:
        # Stored, pushed out of both upper tiers, then served again: from storage (L3).
        tokens = key_tokens(blocks)
        self._serve(tokens)
        self.cache.evict(self.cache.device_pool.num_slots)
        self.cache.evict_host(self.cache.host_pool.num_slots)
        before = self.cache.stats.storage_hit_tokens
        healthy = not self.backend.fail and self.backend.get_gate is None
        stored = 0
        if healthy:  # the leading pages in storage (a backup skipped for want of host room is not)
            stored = self.backend.exists([d.hex() for d in page_hashes(tokens.numpy(), PAGE)])
        req_id = self._start(tokens)
        if req_id is not None:
            self.cache.wait_prefetch(req_id, 5)
            self.cache.terminate_prefetch(req_id)
            del self.in_flight[req_id]
        if healthy and not self.in_flight:  # nothing else holds host room or the path
            expected = stored * PAGE if stored * PAGE >= 8 else 0
            assert self.cache.stats.storage_hit_tokens - before == expected
        self._serve(tokens)

    @rule(blocks=blocks_st)
    def start_prefetch(self, blocks: list[int]) -> None:
        self._start(key_tokens(blocks))

    @precondition(lambda self: self.in_flight)
    @rule(index=st.integers(0, 1 << 10), abort=st.booleans())
    def finish_prefetch(self, index: int, abort: bool) -> None:
        req_id = sorted(self.in_flight)[index % len(self.in_flight)]
        tokens = self.in_flight.pop(req_id)
        if abort:
            self.cache.terminate_prefetch(req_id)
            return
        while not self.cache.check_prefetch_progress(req_id):  # the timeout policy
            self.cache.wait_prefetch(req_id, 0.01)
        m = self.cache.match_prefix(tokens, load_back=True)
        self.cache.flush()
        self._check_hit(tokens, m.device_indices)

    def _check_hit(self, tokens: torch.Tensor, device_indices: torch.Tensor) -> None:
        """The hit's KV is the KV written for its tokens."""
        pool = self.cache.device_pool
        got, want = pool.read(device_indices), expected_kv(tokens[: device_indices.numel()], pool)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))

    @rule(num_tokens=st.integers(0, 48))
    def evict(self, num_tokens: int) -> None:
        self.cache.evict(num_tokens)

    @rule(num_tokens=st.integers(0, 48))
    def evict_host(self, num_tokens: int) -> None:
        self.cache.evict_host(num_tokens)

    @rule()
    def acks(self) -> None:
        self.cache.check_hicache_events()

    @rule(
        ops=st.sampled_from([(), (), ("exists",), ("get",), ("set",), ("exists", "get", "set")]),
        stall=st.booleans(),
    )
    def faults(self, ops: tuple[str, ...], stall: bool) -> None:
        self.backend.fail = set(ops)
        if stall and self.backend.get_gate is None:
            self.backend.get_gate = threading.Event()
            threading.Timer(0.05, self.backend.get_gate.set).start()  # a slow backend
        elif not stall:
            self.backend.get_gate = None

    @invariant()
    def slots_owned_once(self) -> None:
        self.cache.check_invariants(request_slots=NO_REQUEST_SLOTS)

    def teardown(self) -> None:
        self.backend.fail = set()
        if self.backend.get_gate is not None:
            self.backend.get_gate.set()
        self.cache.close()
        cache = self.cache
        assert not cache._prefetch_host and not cache._ongoing_prefetch
        assert not cache._storage_backups
        cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
        host = cache.host_pool
        assert host.allocator.available_size() + cache.tree.host_total_size() == host.num_slots
        self.dir.cleanup()


def test_storage_traffic() -> None:
    case = StorageTraffic.TestCase
    case.settings = settings(settings(), max_examples=40, stateful_step_count=30, deadline=None)
    case().runTest()
