"""The Mamba component of the tree core (device tier): states, validators, locks, tombstones.

SGLang 0.5.23's UnifiedRadixCache with FULL + MAMBA (reference §2.3-2.5, §3.1, §3.11): a node may
hold the recurrent state after its last token; a match ends where the deepest state is; a
childless tombstone is deleted, cascading up, stopping at locked or in-flight nodes (DESIGN.md
failure class 5, tested as a field scenario in tests/regressions/test_fc5_*).
"""

from __future__ import annotations

import pytest
import torch

from hicache._tree import RadixTree
from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from tests.tree.test_tree_ops import slots, snapshot


def mamba_tree(page_size: int = 1) -> RadixTree:
    return RadixTree(page_size, 1024, 1024, mamba=True, num_mamba_slots=64)


def insert(tree: RadixTree, key: list[int], state: int = -1, first_slot: int | None = None):
    base = first_slot if first_slot is not None else 10 * key[0]
    value = torch.arange(base, base + len(key), dtype=torch.int64)
    result = tree.insert(key, value, mamba_value=state)
    tree.check_invariants()
    return result


def full_snapshot(tree: RadixTree) -> tuple:
    return (*snapshot(tree), tree.mamba_evictable_size(), tree.mamba_protected_size())


# --- match and insert -----------------------------------------------------------------------


def test_match_ends_at_the_deepest_node_holding_a_state():
    tree = mamba_tree()
    a = insert(tree, [1, 2, 3, 4], state=5, first_slot=0)
    assert a.mamba_taken and not a.mamba_exist
    b = insert(tree, [1, 2, 3, 4, 5, 6], state=6, first_slot=0)
    assert (b.prefix_len, b.mamba_taken) == (4, True)
    m = tree.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert slots(m.device_indices) == [0, 1, 2, 3, 4, 5]
    assert m.last_device_node == m.best_match_node == b.last_node
    assert m.mamba_branching_seqlen == -1  # nothing matched beyond the state
    # A key that leaves the stateful path inside node b: the match falls back to a's state, and
    # the Full tokens matched beyond it are the branching point.
    m = tree.match_prefix([1, 2, 3, 4, 5, 9])
    assert slots(m.device_indices) == [0, 1, 2, 3]
    assert m.best_match_node == a.last_node and m.mamba_branching_seqlen == 5
    # Inside a's own tokens: no state there, only the root's empty prefix validates.
    m = tree.match_prefix([1, 2, 8])
    assert (m.device_prefix_len, m.best_match_node, m.mamba_branching_seqlen) == (0, 0, 2)
    tree.check_invariants()


def test_a_split_leaves_the_state_on_the_lower_node_which_keeps_the_id():
    tree = mamba_tree()
    leaf = insert(tree, [1, 2, 3, 4], state=7).last_node
    tree.match_prefix([1, 2, 9])  # splits [1 2 | 3 4]
    lower = tree.node_info(leaf)
    upper = tree.node_info(lower.parent_id)
    assert (lower.num_tokens, lower.has_mamba_value, lower.mamba_value) == (2, True, 7)
    assert (upper.num_tokens, upper.has_mamba_value) == (2, False)
    tree.check_invariants()


def test_an_existing_state_is_kept_and_the_callers_copy_is_reported():
    tree = mamba_tree()
    insert(tree, [1, 2, 3], state=3)
    again = insert(tree, [1, 2, 3], state=4)
    assert again.mamba_exist and not again.mamba_taken
    assert slots(tree.all_mamba_indices()) == [3]
    # A node on the path without a state (a tombstone) adopts the caller's state.
    insert(tree, [1, 2, 3, 4, 5], state=5)
    tree.match_prefix([1, 2, 3, 4, 9])  # splits [4 5] into [4 | 5]: the upper part has none
    tombstone = insert(tree, [1, 2, 3, 4], state=6)
    assert tombstone.mamba_taken and sorted(slots(tree.all_mamba_indices())) == [3, 5, 6]


