"""Unit tests of ``RadixTree`` load-backs that fail while the loaded nodes are in use.

A committed load's nodes are device nodes at once; requests may lock them before the copy's ack.
If the copy fails, the tree must never serve their device slots (they hold garbage), never trade a
caller's valid KV for them, and hand the slots back once the last lock on them goes. Every test
checks the tree's invariants and where each slot ends up.
"""

from __future__ import annotations

import pytest
import torch

from hicache._tree import RadixTree
from hicache.errors import InvalidArgumentError

KEY = [1, 2, 3, 4]
LOAD_SLOTS = [100, 101, 102, 103]


def host_only(tree: RadixTree, key: list[int], num_evicted: int | None = None) -> int:
    """Caches ``key`` as one new node (device slots ``0..``), backs it up (host slots ``50..``) and
    evicts its last ``num_evicted`` tokens (default: all) from device; returns the evicted part's
    node id (the node keeps its id as the lower part of an eviction split)."""
    node = tree.insert(key, list(range(len(key)))).last_node
    tree.commit_backup(node, torch.arange(50, 50 + len(key)))
    tree.finish_backup(node)
    num_evicted = len(key) if num_evicted is None else num_evicted
    assert tree.evict(num_evicted, write_back=False).demoted_tokens == num_evicted
    return node


def start_load(tree: RadixTree, anchor: int, device: list[int]) -> int:
    """Commits a load-back of ``anchor`` as the cache does; returns the load's lock receipt."""
    tree.inc_host_lock_ref(anchor)
    assert tree.load_back_plan(anchor).num_tokens == len(device)
    tree.commit_load_back(anchor, torch.tensor(device))
    return tree.inc_lock_ref(anchor).node_id


def end_load(tree: RadixTree, anchor: int, receipt: int, ok: bool) -> list[int]:
    """Acks a load as the cache does; returns the failed-load slots handed back."""
    if ok:
        tree.finish_load_back(anchor)
    else:
        assert tree.abort_load_back(anchor) > 0
    tree.dec_lock_ref(receipt)
    tree.dec_host_lock_ref(anchor)
    tree.check_invariants()
    return tree.take_failed_load_slots().tolist()


def test_failed_load_locked_by_a_request_is_hidden_then_demoted_by_its_unlock() -> None:
    tree = RadixTree()
    node = host_only(tree, KEY)
    load = start_load(tree, node, LOAD_SLOTS)
    request = tree.inc_lock_ref(tree.match_prefix(KEY).last_device_node).node_id
    assert end_load(tree, node, load, ok=False) == []  # the request still holds the nodes
    info = tree.node_info(node)
    assert info.load_failed and info.has_device_value and info.lock_ref == 1
    assert tree.load_failed_size() == 4
    m = tree.match_prefix(KEY)
    assert (m.device_prefix_len, m.host_hit_length) == (0, 0)  # never served, not even as host
    assert tree.load_back_plan(node).num_tokens == 0
    assert tree.insert(KEY, [7, 8, 9, 10]).cached_len == 0  # the caller keeps its slots
    assert tree.dec_lock_ref(request) == 0  # nothing became evictable: it was demoted
    assert sorted(tree.take_failed_load_slots().tolist()) == LOAD_SLOTS
    info = tree.node_info(node)
    assert not info.load_failed and not info.has_device_value and info.has_host_value
    assert (tree.total_size(), tree.load_failed_size(), tree.host_evictable_size()) == (0, 0, 4)
    m = tree.match_prefix(KEY)
    assert (m.device_prefix_len, m.host_hit_length) == (0, 4)  # host-only again: loadable
    tree.check_invariants()


def test_failed_load_nobody_else_locks_is_demoted_when_its_lock_goes() -> None:
    tree = RadixTree()
    node = host_only(tree, KEY)
    load = start_load(tree, node, LOAD_SLOTS)
    assert sorted(end_load(tree, node, load, ok=False)) == LOAD_SLOTS
    assert (tree.total_size(), tree.host_evictable_size()) == (0, 4)


