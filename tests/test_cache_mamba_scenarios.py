"""SGLang's hybrid (Full + Mamba) radix-cache unit scenarios, ported to ``HiCache``.

The tree-level scenarios (matches, evictions, locks) are in
``tests/tree/test_sglang_mamba_scenarios.py``, whose module docstring lists the deliberate
differences, the skipped SGLang tests and the pending SWA cases. This file ports the scenarios
that need a cache: copy-on-write of states, request bookkeeping (what a finished request frees,
SGLang's ``prev_prefix_len``), interior checkpoints, allocation under state pressure and KV
events. Every test checks slot ownership after every request (``HiCache.check_invariants`` with
the slots still held by requests: the device pool, the state pool and the tree partition
exactly, so nothing leaks and nothing is owned twice).

How SGLang's inputs map to hicache's:

- an ``insert(key, value, mamba_value, prev_prefix_len)`` of a finished request is
  ``cache_finished_req(Req(token_ids, kv_indices, prefix_len=prev_prefix_len,
  mamba_checkpoints=[(len, slot)]))``: the cache frees the duplicates ``kv[prev:prefix_len]``,
  the slots the tree did not take and the checkpoint slots the tree did not take;
- ``prev_prefix_len > 0`` means the request holds the tree's slots for that prefix under a lock
  (hicache's ``Req`` contract); SGLang's fixtures pass freshly allocated slots there, which its
  allocator arithmetic counts as consumed. The ports give the request the tree's slots and lock,
  so the arithmetic differs by those slots and says so;
- SGLang's interior checkpoint (``_insert_interior_checkpoint``, no_buffer mode) is one more
  entry in ``Req.mamba_checkpoints``;
- SGLang's ``match_prefix(..., cow_mamba=True)`` is ``HiCache.fork_mamba(last_device_node)``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hicache.cache import HiCache, Req
from hicache.errors import InvalidArgumentError
from hicache.events import BlockRemoved, BlockStored, Medium
from hicache.memory import DeviceKVPool, MambaStatePool
from hicache.results import InsertResult, MatchResult
from tests.test_cache_mamba import state_of, write_state

CHUNK = 64  # SGLang's FLA chunk: where test_mamba_radix_cache_match.py checkpoints
NO_SLOTS = torch.empty(0, dtype=torch.int64)
PAGE_SIZES = pytest.mark.parametrize("page_size", [1, 4])


def make_cache(
    page_size: int = 1, num_states: int = 8, num_slots: int = 512, events: bool = False
) -> HiCache:
    pool = DeviceKVPool(num_slots, 1, 1, 4, torch.float16, "cpu")
    states = MambaStatePool(num_states, 2, (3, 2), (2, 2), torch.float32, torch.float32, "cpu")
    return HiCache(pool, page_size, mamba_pool=states, enable_kv_events=events)


def key(tokens: list[int]) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.int64)


def finish(
    cache: HiCache,
    tokens: list[int],
    checkpoints: tuple[int, ...] = (),
    reuse: bool = True,
) -> tuple[MatchResult, InsertResult]:
    """Serves one request to the end and caches it; returns (its match, the insert).

    ``reuse``: the request continues from its match (locks it, copies its state, holds the
    tree's slots, prefix_len = the hit); else it computes everything from scratch (SGLang's
    ``prev_prefix_len=0``: every cached slot it brings is a duplicate). Each checkpoint
    ``(num_tokens)`` gets a state slot holding ``float(num_tokens)``.
    """
    m = cache.match_prefix(key(tokens))
    hit = m.device_prefix_len if reuse else 0
    receipt = cache.inc_lock_ref(m.last_device_node if reuse else 0)
    working = cache.fork_mamba(receipt.node_id)
    kv = torch.cat((m.device_indices[:hit], cache.alloc(len(tokens) - hit)))
    published = []
    for num_tokens in checkpoints:
        slot = int(cache.alloc_mamba(1)[0])
        write_state(cache, slot, float(num_tokens))
        published.append((num_tokens, slot))
    cache.free_mamba(torch.tensor([working]))
    req = Req(
        key(tokens),
        kv_indices=kv,
        last_node=receipt.node_id,
        prefix_len=hit,
        mamba_node_id=receipt.mamba_node_id,
        mamba_checkpoints=published,
    )
    result = cache.cache_finished_req(req)
    cache.check_invariants(NO_SLOTS, NO_SLOTS)
    return m, result


# --- copy-on-write --------------------------------------------------------------------------


@PAGE_SIZES
def test_mamba_cow_on_match(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_mamba_cow_on_match``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py)
    and the copy-on-write step (req9) of ``TestMamba.test_mamba_radix_cache_1``
    (test/registered/unit/mem_cache/test_mamba_unittest.py).

    A 2-page sequence with its state; a second request matches it whole and gets its own slot
    holding a copy of the node's state (conv and temporal): SGLang's CoW source/destination.
    hicache copies at once (SGLang defers the copy to the forward stream); the copy is then the
    request's to advance, and the node's state stays as it was.

    Also SGLang's CoW allocation when the pool is exhausted (``finalize_match_result_in_cache``,
    reference §3.1: lock the matched node, evict one state, unlock, retry): with no free state
    and the source as the least recently used one, the fork evicts another state, never its
    source.
    """
    cache = make_cache(page_size, num_states=3)
    seq = list(range(1, 1 + 2 * page_size))
    finish(cache, seq, (len(seq),))
    m = cache.match_prefix(key(seq))
    assert m.device_prefix_len == len(seq)
    source = cache.tree.node_info(m.last_device_node).mamba_value
    receipt = cache.inc_lock_ref(m.last_device_node)
    copy = cache.fork_mamba(m.last_device_node)
    assert copy != source
    assert torch.equal(state_of(cache, copy), state_of(cache, source))
    write_state(cache, copy, 9.0)  # the request advances its copy in place
    assert float(state_of(cache, source)[0]) == float(len(seq))
    cache.check_invariants(NO_SLOTS, torch.tensor([copy]))
    cache.free_mamba(torch.tensor([copy]))
    cache.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)

    other = list(range(500, 500 + 2 * page_size))
    finish(cache, other, (len(other),))
    held = cache.alloc_mamba(1)  # a running request's state: the pool is now full
    assert cache.mamba_pool.available_size() == 0
    cache.match_prefix(key(seq))
    cache.match_prefix(key(other))  # seq's state is the least recently used
    node = cache.match_prefix(key(seq)).last_device_node
    cache.match_prefix(key(other))
    copy = cache.fork_mamba(node)
    assert cache.stats.mamba_evicted_states == 1
    cache.check_invariants(NO_SLOTS, torch.cat((held, torch.tensor([copy]))))
    assert cache.match_prefix(key(other)).device_prefix_len == 0  # the victim
    assert torch.equal(state_of(cache, copy), state_of(cache, source))
    cache.check_invariants(NO_SLOTS, torch.cat((held, torch.tensor([copy]))))
    cache.free_mamba(torch.cat((held, torch.tensor([copy]))))


