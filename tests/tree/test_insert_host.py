"""``RadixTree.insert_host``: pages prefetched from storage become host-only nodes.

(The differential machine in ``test_differential.py`` also drives it against the reference model
in every interleaving with the other operations.)
"""

from __future__ import annotations

import pytest
import torch

from hicache._tree import RadixTree
from hicache.errors import IndexOutOfRangeError, InvalidArgumentError


def test_new_pages_become_a_host_only_leaf_below_the_anchor() -> None:
    tree = RadixTree(2, num_device_slots=64, num_host_slots=64, page_hashes=True)
    anchor = tree.insert([1, 2, 3, 4], torch.arange(4)).last_node
    result = tree.insert_host(anchor, [5, 6, 7, 8, 9], torch.arange(10, 15))
    assert (result.prefix_len, result.cached_len, result.adopted_len) == (0, 4, 0)
    info = tree.node_info(result.last_node)
    assert info.parent_id == anchor
    assert (info.has_device_value, info.has_host_value, info.hit_count) == (False, True, 0)
    assert tree.host_total_size() == tree.host_evictable_size() == 4
    tree.check_invariants()
    match = tree.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    assert match.device_prefix_len == 4 and match.host_hit_length == 4
    assert tree.load_back_plan(match.best_match_node).indices.tolist() == [10, 11, 12, 13]
    assert sorted(tree.evict_host(4).tolist()) == [10, 11, 12, 13]
    tree.check_invariants()


def test_pages_already_cached_keep_their_slots_and_are_reported() -> None:
    tree = RadixTree(2, page_hashes=True)
    tree.insert([1, 2, 3, 4], torch.arange(4))
    result = tree.insert_host(tree.root_id, [1, 2, 3, 4, 5, 6], torch.arange(20, 26))
    # The caller frees host[:prefix_len] (duplicates); the tree owns host[prefix_len:cached_len].
    assert (result.prefix_len, result.cached_len) == (4, 6)
    assert sorted(tree.all_host_indices().tolist()) == [24, 25]
    assert tree.all_device_indices().tolist() == [0, 1, 2, 3]
    again = tree.insert_host(tree.root_id, [1, 2, 3, 4, 5, 6], torch.arange(30, 36))
    assert (again.prefix_len, again.cached_len, again.last_node) == (6, 6, result.last_node)
    tree.check_invariants()


def test_a_partial_match_splits_the_existing_node() -> None:
    tree = RadixTree(1, page_hashes=True)
    tree.insert([1, 2, 3], torch.arange(3))
    result = tree.insert_host(tree.root_id, [1, 2, 9], torch.arange(10, 13))
    assert (result.prefix_len, result.cached_len) == (2, 3)
    assert tree.num_nodes() == 3
    tree.check_invariants()


def test_stops_at_a_load_pending_node() -> None:
    tree = RadixTree(1, num_host_slots=64)
    node = tree.insert([1, 2], torch.arange(2)).last_node
    tree.commit_backup(node, torch.arange(40, 42))
    tree.finish_backup(node)
    tree.evict(2, write_back=False)  # demoted: host-only
    tree.inc_host_lock_ref(node)
    tree.commit_load_back(node, torch.arange(2, 4))
    tree.inc_lock_ref(node)
    result = tree.insert_host(tree.root_id, [1, 2, 3], torch.arange(10, 13))
    assert (result.prefix_len, result.cached_len, result.last_node) == (0, 0, tree.root_id)
    tree.check_invariants()


def test_bad_arguments_change_nothing() -> None:
    tree = RadixTree(2, num_host_slots=8)
    node = tree.insert([1, 2], torch.arange(2), "tenant").last_node
    with pytest.raises(InvalidArgumentError, match="must be equal"):
        tree.insert_host(node, [3, 4], torch.arange(3), "tenant")
    with pytest.raises(InvalidArgumentError, match="namespace"):
        tree.insert_host(node, [3, 4], torch.arange(2), "other")
    with pytest.raises(IndexOutOfRangeError):
        tree.insert_host(node, [3, 4], torch.arange(8, 10), "tenant")
    with pytest.raises(IndexOutOfRangeError, match="unknown node"):
        tree.insert_host(12345, [3, 4], torch.arange(2))
    with pytest.raises(InvalidArgumentError, match="needs mamba_host_value"):
        RadixTree(1, mamba=True).insert_host(0, [1], torch.arange(1))
    with pytest.raises(InvalidArgumentError, match="without the Mamba component"):
        tree.insert_host(node, [3, 4], torch.arange(2), "tenant", mamba_host_value=0)
    assert tree.num_nodes() == 1 and tree.host_total_size() == 0
    tree.check_invariants()


def test_storage_backup_plan_covers_the_fragments_of_a_split_backup() -> None:
    tree = RadixTree(2, num_host_slots=64, page_hashes=True)
    parent = tree.insert([9, 9], torch.arange(2)).last_node
    tree.commit_backup(parent, torch.arange(50, 52))
    tree.finish_backup(parent)
    node = tree.insert([9, 9, 1, 2, 3, 4], torch.arange(6)).last_node
    tree.commit_backup(node, torch.arange(10, 14))
    upper = tree.match_prefix([9, 9, 1, 2]).last_device_node  # splits the pending node
    assert upper != node
    plan = tree.storage_backup_plan(node)
    assert plan.node_ids == [upper, node]  # the fragments, root-first; not the parent
    assert plan.indices.tolist() == [10, 11, 12, 13]
    hashes = [d for n in plan.node_ids for d in tree.node_page_hashes(n)]
    assert hashes == tree.path_page_hashes(node)[1:]
    tree.finish_backup(node)
    assert tree.storage_backup_plan(node).node_ids == []
    tree.check_invariants()