def test_mamba_values_are_checked():
    with pytest.raises(InvalidArgumentError, match="without the Mamba component"):
        RadixTree(1, 64).insert([1, 2], torch.arange(2), mamba_value=0)
    tree = mamba_tree()
    before = full_snapshot(tree)
    with pytest.raises(IndexOutOfRangeError, match="mamba_value 64 is out of range"):
        tree.insert([1, 2], torch.arange(2), mamba_value=64)
    with pytest.raises(InvalidArgumentError, match="num_mamba_slots"):
        RadixTree(1, 64, mamba=True, num_mamba_slots=-1)
    assert full_snapshot(tree) == before


# --- locks and receipts -----------------------------------------------------------------------


def test_a_lock_covers_the_state_of_the_node_it_locks_and_needs_its_receipt():
    tree = mamba_tree()
    leaf = insert(tree, [1, 2, 3, 4], state=1).last_node
    receipt = tree.inc_lock_ref(leaf)
    assert receipt.mamba_node_id == leaf
    assert (tree.mamba_evictable_size(), tree.mamba_protected_size()) == (0, 1)
    assert len(tree.evict_mamba(1).mamba_indices) == 0  # a locked state is never freed
    before = full_snapshot(tree)
    with pytest.raises(InvalidArgumentError, match="pass the receipt's mamba_node_id"):
        tree.dec_lock_ref(receipt.node_id)
    with pytest.raises(InvalidArgumentError, match="wrong receipt"):
        tree.dec_lock_ref(receipt.node_id, receipt.node_id + 100)
    assert full_snapshot(tree) == before
    tree.match_prefix([1, 2, 9])  # a split under the lock: the receipt stays valid
    tree.check_invariants()
    assert tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id) == 4
    with pytest.raises(InvalidArgumentError, match="holds no Mamba lock"):
        tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
    assert (tree.mamba_evictable_size(), tree.mamba_protected_size()) == (1, 0)
    tree.check_invariants()


def test_locking_a_tombstone_locks_no_state():
    tree = mamba_tree()
    insert(tree, [1, 2, 3, 4], state=1)
    m = tree.match_prefix([1, 2, 9])  # splits: [1 2] has no state
    upper = tree.node_info(tree.node_info(insert(tree, [1, 2, 3, 4]).last_node).parent_id)
    receipt = tree.inc_lock_ref(upper.node_id)
    assert receipt.mamba_node_id == -1 and m.best_match_node == 0
    tree.dec_lock_ref(receipt.node_id)
    tree.check_invariants()


# --- eviction and the tombstone cascade -------------------------------------------------------


def test_evict_mamba_tombstones_internal_states_and_deletes_useless_leaves():
    tree = mamba_tree()
    insert(tree, [1, 2], state=1, first_slot=0)
    insert(tree, [1, 2, 3, 4], state=2, first_slot=0)  # leaf under the [1 2] state
    insert(tree, [1, 2, 5, 6], state=3, first_slot=100)
    # Make the internal [1 2] state the least recently used one.
    tree.match_prefix([1, 2, 3, 4])
    tree.match_prefix([1, 2, 5, 6])
    r = tree.evict_mamba(1)
    assert slots(r.mamba_indices) in ([1], [2], [3])
    # Every state was touched with its path; the deepest are older than their ancestors, so the
    # back is the [3 4] leaf: a leaf's state goes with the leaf (a childless tombstone is useless).
    assert slots(r.mamba_indices) == [2] and slots(r.device_indices) == [2, 3]
    assert r.dropped_tokens == 2 and tree.match_prefix([1, 2, 3, 4]).device_prefix_len == 2
    tree.check_invariants()
    # Now tombstone the internal state: the node stays (it has a child), its KV too.
    receipt = tree.inc_lock_ref(tree.match_prefix([1, 2, 5, 6]).last_device_node)
    r = tree.evict_mamba(1)
    assert slots(r.mamba_indices) == [1] and len(r.device_indices) == 0
    assert tree.match_prefix([1, 2, 5, 6]).device_prefix_len == 4  # the leaf's state still serves
    assert tree.match_prefix([1, 2]).device_prefix_len == 0  # [1 2] is a tombstone now
    tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
    # Evicting the last state deletes the leaf, and the cascade takes the tombstone parent too.
    r = tree.evict_mamba(5)
    assert slots(r.mamba_indices) == [3]
    assert sorted(slots(r.device_indices)) == [0, 1, 102, 103]
    assert tree.num_nodes() == 0 and tree.total_size() == 0
    tree.check_invariants()


