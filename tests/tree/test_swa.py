"""Unit tests of the SWA component of ``RadixTree``: caller mistakes, host SWA copies, and bugs.

Caller mistakes (a bad ``swa_evicted_seqlen``, a wrong window-lock receipt, host SWA slots for a
node without live SWA KV or of the wrong length) raise :class:`InvalidArgumentError` (or
:class:`IndexOutOfRangeError` for a slot past its pool) and leave the tree exactly as it was: a
throwing call changes nothing (``radix_tree.h``). The host tier of SWA (backup, demotion,
host-only matches, load-back, host eviction, failed backups) is spelled out once here; the
differential machine (``test_differential_swa.py``) covers its interleavings.
"""

from __future__ import annotations

import pytest
import torch

from hicache._tree import RadixTree
from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from tests.tree.test_tree_ops import slots

NUM_SLOTS = 1024


def snapshot(tree: RadixTree) -> tuple:
    """Everything a failed call must leave unchanged (pretty_print has every node's SWA state,
    locks and access time)."""
    return (
        tree.pretty_print(),
        tree.swa_evictable_size(),
        tree.swa_protected_size(),
        tree.swa_host_size(),
        sorted(slots(tree.all_swa_indices())),
        sorted(slots(tree.all_swa_host_indices())),
    )


def swa_tree(page_size: int = 1, window: int = 4, mamba: bool = False) -> RadixTree:
    return RadixTree(
        page_size,
        NUM_SLOTS,
        NUM_SLOTS,
        mamba=mamba,
        num_mamba_slots=NUM_SLOTS if mamba else 0,
        sliding_window_size=window,
        num_swa_host_slots=NUM_SLOTS,
    )


def test_negative_window_is_rejected():
    with pytest.raises(InvalidArgumentError, match="sliding_window_size"):
        RadixTree(1, sliding_window_size=-1)
    with pytest.raises(InvalidArgumentError, match="num_swa_host_slots"):
        RadixTree(1, sliding_window_size=4, num_swa_host_slots=-1)


@pytest.mark.parametrize(
    ("window", "frontier", "message"),
    [(4, -1, "is negative"), (0, 1, "without the SWA component")],
)
def test_bad_swa_evicted_seqlen_changes_nothing(window, frontier, message):
    """A negative frontier, or one given to a tree without SWA, is a caller bug."""
    tree = swa_tree(window=window) if window else RadixTree(1, NUM_SLOTS)
    tree.insert([1, 2, 3], torch.tensor([0, 1, 2]))
    before = snapshot(tree)
    with pytest.raises(InvalidArgumentError, match=message):
        tree.insert([1, 2, 3, 4], torch.tensor([5, 6, 7, 8]), swa_evicted_seqlen=frontier)
    assert snapshot(tree) == before
    tree.check_invariants()


def test_wrong_swa_lock_tokens_change_nothing():
    """dec_lock_ref's SWA part must be the receipt's: 0 for a lock on a non-root node, a count
    past the root, one not ending on a node boundary, any count on a tree without SWA or at the
    root; and a receipt cannot be used twice."""
    tree = swa_tree(window=4)
    tree.insert(list(range(6)), torch.arange(6))  # [0,1] + [2..5]
    leaf = tree.match_prefix(list(range(6))).last_device_node
    receipt = tree.inc_lock_ref(leaf)
    assert receipt.swa_lock_tokens == 4
    before = snapshot(tree)
    for tokens in (0, -4, 2, 5, 6, 100):
        with pytest.raises(InvalidArgumentError):
            tree.dec_lock_ref(leaf, -1, tokens)
        assert snapshot(tree) == before
    with pytest.raises(InvalidArgumentError):
        tree.dec_lock_ref(tree.root_id, -1, 4)
    assert snapshot(tree) == before
    assert tree.dec_lock_ref(leaf, -1, 4) == 6
    after = snapshot(tree)
    with pytest.raises(InvalidArgumentError):
        tree.dec_lock_ref(leaf, -1, 4)
    assert snapshot(tree) == after
    plain = RadixTree(1, NUM_SLOTS)
    node = plain.insert([1, 2], torch.tensor([0, 1])).last_node
    plain.inc_lock_ref(node)
    with pytest.raises(InvalidArgumentError, match="without the SWA component"):
        plain.dec_lock_ref(node, -1, 2)
    tree.check_invariants()
    plain.check_invariants()


