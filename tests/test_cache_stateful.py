"""Random scheduler traffic against HiCache with slot ownership checked after every step.

A hypothesis state machine admits requests (match, load back host hits, lock, alloc), runs chunked
prefill steps (``cache_unfinished_req``), finishes requests (``cache_finished_req``), aborts them
(unlock and free), and evicts. With a host tier (every write policy) it also applies transfer acks
at random times (``check_hicache_events``), flushes, and evicts host KV, while the controller's
worker threads copy concurrently. After every step every device slot must be owned exactly once:
by the tree, by the allocator's free list, or by one running request, and every host slot by the
tree or the host free list (DESIGN.md invariant 3); the KV read back for every running request's
cached prefix (loaded-back parts included) must be what was written for those tokens.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache.cache import HiCache, Req
from hicache.errors import PoolExhaustedError
from hicache.memory import DeviceKVPool, HostKVPool

NUM_SLOTS = 96
NUM_LAYERS = 2


def token_kv(tokens: torch.Tensor) -> torch.Tensor:
    """Deterministic KV of tokens: ``[layers, n, 1, 1]`` float32, ``4 * token + layer``."""
    layers = torch.arange(NUM_LAYERS, dtype=torch.float32).view(-1, 1, 1, 1)
    return tokens.to(torch.float32).view(1, -1, 1, 1) * 4 + layers


def prefix_tokens(blocks: list[int], page_size: int) -> list[int]:
    """Token ids of a key made of page-sized blocks; a token's id depends on its whole prefix, so
    KV read from a slot of another prefix never passes for the right one."""
    ids = []
    for k in range(len(blocks)):
        h = hash(tuple(blocks[: k + 1])) & 0xFFFF
        ids += [h * page_size + i for i in range(page_size)]
    return ids


class CacheTraffic(RuleBasedStateMachine):
    page_size = 4
    host_slots = 0  # no host tier
    write_policy = "write_through"

    def __init__(self) -> None:
        super().__init__()
        pool = DeviceKVPool(NUM_SLOTS, NUM_LAYERS, 1, 1, torch.float32, "cpu", kind="mla")
        host = HostKVPool(pool, self.host_slots, self.page_size) if self.host_slots else None
        self.cache = HiCache(pool, self.page_size, host, self.write_policy)
        self.running: list[Req] = []
        self.finished: list[tuple[torch.Tensor, str | None]] = []

    def teardown(self) -> None:
        self.cache.close()

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
        ids = prefix_tokens(blocks, self.page_size) + [9999] * tail
        self._admit(torch.tensor(ids, dtype=torch.int32), extra_key)

    @precondition(lambda self: self.finished)
    @rule(index=st.integers(0, 100))
    def readmit(self, index):
        """A finished request's prompt comes back (a new turn): the case host hits are made of."""
        self._admit(*self.finished[index % len(self.finished)])

    def _admit(self, tokens, extra_key):
        m = self.cache.match_prefix(tokens, extra_key, load_back=True)
        # The forward pass of this batch: start its loads, each layer waits for its own.
        consumer = self.cache.ready_to_load_host_cache()
        for layer in range(NUM_LAYERS):
            self.cache.wait_until_layer_ready(layer, consumer)
        receipt = self.cache.inc_lock_ref(m.last_device_node)
        try:
            slots = self.cache.alloc(len(tokens) - m.device_prefix_len)
        except PoolExhaustedError:
            self.cache.dec_lock_ref(receipt.node_id)
            return
        req = Req(
            tokens,
            extra_key,
            torch.cat((m.device_indices, slots)),
            receipt.node_id,
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
        req = self.running.pop(index % len(self.running))
        self.finished.append((req.token_ids, req.extra_key))
        self.cache.cache_finished_req(req)

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

    @rule(block=st.booleans())
    def check_hicache_events(self, block):
        self.cache.check_hicache_events(block=block)

    @rule()
    def flush(self):
        self.cache.flush()
        if self.cache.controller is not None:
            assert self.cache.controller.num_pending_writes() == 0
            assert self.cache.controller.num_pending_loads() == 0

    @rule(num_tokens=st.integers(0, 40))
    def evict_host(self, num_tokens):
        before = self.cache.tree.host_total_size()
        freed = self.cache.evict_host(num_tokens)
        assert freed % self.page_size == 0
        assert before - self.cache.tree.host_total_size() == freed

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


def _host_machine(policy: str, page_size: int, host_slots: int) -> type[CacheTraffic]:
    name = f"HostCacheTraffic_{policy}_page{page_size}"
    attrs = {"page_size": page_size, "host_slots": host_slots, "write_policy": policy}
    return type(name, (CacheTraffic,), attrs)


@pytest.mark.parametrize("machine", [CacheTraffic, CacheTrafficPage1], ids=["page4", "page1"])
def test_cache_traffic(machine):
    machine.TestCase().runTest()


@pytest.mark.parametrize(
    ("policy", "page_size", "host_slots"),
    [
        ("write_through", 4, 48),
        ("write_through", 1, 192),
        ("write_through_selective", 4, 192),
        ("write_back", 4, 48),
        ("write_back", 1, 192),
    ],
)
def test_cache_traffic_with_host_tier(policy, page_size, host_slots):
    _host_machine(policy, page_size, host_slots).TestCase().runTest()
