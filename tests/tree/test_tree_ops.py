"""Unit tests of ``RadixTree`` (device tier): one group per operation and per error path.

Every test asserts exact slots, ids and sizes; error tests also check that the failed call left the
tree exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from hicache._tree import RadixTree
from hicache.errors import HiCacheError


def slots(tensor: torch.Tensor) -> list[int]:
    assert tensor.dtype == torch.int64
    assert tensor.device.type == "cpu"
    return tensor.tolist()


def snapshot(tree: RadixTree) -> tuple:
    """Everything a failed call must leave unchanged."""
    return (
        tree.total_size(),
        tree.evictable_size(),
        tree.protected_size(),
        tree.num_nodes(),
        sorted(slots(tree.all_device_indices())),
        tree.pretty_print(),
    )


# --- insert / match ---------------------------------------------------------------------------


def test_empty_tree_matches_nothing() -> None:
    tree = RadixTree()
    result = tree.match_prefix([1, 2, 3])
    assert slots(result.device_indices) == []
    assert result.device_prefix_len == 0
    assert result.last_device_node == tree.root_id
    assert result.last_host_node == tree.root_id
    assert result.best_match_node == tree.root_id
    assert result.host_hit_length == 0
    assert tree.num_nodes() == 0
    assert tree.total_size() == 0


def test_insert_then_match_round_trip() -> None:
    tree = RadixTree()
    inserted = tree.insert([1, 2, 3], torch.tensor([10, 11, 12]))
    assert inserted.prefix_len == 0
    assert inserted.last_node != tree.root_id
    result = tree.match_prefix([1, 2, 3, 4])
    assert slots(result.device_indices) == [10, 11, 12]
    assert result.device_prefix_len == 3
    assert result.last_device_node == inserted.last_node
    assert result.last_host_node == inserted.last_node
    assert result.best_match_node == inserted.last_node
    assert result.host_hit_length == 0
    assert (tree.total_size(), tree.evictable_size(), tree.protected_size()) == (3, 3, 0)
    assert tree.num_nodes() == 1
    info = tree.node_info(inserted.last_node)
    assert info.node_id == inserted.last_node
    assert info.parent_id == tree.root_id
    assert info.num_tokens == 3
    assert info.num_children == 0
    assert info.lock_ref == 0
    assert info.has_device_value
    assert info.extra_key is None
    tree.check_invariants()


def test_key_and_value_input_types() -> None:
    tree = RadixTree()
    tree.insert(torch.tensor([1, 2], dtype=torch.int32), [10, 11])
    tree.insert(np.array([1, 2, 3], dtype=np.int64), np.array([0, 0, 12], dtype=np.int64))
    tree.insert(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 0, 13]))
    assert slots(tree.match_prefix([1, 2, 3, 4]).device_indices) == [10, 11, 12, 13]
    assert slots(tree.match_prefix(torch.tensor([1, 2, 3])).device_indices) == [10, 11, 12]
    tree.check_invariants()


def test_match_inside_node_splits_it() -> None:
    tree = RadixTree()
    lower_id = tree.insert([1, 2, 3, 4], [10, 11, 12, 13]).last_node
    result = tree.match_prefix([1, 2, 9])
    upper_id = result.last_device_node
    assert slots(result.device_indices) == [10, 11]
    assert upper_id not in (lower_id, tree.root_id)
    assert tree.num_nodes() == 2
    upper, lower = tree.node_info(upper_id), tree.node_info(lower_id)
    assert (upper.parent_id, upper.num_tokens, upper.num_children) == (tree.root_id, 2, 1)
    assert (lower.parent_id, lower.num_tokens, lower.num_children) == (upper_id, 2, 0)
    # The old id still ends the full key.
    assert tree.match_prefix([1, 2, 3, 4]).last_device_node == lower_id
    assert tree.total_size() == 4
    tree.check_invariants()


def test_insert_diverging_inside_node_splits_and_keeps_old_slots() -> None:
    tree = RadixTree()
    first_id = tree.insert([1, 2, 3, 4], [10, 11, 12, 13]).last_node
    inserted = tree.insert([1, 2, 5, 6], [20, 21, 22, 23])
    assert inserted.prefix_len == 2
    assert inserted.last_node not in (first_id, tree.root_id)
    assert tree.num_nodes() == 3
    assert slots(tree.match_prefix([1, 2, 5, 6]).device_indices) == [10, 11, 22, 23]
    assert slots(tree.match_prefix([1, 2, 3, 4]).device_indices) == [10, 11, 12, 13]
    assert tree.node_info(first_id).num_tokens == 2
    assert tree.node_info(tree.node_info(first_id).parent_id).num_tokens == 2
    assert sorted(slots(tree.all_device_indices())) == [10, 11, 12, 13, 22, 23]
    tree.check_invariants()


def test_insert_of_cached_key_returns_full_prefix_and_changes_nothing() -> None:
    tree = RadixTree()
    node_id = tree.insert([1, 2, 3], [10, 11, 12]).last_node
    again = tree.insert([1, 2, 3], [20, 21, 22])
    assert again[:6] == (3, node_id, 0, 3, False, False)
    assert again.swa_remap_dst.numel() == 0
    assert slots(tree.match_prefix([1, 2, 3]).device_indices) == [10, 11, 12]
    assert tree.total_size() == 3
    # A cached prefix of a node: the node splits and the upper part is returned.
    shorter = tree.insert([1, 2], [30, 31])
    assert shorter.prefix_len == 2
    assert shorter.last_node != node_id
    assert tree.node_info(shorter.last_node).num_tokens == 2
    assert sorted(slots(tree.all_device_indices())) == [10, 11, 12]
    tree.check_invariants()


def test_page_alignment_ignores_partial_tail() -> None:
    tree = RadixTree(page_size=4)
    inserted = tree.insert(list(range(100, 110)), list(range(10)))
    assert inserted.prefix_len == 0
    assert tree.total_size() == 8
    assert sorted(slots(tree.all_device_indices())) == list(range(8))
    assert tree.node_info(inserted.last_node).num_tokens == 8
    assert slots(tree.match_prefix(list(range(100, 110))).device_indices) == list(range(8))
    assert slots(tree.match_prefix(list(range(100, 107))).device_indices) == [0, 1, 2, 3]
    # The second page differs in its last token: only the first page matches.
    assert slots(tree.match_prefix([100, 101, 102, 103, 104, 105, 106, 0]).device_indices) == [
        0,
        1,
        2,
        3,
    ]
    # The first page differs in its last token: nothing matches.
    assert tree.match_prefix([100, 101, 102, 0, 104]).device_prefix_len == 0
    tree.check_invariants()


def test_insert_shorter_than_a_page_caches_nothing() -> None:
    tree = RadixTree(page_size=4)
    inserted = tree.insert([1, 2, 3], [0, 1, 2])
    assert inserted[:6] == (0, tree.root_id, 0, 0, False, False)
    assert tree.total_size() == 0
    assert tree.num_nodes() == 0
    tree.check_invariants()


def test_extra_key_isolates_namespaces() -> None:
    tree = RadixTree(page_size=2)
    plain = tree.insert([1, 2, 3, 4], [0, 1, 2, 3])
    assert tree.match_prefix([1, 2, 3, 4], "a").device_prefix_len == 0
    in_a = tree.insert([1, 2, 3, 4], [4, 5, 6, 7], "a")
    assert in_a.prefix_len == 0
    assert in_a.last_node != plain.last_node
    in_b = tree.insert([1, 2], [8, 9], "b")
    assert in_b.prefix_len == 0
    assert slots(tree.match_prefix([1, 2, 3, 4]).device_indices) == [0, 1, 2, 3]
    assert slots(tree.match_prefix([1, 2, 3, 4], "a").device_indices) == [4, 5, 6, 7]
    assert slots(tree.match_prefix([1, 2, 3, 4], "b").device_indices) == [8, 9]
    assert tree.node_info(in_a.last_node).extra_key == "a"
    assert tree.node_info(plain.last_node).extra_key is None
    assert tree.total_size() == 10
    assert tree.num_nodes() == 3
    tree.check_invariants()


def test_matched_indices_are_owned_by_the_caller() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3], [10, 11, 12])
    result = tree.match_prefix([1, 2, 3])
    tree.evict(3)
    tree.insert([1, 2, 3], [20, 21, 22])
    assert slots(result.device_indices) == [10, 11, 12]


# --- locks ------------------------------------------------------------------------------------


def make_fork(tree: RadixTree) -> tuple[int, int, int]:
    """Inserts ``[1, 2, 3, 4]`` and ``[1, 2, 5, 6]``; returns (parent [1, 2], leaf a, leaf b)."""
    leaf_a = tree.insert([1, 2, 3, 4], [10, 11, 12, 13]).last_node
    leaf_b = tree.insert([1, 2, 5, 6], [20, 21, 22, 23]).last_node
    parent = tree.node_info(leaf_a).parent_id
    assert tree.node_info(leaf_b).parent_id == parent
    return parent, leaf_a, leaf_b


def test_lock_and_unlock_move_tokens_between_evictable_and_protected() -> None:
    tree = RadixTree()
    parent, leaf_a, leaf_b = make_fork(tree)
    assert (tree.evictable_size(), tree.protected_size()) == (6, 0)
    assert tree.inc_lock_ref(leaf_a).delta == 4
    assert (tree.evictable_size(), tree.protected_size()) == (2, 4)
    assert tree.inc_lock_ref(leaf_b).delta == 2
    assert tree.inc_lock_ref(leaf_b).delta == 0
    assert (tree.evictable_size(), tree.protected_size()) == (0, 6)
    assert [tree.node_info(n).lock_ref for n in (parent, leaf_a, leaf_b)] == [3, 1, 2]
    tree.check_invariants()
    assert tree.dec_lock_ref(leaf_a) == 2
    assert tree.dec_lock_ref(leaf_b) == 0
    assert (tree.evictable_size(), tree.protected_size()) == (2, 4)
    assert tree.dec_lock_ref(leaf_b) == 4
    assert (tree.evictable_size(), tree.protected_size()) == (6, 0)
    assert [tree.node_info(n).lock_ref for n in (parent, leaf_a, leaf_b)] == [0, 0, 0]
    tree.check_invariants()


def test_split_of_locked_node_keeps_lock_on_both_parts() -> None:
    tree = RadixTree()
    node_id = tree.insert([1, 2, 3, 4], [10, 11, 12, 13]).last_node
    tree.inc_lock_ref(node_id)
    upper_id = tree.match_prefix([1, 2]).last_device_node
    assert tree.node_info(upper_id).lock_ref == 1
    assert tree.node_info(node_id).lock_ref == 1
    assert tree.protected_size() == 4
    assert tree.dec_lock_ref(node_id) == 4
    assert tree.protected_size() == 0
    tree.check_invariants()


def test_unlock_of_unlocked_node_raises_value_error() -> None:
    tree = RadixTree()
    _, leaf_a, _ = make_fork(tree)
    before = snapshot(tree)
    with pytest.raises(ValueError) as excinfo:
        tree.dec_lock_ref(leaf_a)
    assert isinstance(excinfo.value, HiCacheError)
    tree.check_invariants()
    assert snapshot(tree) == before
    tree.inc_lock_ref(leaf_a)
    tree.dec_lock_ref(leaf_a)
    before = snapshot(tree)
    with pytest.raises(ValueError):
        tree.dec_lock_ref(leaf_a)
    tree.check_invariants()
    assert snapshot(tree) == before


@pytest.mark.parametrize("method", ["inc_lock_ref", "dec_lock_ref", "node_info"])
def test_unknown_node_id_raises_index_error(method: str) -> None:
    tree = RadixTree()
    make_fork(tree)
    before = snapshot(tree)
    for node_id in (10**6, -5):
        with pytest.raises(IndexError) as excinfo:
            getattr(tree, method)(node_id)
        assert isinstance(excinfo.value, HiCacheError)
        assert not tree.contains_node(node_id)
    tree.check_invariants()
    assert snapshot(tree) == before


def test_evicted_node_id_is_unknown_and_never_reused() -> None:
    tree = RadixTree()
    node_id = tree.insert([1, 2], [10, 11]).last_node
    assert tree.contains_node(node_id)
    assert sorted(slots(tree.evict(2).device_indices)) == [10, 11]
    assert not tree.contains_node(node_id)
    with pytest.raises(IndexError):
        tree.inc_lock_ref(node_id)
    new_id = tree.insert([1, 2], [10, 11]).last_node
    assert new_id != node_id
    assert tree.contains_node(tree.root_id)


# --- invalid inserts leave the tree unchanged -------------------------------------------------


def populated(page_size: int, num_device_slots: int = 0) -> RadixTree:
    """A tree holding ``[1]*ps + [2]*ps`` (slots 0..2ps-1) with a locked first page."""
    tree = RadixTree(page_size=page_size, num_device_slots=num_device_slots)
    node_id = tree.insert([1] * page_size + [2] * page_size, list(range(2 * page_size))).last_node
    locked = tree.match_prefix([1] * page_size).last_device_node
    tree.inc_lock_ref(locked)
    assert tree.node_info(node_id).parent_id == locked
    return tree


PAGE1 = list(range(100, 104))
PAGE2 = list(range(104, 108))

# Each case inserts [1]*ps + [3]*ps + [4]*ps: it would split the cached node after the first page
# and add two pages, so a partial insert before the error would show up in the snapshot.
INVALID_INSERTS = [
    pytest.param(1, 0, torch.arange(3, dtype=torch.float32), ValueError, id="float_tensor"),
    pytest.param(1, 0, torch.arange(3, dtype=torch.int32), ValueError, id="int32_tensor"),
    pytest.param(1, 0, torch.arange(3).reshape(1, 3), ValueError, id="2d_tensor"),
    pytest.param(1, 0, [100, 101], ValueError, id="too_short"),
    pytest.param(1, 0, [100, 101, 102, 103], ValueError, id="too_long"),
    pytest.param(1, 0, [100, 101, -1], ValueError, id="negative_slot"),
    pytest.param(1, 64, [10, 50, 64], IndexError, id="out_of_range_slot"),
    pytest.param(4, 0, PAGE1 + PAGE2 + [109, 110, 111, 112], ValueError, id="unaligned_page"),
    pytest.param(4, 0, PAGE1 + PAGE2 + [108, 109, 111, 110], ValueError, id="non_consecutive"),
    pytest.param(4, 0, PAGE1 + PAGE2 + [-4, -3, -2, -1], ValueError, id="negative_page"),
    pytest.param(4, 64, PAGE1 + [32, 33, 34, 35, 64, 65, 66, 67], IndexError, id="range_page"),
]


@pytest.mark.parametrize(("page_size", "num_device_slots", "value", "error"), INVALID_INSERTS)
def test_invalid_insert_raises_and_leaves_tree_unchanged(
    page_size: int, num_device_slots: int, value: object, error: type[Exception]
) -> None:
    tree = populated(page_size, num_device_slots)
    before = snapshot(tree)
    key = [1] * page_size + [3] * page_size + [4] * page_size
    with pytest.raises(error) as excinfo:
        tree.insert(key, value)
    assert isinstance(excinfo.value, HiCacheError)
    tree.check_invariants()
    assert snapshot(tree) == before


def test_valid_slots_at_the_range_limit_are_accepted() -> None:
    tree = RadixTree(page_size=4, num_device_slots=8)
    assert tree.insert([1] * 8, list(range(8))).prefix_len == 0
    assert tree.total_size() == 8
    tree.check_invariants()


def test_other_invalid_arguments_raise_value_error() -> None:
    tree = populated(page_size=1)
    before = snapshot(tree)
    calls: list[Callable[[], object]] = [
        lambda: tree.evict(-1),
        lambda: tree.match_prefix([1], extra_key=3),  # type: ignore[arg-type]
        lambda: tree.insert([1, 5], [100, 101], extra_key=b"a"),  # type: ignore[arg-type]
        lambda: tree.match_prefix([1, 2**31]),
        lambda: tree.match_prefix(torch.tensor([1.0, 2.0])),
        lambda: tree.reset(),  # something is locked
    ]
    for call in calls:
        with pytest.raises(ValueError) as excinfo:
            call()
        assert isinstance(excinfo.value, HiCacheError)
        tree.check_invariants()
        assert snapshot(tree) == before


# --- eviction ---------------------------------------------------------------------------------


def test_evict_follows_lru_order_across_leaves() -> None:
    tree = RadixTree()
    tree.insert([1, 1], [0, 1])
    tree.insert([2, 2], [2, 3])
    tree.insert([3, 3], [4, 5])
    tree.match_prefix([1, 1])  # [1, 1] becomes the most recent
    assert sorted(slots(tree.evict(2).device_indices)) == [2, 3]
    assert sorted(slots(tree.evict(2).device_indices)) == [4, 5]
    assert sorted(slots(tree.evict(2).device_indices)) == [0, 1]
    assert tree.total_size() == 0
    assert tree.num_nodes() == 0
    tree.check_invariants()


def test_evict_takes_leaves_before_their_parent() -> None:
    tree = RadixTree()
    parent, leaf_a, leaf_b = make_fork(tree)  # leaf_b is the most recent leaf
    assert slots(tree.evict(1).device_indices) == [13]
    assert slots(tree.evict(1).device_indices) == [12]
    assert not tree.contains_node(leaf_a)
    assert slots(tree.evict(1).device_indices) == [23]
    assert slots(tree.evict(1).device_indices) == [22]
    assert not tree.contains_node(leaf_b)
    assert tree.contains_node(parent)
    assert slots(tree.evict(1).device_indices) == [11]
    assert tree.node_info(parent).num_tokens == 1
    tree.check_invariants()


def test_partial_eviction_trims_the_deepest_page() -> None:
    tree = RadixTree(page_size=4)
    node_id = tree.insert(list(range(12)), list(range(12))).last_node
    assert sorted(slots(tree.evict(1).device_indices)) == [8, 9, 10, 11]
    assert tree.total_size() == 8
    assert tree.contains_node(node_id)
    assert tree.node_info(node_id).num_tokens == 8
    assert slots(tree.match_prefix(list(range(12))).device_indices) == list(range(8))
    # 5 tokens round up to 2 pages.
    assert sorted(slots(tree.evict(5).device_indices)) == list(range(8))
    assert tree.total_size() == 0
    tree.check_invariants()


def test_evict_zero_tokens_frees_nothing() -> None:
    tree = RadixTree(page_size=4)
    tree.insert(list(range(8)), list(range(8)))
    assert slots(tree.evict(0).device_indices) == []
    assert tree.total_size() == 8


def test_locked_nodes_are_never_evicted() -> None:
    tree = RadixTree()
    parent, leaf_a, leaf_b = make_fork(tree)
    tree.inc_lock_ref(leaf_a)
    assert sorted(slots(tree.evict(100).device_indices)) == [22, 23]
    assert not tree.contains_node(leaf_b)
    assert (tree.total_size(), tree.protected_size(), tree.evictable_size()) == (4, 4, 0)
    assert slots(tree.evict(100).device_indices) == []
    tree.check_invariants()
    assert tree.dec_lock_ref(leaf_a) == 4
    assert sorted(slots(tree.evict(100).device_indices)) == [10, 11, 12, 13]
    assert not tree.contains_node(parent)
    assert tree.total_size() == 0
    tree.check_invariants()


def test_evict_more_than_evictable_returns_what_exists() -> None:
    tree = RadixTree(page_size=2)
    tree.insert([1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5])
    assert sorted(slots(tree.evict(1000).device_indices)) == [0, 1, 2, 3, 4, 5]
    assert (tree.total_size(), tree.num_nodes()) == (0, 0)
    assert slots(tree.evict(1000).device_indices) == []
    tree.check_invariants()


def test_unlock_counts_as_a_use() -> None:
    tree = RadixTree()
    tree.insert([1], [10])
    tree.insert([2], [20])
    node_id = tree.match_prefix([1]).last_device_node
    tree.inc_lock_ref(node_id)
    tree.match_prefix([2])  # [2] is more recent than [1] ...
    tree.dec_lock_ref(node_id)  # ... until [1] is unlocked
    assert slots(tree.evict(1).device_indices) == [20]


def test_lock_alone_does_not_count_as_a_use() -> None:
    tree = RadixTree()
    a = tree.insert([1], [10]).last_node
    tree.insert([2], [20])
    tree.inc_lock_ref(a)
    tree.inc_lock_ref(a)
    tree.dec_lock_ref(a)  # still locked: no touch
    tree.match_prefix([2])
    tree.dec_lock_ref(a)  # now unlocked: touched, more recent than [2]
    assert slots(tree.evict(1).device_indices) == [20]
    tick = tree.node_info(a).last_access_time
    tree.inc_lock_ref(a)  # locking does not touch
    assert tree.node_info(a).last_access_time == tick
    tree.dec_lock_ref(a)  # unlocking does
    assert tree.node_info(a).last_access_time > tick


def test_match_touches_ancestors_after_the_deepest_node() -> None:
    tree = RadixTree(page_size=2)
    tree.insert([1, 1, 2, 2], [0, 1, 2, 3])
    tree.insert([5, 5], [4, 5])
    tree.match_prefix([1, 1, 2, 2])  # both pages of the path are newer than [5, 5]
    assert sorted(slots(tree.evict(2).device_indices)) == [4, 5]
    assert sorted(slots(tree.evict(2).device_indices)) == [2, 3]


# --- reset ------------------------------------------------------------------------------------


def test_reset_returns_all_slots_and_never_reuses_ids() -> None:
    tree = RadixTree()
    parent, leaf_a, leaf_b = make_fork(tree)
    tree.insert([7], [70], "a")
    freed = tree.reset()
    assert sorted(slots(freed)) == [10, 11, 12, 13, 22, 23, 70]
    assert (tree.total_size(), tree.num_nodes()) == (0, 0)
    assert not any(tree.contains_node(n) for n in (parent, leaf_a, leaf_b))
    assert tree.contains_node(tree.root_id)
    new_id = tree.insert([1, 2, 3, 4], [10, 11, 12, 13]).last_node
    assert new_id not in (parent, leaf_a, leaf_b)
    assert tree.match_prefix([7], "a").device_prefix_len == 0
    assert slots(tree.reset()) != []
    tree.check_invariants()