def test_window_segment_lock_counts_whole_nodes_and_stops_at_the_root():
    """The segment covers whole nodes up from the locked one until the window is covered (it may
    cover more), or the root; the root's lock holds nothing."""
    tree = swa_tree(window=5)
    tree.insert(list(range(3)), torch.arange(3))
    node = tree.insert(list(range(7)), torch.arange(7)).last_node  # [0..2] + [3..6]
    receipt = tree.inc_lock_ref(node)
    assert receipt.swa_lock_tokens == 7 and tree.swa_protected_size() == 7
    tree.dec_lock_ref(node, -1, 7)
    short = tree.insert([50, 51], torch.tensor([50, 51])).last_node
    assert tree.inc_lock_ref(short).swa_lock_tokens == 2  # reaches the root first
    assert tree.inc_lock_ref(tree.root_id).swa_lock_tokens == 0
    tree.check_invariants()


def _backed_up_node(tree: RadixTree, frontier: int = 0) -> int:
    """Inserts [1..4] (with frontier ``frontier``) and returns its node, unbacked."""
    return tree.insert([1, 2, 3, 4], torch.arange(4), swa_evicted_seqlen=frontier).last_node


def test_host_swa_for_a_tombstone_or_of_the_wrong_length_changes_nothing():
    """commit_backup's host SWA slots: only for a node with live SWA KV, one per token, whole
    pages, in range; a failed call leaves the node unbacked."""
    tree = swa_tree(page_size=2, window=4)
    tombstone = _backed_up_node(tree, frontier=4)
    before = snapshot(tree)
    with pytest.raises(InvalidArgumentError, match="no live device SWA"):
        tree.commit_backup(tombstone, torch.arange(4), host_swa_indices=torch.arange(4))
    assert snapshot(tree) == before and not tree.node_info(tombstone).has_host_value
    tree.reset()
    live = _backed_up_node(tree)
    before = snapshot(tree)
    bad = [
        (torch.arange(2), InvalidArgumentError),  # wrong length
        (torch.arange(6), InvalidArgumentError),
        (torch.tensor([0, 1, -2, -1]), InvalidArgumentError),  # negative
        (torch.tensor([1, 2, 3, 4]), InvalidArgumentError),  # not whole pages
        (torch.arange(NUM_SLOTS, NUM_SLOTS + 4), IndexOutOfRangeError),  # past the pool
        (torch.arange(4, dtype=torch.int32), InvalidArgumentError),  # not int64
    ]
    for host_swa, error in bad:
        with pytest.raises(error):
            tree.commit_backup(live, torch.arange(4), host_swa_indices=host_swa)
        assert snapshot(tree) == before and not tree.node_info(live).has_host_value
    tree.commit_backup(live, torch.arange(4), host_swa_indices=torch.arange(8, 12))
    tree.finish_backup(live)
    assert tree.swa_host_size() == 4 and tree.node_info(live).has_swa_host_value
    tree.check_invariants()


def test_negative_evict_swa_and_a_tree_without_swa():
    tree = swa_tree()
    with pytest.raises(InvalidArgumentError, match="num_tokens"):
        tree.evict_swa(-1)
    plain = RadixTree(1, NUM_SLOTS)
    plain.insert([1, 2], torch.tensor([0, 1]))
    r = plain.evict_swa(10)  # no SWA KV: nothing to free
    assert slots(r.device_indices) == [] and plain.total_size() == 2


