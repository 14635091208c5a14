"""Random scheduler traffic against HiCache with slot ownership checked after every step.

A hypothesis state machine admits requests (match, lock, alloc), runs chunked prefill steps
(``cache_unfinished_req``), finishes requests (``cache_finished_req``), aborts them (unlock and
free), and evicts. After every step every slot of the pool must be owned exactly once: by the
tree, by the allocator's free list, or by one running request (DESIGN.md invariant 3), and the
KV read back for every cached prefix must be what was written for those tokens.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache.cache import HiCache, Req
from hicache.errors import PoolExhaustedError
from hicache.memory import DeviceKVPool

NUM_SLOTS = 96


def token_kv(tokens: torch.Tensor) -> torch.Tensor:
    """Deterministic KV of tokens: ``[1, n, 1, 1]`` float32 equal to the token id."""
    return tokens.to(torch.float32).view(1, -1, 1, 1)


class CacheTraffic(RuleBasedStateMachine):
    page_size = 4

    def __init__(self) -> None:
        super().__init__()
        pool = DeviceKVPool(NUM_SLOTS, 1, 1, 1, torch.float32, "cpu", kind="mla")
        self.cache = HiCache(pool, page_size=self.page_size)
        self.running: list[Req] = []

    def _write(self, req: Req, start: int) -> None:
        tokens = req.token_ids[start:]
        if len(tokens):
            slots = req.kv_indices[start : len(req.token_ids)]
            self.cache.device_pool.write(slots, token_kv(tokens))

    @rule(
        blocks=st.lists(st.integers(0, 2), min_size=1, max_size=5),
        tail=st.integers(0, 3),
        extra_key=st.sampled_from([None, "t1"]),
    )
    def admit(self, blocks, tail, extra_key):
        ps = self.page_size
        ids = [b * 1000 + i for b in blocks for i in range(ps)] + [9999] * tail
        tokens = torch.tensor(ids, dtype=torch.int32)
        m = self.cache.match_prefix(tokens, extra_key)
        self.cache.inc_lock_ref(m.last_device_node)
        try:
            slots = self.cache.alloc(len(tokens) - m.device_prefix_len)
        except PoolExhaustedError:
            self.cache.dec_lock_ref(m.last_device_node)
            return
        req = Req(
            tokens,
            extra_key,
            torch.cat((m.device_indices, slots)),
            m.last_device_node,
            m.device_prefix_len,
        )
        self._write(req, m.device_prefix_len)
        self.running.append(req)

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 100), extend=st.integers(0, 6))
    def prefill_chunk(self, index, extend):
        """Caches what a request computed so far, then gives it ``extend`` more tokens."""
        req = self.running[index % len(self.running)]
        self.cache.cache_unfinished_req(req)
        if extend:
            have = req.kv_indices.numel()
            need = len(req.token_ids) + extend - have
            try:
                more = self.cache.alloc(max(need, 0))
            except PoolExhaustedError:
                return
            start = len(req.token_ids)
            req.token_ids = torch.cat(
                (
                    req.token_ids,
                    torch.arange(5000 + start, 5000 + start + extend, dtype=torch.int32),
                )
            )
            req.kv_indices = torch.cat((req.kv_indices, more))
            self._write(req, start)

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 100))
    def finish(self, index):
        self.cache.cache_finished_req(self.running.pop(index % len(self.running)))

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 100))
    def abort(self, index):
        req = self.running.pop(index % len(self.running))
        self.cache.dec_lock_ref(req.last_node)
        if req.kv_indices.numel() > req.prefix_len:
            self.cache.free(req.kv_indices[req.prefix_len :])

    @rule(num_tokens=st.integers(0, 40))
    def evict(self, num_tokens):
        before = self.cache.total_size()
        freed = self.cache.evict(num_tokens)
        assert freed % self.page_size == 0
        assert before - self.cache.total_size() == freed

    @invariant()
    def every_slot_owned_exactly_once(self):
        owned = [r.kv_indices[r.prefix_len :] for r in self.running]
        self.cache.check_invariants(
            request_slots=torch.cat(owned) if owned else torch.empty(0, dtype=torch.int64)
        )

    @invariant()
    def cached_kv_is_what_was_written(self):
        for req in self.running:
            aligned = req.prefix_len
            if aligned:
                (kv,) = self.cache.device_pool.read(req.kv_indices[:aligned])
                assert torch.equal(kv, token_kv(req.token_ids[:aligned]))


class CacheTrafficPage1(CacheTraffic):
    page_size = 1


@pytest.mark.parametrize("machine", [CacheTraffic, CacheTrafficPage1], ids=["page4", "page1"])
def test_cache_traffic(machine):
    machine.TestCase().runTest()