# --- request bookkeeping --------------------------------------------------------------------


def test_insert_prev_prefix_len():
    """Ports ``TestMamba.test_insert_prev_prefix_len`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_unittest.py).

    [1,2,3]; [1..7] with prev_prefix_len 0 (prefix_len 3: the 3 duplicates are freed, net -4);
    [1..8] with prev_prefix_len 2 (prefix_len 7 across two nodes: [2:7] freed, 1 slot stored);
    [1..9] with prev_prefix_len 8 (prefix_len 8: nothing freed, 1 stored).

    Adapted (module docstring): the request's first ``prev_prefix_len`` slots are the tree's,
    held under a lock (for 2, on the node a split at 2 creates; 8 is a real match: the [1..8]
    request published its state there). So the net changes are -4, -1 and -1 where SGLang's
    fixture, whose protected prefix is freshly allocated, counts -4, -3 and -9. Slot ownership
    is checked exactly after every step.
    """
    cache = make_cache()
    available = cache.available_size()
    finish(cache, [1, 2, 3], (3,), reuse=False)
    assert cache.available_size() == available - 3
    _, r = finish(cache, [1, 2, 3, 4, 5, 6, 7], (7,), reuse=False)
    assert r.prefix_len == 3 and cache.available_size() == available - 7

    available = cache.available_size()
    first = cache.match_prefix(key([1, 2, 3]))
    cache.match_prefix(key([1, 2, 99]))  # splits [1,2,3]: a node now ends at 2
    split = cache.tree.node_info(first.last_device_node).parent_id
    assert cache.tree.node_key(split) == [1, 2]
    receipt = cache.inc_lock_ref(split)
    kv = torch.cat((first.device_indices[:2], cache.alloc(6)))
    state = int(cache.alloc_mamba(1)[0])
    req = Req(
        key([1, 2, 3, 4, 5, 6, 7, 8]),
        kv_indices=kv,
        last_node=receipt.node_id,
        prefix_len=2,
        mamba_node_id=receipt.mamba_node_id,
        mamba_checkpoints=[(8, state)],
    )
    r = cache.cache_finished_req(req)
    assert (r.prefix_len, r.cached_len) == (7, 8)
    assert cache.available_size() == available - 1  # 6 allocated, 5 duplicates freed
    cache.check_invariants(NO_SLOTS, NO_SLOTS)

    available = cache.available_size()
    m, r = finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9], (9,))
    assert m.device_prefix_len == 8 and r.prefix_len == 8
    assert cache.available_size() == available - 1