def test_host_swa_copy_round_trip():
    """A live node backed up with its SWA KV is demoted with its host SWA copy, matches from host
    (a host-only window validates), is planned for load-back with its host SWA slots, and is live
    on device again once loaded; a node backed up without SWA stays an SWA tombstone."""
    tree = swa_tree(window=4)
    node = tree.insert([1, 2, 3, 4], torch.arange(4)).last_node
    plan = tree.backup_plan(node)
    assert plan.swa == (True,)
    tree.commit_backup(node, torch.arange(100, 104), host_swa_indices=torch.arange(200, 204))
    tree.finish_backup(node)
    r = tree.evict(4)
    assert r.demoted_tokens == 4 and slots(r.device_indices) == [0, 1, 2, 3]
    info = tree.node_info(node)
    assert (info.has_device_value, info.has_swa_value, info.has_swa_host_value) == (
        False,
        False,
        True,
    )
    m = tree.match_prefix([1, 2, 3, 4])
    assert (m.host_hit_length, m.best_match_node, m.swa_branching_seqlen) == (4, node, -1)
    plan = tree.load_back_plan(node)
    assert plan.swa == (True,) and slots(plan.swa_indices) == [200, 201, 202, 203]
    tree.commit_load_back(node, torch.arange(10, 14))
    assert tree.node_info(node).has_swa_value and tree.swa_evictable_size() == 4
    tree.finish_load_back(node)
    tree.check_invariants()


def test_host_swa_slots_freed_inside_the_tree_go_to_the_outbox():
    """Host SWA slots the tree frees itself (an aborted backup, host eviction, the tombstone
    cascade) wait in take_freed_swa_host_slots(), once each."""
    tree = swa_tree(window=4)
    node = tree.insert([1, 2, 3, 4], torch.arange(4)).last_node
    tree.commit_backup(node, torch.arange(100, 104), host_swa_indices=torch.arange(200, 204))
    assert slots(tree.abort_backup(node)) == [100, 101, 102, 103]
    assert slots(tree.take_freed_swa_host_slots()) == [200, 201, 202, 203]
    assert slots(tree.take_freed_swa_host_slots()) == []
    tree.commit_backup(node, torch.arange(100, 104), host_swa_indices=torch.arange(300, 304))
    tree.finish_backup(node)
    tree.evict(4)
    assert slots(tree.evict_host(4)) == [100, 101, 102, 103]
    assert slots(tree.take_freed_swa_host_slots()) == [300, 301, 302, 303]
    assert tree.swa_host_size() == 0 and tree.num_nodes() == 0
    tree.check_invariants()


def test_demoted_node_without_host_swa_is_deleted_by_the_cascade():
    """A node backed up without its SWA KV (no host SWA slots to spare) has SWA on neither tier
    once demoted: a useless tombstone, deleted with its host copy; its tokens count as dropped."""
    tree = swa_tree(window=4)
    node = tree.insert([1, 2, 3, 4], torch.arange(4)).last_node
    tree.commit_backup(node, torch.arange(100, 104))
    tree.finish_backup(node)
    r = tree.evict(4)
    assert (r.demoted_tokens, r.dropped_tokens) == (0, 4)
    assert slots(r.host_indices) == [100, 101, 102, 103] and tree.num_nodes() == 0
    tree.check_invariants()


def test_evict_swa_write_back_asks_for_a_backup_first():
    """Under write_back an unbacked SWA victim is not touched: the call names it (SGLang PR
    #28468); once backed up with its SWA KV, the next call demotes it."""
    tree = swa_tree(window=4)
    node = tree.insert([1, 2, 3, 4], torch.arange(4)).last_node
    r = tree.evict_swa(4, write_back=True)
    assert r.needs_backup == node and slots(r.device_indices) == []
    tree.commit_backup(node, torch.arange(100, 104), host_swa_indices=torch.arange(200, 204))
    tree.finish_backup(node)
    r = tree.evict_swa(4, write_back=True)
    assert r.needs_backup == -1 and r.demoted_tokens == 4
    assert tree.node_info(node).has_swa_host_value
    tree.check_invariants()


