"""SGLang's hybrid (Full + Mamba) radix-cache unit scenarios, ported to the tree core.

Each test replays the insert / evict / match steps of one SGLang test on ``RadixTree(...,
mamba=True)`` and checks, after every step, the tree's invariants, the matched lengths, which node
holds which state and what an eviction frees (KV slots and state slots). The docstring of each
test names the SGLang test it ports (all in the ``sgl-project/sglang`` repository) and how the
expectation was adapted. Copy-on-write needs a state pool, so it is ported at the cache level
(``tests/test_cache_mamba_scenarios.py``, with the scenarios about request bookkeeping and KV
events).

Sources:

- ``test/registered/unit/mem_cache/test_mamba_unittest.py`` (``TestMamba``, legacy
  ``MambaRadixCache``);
- ``test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py``
  (``UnifiedRadixCacheSuite`` run on its ``FULL_MAMBA`` configs,
  ``TestUnifiedMambaLRUMatchRefresh``, ``TestUnifiedRadixAllocationEvictionRealComponents``);
- ``test/registered/unit/mem_cache/test_mamba_radix_cache_match.py`` (``TestMambaRadixCacheMatch``;
  its ``TestMambaRadixCacheInteriorCheckpoint`` needs requests: cache level).

(The ``test_mamba_radix_cache_comprehensive.py`` / ``_gauntlet.py`` files found in forks of
SGLang are not SGLang's own tests and were not ported.)

Deliberate differences, used by several tests below:

1. **Recency order.** hicache touches a matched or inserted path deepest-first, so ancestors are
   always more recent than their descendants, in the Mamba LRU too (the device LRU's back is then
   always a leaf). SGLang does the opposite for Mamba: its insert walk refreshes root-first, its
   split re-inserts the lower node as most recent, and its match refreshes only the matched node,
   so its Mamba eviction tombstones root-side internal states first. hicache evicts the deepest
   state of the coldest path first; a childless node without a state is useless (no match can
   end in it or below it), so that leaf goes with its KV (item 3). Where a SGLang test depends on
   its order, the port either checks hicache's outcome, or steers hicache to SGLang's victims
   with a match (recency) or locks (a locked state is never evicted), saying which.
2. **Page-granular Full eviction.** ``evict(n)`` frees ``ceil(n / page_size)`` pages from the tail
   of the least recently used leaf; SGLang frees whole leaves (at least ``n`` tokens). A trimmed
   leaf loses its state (the state is of the dropped end).
3. **Tombstone cascade.** A childless Mamba tombstone is deleted with its KV, and so is its parent
   if that is now one too, up to a node that holds a state, has children, or is locked
   (``radix_tree.h``). SGLang's legacy tree keeps the same "no tombstone leaf" rule.
4. **Locks.** A lock locks the state of the node it locks (single-node) and the Full KV of its
   path; there is no Mamba opt-out lock (SGLang's ``skip_lock_components=(MAMBA,)``). A Full-locked
   node with an unlocked state is reached instead by giving a locked tombstone a state.
5. **Branching point.** ``mamba_branching_seqlen`` is the Full tokens matched (page-aligned) past
   the validated prefix: hicache's checkpoint grid is the page. SGLang floors to
   ``mamba_cache_chunk_size`` (64 for FLA) and reports None below one chunk.
6. **API shape.** ``insert`` takes one state slot and reports ``mamba_taken`` / ``mamba_exist``
   (the caller frees its copy on ``mamba_exist``); the caller frees its duplicate KV slots itself
   (``value[prev:prefix_len]``, SGLang's ``prev_prefix_len``: see the cache-level file).

Skipped, with the reason:

- ``TestMamba.test_hybrid_linear_kv_pool``, ``test_hybrid_linear_kv_pool_layer_ids_match_buffer_
  groups``, ``test_mamba_pool``, ``test_mamba_pool_deduplicated_conv_window_axis``,
  ``test_mamba_pool_cpu_offload``, ``test_hybrid_kv_pool_cpu_offload``: pool layouts and
  SGLang's request pool, not tree scenarios (hicache's pools are tested in ``tests/memory``).
- Every ``test_hicache_*`` / ``test_scheduler_hicache_*`` / ``test_load_back_*`` /
  ``test_prepare_load_back_*`` / ``test_prepare_prefetch_mamba`` /
  ``test_mamba_has_host_value_only_predicate`` / ``test_mamba_device_value_accessor`` /
  ``test_admission_keeps_mamba_h2d_destination_on_full_overdelivery`` /
  ``test_evict_host_drains_freed_host_values_to_the_pools`` and the host half of
  ``test_mamba_branching_seqlen_disabled_under_hicache``: host (L2) Mamba states, load-back and
  storage of states; hicache's Mamba component is device-tier only.
- ``test_buffer_only_rejects_mamba`` and the buffer-mode tests: no buffer-only host mode.
- ``TestMambaCheckpointGrid``: a chunk grid wider than the page (DCP's widened tree page);
  hicache's grid is the page.
- ``TestUnifiedRadixCacheInt8MambaCheckpoint``: int8 checkpoint pool.
- The ``FULL_MAMBA`` configs with ``page_size > 1`` run with ``enable_mamba_extra_buffer``
  (ping-pong track slots) in SGLang; hicache needs no extra buffer for pages, so the suite tests
  below run at ``page_size`` 1 and 4 without one. Nothing here ports the ping-pong slots.
- ``test_cache_unfinished_req``: ``HiCache.cache_unfinished_req`` rejects a Mamba cache (running
  requests' states are not checkpointed yet).
- ``test_cache_finished_req_strips_thinking``, ``test_cache_finished_req_no_insert``,
  ``test_diagnostics``, ``test_zero_match_result_carries_node_id_handles``, the action-routing and
  resumable-insert classes: features or hooks hicache does not have (thinking stripping, release
  without insert, ``available_and_evictable_str``, deferred cache actions).
- ``test_cascade_evict_asserts_on_locked_*_mamba``, ``test_mamba_opt_out_holder_*``,
  ``test_swa_early_release_*``, ``test_dec_swa_lock_only_hicache_child_on_host_treated_as_device_
  leaf``: the Mamba opt-out lock and the early SWA release (``dec_swa_lock_only``), which hicache
  does not have. ``test_leaf_transition_swa_evict_spares_locked_full`` and
  ``TestSegmentLockFuzzWithMamba``: FULL + SWA + MAMBA interleavings of locks and evictions,
  covered by ``test_differential_swa.py`` (``SwaMambaTreeVsModel``, a model of all three) and
  ``test_sglang_swa_scenarios.py::test_lock_protects_its_window_from_swa_eviction``.

SWA ports: the tree scenarios are in ``test_sglang_swa_scenarios.py`` (the tests named below are
there), the caller-mistake cases in ``test_swa.py``; the rest needs a request, a pool or KV
events, or is a deliberate difference.

``test/registered/unit/mem_cache/test_swa_unittest.py``:

- ``test_swa_radix_cache_1``: ported, steered by a lock (its order differs):
  ``test_swa_radix_cache_1_steered_to_sglang_end_state``.
- ``test_swa_radix_cache_eagle``, ``test_swa_cache_finished_req_eagle_uses_cache_protected_len_
  and_bigram_key``: not ported. The tree has no EAGLE bigram keys (a caller's key is whatever it
  passes), and the finished-request bookkeeping (``prev_prefix_len``, what it frees) is the
  cache's.
- ``test_swa_radix_cache_kv_events``, ``test_swa_radix_cache_kv_events_split_hash``: not ported
  here; KV events are emitted by the cache (``src/hicache/events.py``), whose SWA support is not
  written yet.
- ``TestSWASplitLeafOnInsert``: ported, the whole table (``test_split_leaf_on_insert_caps_the_
  locked_window``, which also balances the release to 0), the no-split cases and the match of the
  whole chain. ``test_flag_off_protects_full_leaf`` does not apply: the cut is always on.
- ``test_swa_memory_pool_paged_free_clears_full_page_mapping``,
  ``test_swa_tail_mapping_uses_real_endpoint_and_clears_padding``: the SWA allocator's mapping, a
  pool concern (``tests/memory/test_swa_pool.py``).

``test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py`` (SWA configs):

- ``test_swa_unfinished_req_preserves_existing_eviction_boundary``,
  ``test_swa_insert_keeps_full_leaf_when_entire_span_is_outside_window``,
  ``test_swa_leaf_capped_to_window_on_insert``, ``test_swa_unfinished_recovery_preserves_locked_
  full_value``, ``test_swa_evict_cascades``, ``test_swa_evict_internal_tombstone``,
  ``test_swa_evict_full_leaf_cascades_all``, ``test_swa_lock_protects_from_eviction``,
  ``test_swa_branching_seqlen_uses_device_full_hit`` (with its ``_caps_insert_after_forward`` and
  ``_branch_insert_releases_forward_overshoot`` follow-ups at tree level): ported, one test each
  (the names say which).
- ``test_swa_eager_eviction_on_unfinished_req``, ``test_swa_eager_eviction_noop_when_within_
  window``: not ported here. How far a running request moves its frontier (SGLang's
  ``free_swa_out_of_window_slots``) is the caller's rule; the tree only takes the frontier it is
  given (every insert rule of the differential machine draws one).
- ``test_swa_lru_walk_down_does_not_refresh_ancestors_during_insert``,
  ``test_swa_lru_match_only_refreshes_window_cushion``,
  ``test_swa_lru_old_ancestors_evict_first_under_pressure``,
  ``test_swa_lru_fresh_leaf_cap_rebuilds_both_nodes``,
  ``test_swa_sanity_check_passes_after_deep_match``: not ported, a deliberate difference: hicache
  refreshes the whole matched or inserted path deepest-first (ancestors are more recent), so a
  side branch goes before the old ancestors. The reference model predicts that order and every
  ``evict_swa`` victim (``test_differential_swa.py``), which checks the invariants after every
  step, deep matches included; the cut leaf's two nodes are both live (``test_split_leaf_*``).
- ``TestResumableInsertWalkSWA``: ported, adapted (the tree keeps a recovered tombstone's Full
  slots and remaps the SWA side, locked or not: ``test_recovery_*``; the duplicate below the
  request's floor is not recovered: ``test_tombstone_healing_by_the_frontier``). "A recovered span
  is evicted before the in-window leaf" does not apply: the span is an ancestor of the leaf, more
  recent in hicache's order. Resumable inserts and adopted-range tracking are not tree features.
- ``TestSegmentLockProtocol``: ported (``test_segment_lock_*`` and
  ``test_lock_on_a_tombstone_then_recovered_is_released_by_its_receipt``; receipts are token
  counts, exact across splits, instead of uuids). ``TestStreamingSessionLockLifecycle``: not
  ported, no streaming sessions nor early SWA release.

``sgl-project/sglang-jax``, ``python/sgl_jax/test/mem_cache/test_swa_radix_cache.py`` (T1-T22):

- T1, T2, T3-T5, T6/T18, T9, T13, T14/T15: ported
  (``test_evict_internal_tombstone_keeps_its_full_kv``, ``test_tombstones_reset_the_window_run``,
  ``test_tombstone_healing_by_the_frontier``, ``test_deleting_the_leaf_cascades_into_the_
  tombstone_parent``, ``test_new_node_crossing_the_frontier_is_cut_there``, ``test_insert_keeps_
  the_full_leaf_when_the_whole_span_is_outside_the_window``; T14/T15 adapted: the new pages are
  cached as a tombstone, as SGLang's unified cache does).
- T7/T11/T12 (size-tracking cycles and fuzz), T8 (protected prefix), T10 (evicting both pools):
  the differential machine compares every size after every step of random inserts, locks,
  ``evict`` and ``evict_swa``; T8 and T10 also in ``test_lock_protects_its_window_from_swa_
  eviction`` and ``test_swa_radix_cache_1_steered_to_sglang_end_state``.
- T19/T20 (a request's frontier from its locked path), T22 (``cache_unfinished_req``'s write-back
  range): request bookkeeping, the cache's. T21 (page-alignment assertion): hicache floors an
  unaligned frontier to a page instead (``test_new_node_crossing_the_frontier_is_cut_there``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hicache._tree import RadixTree
from hicache.results import EvictResult, InsertResult, LockReceipt, MatchResult
from tests.tree.test_tree_ops import slots

ROOT = 0
NUM_SLOTS = 4096
NUM_STATES = 256
CHUNK = 64  # SGLang's FLA chunk, the Mamba checkpoint grid of test_mamba_radix_cache_match.py


@dataclass
class Inserted:
    """One insert: its result, the slots it gave and the state slot (-1: none)."""

    result: InsertResult
    value: torch.Tensor
    state: int

    @property
    def node(self) -> int:
        return self.result.last_node


class Scenario:
    """A Mamba tree fed with fresh slots, whose invariants are checked after every step."""

    def __init__(self, page_size: int = 1) -> None:
        self.page_size = page_size
        self.tree = RadixTree(page_size, NUM_SLOTS, 0, mamba=True, num_mamba_slots=NUM_STATES)
        self._next_slot = 0
        self._next_state = 0

    def seq(self, start: int, num_pages: int) -> list[int]:
        """``num_pages`` pages of consecutive tokens from ``start`` (SGLang's ``_make_seq``)."""
        return list(range(start, start + num_pages * self.page_size))

    def insert(self, key: list[int], state: bool = True) -> Inserted:
        num_pages = -(-len(key) // self.page_size)
        value = torch.arange(self._next_slot, self._next_slot + len(key), dtype=torch.int64)
        self._next_slot += num_pages * self.page_size
        slot = -1
        if state:
            slot, self._next_state = self._next_state, self._next_state + 1
        result = self.tree.insert(key, value, mamba_value=slot)
        self.tree.check_invariants()
        return Inserted(result, value, slot)

    def match(self, key: list[int]) -> MatchResult:
        result = self.tree.match_prefix(key)
        self.tree.check_invariants()
        return result

    def evict(self, num_tokens: int) -> EvictResult:
        result = self.tree.evict(num_tokens, write_back=False)
        self.tree.check_invariants()
        return result

    def evict_mamba(self, num_states: int) -> EvictResult:
        result = self.tree.evict_mamba(num_states)
        self.tree.check_invariants()
        return result

    def lock(self, node: int) -> LockReceipt:
        receipt = self.tree.inc_lock_ref(node)
        self.tree.check_invariants()
        return receipt

    def unlock(self, receipt: LockReceipt) -> int:
        delta = self.tree.dec_lock_ref(
            receipt.node_id, receipt.mamba_node_id, receipt.swa_lock_tokens
        )
        self.tree.check_invariants()
        return delta

    def state(self, node: int) -> int:
        """The node's state slot, -1 for a tombstone."""
        return self.tree.node_info(node).mamba_value

    def key(self, node: int) -> list[int]:
        return self.tree.node_key(node)

    def parent(self, node: int) -> int:
        return self.tree.node_info(node).parent_id


def freed(result: EvictResult) -> tuple[list[int], list[int]]:
    """(device slots, state slots) an eviction freed, sorted."""
    return sorted(slots(result.device_indices)), sorted(slots(result.mamba_indices))


def tail(inserted: Inserted, start: int) -> list[int]:
    """The slots ``inserted`` gave for its tokens ``start:``."""
    return slots(inserted.value[start:])


PAGE_SIZES = pytest.mark.parametrize("page_size", [1, 4])


# --- test_mamba_unittest.py -----------------------------------------------------------------


def test_mamba_radix_cache_1_steered_to_sglang_victims():
    """Ports ``TestMamba.test_mamba_radix_cache_1`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_unittest.py) with SGLang's victims.

    Inserts [1,2,3], [1..7], [10,11,12], [1,2,3,4,5,60,70] (a state at each end), evicts one
    Full token, then one state, checks the matches ([1..5] -> 0, [1..5,60,70] -> 7 ending at
    [60,70], [1..7] -> 7 ending at [6,7]), evicts one more state and checks [1..5,60,70] -> 0 at
    the root. The copy-on-write of req9 is in tests/test_cache_mamba_scenarios.py.

    Adapted (module docstring items 1, 2): SGLang's split re-inserts [6,7] as most recent, so
    its LRU leaf is [10,11,12]; here a match of [1..7] makes it so. SGLang's first Mamba
    eviction tombstones the root-side [1,2,3] state; hicache would take the deepest one, so
    the two states SGLang keeps ([6,7] and [60,70]) are locked meanwhile. The second eviction
    takes [60,70]'s state with [6,7] still locked. Every expected match then is SGLang's.
    """
    s = Scenario()
    a = s.insert([1, 2, 3])
    b = s.insert([1, 2, 3, 4, 5, 6, 7])
    assert (b.result.prefix_len, b.result.mamba_taken) == (3, True)
    c = s.insert([10, 11, 12])
    d = s.insert([1, 2, 3, 4, 5, 60, 70])
    assert (d.result.prefix_len, d.result.mamba_taken) == (5, True)
    # The last insert split [4..7] at [4,5]: the state stays below, with [6,7], which keeps its id.
    split = s.parent(b.node)
    assert (s.key(b.node), s.state(b.node)) == ([6, 7], b.state)
    assert (s.key(split), s.state(split)) == ([4, 5], -1)
    assert s.parent(d.node) == split and s.parent(split) == a.node

    s.match([1, 2, 3, 4, 5, 6, 7])  # steering: [10,11,12] becomes the LRU leaf, as in SGLang
    r = s.evict(1)
    # One page from [10,11,12]'s tail takes its state; the stateless rest is a childless tombstone
    # and goes too: the whole leaf, as SGLang's whole-node eviction.
    assert freed(r) == (slots(c.value), [c.state]) and r.dropped_tokens == 3
    assert not s.tree.contains_node(c.node)

    held = [s.lock(b.node), s.lock(d.node)]  # steering: SGLang evicts the root-side state first
    r = s.evict_mamba(1)
    assert freed(r) == ([], [a.state])  # an internal node: tombstoned, its KV stays
    assert s.tree.contains_node(a.node) and s.state(a.node) == -1

    m = s.match([1, 2, 3, 4, 5])  # req5
    assert (m.device_prefix_len, m.best_match_node) == (0, ROOT)
    m = s.match([1, 2, 3, 4, 5, 60, 70])  # req6
    assert (m.device_prefix_len, m.last_device_node, len(s.key(m.last_device_node))) == (
        7,
        d.node,
        2,
    )
    m = s.match([1, 2, 3, 4, 5, 6, 7])  # req7
    assert (m.device_prefix_len, m.last_device_node, len(s.key(m.last_device_node))) == (
        7,
        b.node,
        2,
    )

    s.unlock(held.pop())  # [60,70]: SGLang's second eviction takes its state
    r = s.evict_mamba(1)
    # A leaf's state goes with the leaf; [4,5] still has the [6,7] child.
    assert freed(r) == (tail(d, 5), [d.state])
    assert s.tree.contains_node(split) and not s.tree.contains_node(d.node)
    m = s.match([1, 2, 3, 4, 5, 60, 70])  # req8
    assert (m.device_prefix_len, m.last_device_node, m.best_match_node) == (0, ROOT, ROOT)
    m = s.match([1, 2, 3, 4, 5, 6, 7])  # req9 (its copy-on-write source)
    assert (m.device_prefix_len, s.state(m.last_device_node)) == (7, b.state)
    s.unlock(held.pop())
    assert s.tree.mamba_evictable_size() == 1 and s.tree.mamba_protected_size() == 0


def test_mamba_radix_cache_1_in_hicache_order():
    """Ports ``TestMamba.test_mamba_radix_cache_1`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_unittest.py) step for step, unsteered.

    The same inserts, then evict 1 Full token, evict 1 state, the three matches, evict 1 state
    and the last match, with no step added: what hicache's own recency order makes of SGLang's
    sequence (module docstring items 1-3).

    Adapted expectations: the LRU leaf is [6,7] (SGLang's split made it the most recent), so
    the Full eviction takes it with its state; the first Mamba eviction takes [10,11,12]'s state
    (the coldest path's deepest) and the leaf with it, where SGLang tombstones [1,2,3]; so [1..5]
    and [1..7] still match [1,2,3] (SGLang: 0 and 7), and the second Mamba eviction deletes
    [60,70] and then [4,5], now a childless tombstone.
    """
    s = Scenario()
    a = s.insert([1, 2, 3])
    b = s.insert([1, 2, 3, 4, 5, 6, 7])
    c = s.insert([10, 11, 12])
    d = s.insert([1, 2, 3, 4, 5, 60, 70])
    split = s.parent(b.node)

    r = s.evict(1)
    assert freed(r) == (tail(b, 5), [b.state])  # [6,7] trimmed to [6], stateless: deleted
    assert not s.tree.contains_node(b.node) and s.tree.contains_node(split)
    r = s.evict_mamba(1)
    assert freed(r) == (slots(c.value), [c.state])

    m = s.match([1, 2, 3, 4, 5])  # req5: [4,5] has no state, [1,2,3] has
    assert (m.device_prefix_len, m.last_device_node, m.mamba_branching_seqlen) == (3, a.node, 5)
    m = s.match([1, 2, 3, 4, 5, 60, 70])  # req6
    assert (m.device_prefix_len, m.last_device_node) == (7, d.node)
    m = s.match([1, 2, 3, 4, 5, 6, 7])  # req7: [6,7] is gone
    assert (m.device_prefix_len, m.last_device_node, m.mamba_branching_seqlen) == (3, a.node, 5)

    r = s.evict_mamba(1)
    # [60,70], then [4,5] by the cascade ([4,5] holds slots of the [1..7] insert).
    assert freed(r) == (sorted(slots(b.value[3:5]) + tail(d, 5)), [d.state])
    assert s.tree.num_nodes() == 1 and s.state(a.node) == a.state
    m = s.match([1, 2, 3, 4, 5, 60, 70])  # req8
    assert (m.device_prefix_len, m.last_device_node) == (3, a.node)


def test_mamba_lru_match_refreshes_the_whole_matched_path():
    """Ports ``TestMamba.test_mamba_lru_match_refreshes_only_used_node`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_unittest.py) and the identical
    ``TestUnifiedMambaLRUMatchRefresh.test_match_refreshes_only_used_node``
    (test_unified_radix_cache_unittest.py).

    Two sessions, each a two-state chain (a1 -> b1, a2 -> b2), session 2 matched last, then
    session 1 re-accessed. SGLang: only b1 moves to the front; a1 stays older than a2, so under
    pressure the intermediate states go first and whole sessions survive.

    Adapted (module docstring item 1): hicache refreshes the whole matched path deepest-first,
    so a1 ends up the most recent state and newer than a2, and the pressure victim is the
    coldest session's leaf state b2 (with its KV, a childless tombstone), not a1: session 2
    still matches its 3-token a2 prefix. The order is read from ``last_access_time``, which
    the Mamba LRU follows (an invariant).
    """
    s = Scenario()
    a1 = s.insert([1, 2, 3])
    b1 = s.insert([1, 2, 3, 4, 5, 6])
    a2 = s.insert([7, 8, 9])
    b2 = s.insert([7, 8, 9, 10, 11, 12])
    assert s.match([1, 2, 3, 4, 5, 6]).best_match_node == b1.node
    assert s.match([7, 8, 9, 10, 11, 12]).best_match_node == b2.node

    def access(node: Inserted) -> int:
        return s.tree.node_info(node.node).last_access_time

    assert access(a1) < access(a2)  # session 2 matched last: as in SGLang
    assert s.match([1, 2, 3, 4, 5, 6]).best_match_node == b1.node
    assert access(a1) > access(b1) > access(a2) > access(b2)  # SGLang: b1 newest, a1 < a2

    r = s.evict_mamba(1)
    assert freed(r) == (tail(b2, 3), [b2.state])
    m = s.match([7, 8, 9, 10, 11, 12])
    assert (m.device_prefix_len, m.last_device_node) == (3, a2.node)


# --- test_unified_radix_cache_unittest.py: UnifiedRadixCacheSuite on FULL + MAMBA -------------


@PAGE_SIZES
def test_insert_and_match_basic(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_insert_and_match_basic`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    seq_a (2 pages), then seq_a + 1 page: prefix_len = len(seq_a); the long key matches whole and
    ends at the insert's last node; seq_a + an unknown page matches seq_a (its state); an unknown
    key matches nothing. Same expectations as SGLang.
    """
    s = Scenario(page_size)
    seq_a = s.seq(1, 2)
    seq_b = seq_a + s.seq(1000, 1)
    a = s.insert(seq_a)
    b = s.insert(seq_b)
    assert (b.result.prefix_len, b.result.mamba_taken) == (len(seq_a), True)
    m = s.match(seq_b)
    assert (m.device_prefix_len, m.last_device_node) == (len(seq_b), b.node)
    assert slots(m.device_indices) == slots(a.value) + tail(b, len(seq_a))
    m = s.match(seq_a + s.seq(9000, 1))
    assert (m.device_prefix_len, m.last_device_node) == (len(seq_a), a.node)
    assert s.match(s.seq(5000, 2)).device_prefix_len == 0


@PAGE_SIZES
@pytest.mark.parametrize(
    ("base_pages", "branch_pages", "num_branches"),
    [(2, 2, 2), (3, 1, 2), (2, 2, 3)],
    ids=["test_shared_prefix_split", "test_node_split_at_boundary", "test_multi_branch_tree"],
)
def test_branches_over_a_shared_prefix(page_size, base_pages, branch_pages, num_branches):
    """Ports ``UnifiedRadixCacheSuite.test_shared_prefix_split``, and from earlier versions of
    the same file ``test_node_split_at_boundary`` and ``test_multi_branch_tree``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    A base with its state, then branches base + suffix: each insert reuses the base
    (prefix_len = len(base)), each branch matches whole, base + an unknown page matches the base.
    Same expectations as SGLang; the base node keeps its state and gains one child per branch.
    """
    s = Scenario(page_size)
    base = s.seq(1, base_pages)
    root_side = s.insert(base)
    branches = [base + s.seq(100 * (i + 1), branch_pages) for i in range(num_branches)]
    for branch in branches:
        r = s.insert(branch)
        assert (r.result.prefix_len, s.parent(r.node)) == (len(base), root_side.node)
    for branch in branches:
        assert s.match(branch).device_prefix_len == len(branch)
    m = s.match(base + s.seq(999, 1))
    assert (m.device_prefix_len, m.last_device_node) == (len(base), root_side.node)
    info = s.tree.node_info(root_side.node)
    assert (info.num_children, info.mamba_value) == (num_branches, root_side.state)


@PAGE_SIZES
def test_cache_salt_and_extra_key_form_independent_namespaces(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_cache_salt_and_extra_key_form_independent_namespaces``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    The same tokens in two namespaces share nothing (prefix_len 0 twice, each keeps its state),
    each matches in its own namespace at its own node, the default namespace misses.

    Adapted: hicache has one namespace string, ``extra_key``; SGLang's second field
    ``cache_salt`` (and the check that ("bc", "a") and ("c", "ab") do not collide once
    concatenated) is the engine's to fold into ``extra_key``.
    """
    s = Scenario(page_size)
    seq = s.seq(1, 2)
    results = []
    for namespace in ("adapter-bc/tenant-a", "adapter-c/tenant-ab"):
        value = torch.arange(len(seq), dtype=torch.int64) + 100 * len(results) * page_size
        r = s.tree.insert(seq, value, namespace, mamba_value=len(results))
        s.tree.check_invariants()
        assert (r.prefix_len, r.mamba_taken) == (0, True)
        results.append(r)
    first = s.tree.match_prefix(seq, "adapter-bc/tenant-a")
    second = s.tree.match_prefix(seq, "adapter-c/tenant-ab")
    assert first.device_prefix_len == second.device_prefix_len == len(seq)
    assert (first.last_device_node, second.last_device_node) == tuple(r.last_node for r in results)
    assert s.match(seq).device_prefix_len == 0


@PAGE_SIZES
def test_evict_respects_lock_ref(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_respects_lock_ref`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    Lock seq_a, evict everything: seq_b goes (KV and state), seq_a stays and matches; unlock, and
    evicting len(seq_a) takes it. Same expectations, with the exact frees instead of ">=".
    """
    s = Scenario(page_size)
    a = s.insert(s.seq(1, 2))
    b = s.insert(s.seq(500, 2))
    receipt = s.lock(s.match(s.seq(1, 2)).last_device_node)
    assert receipt.mamba_node_id == a.node  # the state the request continues from is locked too
    r = s.evict(4 * page_size)
    assert freed(r) == (slots(b.value), [b.state])
    assert s.match(s.seq(1, 2)).device_prefix_len == 2 * page_size
    assert s.unlock(receipt) == 2 * page_size
    assert freed(s.evict(2 * page_size)) == (slots(a.value), [a.state])


def test_evict_empty_tree():
    """Ports ``UnifiedRadixCacheSuite.test_evict_empty_tree`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py): evicting 10 tokens and
    5 states from an empty tree frees nothing."""
    s = Scenario()
    assert freed(s.evict(10)) == ([], [])
    assert freed(s.evict_mamba(5)) == ([], [])


@PAGE_SIZES
def test_mamba_evict_only(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_mamba_evict_only`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    short (2 pages), long = short + 2 pages: two evictable states; evicting one frees one.

    Adapted (module docstring items 1, 3): SGLang only checks ">= 1 state"; hicache's victim is
    the deepest state, long's, and long's leaf goes with it (a childless tombstone), so short
    still matches and one state stays evictable.
    """
    s = Scenario(page_size)
    short = s.insert(s.seq(1, 2))
    long = s.insert(s.seq(1, 2) + s.seq(500, 2))
    assert s.tree.mamba_evictable_size() == 2
    r = s.evict_mamba(1)
    assert freed(r) == (tail(long, 2 * page_size), [long.state])
    assert s.tree.mamba_evictable_size() == 1
    assert s.match(s.seq(1, 2) + s.seq(500, 2)).last_device_node == short.node


@PAGE_SIZES
def test_mamba_evict_breaks_match(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_mamba_evict_breaks_match`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    short (2 pages), long = short + 1 page; evicting 10 states leaves none and long matches 0.
    Same expectations; hicache also shows why: without states both nodes are childless
    tombstones in turn, so the tree is empty (every KV slot freed).
    """
    s = Scenario(page_size)
    short = s.insert(s.seq(1, 2))
    long = s.insert(s.seq(1, 2) + s.seq(500, 1))
    r = s.evict_mamba(10)
    assert freed(r) == (sorted(slots(short.value) + tail(long, 2 * page_size)), [0, 1])
    assert s.tree.mamba_evictable_size() == 0 and s.tree.num_nodes() == 0
    assert s.match(s.seq(1, 2) + s.seq(500, 1)).device_prefix_len == 0


@PAGE_SIZES
def test_mamba_internal_tombstone_evict(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_mamba_internal_tombstone_evict`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    short (2 pages) and long = short + 2 pages; a Mamba-only eviction of everything evictable
    tombstones the internal node and keeps the Full KV (mamba_evictable_size 0 after).

    Adapted (module docstring item 1): hicache would evict long's leaf state first (then short
    is a leaf), so long's leaf is locked, as a running request would: its state is then not
    evictable and short's state is the only victim, an internal tombstone. SGLang's comment
    "Full should still be accessible" is checked: every KV slot stays, long still matches
    whole, short now matches 0.
    """
    s = Scenario(page_size)
    short = s.insert(s.seq(1, 2))
    long = s.insert(s.seq(1, 2) + s.seq(500, 2))
    receipt = s.lock(long.node)
    total = s.tree.total_size()
    r = s.evict_mamba(10)
    assert freed(r) == ([], [short.state])
    assert s.tree.mamba_evictable_size() == 0 and s.tree.total_size() == total
    assert s.state(short.node) == -1 and s.tree.node_info(short.node).has_device_value
    assert s.match(s.seq(1, 2)).device_prefix_len == 0
    assert s.match(s.seq(1, 2) + s.seq(500, 2)).device_prefix_len == 4 * page_size
    s.unlock(receipt)


@PAGE_SIZES
@pytest.mark.parametrize("num_pages", [2, 3])
def test_mamba_evict_cascades_on_full_leaf(page_size, num_pages):
    """Ports ``UnifiedRadixCacheSuite.test_mamba_evict_cascades_on_full_leaf`` (2 pages) and
    ``test_mamba_evict_result_accounting`` (3 pages, earlier versions of the same file;
    sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    A Full eviction of a whole leaf frees its KV and its state. Same expectations, exact: the
    leaf's slots, its state, ``dropped_tokens`` = len(seq).
    """
    s = Scenario(page_size)
    seq = s.insert(s.seq(1, num_pages))
    r = s.evict(num_pages * page_size)
    assert freed(r) == (slots(seq.value), [seq.state])
    assert r.dropped_tokens == num_pages * page_size


@PAGE_SIZES
def test_partial_match_keeps_unmatched_suffix_lru_position(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_partial_match_keeps_unmatched_suffix_lru_position``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    cold, then hot (2 pages each); a match of cold's first page splits cold. The unmatched lower
    part (which keeps cold's id and state) is not refreshed: hot stays more recent in the Mamba
    LRU. Same expectation (read from last_access_time); the match ends at the root (no state
    after one page).
    """
    s = Scenario(page_size)
    cold = s.insert(s.seq(1, 2))
    hot = s.insert(s.seq(100, 2))
    m = s.match(s.seq(1, 1))
    assert (m.device_prefix_len, m.best_match_node, m.mamba_branching_seqlen) == (0, 0, page_size)
    assert s.key(cold.node) == s.seq(1, 2)[page_size:] and s.state(cold.node) == cold.state
    info = s.tree.node_info
    assert info(hot.node).last_access_time > info(cold.node).last_access_time


@PAGE_SIZES
def test_tombstone_cleanup_respects_locked_parent(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_tombstone_cleanup_respects_locked_parent``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    SGLang locks a node's Full and runs the tombstone cleanup from it directly: the node stays,
    nothing is freed. hicache has no direct cleanup entry: the cascade runs after an eviction.
    Adapted: a Full-locked tombstone parent (inserted without a state) under a stateful child;
    evicting the child's state deletes the child, and the cascade stops at the locked parent
    (its KV is not freed). After the unlock the parent is an ordinary evictable leaf.
    """
    s = Scenario(page_size)
    parent = s.insert(s.seq(1, 1), state=False)
    child = s.insert(s.seq(1, 1) + s.seq(1000, 1))
    receipt = s.lock(parent.node)
    assert receipt.mamba_node_id == -1  # a tombstone: no state to lock
    r = s.evict_mamba(1)
    assert freed(r) == (tail(child, page_size), [child.state])
    assert s.tree.contains_node(parent.node) and not s.tree.contains_node(child.node)
    s.unlock(receipt)
    info = s.tree.node_info(parent.node)
    assert (info.num_children, info.lock_ref, info.has_device_value) == (0, 0, True)
    assert freed(s.evict(page_size)) == (slots(parent.value), [])


@PAGE_SIZES
def test_aux_evict_full_locked_leaf_tombstones_aux_only(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_aux_evict_full_locked_leaf_tombstones_aux_only``
    on its Mamba configs (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    A one-page leaf whose Full is locked but whose state is not: evicting one state frees it
    and no KV, the node keeps its Full value and leaves the Mamba LRU; the unlock then balances.

    Adapted (module docstring item 4): SGLang reaches that state with the decode hold's Mamba
    opt-out lock; hicache locks a tombstone leaf (no state to lock), then an insert of the same
    key gives it an (unlocked) state.
    """
    s = Scenario(page_size)
    seq = s.seq(1, 1)
    node = s.insert(seq, state=False).node
    assert s.match(seq).best_match_node == ROOT  # a tombstone never ends a match
    receipt = s.lock(node)
    again = s.insert(seq)
    assert again.node == node and again.result.mamba_taken
    assert (s.tree.mamba_evictable_size(), s.tree.mamba_protected_size()) == (1, 0)
    r = s.evict_mamba(1)
    assert freed(r) == ([], [again.state])  # the cascade stops at the Full lock
    info = s.tree.node_info(node)
    assert (info.has_device_value, info.has_mamba_value, info.lock_ref) == (True, False, 1)
    assert s.tree.mamba_evictable_size() == 0
    assert s.unlock(receipt) == page_size


@PAGE_SIZES
def test_evict_leaf_frees_all_components(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_leaf_frees_all_components`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py): evicting twice the
    evictable size of one 3-page leaf frees its KV and its state; Full and Mamba evictable sizes
    are 0. Same expectations, exact."""
    s = Scenario(page_size)
    seq = s.insert(s.seq(1, 3))
    r = s.evict(2 * s.tree.evictable_size())
    assert freed(r) == (slots(seq.value), [seq.state])
    assert (s.tree.evictable_size(), s.tree.mamba_evictable_size(), s.tree.num_nodes()) == (0, 0, 0)


@PAGE_SIZES
def test_evict_cascade_parent_becomes_d_leaf(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_cascade_parent_becomes_d_leaf``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    base (2 pages) locked, leaf = base + 2 pages; evicting len(leaf) takes the leaf only; after
    the unlock the base is an evictable device leaf (hicache: unlocked, childless, on device,
    its tokens counted evictable). Same expectations.
    """
    s = Scenario(page_size)
    base = s.insert(s.seq(1, 2))
    leaf = s.insert(s.seq(1, 2) + s.seq(500, 2))
    receipt = s.lock(s.match(s.seq(1, 2)).last_device_node)
    r = s.evict(4 * page_size)
    assert freed(r) == (tail(leaf, 2 * page_size), [leaf.state])
    s.unlock(receipt)
    info = s.tree.node_info(base.node)
    assert (info.lock_ref, info.num_children, info.has_device_value) == (0, 0, True)
    assert s.tree.evictable_size() == 2 * page_size


@PAGE_SIZES
def test_evict_iterative_tombstone_cleanup(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_iterative_tombstone_cleanup``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    A chain of 2, 4, 6 pages (a state at each end); evicting everything leaves only the root.
    Same expectations, plus a variant where the middle insert carries no state: the middle node
    is then a tombstone, deleted by the cascade when its child goes (one eviction step frees
    both).
    """
    for middle_state in (True, False):
        s = Scenario(page_size)
        chain = s.seq(1, 6)
        s.insert(chain[: 2 * page_size])
        s.insert(chain[: 4 * page_size], state=middle_state)
        s.insert(chain)
        total = s.tree.evictable_size()
        r = s.evict(2 * total)
        assert len(r.device_indices) == total == 6 * page_size
        assert len(r.mamba_indices) == (3 if middle_state else 2)
        assert s.tree.num_nodes() == 0 and s.tree.evictable_size() == 0
    s = Scenario(page_size)
    chain = s.seq(1, 6)
    s.insert(chain[: 2 * page_size])
    middle = s.insert(chain[: 4 * page_size], state=False)
    last = s.insert(chain)
    r = s.evict(2 * page_size)  # the leaf's two pages; the stateless middle follows
    expected = sorted(tail(middle, 2 * page_size) + tail(last, 4 * page_size))
    assert freed(r) == (expected, [last.state])
    assert s.tree.num_nodes() == 1


@PAGE_SIZES
def test_evict_respects_lru_order(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_respects_lru_order`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py): seq_old, seq_new,
    match seq_new, evict len(seq_old): seq_old goes, seq_new stays. Same expectations."""
    s = Scenario(page_size)
    old = s.insert(s.seq(1, 2))
    s.insert(s.seq(500, 2))
    s.match(s.seq(500, 2))
    assert freed(s.evict(2 * page_size)) == (slots(old.value), [old.state])
    assert s.match(s.seq(1, 2)).device_prefix_len == 0
    assert s.match(s.seq(500, 2)).device_prefix_len == 2 * page_size


@PAGE_SIZES
def test_evict_multiple_independent_leaves(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_multiple_independent_leaves``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    Four independent 2-page leaves; evicting half frees at least half (hicache: exactly the two
    oldest leaves and their states), evicting the rest empties the tree.
    """
    s = Scenario(page_size)
    seqs = [s.insert(s.seq(i * 100, 2)) for i in range(4)]
    total = 8 * page_size
    assert s.tree.evictable_size() == total
    r = s.evict(total // 2)
    assert freed(r) == (
        sorted(slots(seqs[0].value) + slots(seqs[1].value)),
        [seqs[0].state, seqs[1].state],
    )
    s.evict(2 * s.tree.evictable_size())
    assert s.tree.evictable_size() == 0 and s.tree.mamba_evictable_size() == 0


@PAGE_SIZES
def test_evict_shared_prefix_keeps_common_path(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_shared_prefix_keeps_common_path``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    branch_a and branch_b share a 2-page base (which gets no state: it was never an insert's
    end); with branch_b locked, evicting len(branch_a) takes branch_a's own pages and state; the
    base stays (it has branch_b), branch_b matches whole. Same expectations.
    """
    s = Scenario(page_size)
    base = s.seq(1, 2)
    a = s.insert(base + s.seq(100, 2))
    b = s.insert(base + s.seq(200, 2))
    assert s.state(s.parent(b.node)) == -1
    receipt = s.lock(s.match(base + s.seq(200, 2)).last_device_node)
    r = s.evict(4 * page_size)
    assert freed(r) == (tail(a, 2 * page_size), [a.state])
    assert s.match(base + s.seq(200, 2)).device_prefix_len == 4 * page_size
    s.unlock(receipt)


@PAGE_SIZES
def test_evict_result_accounting_matches_actual(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_result_accounting_matches_actual``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py):
    five 2-page leaves, evict the evictable size: the freed count equals the drop of the
    evictable size (and of the states). Same expectations."""
    s = Scenario(page_size)
    for i in range(5):
        s.insert(s.seq(i * 100, 2))
    before, states_before = s.tree.evictable_size(), s.tree.mamba_evictable_size()
    r = s.evict(before)
    assert len(r.device_indices) == before - s.tree.evictable_size()
    assert len(r.mamba_indices) == states_before - s.tree.mamba_evictable_size()


@PAGE_SIZES
def test_evict_locked_subtree_skipped(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_locked_subtree_skipped`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py): with seq_a (3 pages)
    locked, evicting the whole tree leaves seq_a matchable. Same expectations."""
    s = Scenario(page_size)
    a = s.insert(s.seq(1, 3))
    b = s.insert(s.seq(500, 2))
    receipt = s.lock(s.match(s.seq(1, 3)).last_device_node)
    r = s.evict(s.tree.evictable_size() + s.tree.protected_size())
    assert freed(r) == (slots(b.value), [b.state])
    assert s.match(s.seq(1, 3)).last_device_node == a.node
    s.unlock(receipt)


@PAGE_SIZES
def test_evict_reinsert_after_full_eviction(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_reinsert_after_full_eviction``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py):
    after evicting everything, a new insert matches whole. Same expectations."""
    s = Scenario(page_size)
    s.insert(s.seq(1, 2))
    s.evict(4 * page_size)
    assert s.tree.evictable_size() == 0
    b = s.insert(s.seq(500, 2))
    assert s.match(s.seq(500, 2)).last_device_node == b.node


@PAGE_SIZES
def test_evict_d_leaf_set_consistency(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_evict_d_leaf_set_consistency`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    Six 2-page leaves; lock the first, evict one leaf's worth (the LRU unlocked one, the second,
    goes), unlock, insert more. SGLang checks its D-leaf set at each step; here
    check_invariants recomputes the evictable leaf set (DESIGN.md invariant 4) and the Mamba LRU.
    """
    s = Scenario(page_size)
    seqs = [s.insert(s.seq(i * 100, 2)) for i in range(6)]
    receipt = s.lock(seqs[0].node)
    assert freed(s.evict(2 * page_size)) == (slots(seqs[1].value), [seqs[1].state])
    s.unlock(receipt)
    s.insert(s.seq(9000, 2))
    assert s.tree.mamba_evictable_size() == 6


@PAGE_SIZES
def test_match_prefix_best_and_device_node_without_hicache(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_match_prefix_best_and_device_node_without_hicache``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py):
    a whole match on device has best_match_node = last_device_node = last_host_node and no host
    hit; hicache adds no branching point (-1). Same expectations."""
    s = Scenario(page_size)
    seq = s.insert(s.seq(1, 2))
    m = s.match(s.seq(1, 2))
    assert m.device_prefix_len == 2 * page_size
    assert m.best_match_node == m.last_device_node == m.last_host_node == seq.node
    assert (m.host_hit_length, m.mamba_branching_seqlen) == (0, -1)


def test_full_kv_hit_length_counts_the_split_fragment():
    """Ports ``UnifiedRadixCacheSuite.test_full_kv_hit_length_counts_the_split_fragment``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    [1..8] with its state; [1,2,3,4,99] splits it mid-node and the matched fragment counts as a
    4-token Full hit although no state validates it.

    Adapted: hicache has no ``full_kv_hit_length``; the Full tokens matched past the validated
    prefix are ``mamba_branching_seqlen`` (here 4, the whole fragment, with 0 device tokens).
    """
    s = Scenario()
    leaf = s.insert(list(range(1, 9)))
    m = s.match([1, 2, 3, 4, 99])
    assert (m.device_prefix_len, m.mamba_branching_seqlen, m.best_match_node) == (0, 4, ROOT)
    assert s.key(s.parent(leaf.node)) == [1, 2, 3, 4]


def test_paged_match_truncates_unaligned_key():
    """Ports ``UnifiedRadixCacheSuite.test_paged_match_truncates_unaligned_key`` on its
    FULL_MAMBA page_size 4 config (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py): 2 pages inserted; the
    key plus 3 more tokens matches the 2 pages, a 3-token key matches nothing. Same expectations
    (SGLang runs this config with the extra buffer, hicache needs none)."""
    s = Scenario(page_size=4)
    seq = s.seq(1, 2)
    s.insert(seq)
    assert s.match(seq + [9000, 9001, 9002]).device_prefix_len == 8
    assert s.match(seq[:3]).device_prefix_len == 0


def test_paged_page_boundary_mismatch():
    """Ports ``UnifiedRadixCacheSuite.test_paged_page_boundary_mismatch`` on its FULL_MAMBA
    page_size 4 config (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    The first page is inserted on its own first (so a state ends there), then 2 pages: a
    mismatch in the second page matches the first page, one in the first page matches nothing.
    Same expectations; the first node keeps its state across the split the mismatch causes.
    """
    s = Scenario(page_size=4)
    seq = s.seq(1, 2)
    first = s.insert(seq[:4])
    s.insert(seq)
    m = s.match(seq[:4] + [9999] * 4)
    assert (m.device_prefix_len, m.last_device_node) == (4, first.node)
    assert s.match([9999] + seq[1:]).device_prefix_len == 0


@PAGE_SIZES
def test_mamba_branching_seqlen_from_device_full_hit_and_checkpoint_there(page_size):
    """Ports ``UnifiedRadixCacheSuite.test_mamba_branching_seqlen_uses_device_full_hit_under_
    hicache`` and the device half of ``test_mamba_branching_from_host_full_is_reusable_after_
    insert`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    prefix (with its state) then tokens = prefix + more with a tombstone leaf: the match ends at
    the prefix (best = last device node, no host hit) and reports the branching point; inserting
    tokens[:branching] with a state there (the scheduler's re-checkpoint) makes the rematch reach
    it with no branching point left. SGLang tombstones the leaf with a raw setter; here the leaf
    is inserted without a state.

    Adapted (module docstring item 5): SGLang's grid is the chunk (2 * chunk for a 2 * chunk + 1
    hit); hicache's is the page, so the branching point is the whole page-aligned Full hit and
    the checkpoint insert takes no KV (all of it is cached already).
    """
    s = Scenario(page_size)
    prefix = s.insert(s.seq(1, 2))
    tokens = s.seq(1, 2) + s.seq(1000, 3)
    leaf = s.insert(tokens, state=False)
    m = s.match(tokens)
    assert m.best_match_node == m.last_device_node == prefix.node
    assert (m.device_prefix_len, m.host_hit_length) == (2 * page_size, 0)
    branching = m.mamba_branching_seqlen
    assert branching == len(tokens)
    checkpoint = s.insert(tokens[:branching])
    assert checkpoint.node == leaf.node and checkpoint.result.mamba_taken
    assert checkpoint.result.prefix_len == branching  # no KV taken: the caller frees its copy
    m = s.match(tokens)
    assert (m.device_prefix_len, m.mamba_branching_seqlen, m.last_device_node) == (
        branching,
        -1,
        leaf.node,
    )


@PAGE_SIZES
def test_mamba_branching_seqlen_without_a_validated_prefix(page_size):
    """Ports the device half of ``UnifiedRadixCacheSuite.test_mamba_branching_seqlen_disabled_
    under_hicache`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    A single leaf without a state: the match ends at the root on device and as best match and
    reports the branching point. Adapted (item 5): the whole page-aligned key (SGLang: the chunk
    floor). The host half (no branching point under HiCache when a host state validates) needs
    host Mamba states: skipped.
    """
    s = Scenario(page_size)
    tokens = s.seq(1, 3) + [77] * (page_size - 1)
    s.insert(tokens, state=False)
    m = s.match(tokens)
    assert (m.best_match_node, m.last_device_node, m.device_prefix_len) == (ROOT, ROOT, 0)
    assert m.mamba_branching_seqlen == 3 * page_size


def test_explicit_evict_continues_across_internal_steps():
    """Ports the Mamba case of ``TestUnifiedRadixAllocationEvictionRealComponents.
    test_explicit_evict_continues_across_internal_steps`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    A chain [1,2], [1..4], [1..6] (a state at each end); a Mamba eviction of two states
    tombstones the two internal ones ("first", root-side, and "second") and keeps the leaf with
    its KV and state; the Full KV of all stays.

    Adapted (item 1): SGLang's LRU holds first < second < leaf; hicache's is the reverse, and the
    unsteered eviction takes the leaf's state (deleting the leaf) and then second's (now a leaf,
    deleted too), keeping first. With the leaf locked, as a running request would, hicache
    reaches SGLang's outcome.
    """
    s = Scenario()
    first = s.insert([1, 2])
    second = s.insert([1, 2, 3, 4])
    leaf = s.insert([1, 2, 3, 4, 5, 6])
    r = s.evict_mamba(2)
    assert freed(r) == (sorted(tail(second, 2) + tail(leaf, 4)), [second.state, leaf.state])
    assert s.tree.num_nodes() == 1 and s.state(first.node) == first.state

    s = Scenario()
    first = s.insert([1, 2])
    second = s.insert([1, 2, 3, 4])
    leaf = s.insert([1, 2, 3, 4, 5, 6])
    receipt = s.lock(leaf.node)
    r = s.evict_mamba(2)
    assert freed(r) == ([], [first.state, second.state])
    assert (s.state(first.node), s.state(second.node), s.state(leaf.node)) == (-1, -1, leaf.state)
    assert s.tree.total_size() == 6
    s.unlock(receipt)


def test_temp_lock_on_a_tombstone_does_not_release_a_later_state_lock():
    """Ports ``UnifiedRadixCacheSuite.test_hicache_mamba_temp_lock_does_not_release_restored_
    tombstone`` to the device tier (sgl-project/sglang,
    test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py).

    A temporary lock taken while a node was a Mamba tombstone; the tombstone then gets a state;
    two more locks (SGLang: the load-back's and the request's) lock the state. Releasing the
    temporary lock must not take a Mamba lock away; the other two release it to 0.

    Adapted: SGLang restores the state by a host load-back; hicache has no host states, so an
    insert of the same key gives the tombstone its state. SGLang's segment lock counts the
    tombstone's Mamba ref in the temporary lock (3 refs, then 2); hicache's single-node lock
    takes none on a tombstone (its receipt has no mamba_node_id): 2 refs, and after the
    temporary release still 2.
    """
    s = Scenario()
    seq = [1, 2, 3, 4]
    node = s.insert(seq, state=False).node
    temp = s.lock(node)
    assert temp.mamba_node_id == -1
    restored = s.insert(seq)
    assert restored.result.mamba_taken
    load_back, request = s.lock(node), s.lock(node)
    assert load_back.mamba_node_id == request.mamba_node_id == node
    assert s.tree.node_info(node).mamba_lock_ref == 2
    s.unlock(temp)
    assert s.tree.node_info(node).mamba_lock_ref == 2
    s.unlock(load_back)
    s.unlock(request)
    info = s.tree.node_info(node)
    assert (info.mamba_lock_ref, info.lock_ref) == (0, 0)
    assert (s.tree.mamba_evictable_size(), s.tree.mamba_protected_size()) == (1, 0)


# --- test_mamba_radix_cache_match.py: TestMambaRadixCacheMatch -------------------------------


def test_n_minus_1_lookup_after_identical_prompt_lands_on_the_safe_boundary():
    """Ports ``TestMambaRadixCacheMatch.test_n_minus_1_lookup_after_identical_prompt_lands_on_
    the_safe_boundary`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_radix_cache_match.py; SGLang issue #22935).

    [1,2,3] with its state; the fresh prefill lookup [1,2] splits it and no state validates: 0
    tokens. Adapted (item 5): SGLang reports no branching point (under one 64-token chunk);
    hicache's grid is the page, so it reports 2.
    """
    s = Scenario()
    s.insert([1, 2, 3])
    m = s.match([1, 2])
    assert (m.device_prefix_len, m.mamba_branching_seqlen) == (0, 2)


def test_tombstone_does_not_block_matches_that_continue_past_it():
    """Ports ``TestMambaRadixCacheMatch.test_tombstone_does_not_block_matches_that_continue_
    past_it`` (sgl-project/sglang, test/registered/unit/mem_cache/test_mamba_radix_cache_match.py):
    after [1,2] split [1,2,3] into a tombstone, [1,2,3] still matches 3. Same expectations."""
    s = Scenario()
    s.insert([1, 2, 3])
    assert s.match([1, 2]).device_prefix_len == 0
    assert s.match([1, 2, 3]).device_prefix_len == 3


def test_match_never_returns_past_the_deepest_checkpoint():
    """Ports ``TestMambaRadixCacheMatch.test_match_never_returns_past_the_deepest_checkpoint``
    and ``test_branching_signal_points_at_the_chunk_aligned_boundary`` (sgl-project/sglang,
    test/registered/unit/mem_cache/test_mamba_radix_cache_match.py).

    States at 64 and 94; the 93-token lookup keeps the first 64 (the split [64:93] has no
    state). Adapted (item 5): SGLang's branching point is the chunk boundary 64; hicache's grid
    is the page (1 here), so it is the whole 93-token Full hit.
    """
    s = Scenario()
    s.insert(list(range(CHUNK)))
    s.insert(list(range(CHUNK + 30)))
    m = s.match(list(range(CHUNK + 29)))
    assert (m.device_prefix_len, m.mamba_branching_seqlen) == (CHUNK, CHUNK + 29)


def test_shared_prefix_divergence_stops_at_the_tombstone():
    """Ports ``TestMambaRadixCacheMatch.test_shared_prefix_divergence_stops_at_the_tombstone``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_mamba_radix_cache_match.py; SGLang
    issue #22935): [1,2,3] and [1,2,4,5] share a stateless [1,2] edge, so [1,2,4] reuses
    nothing. Same expectations."""
    s = Scenario()
    s.insert([1, 2, 3])
    s.insert([1, 2, 4, 5])
    assert s.match([1, 2, 4]).device_prefix_len == 0


def test_full_match_returns_kv_through_the_last_checkpoint():
    """Ports ``TestMambaRadixCacheMatch.test_full_match_returns_kv_through_the_last_checkpoint``
    (sgl-project/sglang, test/registered/unit/mem_cache/test_mamba_radix_cache_match.py): with
    states at 64 and 94, the 94-token key matches whole. Same expectations."""
    s = Scenario()
    s.insert(list(range(CHUNK)))
    last = s.insert(list(range(CHUNK + 30)))
    m = s.match(list(range(CHUNK + 30)))
    assert (m.device_prefix_len, m.last_device_node) == (CHUNK + 30, last.node)