def test_full_eviction_frees_the_states_it_takes_and_cascades():
    tree = mamba_tree(page_size=2)
    insert(tree, [1, 1, 2, 2], state=1, first_slot=0)
    insert(tree, [1, 1, 2, 2, 3, 3, 4, 4], state=2, first_slot=0)
    r = tree.evict(2, write_back=False)  # one page from the LRU leaf [3 3 4 4]: its end is gone
    assert slots(r.mamba_indices) == [2]
    # The trimmed leaf lost its state: a childless tombstone, deleted whole by the cascade.
    assert sorted(slots(r.device_indices)) == [4, 5, 6, 7]
    assert tree.match_prefix([1, 1, 2, 2, 3, 3]).device_prefix_len == 4
    tree.check_invariants()
    r = tree.evict(100, write_back=False)
    assert slots(r.mamba_indices) == [1] and tree.num_nodes() == 0
    assert tree.mamba_evictable_size() == 0
    tree.check_invariants()


@pytest.mark.parametrize("hold", ["lock", "host_lock", "backup"])
def test_the_cascade_stops_at_a_held_node(hold):
    tree = mamba_tree()
    insert(tree, [1, 2], first_slot=0)  # no state: a tombstone from the start
    leaf = insert(tree, [1, 2, 3, 4], state=9, first_slot=0).last_node
    parent = tree.node_info(leaf).parent_id
    if hold == "lock":
        tree.inc_lock_ref(parent)
    elif hold == "host_lock":
        tree.inc_host_lock_ref(parent)
    else:
        tree.commit_backup(parent, torch.arange(2))
        tree.inc_lock_ref(parent)  # the cache locks what it backs up, until the ack
    r = tree.evict_mamba(1)
    assert slots(r.mamba_indices) == [9] and sorted(slots(r.device_indices)) == [2, 3]
    assert tree.contains_node(parent) and not tree.contains_node(leaf)
    tree.check_invariants()


# --- host tier: states backed up with the KV, kept by demotion, loaded back with the anchor ----


def backed_up_tree(state: int = 2, host_state: int = 5):
    tree = mamba_tree(page_size=4)
    leaf = insert(tree, list(range(8)), state=state, first_slot=0).last_node
    plan = tree.backup_plan(leaf, 1)
    assert plan.states == (state,)
    tree.commit_backup(leaf, torch.arange(8, 16), host_state=host_state)
    tree.finish_backup(leaf)
    tree.check_invariants()
    return tree, leaf


def test_a_demoted_node_keeps_its_host_state_and_loads_it_back_with_the_kv():
    tree, leaf = backed_up_tree()
    evicted = tree.evict(8, write_back=False)
    assert slots(evicted.mamba_indices) == [2] and evicted.demoted_tokens == 8
    info = tree.node_info(leaf)
    assert (info.has_device_value, info.has_mamba_host_value, info.mamba_host_value) == (
        False,
        True,
        5,
    )
    m = tree.match_prefix(list(range(8)))
    assert (m.best_match_node, m.last_device_node, m.host_hit_length) == (leaf, 0, 8)
    plan = tree.load_back_plan(leaf)
    assert plan.states == (5,) and slots(plan.indices) == list(range(8, 16))
    before = full_snapshot(tree)
    with pytest.raises(InvalidArgumentError, match="needs a device_state slot"):
        tree.commit_load_back(leaf, torch.arange(20, 28))
    assert full_snapshot(tree) == before
    tree.commit_load_back(leaf, torch.arange(20, 28), device_state=7)
    receipt = tree.inc_lock_ref(leaf)
    assert receipt.mamba_node_id == leaf  # the loaded state is locked with the KV
    tree.check_invariants()
    tree.finish_load_back(leaf)
    tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
    m = tree.match_prefix(list(range(8)))
    assert slots(m.device_indices) == list(range(20, 28)) and m.last_device_node == leaf
    assert tree.node_info(leaf).mamba_value == 7 and tree.node_info(leaf).mamba_host_value == 5
    tree.check_invariants()