def test_host_hit_counts_an_unvalidated_device_node_above_the_host_window():
    """SGLang's ``best_match_device_node`` rule: the device part of a match ends at the deepest
    node that validates on device. An SWA tombstone on device above a host-only node with a host
    SWA window does not validate, so it counts in ``host_hit_length`` although its Full KV is on
    device (the load-back plan then brings the host-only node only, and the rematch has both)."""
    tree = swa_tree(page_size=4, window=4)
    tree.insert(list(range(8)), torch.arange(8))  # [0..3] + [4..7], both live
    plan = tree.backup_plan(tree.match_prefix(list(range(8))).last_device_node)
    for i, node in enumerate(plan.node_ids):  # root-first: [0..3], [4..7]
        host, host_swa = (
            torch.arange(100 + 4 * i, 104 + 4 * i),
            torch.arange(200 + 4 * i, 204 + 4 * i),
        )
        tree.commit_backup(node, host, host_swa_indices=host_swa)
        tree.finish_backup(node)
    tree.evict(8)  # both demoted, host SWA kept
    head = tree.insert([0, 1, 2, 3], torch.arange(20, 24), swa_evicted_seqlen=4)
    assert head.adopted_len == 4 and not tree.node_info(head.last_node).has_swa_value
    m = tree.match_prefix(list(range(8)))
    assert (m.device_prefix_len, m.host_hit_length, m.last_device_node) == (0, 8, tree.root_id)
    plan = tree.load_back_plan(m.best_match_node)
    assert plan.num_tokens == 4 and slots(plan.swa_indices) == [204, 205, 206, 207]
    tree.commit_load_back(m.best_match_node, torch.arange(40, 44))
    tree.finish_load_back(m.best_match_node)
    m = tree.match_prefix(list(range(8)))
    assert slots(m.device_indices) == [20, 21, 22, 23, 40, 41, 42, 43]
    tree.check_invariants()


def test_mamba_release_keeps_the_swa_lru_in_access_order():
    """FULL + SWA + MAMBA: releasing a lock whose state node is still Full-locked by a deeper
    request (whose window does not reach it) keeps every LRU in access-time order.

    P [1,2] -> N [3,4] (a state) -> D [5..8]; window 4: N's segment is N + P, D's is D alone.
    Releasing N's lock (D's still held) releases the SWA of N then P, then N's state.
    """
    tree = swa_tree(page_size=1, window=4, mamba=True)
    tree.insert([1, 2], torch.tensor([0, 1]))
    n = tree.insert([1, 2, 3, 4], torch.arange(4), mamba_value=0).last_node
    d = tree.insert(list(range(1, 9)), torch.arange(8)).last_node
    on_n, on_d = tree.inc_lock_ref(n), tree.inc_lock_ref(d)
    assert (on_n.swa_lock_tokens, on_n.mamba_node_id, on_d.swa_lock_tokens) == (4, n, 4)
    tree.dec_lock_ref(on_n.node_id, on_n.mamba_node_id, on_n.swa_lock_tokens)
    tree.check_invariants()


def test_a_receipt_shorter_than_the_window_is_rejected():
    """A wrong receipt naming only the first node of a two-node window segment fails loudly and
    changes nothing (SGLang's uuid receipts cannot name part of a segment)."""
    tree = swa_tree(page_size=1, window=4)
    tree.insert([1, 2], torch.tensor([0, 1]))
    leaf = tree.insert([1, 2, 3, 4], torch.arange(4)).last_node  # [1,2] + [3,4]
    receipt = tree.inc_lock_ref(leaf)
    assert receipt.swa_lock_tokens == 4
    before = snapshot(tree)
    with pytest.raises(InvalidArgumentError):
        tree.dec_lock_ref(leaf, -1, 2)
    assert snapshot(tree) == before