@PAGE_SIZES
def test_prev_prefix_len(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_prev_prefix_len`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    1 page; 2 pages with prev_prefix_len 0 (prefix_len 1 page, the tree adopts [1p, 2p), net
    -1 page); 3 pages with prev_prefix_len 2 pages (prefix_len 2 pages, adopted [2p, 3p), nothing
    freed). hicache's adopted range is ``[prefix_len, cached_len)``.

    Adapted (module docstring): the 2-page prefix is a real match (its state was published),
    so the request allocates only its third page: net -1 page where SGLang's fixture, which
    allocates all 3 pages fresh, counts -3.
    """
    cache = make_cache(page_size)
    p = page_size
    seq = list(range(1, 1 + 3 * p))
    available = cache.available_size()
    finish(cache, seq[:p], (p,), reuse=False)
    assert cache.available_size() == available - p
    _, r = finish(cache, seq[: 2 * p], (2 * p,), reuse=False)
    assert (r.prefix_len, r.cached_len) == (p, 2 * p)
    assert cache.available_size() == available - 2 * p
    m, r = finish(cache, seq, (3 * p,))
    assert m.device_prefix_len == 2 * p
    assert (r.prefix_len, r.cached_len) == (2 * p, 3 * p)
    assert cache.available_size() == available - 3 * p


@PAGE_SIZES
def test_cache_finished_req_insert(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_cache_finished_req_insert`` on its Mamba configs
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    A finished request of 3 prompt pages and 1 output page, its state tracked to the end
    (SGLang: ``mamba_last_track_seqlen = kv_len``): the whole aligned sequence matches afterwards.
    Same expectation. (SGLang's prompt/output node split check runs on Full-only configs.)
    """
    cache = make_cache(page_size)
    tokens = list(range(1, 1 + 3 * page_size)) + list(range(2000, 2000 + page_size))
    finish(cache, tokens, (len(tokens),), reuse=False)
    assert cache.match_prefix(key(tokens)).device_prefix_len == len(tokens)


def test_paged_cache_finished_unaligned_tail_freed():
    """Ports ``UnifiedRadixCacheSuite.test_paged_cache_finished_unaligned_tail_freed`` on its
    FULL_MAMBA page_size 4 config (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    1 page + 2 tokens: the aligned page is cached (with its state) and matches; the tail is
    freed. Adapted: hicache allocates whole pages, so the request held 8 slots and gets the
    whole last page back (4 slots: the 2 tail tokens and 2 never used), where SGLang's token
    allocator frees the 2 tail slots.
    """
    cache = make_cache(page_size=4)
    tokens = [1, 2, 3, 4, 8000, 8001]
    kv = cache.alloc(len(tokens))
    assert kv.numel() == 8
    state = int(cache.alloc_mamba(1)[0])
    available = cache.available_size()
    cache.cache_finished_req(Req(key(tokens), kv_indices=kv, mamba_checkpoints=[(4, state)]))
    cache.check_invariants(NO_SLOTS, NO_SLOTS)
    assert cache.available_size() == available + 4
    assert cache.match_prefix(key(tokens[:4])).device_prefix_len == 4


# --- interior checkpoints (test_mamba_radix_cache_match.py) ---------------------------------


def test_interior_checkpoint_lets_the_n_minus_1_lookup_reuse():
    """Ports ``TestMambaRadixCacheInteriorCheckpoint.test_interior_checkpoint_lets_the_n_minus_1_
    lookup_reuse`` and ``test_main_insert_prev_prefix_len_keeps_the_interior_node_kv``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_mamba_radix_cache_match.py; SGLang
    issue #22935).

    A 2-chunk request tracks a state at the chunk boundary and at its end: the fresh prefill
    lookup of the same prompt (n - 1 tokens) reuses one chunk instead of 0, and the interior
    node keeps its KV (no double free: the pools and the tree partition exactly).

    Adapted: SGLang inserts the interior checkpoint first and hands the main insert its
    prev_prefix_len; hicache publishes every ``Req.mamba_checkpoints`` entry after the main
    insert, at the node ending its prefix (splitting there).
    """
    cache = make_cache()
    tokens = list(range(2 * CHUNK))
    finish(cache, tokens, (CHUNK, 2 * CHUNK), reuse=False)
    assert cache.stats.mamba_published == 2
    assert cache.match_prefix(key(tokens[:-1])).device_prefix_len == CHUNK
    assert cache.available_size() == 512 - 2 * CHUNK


def test_interior_checkpoint_revives_the_split_tombstone():
    """Ports ``TestMambaRadixCacheInteriorCheckpoint.test_interior_checkpoint_revives_the_split_
    tombstone`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_radix_cache_match.py).

    A first request leaves only its end state; the second identical request's n - 1 lookup
    splits that node into a stateless [0:127] above [127] and reuses nothing; its interior
    checkpoint then lands inside that tombstone (split again at 64) and the n - 1 lookup reuses
    64 tokens. Its end checkpoint already exists: the tree keeps its own state and the request's
    copy is freed. Same expectations.
    """
    cache = make_cache()
    tokens = list(range(2 * CHUNK))
    finish(cache, tokens, (2 * CHUNK,), reuse=False)
    m = cache.match_prefix(key(tokens[:-1]))
    assert m.device_prefix_len == 0
    _, r = finish(cache, tokens, (CHUNK, 2 * CHUNK), reuse=False)
    assert r.prefix_len == 2 * CHUNK
    assert (cache.stats.mamba_published, cache.stats.mamba_existed) == (2, 1)
    m = cache.match_prefix(key(tokens[:-1]))
    assert m.device_prefix_len == CHUNK
    assert float(state_of(cache, cache.tree.node_info(m.last_device_node).mamba_value)[0]) == CHUNK


def test_duplicate_interior_checkpoint_is_freed():
    """Ports ``TestMambaRadixCacheInteriorCheckpoint.test_duplicate_interior_checkpoint_is_freed``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_mamba_radix_cache_match.py).

    A checkpointed node already covers the interior depth: a second request's interior state
    is a duplicate; it is freed (the state pool gets it back) and the tree is unchanged (same
    nodes, same state at the boundary). Same expectations.
    """
    cache = make_cache()
    tokens = list(range(2 * CHUNK))
    finish(cache, tokens, (CHUNK, 2 * CHUNK), reuse=False)
    nodes = cache.tree.node_ids()
    free_states = cache.mamba_pool.available_size()
    finish(cache, tokens, (CHUNK,), reuse=False)
    assert cache.stats.mamba_existed == 1
    assert cache.mamba_pool.available_size() == free_states
    assert cache.tree.node_ids() == nodes
    m = cache.match_prefix(key(tokens[:-1]))
    assert m.device_prefix_len == CHUNK
    assert float(state_of(cache, cache.tree.node_info(m.last_device_node).mamba_value)[0]) == CHUNK


def test_stale_interior_checkpoint_is_rejected():
    """Ports ``TestMambaRadixCacheInteriorCheckpoint.test_stale_interior_checkpoint_is_dropped``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_mamba_radix_cache_match.py).

    A checkpoint deeper than the tokens the request holds cannot be published. SGLang frees the
    slot and carries on. Adapted: ``cache_finished_req`` validates its request first and raises
    ``InvalidArgumentError`` without changing anything (a caller bug, reported instead of
    silently dropped): the request still owns its KV slots and the state slot.
    """
    cache = make_cache()
    tokens = list(range(CHUNK + 30))
    kv = cache.alloc(len(tokens))
    state = int(cache.alloc_mamba(1)[0])
    stale = Req(key(tokens), kv_indices=kv, mamba_checkpoints=[(len(tokens) + CHUNK, state)])
    with pytest.raises(InvalidArgumentError, match="not a page-aligned prefix"):
        cache.cache_finished_req(stale)
    assert cache.tree.num_nodes() == 0
    cache.check_invariants(kv, torch.tensor([state]))
    cache.free(kv)
    cache.free_mamba(torch.tensor([state]))


def test_one_state_slot_cannot_be_published_twice():
    """The slot-reuse guard of ``TestMambaRadixCacheInteriorCheckpoint.test_interior_checkpoint_
    lets_the_n_minus_1_lookup_reuse`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_radix_cache_match.py).

    SGLang asserts that publishing the interior checkpoint consumes the request's stash exactly
    once, so the same slot cannot be handed to the tree again (and then freed twice). hicache's
    analog is a request whose checkpoints repeat a slot: two nodes would own one state, and
    evicting either would leave the other serving whatever the slot holds next. The request is
    rejected before anything changes.
    """
    cache = make_cache()
    tokens = list(range(2 * CHUNK))
    kv = cache.alloc(len(tokens))
    state = int(cache.alloc_mamba(1)[0])
    twice = Req(key(tokens), kv_indices=kv, mamba_checkpoints=[(CHUNK, state), (2 * CHUNK, state)])
    with pytest.raises(InvalidArgumentError, match="state slot 0 is given twice"):
        cache.cache_finished_req(twice)
    assert cache.tree.num_nodes() == 0
    cache.check_invariants(kv, torch.tensor([state]))
    cache.free(kv)
    cache.free_mamba(torch.tensor([state]))


# --- state pressure --------------------------------------------------------------------------


def test_allocation_target_stops_after_one_internal_tombstone():
    """Ports the Mamba case of ``TestUnifiedRadixAllocationEvictionRealComponents.
    test_allocation_target_stops_after_one_internal_tombstone`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    A chain [1,2], [1..4], [1..6], each with its state; an allocation one state short evicts
    exactly one state, an internal one (a tombstone: no KV freed), and stops: the other states
    and all the KV stay.

    Adapted: SGLang's victim is the root-side state (its LRU back) and its leaf is unlocked;
    hicache's Mamba LRU back is the deepest state (tree-level module docstring item 1), so the
    leaf is locked by a running request, as the decode hold would, and the victim is the
    deepest unlocked state, [1..4]'s.
    """
    cache = make_cache(num_states=4)
    for length in (2, 4, 6):
        finish(cache, list(range(1, length + 1)), (length,))
    assert cache.mamba_pool.available_size() == 1
    leaf = cache.match_prefix(key([1, 2, 3, 4, 5, 6]))
    receipt = cache.inc_lock_ref(leaf.last_device_node)
    total = cache.total_size()
    states = cache.alloc_mamba(2)
    assert (cache.stats.mamba_evicted_states, cache.stats.evicted_tokens) == (1, 0)
    assert cache.total_size() == total
    hits = [cache.match_prefix(key(list(range(1, n + 1)))).device_prefix_len for n in (2, 4, 6)]
    assert hits == [2, 2, 6]  # [1..4] is a tombstone now: its match falls back to [1,2]
    cache.check_invariants(NO_SLOTS, states)
    cache.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
    cache.free_mamba(states)
    cache.check_invariants(NO_SLOTS, NO_SLOTS)


# --- KV events ------------------------------------------------------------------------------


def test_mamba_radix_cache_kv_events():
    """Ports ``TestMamba.test_mamba_radix_cache_kv_events`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_unittest.py).

    [1,2,3] then [1..5]: one BlockStored each, of tokens [1,2,3] and [4,5]. Evicting an internal
    state tombstones the node and removes no block; evicting one Full token then removes every
    stored block (the leaf goes, and its stateless ancestor with it).

    Adapted (tree-level module docstring items 1-3): to make the internal state the victim, the
    [1..5] leaf is locked while a state allocation evicts (hicache would otherwise take the
    leaf's state, and the leaf's blocks with it). The Full eviction trims one page from the
    leaf, which then holds no state: the cascade deletes it and the tombstone above, so every
    block is removed as in SGLang.
    """
    cache = make_cache(num_states=3, events=True)
    events = []
    cache.kv_events.subscribe(events.append)
    finish(cache, [1, 2, 3], (3,), reuse=False)
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert len(stored) == 1 and stored[0].token_ids == (1, 2, 3)
    finish(cache, [1, 2, 3, 4, 5], (5,), reuse=False)
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert len(stored) == 2 and stored[1].token_ids == (4, 5)
    stored_hashes = [h for e in stored for h in e.block_hashes]

    leaf = cache.match_prefix(key([1, 2, 3, 4, 5]))
    receipt = cache.inc_lock_ref(leaf.last_device_node)
    states = cache.alloc_mamba(2)  # one free, one evicted: [1,2,3]'s, internal
    assert cache.stats.mamba_evicted_states == 1
    assert not [e for e in events if isinstance(e, BlockRemoved)]
    assert cache.match_prefix(key([1, 2, 3])).device_prefix_len == 0
    cache.check_invariants(NO_SLOTS, states)
    cache.free_mamba(states)
    cache.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)

    assert cache.evict(1) == 5
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert Counter(removed) == Counter(stored_hashes)
    assert all(e.medium == Medium.GPU for e in events)
    cache.check_invariants(NO_SLOTS, NO_SLOTS)


def test_mamba_radix_cache_kv_events_split_hash():
    """Ports ``TestMamba.test_mamba_radix_cache_kv_events_split_hash`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_unittest.py).

    [1,2,3,4] then [1,2,5,6]: the second BlockStored holds [5,6] and its parent is the first
    insert's second block (the split point). Same expectations.
    """
    cache = make_cache(events=True)
    events = []
    cache.kv_events.subscribe(events.append)
    finish(cache, [1, 2, 3, 4], (4,), reuse=False)
    first = [e for e in events if isinstance(e, BlockStored)]
    assert len(first) == 1
    finish(cache, [1, 2, 5, 6], (4,), reuse=False)
    second = [e for e in events if isinstance(e, BlockStored)][1:]
    assert len(second) == 1 and second[0].token_ids == (5, 6)
    assert second[0].parent_block_hash == first[0].block_hashes[1]