def test_abort_after_the_loads_lock_was_released_demotes_at_once() -> None:
    tree = RadixTree()
    node = host_only(tree, KEY)
    tree.commit_load_back(node, torch.tensor(LOAD_SLOTS))  # no lock taken at all
    assert tree.abort_load_back(node) == 4
    assert sorted(tree.take_failed_load_slots().tolist()) == LOAD_SLOTS
    assert tree.take_failed_load_slots().tolist() == []  # handed over once
    assert not tree.node_info(node).has_device_value
    tree.check_invariants()


def test_insert_stops_at_a_load_pending_node_and_leaves_the_callers_slots() -> None:
    tree = RadixTree()
    node = host_only(tree, [9, *KEY], num_evicted=4)  # [9] on device, KEY host-only
    head = tree.node_info(node).parent_id
    load = start_load(tree, node, LOAD_SLOTS)
    result = tree.insert([9, *KEY, 5, 6], [20, 10, 11, 12, 13, 14, 15])
    assert (result.prefix_len, result.adopted_len, result.cached_len) == (1, 0, 1)
    assert result.last_node == head
    assert tree.node_info(node).num_children == 0  # nothing was created under the load
    assert sorted(tree.all_device_indices().tolist()) == [0, *LOAD_SLOTS]
    tree.check_invariants()
    assert end_load(tree, node, load, ok=True) == []
    result = tree.insert([9, *KEY, 5, 6], [20, 10, 11, 12, 13, 14, 15])
    assert (result.prefix_len, result.cached_len) == (5, 7)  # once loaded, it is a prefix
    tree.check_invariants()


def test_load_chained_under_a_failed_load_fails_with_it() -> None:
    """A load committed under an in-flight load depends on it: if the upper one fails, the lower
    one's nodes are unreachable garbage-prefixed KV too, whatever their own copy does."""
    tree = RadixTree()
    lower = host_only(tree, [*KEY, 5, 6])
    upper = tree.match_prefix(KEY).best_match_node  # splits off KEY
    assert tree.node_info(lower).parent_id == upper
    upper_load = start_load(tree, upper, LOAD_SLOTS)
    lower_load = start_load(tree, lower, [104, 105])  # chained: its parent is load-pending
    assert end_load(tree, upper, upper_load, ok=False) == []  # the lower load locks it
    assert tree.node_info(lower).load_failed and tree.node_info(lower).load_pending
    assert tree.match_prefix([*KEY, 5, 6]).device_prefix_len == 0
    with pytest.raises(InvalidArgumentError, match="still pending"):
        tree.dec_lock_ref(lower_load)  # a load's lock is released after its ack
    assert sorted(end_load(tree, lower, lower_load, ok=True)) == [*LOAD_SLOTS, 104, 105]
    m = tree.match_prefix([*KEY, 5, 6])
    assert (m.device_prefix_len, m.host_hit_length) == (0, 6)
    assert tree.load_failed_size() == 0


def test_nothing_is_loaded_under_a_failed_node() -> None:
    tree = RadixTree()
    lower = host_only(tree, [*KEY, 5])
    upper = tree.match_prefix(KEY).best_match_node
    load = start_load(tree, upper, LOAD_SLOTS)
    request = tree.inc_lock_ref(upper).node_id
    end_load(tree, upper, load, ok=False)
    assert tree.load_back_plan(lower).num_tokens == 0
    with pytest.raises(InvalidArgumentError, match="load-failed"):
        tree.commit_load_back(lower, torch.tensor([], dtype=torch.int64))
    tree.dec_lock_ref(request)
    assert sorted(tree.take_failed_load_slots().tolist()) == LOAD_SLOTS
    assert tree.load_back_plan(lower).num_tokens == 5  # demoted: the whole path loads again
    tree.check_invariants()
