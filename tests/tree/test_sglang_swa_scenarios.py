"""SGLang's hybrid (Full + SWA) radix-cache unit scenarios, ported to the tree core.

Each test replays the insert / lock / evict / match steps of one SGLang test on ``RadixTree(...,
sliding_window_size=W)`` and checks, after every step, the tree's invariants, then the matched
lengths and ``swa_branching_seqlen``, which node has live SWA KV (device), a host SWA copy or an
SWA lock, the window-lock receipts and what an eviction frees (Full slots, and the Full slots of
new SWA tombstones whose SWA side only is freed). The docstring of each test names the SGLang
test it ports (all in the ``sgl-project/sglang`` repository unless said) and how the expectation
was adapted. The cases that need a request, a pool or KV events are listed in
``test_sglang_mamba_scenarios.py`` with where they went.

Sources:

- ``test/registered/unit/mem_cache/test_swa_unittest.py`` (``TestSWA``, legacy
  ``SWARadixCache``; ``TestSWASplitLeafOnInsert``);
- ``test/registered/unit/mem_cache/test_unified_radix_cache_unittest.py`` (its SWA configs,
  ``TestResumableInsertWalkSWA``, ``TestSegmentLockProtocol``);
- ``sgl-project/sglang-jax``, ``python/sgl_jax/test/mem_cache/test_swa_radix_cache.py`` (T1-T22).

Deliberate differences, used by several tests below:

1. **Recency order.** hicache touches a matched or inserted path deepest-first (ancestors are more
   recent), and a match refreshes the whole matched path, not a window + page cushion. So the SWA
   LRU's back is a leaf unless requests hold the leaves: then it is the node just above a held
   window, an internal victim that becomes an SWA tombstone. SGLang's tests that rely on its
   order are steered with locks (a held window is never evicted), saying which.
2. **Page-granular Full eviction.** ``evict(n)`` frees ``ceil(n / page_size)`` pages from the tail
   of the least recently used leaf; ``evict_swa`` takes whole nodes (a device leaf through the
   Full path, whole), as SGLang does for both.
3. **Tombstone recovery keeps the node's Full slots.** An SWA tombstone above the inserting
   request's frontier takes the request's SWA KV (the remap pairs ``swa_remap_dst`` /
   ``swa_remap_src``), whether or not its Full KV is locked; SGLang adopts the incoming Full KV
   when it is unlocked. Either way the request frees its duplicate Full slots.
4. **Receipts.** A window lock's receipt is a token count (``swa_lock_tokens``), exact across
   splits, instead of SGLang's uuid; there is no early SWA release (``dec_swa_lock_only``).
5. **Frontier at or past the key's end.** The new pages are still cached, as an SWA tombstone
   with its Full KV (SGLang's unified cache does the same); sglang-jax creates no node.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hicache._tree import RadixTree
from hicache.errors import InvalidArgumentError
from hicache.results import EvictResult, InsertResult
from tests.tree.test_sglang_mamba_scenarios import Scenario
from tests.tree.test_tree_ops import slots

ROOT = 0
NUM_SLOTS = 1 << 16
NUM_STATES = 256


@dataclass
class Inserted:
    """One insert: its result and the slots it gave."""

    result: InsertResult
    value: list[int]

    @property
    def node(self) -> int:
        return self.result.last_node


class SwaScenario(Scenario):
    """An SWA tree (Mamba too, optionally) fed with fresh slots, whose invariants are checked
    after every step (match, evict, lock and unlock as the Mamba scenarios')."""

    def __init__(self, page_size: int = 1, window: int = 4, mamba: bool = False) -> None:
        self.page_size = page_size
        self.tree = RadixTree(
            page_size,
            NUM_SLOTS,
            NUM_SLOTS,
            mamba=mamba,
            num_mamba_slots=NUM_STATES if mamba else 0,
            sliding_window_size=window,
            num_swa_host_slots=NUM_SLOTS,
        )
        self._next_slot = 0
        self._next_state = 0

    def fresh(self, num_tokens: int) -> list[int]:
        num_pages = -(-num_tokens // self.page_size)
        start = self._next_slot
        self._next_slot += num_pages * self.page_size
        return list(range(start, start + num_tokens))

    def insert(
        self,
        key: list[int],
        frontier: int = 0,
        value: list[int] | None = None,
        state: bool = False,
    ) -> Inserted:
        """Inserts ``key`` with ``value`` (fresh slots by default) and SWA frontier ``frontier``."""
        value = self.fresh(len(key)) if value is None else value
        mamba_value = -1
        if state:
            mamba_value, self._next_state = self._next_state, self._next_state + 1
        result = self.tree.insert(
            key, torch.tensor(value), mamba_value=mamba_value, swa_evicted_seqlen=frontier
        )
        self.tree.check_invariants()
        return Inserted(result, value)

    def evict_swa(self, num_tokens: int) -> EvictResult:
        result = self.tree.evict_swa(num_tokens)
        self.tree.check_invariants()
        return result

    def key(self, node: int) -> list[int]:
        return self.tree.node_key(node)

    def parent(self, node: int) -> int:
        return self.tree.node_info(node).parent_id

    def live(self, node: int) -> bool:
        """Whether the node's device SWA KV is live (else an SWA tombstone)."""
        return self.tree.node_info(node).has_swa_value

    def chain(self, node: int) -> list[tuple[int, bool]]:
        """(tokens, live) of each node on the path root..node, root-first (root excluded)."""
        out = []
        while node != ROOT:
            out.append((len(self.key(node)), self.live(node)))
            node = self.parent(node)
        return out[::-1]

    def swa_sizes(self) -> tuple[int, int]:
        return self.tree.swa_evictable_size(), self.tree.swa_protected_size()


# --- test_swa_unittest.py ---------------------------------------------------------------------


def test_swa_radix_cache_1_steered_to_sglang_end_state():
    """Ports ``TestSWA.test_swa_radix_cache_1`` (test/registered/unit/mem_cache/
    test_swa_unittest.py): window 4, page 1.

    Inserts [1,2,3], [1..7], [10,11,12], [1,2,3,4,5,60,70] (prefix_len 0, 3, 0, 5), evicts (Full
    1, SWA 0), (0, 1), (1, 2), then [1..5] matches 0 (its window is tombstoned) and
    [1,2,3,4,5,60,70] matches 7, ending at the [60,70] node.

    Adapted (module docstring items 1, 2): a request holds [60,70] during the evictions (its
    window is [4,5] + [60,70]), so that [1,2,3], above that window, is the internal SWA victim
    that SGLang's order made a tombstone; page-granular Full eviction takes [6,7] and
    [10,11,12] a page at a time (an SWA eviction of a device leaf takes the rest whole), and one
    more ``evict_swa(1)`` tombstones [1,2,3]. Every expected match then is SGLang's.
    """
    s = SwaScenario(page_size=1, window=4)
    a = s.insert([1, 2, 3])
    b = s.insert([1, 2, 3, 4, 5, 6, 7])
    c = s.insert([10, 11, 12])
    d = s.insert([1, 2, 3, 4, 5, 60, 70])
    assert [x.result.prefix_len for x in (a, b, c, d)] == [0, 3, 0, 5]
    split = s.parent(d.node)  # [4..7] split at [4,5]; [6,7] keeps its id
    assert (s.key(split), s.key(b.node), s.parent(b.node)) == ([4, 5], [6, 7], split)
    assert s.chain(d.node) == [(3, True), (2, True), (2, True)]

    held = s.lock(d.node)
    assert held.swa_lock_tokens == 4  # [60,70] + [4,5]: one window
    assert s.swa_sizes() == (3 + 2 + 3, 4)  # [1,2,3], [6,7], [10,11,12] unlocked

    r = s.evict(1)  # Full 1: the LRU leaf [6,7] loses its tail page
    assert slots(r.device_indices) == b.value[6:]
    r = s.evict_swa(1)  # SWA 1: the rest of [6,7], a device leaf, goes whole
    assert slots(r.device_indices) == b.value[5:6] and slots(r.swa_indices) == []
    r = s.evict(1)  # Full 1, SWA 2: [10,11,12]'s tail page, then the rest whole
    assert slots(r.device_indices) == c.value[2:]
    r = s.evict_swa(2)
    assert slots(r.device_indices) == c.value[:2]
    assert not s.tree.contains_node(b.node) and not s.tree.contains_node(c.node)
    r = s.evict_swa(1)  # steering: [1,2,3] is above the held window, Full-locked: a tombstone
    assert slots(r.swa_indices) == a.value and len(a.value) == 3
    assert slots(r.device_indices) == []
    assert s.chain(d.node) == [(3, False), (2, True), (2, True)]
    assert s.unlock(held) == 7

    m = s.match([1, 2, 3, 4, 5])  # req5: the run [4,5] is shorter than the window
    assert (m.device_prefix_len, m.best_match_node, m.swa_branching_seqlen) == (0, ROOT, 5)
    m = s.match([1, 2, 3, 4, 5, 60, 70])  # req6
    expected = a.value + b.value[3:5] + d.value[5:]  # [4,5] kept req2's slots
    assert m.device_prefix_len == 7 and slots(m.device_indices) == expected
    assert m.last_device_node == d.node and s.key(m.last_device_node) == [60, 70]
    assert m.swa_branching_seqlen == -1


SPLIT_LEAF_CASES = [  # (window, page_size, leaf_len, one-window tail), SGLang's table
    (4, 1, 12, 4),
    (4, 1, 5, 4),
    (1, 1, 5, 1),
    (4, 2, 12, 4),
    (8, 2, 12, 8),
    (4, 4, 12, 4),
    (3, 2, 12, 4),
    (5, 4, 12, 8),
    (3, 4, 12, 4),
]
NO_SPLIT_CASES = [(4, 1, 4), (4, 1, 3), (4, 2, 4), (3, 2, 4), (8, 2, 4), (4, 4, 4)]


@pytest.mark.parametrize(("window", "page_size", "leaf_len", "tail"), SPLIT_LEAF_CASES)
def test_split_leaf_on_insert_caps_the_locked_window(window, page_size, leaf_len, tail):
    """Ports ``TestSWASplitLeafOnInsert.test_flag_on_caps_protection_at_window`` and
    ``test_dec_lock_ref_after_split_balances_to_zero`` (test_swa_unittest.py).

    A fresh live leaf longer than ``ceil(window / page) * page`` tokens is cut so that its last
    node is that long: locking it protects one window of SWA KV (and the whole path's Full KV);
    the receipt's ``swa_lock_tokens`` is the tail's length and the release balances to 0.
    """
    assert -(-window // page_size) * page_size == tail
    s = SwaScenario(page_size, window)
    leaf = s.insert(list(range(leaf_len))).node
    assert len(s.key(leaf)) == tail
    assert s.chain(leaf) == [(leaf_len - tail, True), (tail, True)]
    receipt = s.lock(leaf)
    assert receipt.swa_lock_tokens == tail
    assert s.swa_sizes() == (leaf_len - tail, tail)
    assert s.tree.protected_size() == leaf_len
    assert s.unlock(receipt) == leaf_len
    assert s.swa_sizes() == (leaf_len, 0) and s.tree.protected_size() == 0
    assert all(s.tree.node_info(n).swa_lock_ref == 0 for n in s.tree.node_ids())


@pytest.mark.parametrize(("window", "page_size", "leaf_len"), NO_SPLIT_CASES)
def test_split_leaf_on_insert_not_within_a_window(window, page_size, leaf_len):
    """Ports ``TestSWASplitLeafOnInsert.test_flag_on_no_split_when_leaf_within_window``: a leaf
    no longer than the page-aligned window stays whole, and a lock protects all of it."""
    s = SwaScenario(page_size, window)
    leaf = s.insert(list(range(leaf_len))).node
    aligned = leaf_len - leaf_len % page_size
    assert s.key(leaf) == list(range(aligned)) and s.tree.num_nodes() == 1
    receipt = s.lock(leaf)
    assert receipt.swa_lock_tokens == aligned and s.swa_sizes() == (0, aligned)
    s.unlock(receipt)


def test_split_leaf_match_returns_the_whole_chain():
    """Ports ``TestSWASplitLeafOnInsert.test_match_prefix_returns_full_chain_after_split``: the cut
    is invisible to a match, which returns all 12 tokens and ends at the tail node."""
    s = SwaScenario(page_size=1, window=4)
    inserted = s.insert(list(range(12)))
    assert len(s.key(inserted.node)) == 4
    m = s.match(list(range(12)))
    assert slots(m.device_indices) == inserted.value and m.last_device_node == inserted.node


# --- test_unified_radix_cache_unittest.py, SWA configs ----------------------------------------


def test_unfinished_req_preserves_the_existing_eviction_boundary():
    """Ports ``test_swa_unfinished_req_preserves_existing_eviction_boundary``: window 4, 8 tokens
    with ``swa_evicted_seqlen`` 4 become a 4-token SWA tombstone above a 4-token live node, and
    all 8 tokens match (the live run is one window)."""
    s = SwaScenario(page_size=1, window=4)
    inserted = s.insert(list(range(8)), frontier=4)
    assert s.chain(inserted.node) == [(4, False), (4, True)]
    assert s.swa_sizes() == (4, 0) and s.tree.evictable_size() == 8
    assert sorted(slots(s.tree.all_swa_indices())) == inserted.value[4:]
    m = s.match(list(range(8)))
    assert slots(m.device_indices) == inserted.value and m.swa_branching_seqlen == -1
    # One token less: the run [4..6] is shorter than the window, and the walk splits there.
    m = s.match(list(range(7)))
    assert (m.device_prefix_len, m.swa_branching_seqlen) == (0, 7)


@pytest.mark.parametrize("past_end", [0, 1, 100])
def test_insert_keeps_the_full_leaf_when_the_whole_span_is_outside_the_window(past_end):
    """Ports ``test_swa_insert_keeps_full_leaf_when_entire_span_is_outside_window`` and
    sglang-jax T14/T15 (``test_new_leaf_never_tombstone(_exact_boundary)``): with
    ``swa_evicted_seqlen`` at or past the key's end the new leaf is still cached with its Full KV
    (the tree takes every slot: nothing for the caller to free), as an SWA tombstone (module
    docstring item 5: sglang-jax creates no node). No match ends in it."""
    s = SwaScenario(page_size=1, window=4)
    inserted = s.insert(list(range(8)), frontier=8 + past_end)
    assert (inserted.result.prefix_len, inserted.result.cached_len) == (0, 8)
    assert s.chain(inserted.node) == [(8, False)]
    assert s.tree.evictable_size() == 8 and s.swa_sizes() == (0, 0)
    m = s.match(list(range(8)))
    assert (m.device_prefix_len, m.swa_branching_seqlen) == (0, 8)
    # It is a useless tombstone: the next eviction that reaches it deletes it with its KV.
    r = s.evict(1)
    assert sorted(slots(r.device_indices)) == inserted.value and s.tree.num_nodes() == 0


def test_new_node_crossing_the_frontier_is_cut_there():
    """Ports sglang-jax T9 ``test_new_node_tombstone_split``: a new 20-token node with
    ``swa_evicted_seqlen`` 10 is a 10-token tombstone above a 10-token live leaf (window 16: the
    live part is within one window, so not cut again); page 4 floors an unaligned frontier."""
    s = SwaScenario(page_size=1, window=16)
    inserted = s.insert(list(range(20)), frontier=10)
    assert s.chain(inserted.node) == [(10, False), (10, True)]
    s = SwaScenario(page_size=4, window=16)
    inserted = s.insert(list(range(20)), frontier=10)  # floored to 8
    assert s.chain(inserted.node) == [(8, False), (12, True)]


def test_leaf_capped_to_the_window_after_the_frontier():
    """Ports ``test_swa_leaf_capped_to_window_on_insert``: the live part of a new leaf is cut to a
    one-window tail, so a lock pins one window of SWA KV and all the Full KV; a short leaf is
    not cut."""
    s = SwaScenario(page_size=1, window=4)
    inserted = s.insert(list(range(12)), frontier=2)
    assert s.chain(inserted.node) == [(2, False), (6, True), (4, True)]
    receipt = s.lock(inserted.node)
    assert (receipt.swa_lock_tokens, s.tree.protected_size()) == (4, 12)
    assert s.swa_sizes() == (6, 4)
    s.unlock(receipt)
    short = s.insert([50, 51, 52])
    assert s.chain(short.node) == [(3, True)]


def _tombstone_above_a_held_window(s: SwaScenario, length: int = 8) -> tuple[Inserted, int, int]:
    """Inserts ``range(length)`` (cut into a head and a one-window tail), holds the tail and
    tombstones the head (an internal SWA victim). Returns the insert, the head, the receipt."""
    inserted = s.insert(list(range(length)))
    head = s.parent(inserted.node)
    receipt = s.lock(inserted.node)
    r = s.evict_swa(1)
    assert slots(r.swa_indices) == inserted.value[: length - 4] and slots(r.device_indices) == []
    assert not s.live(head)
    return inserted, head, receipt


def test_evict_internal_tombstone_keeps_its_full_kv():
    """Ports ``test_swa_evict_internal_tombstone`` and sglang-jax T1 ``test_tombstone_creation``:
    an SWA eviction of an internal node (here: above a held window) makes it an SWA tombstone
    that keeps its Full KV (only the SWA side of ``swa_indices`` is freed); evicting every SWA
    leaf then leaves ``swa_evictable_size`` 0."""
    s = SwaScenario(page_size=1, window=4)
    inserted, head, receipt = _tombstone_above_a_held_window(s)
    assert s.tree.total_size() == 8 and sorted(slots(s.tree.all_device_indices())) == list(
        inserted.value
    )
    assert s.swa_sizes() == (0, 4)
    s.unlock(receipt)
    r = s.evict_swa(100)  # the tail, now a device leaf, goes whole; the tombstone cascades
    assert sorted(slots(r.device_indices)) == inserted.value
    assert s.swa_sizes() == (0, 0) and s.tree.num_nodes() == 0


def test_evict_internal_tombstone_cascades_to_mamba():
    """Ports ``test_swa_evict_cascades`` (FULL + SWA + MAMBA): SWA eviction of an internal node
    frees its Mamba state too (a state cannot be resumed without the window before it)."""
    s = SwaScenario(page_size=1, window=4, mamba=True)
    head = s.insert(list(range(4)), state=True)
    inserted = s.insert(list(range(8)), state=True)
    assert s.parent(inserted.node) == head.node
    receipt = s.lock(inserted.node)
    r = s.evict_swa(1)
    assert slots(r.swa_indices) == head.value and slots(r.mamba_indices) == [0]
    info = s.tree.node_info(head.node)
    assert (info.has_swa_value, info.has_mamba_value, info.has_device_value) == (False, False, True)
    s.unlock(receipt)


def test_full_leaf_eviction_frees_every_component():
    """Ports ``test_swa_evict_full_leaf_cascades_all``: a Full eviction of a leaf frees its SWA KV
    (the caller frees the SWA side of the Full slots) and its Mamba state."""
    s = SwaScenario(page_size=1, window=4, mamba=True)
    inserted = s.insert(list(range(4)), state=True)
    r = s.evict(4)
    assert slots(r.device_indices) == inserted.value and slots(r.mamba_indices) == [0]
    assert s.swa_sizes() == (0, 0) and slots(s.tree.all_swa_indices()) == []


def test_lock_protects_its_window_from_swa_eviction():
    """Ports ``test_swa_lock_protects_from_eviction``: however much SWA is evicted, the held
    window stays live; the node above it becomes a tombstone (it is Full-locked, so internal),
    other leaves go whole."""
    s = SwaScenario(page_size=1, window=4)
    inserted = s.insert(list(range(8)))
    other = s.insert([50, 51])
    receipt = s.lock(inserted.node)
    r = s.evict_swa(1000)
    assert sorted(slots(r.device_indices)) == other.value
    assert slots(r.swa_indices) == inserted.value[:4]
    assert s.chain(inserted.node) == [(4, False), (4, True)]
    assert s.swa_sizes() == (0, 4)
    s.unlock(receipt)
    assert s.swa_sizes() == (4, 0)


def test_deleting_the_leaf_cascades_into_the_tombstone_parent():
    """Ports sglang-jax T6/T18 (``test_cascade_delete_tombstone``,
    ``test_delete_tombstone_leaf_uses_child_key_fn``): once its last child is evicted, a childless
    SWA tombstone (no host copy) is useless and is deleted with its Full KV."""
    s = SwaScenario(page_size=1, window=4)
    inserted, head, receipt = _tombstone_above_a_held_window(s)
    s.unlock(receipt)
    r = s.evict(4)  # the tail leaf; then its parent, the tombstone
    assert sorted(slots(r.device_indices)) == inserted.value
    assert r.dropped_tokens == 8 and s.tree.num_nodes() == 0


def test_tombstones_reset_the_window_run():
    """Ports sglang-jax T2 ``test_tombstone_prefix_match`` and T13
    ``test_tombstone_reset_unconditional``: a live suffix of at least one window matches through
    any tombstones above it, and every tombstone resets the run (two in a row too)."""
    s = SwaScenario(page_size=1, window=4)
    inserted = s.insert(list(range(13)), frontier=8)  # [0..7] tombstone, [8..12] live
    assert s.chain(inserted.node) == [(8, False), (1, True), (4, True)]
    assert s.match(list(range(13))).device_prefix_len == 13  # T2: a 5-token live suffix
    s.match(list(range(4)))  # splits the tombstone: two in a row
    assert s.chain(inserted.node) == [(4, False), (4, False), (1, True), (4, True)]
    assert s.match(list(range(13))).device_prefix_len == 13
    m = s.match(list(range(11)))  # the run [8..10] is shorter than the window
    assert (m.device_prefix_len, m.swa_branching_seqlen) == (0, 11)


def test_recovery_remaps_swa_onto_a_locked_full_value():
    """Ports ``test_swa_unfinished_recovery_preserves_locked_full_value``: a request re-inserts
    over an SWA tombstone whose Full KV is locked, its frontier below the tombstone: the node
    keeps its Full slots, the request's SWA KV is mapped onto them (``swa_remap_dst`` its slots,
    ``swa_remap_src`` the request's) and the request frees only its duplicate Full slots
    (``value[:prefix_len]``). The recovered node is live again and the window matches."""
    s = SwaScenario(page_size=1, window=4)
    inserted, head, receipt = _tombstone_above_a_held_window(s)
    again = s.insert(list(range(8)), frontier=0)
    assert again.result.prefix_len == 8
    assert slots(again.result.swa_remap_dst) == inserted.value[:4]
    assert slots(again.result.swa_remap_src) == again.value[:4]
    assert s.live(head) and sorted(slots(s.tree.all_device_indices())) == inserted.value
    assert s.swa_sizes() == (4, 4)
    s.unlock(receipt)
    assert slots(s.match(list(range(8))).device_indices) == inserted.value


def test_recovery_of_an_unlocked_tombstone_keeps_its_full_value_too():
    """Ports the unlocked case of ``TestResumableInsertWalkSWA`` (tombstone recovery), adapted
    (module docstring item 3): SGLang adopts the incoming Full KV of an unlocked tombstone; hicache
    remaps the SWA side the same way as for a locked one, and the node keeps its Full slots."""
    s = SwaScenario(page_size=1, window=4)
    inserted, head, receipt = _tombstone_above_a_held_window(s)
    s.unlock(receipt)
    again = s.insert(list(range(8)))
    assert slots(again.result.swa_remap_dst) == inserted.value[:4]
    assert slots(again.result.swa_remap_src) == again.value[:4]
    assert s.live(head) and sorted(slots(s.tree.all_device_indices())) == inserted.value


@pytest.mark.parametrize(
    ("frontier", "chain", "remapped"),
    [
        (0, [(4, True), (4, True)], range(0, 4)),  # T3: at or below the node's start: revived
        (2, [(2, False), (2, True), (4, True)], range(2, 4)),  # T4: inside: cut, back revived
        (4, [(4, False), (4, True)], range(0)),  # T5: at its end or past: still a tombstone
        (8, [(4, False), (4, True)], range(0)),
    ],
)
def test_tombstone_healing_by_the_frontier(frontier, chain, remapped):
    """Ports sglang-jax T3-T5 ``test_tombstone_healing_branch1/2/3`` and the floor case of
    ``TestResumableInsertWalkSWA`` (a duplicate slice below the request's eviction floor frees
    Full only): a re-insert revives the part of a tombstone at or above its frontier (cut there),
    never the part below it (the request has no SWA KV there)."""
    s = SwaScenario(page_size=1, window=4)
    inserted, head, receipt = _tombstone_above_a_held_window(s)
    again = s.insert(list(range(8)), frontier=frontier)
    assert s.chain(inserted.node) == chain
    assert slots(again.result.swa_remap_dst) == [inserted.value[i] for i in remapped]
    assert slots(again.result.swa_remap_src) == [again.value[i] for i in remapped]
    s.unlock(receipt)


def test_reinsert_with_the_trees_own_slots_remaps_nothing():
    """A request that matched gives back the tree's own slots for its prefix: a tombstone it
    walks is not recovered (no KV of its own to map), whatever its frontier."""
    s = SwaScenario(page_size=1, window=4)
    inserted, head, receipt = _tombstone_above_a_held_window(s)
    again = s.insert(list(range(8)), value=list(inserted.value))
    assert slots(again.result.swa_remap_dst) == [] and not s.live(head)
    s.unlock(receipt)


def test_branching_seqlen_uses_the_device_full_hit_and_a_checkpoint_reaches_it():
    """Ports ``test_swa_branching_seqlen_uses_device_full_hit`` (and the ``_caps_insert_after_
    forward`` / ``_branch_insert_releases_forward_overshoot`` follow-ups, at tree level): when the
    window at the end of the Full walk is tombstoned, the match stops at the last window and
    reports the Full hit as ``swa_branching_seqlen``; the request recomputes from there and
    inserts up to it (the tree's slots for its prefix, its own above: the tombstone takes its SWA
    KV), and the rematch reaches it."""
    s = SwaScenario(page_size=1, window=4)
    first = s.insert(list(range(12)))  # [0..7] + [8..11]
    deeper = s.insert(list(range(16)))  # + [12..15]
    middle = s.parent(deeper.node)
    assert s.key(middle) == [8, 9, 10, 11]
    receipt = s.lock(deeper.node)
    r = s.evict_swa(1)  # [8..11], Full-locked above the held window
    assert slots(r.swa_indices) == first.value[8:12] and not s.live(middle)
    s.unlock(receipt)
    m = s.match(list(range(12)))
    assert (m.device_prefix_len, m.swa_branching_seqlen) == (8, 12)
    key = list(range(m.swa_branching_seqlen))
    branch = s.insert(key, frontier=4, value=slots(m.device_indices) + s.fresh(4))
    assert slots(branch.result.swa_remap_dst) == first.value[8:12]
    m = s.match(list(range(12)))
    assert (m.device_prefix_len, m.swa_branching_seqlen) == (12, -1)


def test_branching_seqlen_when_no_window_validates():
    """The Full walk matched, but its only window is a tombstone: nothing validates (the root's
    empty prefix does) and the whole Full hit is the branching point."""
    s = SwaScenario(page_size=4, window=4)
    s.insert(list(range(8)), frontier=8)
    m = s.match(list(range(9)))
    assert (m.device_prefix_len, m.best_match_node, m.swa_branching_seqlen) == (0, ROOT, 8)


# --- TestSegmentLockProtocol (window-segment locks and their receipts) ------------------------


def test_segment_lock_release_balances_across_a_split():
    """Ports ``TestSegmentLockProtocol``'s balanced release across a split: a match splits a node
    inside a held segment; the receipt (a token count) still releases exactly that segment."""
    s = SwaScenario(page_size=1, window=6)
    inserted = s.insert(list(range(8)))  # [0,1] + [2..7] (one window of 6)
    s.insert(list(range(10)))  # + [8,9]: the held segment is [8,9] + [2..7]
    receipt = s.lock(s.match(list(range(10))).last_device_node)
    assert receipt.swa_lock_tokens == 8 and s.swa_sizes() == (2, 8)
    s.match([0, 1, 2, 3, 99])  # splits [2..7] at [2,3]: both parts keep the SWA lock
    assert [s.tree.node_info(n).swa_lock_ref for n in s.tree.node_ids()].count(1) == 3
    assert s.unlock(receipt) == 10
    assert s.swa_sizes() == (10, 0)
    assert all(s.tree.node_info(n).swa_lock_ref == 0 for n in s.tree.node_ids())
    assert inserted.result.prefix_len == 0


def test_segment_lock_wrong_receipts_fail_loudly_and_change_nothing():
    """Ports ``TestSegmentLockProtocol``'s loud failures on bad receipts: a missing SWA part, a
    count that does not end on a segment boundary, one past the held segment, and a receipt used
    twice raise InvalidArgumentError and leave the tree as it was."""
    s = SwaScenario(page_size=1, window=4)
    inserted = s.insert(list(range(8)))  # [0..3] + [4..7]
    receipt = s.lock(inserted.node)
    assert receipt.swa_lock_tokens == 4
    before = s.tree.pretty_print()
    for tokens in (0, 3, 8):
        with pytest.raises(InvalidArgumentError):
            s.tree.dec_lock_ref(receipt.node_id, -1, tokens)
        assert s.tree.pretty_print() == before
    s.unlock(receipt)
    after = s.tree.pretty_print()
    with pytest.raises(InvalidArgumentError):
        s.unlock(receipt)
    assert s.tree.pretty_print() == after


def test_lock_on_a_tombstone_then_recovered_is_released_by_its_receipt():
    """Ports ``TestSegmentLockProtocol``'s "no lock theft after a tombstone is rebuilt": a window
    lock that holds an SWA tombstone still holds it once an insert revives it (then protected);
    its receipt releases it (then evictable), and another lock's count is untouched."""
    s = SwaScenario(page_size=1, window=8)
    inserted = s.insert(list(range(8)), frontier=4)  # [0..3] tombstone + [4..7]
    head = s.parent(inserted.node)
    receipt = s.lock(inserted.node)
    assert receipt.swa_lock_tokens == 8 and s.swa_sizes() == (0, 4)
    s.insert(list(range(8)))  # revives [0..3] under the lock
    assert s.live(head) and s.swa_sizes() == (0, 8)
    other = s.lock(head)
    assert other.swa_lock_tokens == 4
    s.unlock(receipt)
    assert s.swa_sizes() == (4, 4) and s.tree.node_info(head).swa_lock_ref == 1
    s.unlock(other)
    assert s.swa_sizes() == (8, 0)
