"""HiCache: allocation with eviction, the request helpers, and slot ownership."""

from __future__ import annotations

import pytest
import torch

from hicache.cache import HiCache, Req
from hicache.errors import InvalidArgumentError, InvariantError, PoolExhaustedError
from hicache.memory import DeviceKVPool

PAGE = 4
NO_SLOTS = torch.empty(0, dtype=torch.int64)


def make_cache(num_slots: int = 64) -> HiCache:
    return HiCache(DeviceKVPool(num_slots, 1, 1, 2, torch.float32, "cpu"), page_size=PAGE)


def start(cache: HiCache, tokens: torch.Tensor) -> Req:
    """A request admitted the way a scheduler does it: match, lock, allocate the rest."""
    m = cache.match_prefix(tokens)
    cache.inc_lock_ref(m.last_device_node)
    slots = cache.alloc(len(tokens) - m.device_prefix_len)
    return Req(
        tokens,
        kv_indices=torch.cat((m.device_indices, slots)),
        last_node=m.last_device_node,
        prefix_len=m.device_prefix_len,
    )


def owned_by(req: Req) -> torch.Tensor:
    return req.kv_indices[req.prefix_len :]


def test_finished_request_is_cached_and_releases_everything():
    cache = make_cache()
    req = start(cache, torch.arange(10, dtype=torch.int32))
    assert req.kv_indices.numel() == 12  # whole pages
    cache.check_invariants(request_slots=owned_by(req))
    result = cache.cache_finished_req(req)
    assert result.prefix_len == 0
    assert cache.total_size() == 8 and cache.protected_size() == 0
    assert cache.available_size() == 64 - 8  # the unaligned tail page went back
    cache.check_invariants(request_slots=NO_SLOTS)
    assert req.kv_indices.numel() == 0 and req.last_node == 0


def test_second_request_reuses_prefix_and_frees_duplicates():
    cache = make_cache()
    cache.cache_finished_req(start(cache, torch.arange(8, dtype=torch.int32)))
    first_slots = cache.match_prefix(torch.arange(8, dtype=torch.int32)).device_indices
    # A request that computed the same 8 tokens itself (no match used) plus 4 new ones.
    dup = Req(torch.arange(12, dtype=torch.int32), kv_indices=cache.alloc(12))
    cache.cache_finished_req(dup)
    assert torch.equal(
        cache.match_prefix(torch.arange(12, dtype=torch.int32)).device_indices[:8], first_slots
    )
    assert cache.total_size() == 12
    cache.check_invariants(request_slots=NO_SLOTS)


def test_unfinished_request_keeps_its_lock_and_tail():
    cache = make_cache()
    req = start(cache, torch.arange(6, dtype=torch.int32))
    cache.cache_unfinished_req(req)
    assert req.prefix_len == 4 and cache.protected_size() == 4
    assert torch.equal(req.kv_indices[:4], cache.match_prefix(torch.arange(4)).device_indices)
    cache.check_invariants(request_slots=owned_by(req))
    # The next chunk: 6 more tokens.
    req.token_ids = torch.arange(12, dtype=torch.int32)
    req.kv_indices = torch.cat((req.kv_indices, cache.alloc(4)))
    cache.cache_unfinished_req(req)
    assert req.prefix_len == 12 and cache.protected_size() == 12
    assert cache.evict(64) == 0  # everything the request uses is locked
    cache.cache_finished_req(req)
    assert cache.protected_size() == 0 and cache.total_size() == 12
    cache.check_invariants(request_slots=NO_SLOTS)


def test_alloc_evicts_lru_pages_when_the_pool_is_full():
    cache = make_cache(16)
    cache.cache_finished_req(start(cache, torch.arange(8, dtype=torch.int32)))
    cache.cache_finished_req(start(cache, torch.arange(100, 108, dtype=torch.int32)))
    assert cache.available_size() == 0
    slots = cache.alloc(4)  # evicts the deepest page of the older request
    assert slots.numel() == 4 and cache.num_evicted_tokens == 4
    assert cache.match_prefix(torch.arange(8, dtype=torch.int32)).device_prefix_len == 4
    assert cache.match_prefix(torch.arange(100, 108, dtype=torch.int32)).device_prefix_len == 8
    cache.check_invariants(request_slots=slots)


def test_alloc_that_cannot_fit_changes_nothing():
    cache = make_cache(16)
    req = start(cache, torch.arange(8, dtype=torch.int32))
    cache.cache_unfinished_req(req)  # 8 tokens locked
    cache.cache_finished_req(start(cache, torch.arange(50, 54, dtype=torch.int32)))
    before = (cache.available_size(), cache.total_size(), cache.evictable_size())
    with pytest.raises(PoolExhaustedError, match="locked by running requests"):
        cache.alloc(12)
    assert (cache.available_size(), cache.total_size(), cache.evictable_size()) == before
    cache.check_invariants(request_slots=owned_by(req))


def test_bad_requests_are_rejected_before_anything_changes():
    cache = make_cache()
    req = start(cache, torch.arange(8, dtype=torch.int32))
    short = Req(req.token_ids, kv_indices=req.kv_indices[:4])
    with pytest.raises(InvalidArgumentError, match="whole pages"):
        cache.cache_finished_req(short)
    wrong_dtype = Req(req.token_ids, kv_indices=req.kv_indices.to(torch.int32))
    with pytest.raises(InvalidArgumentError, match="int64"):
        cache.cache_finished_req(wrong_dtype)
    with pytest.raises(InvalidArgumentError):
        cache.alloc(-1)
    assert cache.total_size() == 0
    cache.check_invariants(request_slots=req.kv_indices)


def test_ownership_check_catches_a_leaked_slot():
    cache = make_cache()
    req = start(cache, torch.arange(8, dtype=torch.int32))
    with pytest.raises(InvariantError, match="owned by nobody"):
        cache.check_invariants(request_slots=req.kv_indices[:4])  # "forgot" a page


def test_reset_frees_everything_but_refuses_while_locked():
    cache = make_cache()
    req = start(cache, torch.arange(8, dtype=torch.int32))
    cache.cache_unfinished_req(req)
    with pytest.raises(InvalidArgumentError, match="locked"):
        cache.reset()
    cache.cache_finished_req(req)
    cache.reset()
    assert cache.total_size() == 0 and cache.available_size() == 64
    cache.check_invariants(request_slots=NO_SLOTS)