def test_host_states_freed_inside_the_tree_wait_in_the_outbox():
    tree, leaf = backed_up_tree()
    tree.evict(8, write_back=False)
    assert tree.evict_host(8).tolist() == list(range(8, 16))
    assert slots(tree.take_freed_mamba_host_slots()) == [5]
    assert slots(tree.take_freed_mamba_host_slots()) == []  # handed over once
    assert tree.num_nodes() == 0
    # A failed backup frees its host state too.
    leaf = insert(tree, list(range(8)), state=3, first_slot=0).last_node
    tree.commit_backup(leaf, torch.arange(8, 16), host_state=6)
    receipt = tree.inc_lock_ref(leaf)
    assert slots(tree.abort_backup(leaf)) == list(range(8, 16))
    assert slots(tree.take_freed_mamba_host_slots()) == [6]
    assert not tree.node_info(leaf).has_mamba_host_value
    tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
    tree.check_invariants()


def test_a_failed_load_hands_its_state_back():
    tree, leaf = backed_up_tree()
    tree.evict(8, write_back=False)
    tree.inc_host_lock_ref(leaf)
    tree.commit_load_back(leaf, torch.arange(20, 28), device_state=7)
    receipt = tree.inc_lock_ref(leaf)
    tree.abort_load_back(leaf)
    tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)  # demotes the failed node
    tree.dec_host_lock_ref(leaf)
    assert slots(tree.take_failed_load_slots()) == list(range(20, 28))
    assert slots(tree.take_failed_load_states()) == [7]
    info = tree.node_info(leaf)
    assert not info.has_device_value and info.has_mamba_host_value  # still matchable from host
    assert tree.match_prefix(list(range(8))).best_match_node == leaf
    tree.check_invariants()


def test_host_state_arguments_are_checked():
    tree = mamba_tree(page_size=4)
    leaf = insert(tree, list(range(8)), first_slot=0).last_node  # no state
    before = full_snapshot(tree)
    with pytest.raises(InvalidArgumentError, match="holds no device Mamba state"):
        tree.commit_backup(leaf, torch.arange(8, 16), host_state=1)
    assert full_snapshot(tree) == before
    tree, leaf = backed_up_tree()
    tree.evict(8, write_back=False)
    tree.match_prefix(list(range(8)))
    bounded = RadixTree(4, 64, 64, mamba=True, num_mamba_slots=8, num_mamba_host_slots=8)
    other = bounded.insert(list(range(4)), torch.arange(4), mamba_value=1).last_node
    with pytest.raises(IndexOutOfRangeError, match="host_state 8 is out of range"):
        bounded.commit_backup(other, torch.arange(4), host_state=8)
    bounded.check_invariants()


def test_a_demoted_leaf_deleted_by_the_cascade_counts_as_dropped_not_demoted():
    # A backed-up leaf loses its state when demoted: a childless host-only tombstone, which the
    # cascade deletes with its host copy. Its tokens did not stay in the tree as host-only, so
    # they are dropped (KV gone), not demoted (the metrics' "L1 evictions that kept a host copy").
    tree = mamba_tree(page_size=2)
    leaf = insert(tree, [1, 1, 2, 2], state=1, first_slot=0).last_node
    tree.commit_backup(leaf, torch.arange(10, 14))
    tree.finish_backup(leaf)
    r = tree.evict(2, write_back=False)  # one page asked: the leaf is split, its tail demoted
    assert slots(r.mamba_indices) == [1]
    assert sorted(slots(r.host_indices)) == [10, 11, 12, 13] and tree.num_nodes() == 0
    assert (r.demoted_tokens, r.dropped_tokens) == (0, 4)
    tree.check_invariants()
    # A demoted leaf the cascade cannot delete (host-locked) stays host-only: demoted.
    leaf = insert(tree, [3, 3, 4, 4], state=2, first_slot=20).last_node
    tree.commit_backup(leaf, torch.arange(30, 34))
    tree.finish_backup(leaf)
    tree.inc_host_lock_ref(leaf)
    r = tree.evict(4, write_back=False)
    assert (r.demoted_tokens, r.dropped_tokens) == (4, 0) and len(r.host_indices) == 0
    assert tree.node_info(leaf).has_host_value and not tree.node_info(leaf).has_device_value
    tree.dec_host_lock_ref(leaf)
    tree.check_invariants()