def test_mamba_tree_takes_the_host_state_at_the_end_of_the_prefetched_key() -> None:
    tree = RadixTree(1, num_host_slots=64, mamba=True, num_mamba_host_slots=4)
    result = tree.insert_host(tree.root_id, [1, 2, 3], torch.arange(10, 13), mamba_host_value=2)
    assert (result.cached_len, result.mamba_taken, result.mamba_exist) == (3, True, False)
    info = tree.node_info(result.last_node)
    assert (info.has_mamba_host_value, info.mamba_host_value) == (True, 2)
    match = tree.match_prefix([1, 2, 3, 4])
    assert match.host_hit_length == 3 and match.best_match_node == result.last_node
    assert tree.load_back_plan(match.best_match_node).states == (2,)
    again = tree.insert_host(tree.root_id, [1, 2, 3], torch.arange(20, 23), mamba_host_value=3)
    assert (again.prefix_len, again.mamba_taken, again.mamba_exist) == (3, False, True)
    # Ending inside the node: the split-off upper part takes it (it has host KV).
    upper = tree.insert_host(tree.root_id, [1, 2], torch.arange(30, 32), mamba_host_value=3)
    assert upper.mamba_taken and upper.last_node != result.last_node
    tree.check_invariants()
    with pytest.raises(IndexOutOfRangeError, match="mamba_host_value"):
        tree.insert_host(tree.root_id, [5], torch.arange(40, 41), mamba_host_value=4)
    tree.check_invariants()


def swa_tree() -> RadixTree:
    """A page-2 SWA tree (window 4 tokens) with page hashes and 64 host / host SWA slots."""
    return RadixTree(
        2,
        num_device_slots=64,
        num_host_slots=64,
        sliding_window_size=4,
        num_swa_host_slots=64,
        page_hashes=True,
    )


def test_swa_tree_gives_exactly_the_window_nodes_a_host_swa_copy() -> None:
    tree = swa_tree()
    key = list(range(1, 11))  # 5 pages; the window is the last 2
    result = tree.insert_host(
        tree.root_id, key, torch.arange(10), host_swa_indices=torch.arange(20, 24)
    )
    assert result.cached_len == 10 and result.swa_host_spare.numel() == 0
    leaf = tree.node_info(result.last_node)
    upper = tree.node_info(leaf.parent_id)
    assert (leaf.num_tokens, leaf.has_swa_host_value) == (4, True)
    assert (upper.num_tokens, upper.has_swa_host_value, upper.parent_id) == (6, False, 0)
    assert sorted(tree.all_swa_host_indices().tolist()) == [20, 21, 22, 23]
    tree.check_invariants()
    assert tree.match_prefix(key).host_hit_length == 10  # the window validates the whole path
    plan = tree.load_back_plan(result.last_node)
    assert plan.swa == (False, True) and plan.swa_indices.tolist() == [20, 21, 22, 23]
    # Host eviction takes the window leaf, then its upper part (a useless SWA tombstone).
    assert sorted(tree.evict_host(4).tolist()) == list(range(10))
    assert sorted(tree.take_freed_swa_host_slots().tolist()) == [20, 21, 22, 23]
    assert tree.num_nodes() == 0
    tree.check_invariants()


def test_swa_window_over_existing_host_nodes_splits_them_and_spares_what_has_a_copy() -> None:
    tree = swa_tree()
    first = [1, 2, 3, 4, 5, 6]
    tree.insert_host(tree.root_id, first, torch.arange(6), host_swa_indices=[30, 31])
    # The window [2, 8) covers the old upper node's last page (no copy: taken after a split),
    # the old window page (it has a copy: spare) and the new page.
    result = tree.insert_host(
        tree.root_id, [*first, 7, 8], torch.arange(10, 18), host_swa_indices=torch.arange(40, 46)
    )
    assert (result.prefix_len, result.cached_len) == (6, 8)
    assert result.swa_host_spare.tolist() == [42, 43]
    assert sorted(tree.all_swa_host_indices().tolist()) == [30, 31, 40, 41, 44, 45]
    assert [tree.node_info(n).num_tokens for n in tree.node_ids()] == [2, 2, 2, 2]
    tree.check_invariants()


def test_swa_tree_bad_windows_change_nothing() -> None:
    tree = swa_tree()
    for swa in (None, torch.arange(3), torch.arange(8), torch.arange(64, 66)):
        with pytest.raises((InvalidArgumentError, IndexOutOfRangeError)):
            tree.insert_host(tree.root_id, [1, 2, 3, 4, 5, 6], torch.arange(6), None, -1, swa)
    assert tree.num_nodes() == 0
    with pytest.raises(InvalidArgumentError):
        RadixTree(2, page_hashes=True).insert_host(0, [1, 2], [0, 1], None, -1, [0, 1])


def test_storage_backup_plan_carries_the_host_swa_copies() -> None:
    tree = swa_tree()
    node = tree.insert([1, 2, 3, 4], torch.arange(4)).last_node
    tree.commit_backup(node, torch.arange(8, 12), -1, torch.arange(50, 54))
    plan = tree.storage_backup_plan(node)
    assert plan.swa == (True,) and plan.swa_indices.tolist() == [50, 51, 52, 53]
    tree.finish_backup(node)
    tree.check_invariants()