def test_write_back_state_eviction_asks_for_a_backup_first():
    """SGLang PR #28468: under write_back, a state is backed up before it is tombstoned."""
    tree = mamba_tree(page_size=4)
    leaf = insert(tree, list(range(8)), state=3, first_slot=0).last_node
    r = tree.evict_mamba(1, write_back=True)
    assert r.needs_backup == leaf and len(r.mamba_indices) == 0  # nothing lost yet
    plan = tree.backup_plan(leaf, 0)
    tree.commit_backup(leaf, torch.arange(8, 16), host_state=plan.states[-1] + 10)
    tree.finish_backup(leaf)
    r = tree.evict_mamba(1, write_back=True)
    assert slots(r.mamba_indices) == [3] and r.needs_backup == -1
    info = tree.node_info(leaf)  # a device tombstone whose state survives on host
    assert info.has_device_value and not info.has_mamba_value and info.has_mamba_host_value
    tree.evict(8, write_back=True)  # demoted: matchable from host with its state
    assert tree.match_prefix(list(range(8))).best_match_node == leaf
    tree.check_invariants()


def test_a_state_published_after_its_nodes_backup_gets_an_incremental_backup():
    tree = mamba_tree(page_size=4)
    leaf = insert(tree, list(range(8)), first_slot=0).last_node  # no state yet
    tree.commit_backup(leaf, torch.arange(8, 16))
    tree.finish_backup(leaf)
    assert tree.state_backup_plan(leaf).node_ids == []
    insert(tree, list(range(8)), state=4, first_slot=0)  # the state comes after the backup
    plan = tree.state_backup_plan(leaf)
    assert (plan.node_ids, plan.lengths, plan.states) == ([leaf], [0], (4,))
    unbacked = insert(tree, [9, 9, 9, 9], state=5, first_slot=40).last_node
    before = full_snapshot(tree)
    with pytest.raises(InvalidArgumentError, match="see state_backup_plan"):
        tree.commit_state_backup(unbacked, 1)  # its KV is not on host: a full backup's job
    assert full_snapshot(tree) == before
    tree.commit_state_backup(leaf, 6)
    receipt = tree.inc_lock_ref(leaf)
    tree.check_invariants()
    assert tree.state_backup_plan(leaf).node_ids == []  # in flight: not planned twice
    # The cascade never deletes a node whose state is being copied.
    tree.abort_state_backup(leaf)
    assert slots(tree.take_freed_mamba_host_slots()) == [6]
    assert not tree.node_info(leaf).has_mamba_host_value
    tree.commit_state_backup(leaf, 7)
    tree.finish_state_backup(leaf)
    tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
    assert tree.node_info(leaf).mamba_host_value == 7
    with pytest.raises(InvalidArgumentError, match="no state backup in flight"):
        tree.finish_state_backup(leaf)
    tree.check_invariants()
    tree.evict(100, write_back=False)  # demoted with its host state: still matchable from host
    assert tree.match_prefix(list(range(8))).best_match_node == leaf


def test_a_receipt_given_back_without_its_mamba_part_is_rejected_under_other_locks():
    tree = mamba_tree()
    parent = insert(tree, [1, 2], state=1, first_slot=0).last_node
    child = insert(tree, [1, 2, 3, 4], state=2, first_slot=0).last_node
    a = tree.inc_lock_ref(parent)  # holds the parent's state
    b = tree.inc_lock_ref(child)  # its path lock covers the parent too
    assert tree.node_info(parent).lock_ref == 2 and a.mamba_node_id == parent
    before = full_snapshot(tree)
    with pytest.raises(InvalidArgumentError, match="every lock taken here holds its Mamba state"):
        tree.dec_lock_ref(a.node_id)  # the Mamba part forgotten: the state would stay locked
    upper = insert(tree, [7, 7], first_slot=40).last_node  # no states below here
    lower = insert(tree, [7, 7, 8, 8], first_slot=40).last_node
    c = tree.inc_lock_ref(lower)  # the receipt names `lower`; `upper` is locked via the path only
    before = full_snapshot(tree)
    with pytest.raises(InvalidArgumentError, match="not a receipt's node_id"):
        tree.dec_lock_ref(upper)
    assert full_snapshot(tree) == before
    tree.dec_lock_ref(c.node_id, c.mamba_node_id)
    tree.dec_lock_ref(b.node_id, b.mamba_node_id)
    tree.dec_lock_ref(a.node_id, a.mamba_node_id)
    tree.check_invariants()
