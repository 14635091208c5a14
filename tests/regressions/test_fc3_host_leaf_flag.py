"""Failure class 3 (DESIGN.md): host-leaf status computed from the wrong flag.

Field scenario (SGLang, write_back): a parent counted as a host-evictable leaf because its child
was not `evicted`, while the child's host copy still existed (it had been reloaded to device). The
parent's host KV was freed under host pressure with a backed-up child below it -> assertion crash.
Rule: a node is a host-evictable leaf only when no child is still `backuped`; here also only when
it is host-only (its own device copy keeps its host copy alive).
"""

from __future__ import annotations

import torch

from tests.regressions.helpers import NO_REQUEST_SLOTS, make_cache, run_request

PARENT = torch.arange(0, 16)
CHILD = torch.cat((PARENT, torch.arange(100, 116)))  # PARENT + one more node


def _host_value(cache, node_id: int) -> bool:
    return cache.tree.contains_node(node_id) and cache.tree.node_info(node_id).has_host_value


def test_parent_is_not_host_evictable_while_reloaded_child_is_backuped():
    cache = make_cache("write_back", device_slots=64, host_slots=64)
    run_request(cache, CHILD)  # parent node [0..16) and child node [16..32) on device
    parent = cache.match_prefix(PARENT).last_device_node
    child = cache.match_prefix(CHILD).last_device_node
    assert parent != child

    # Device pressure under write_back: both are backed up, then demoted (host-only).
    assert cache.evict(64) == 32
    assert cache.stats.demoted_tokens == 32
    assert _host_value(cache, parent) and _host_value(cache, child)

    # The child is reloaded to device (its path, parent included, comes back) ...
    assert run_request(cache, CHILD) == 32
    assert cache.stats.load_back_tokens == 32
    # ... then the child alone is evicted again: it keeps its host copy (no second backup).
    backups = cache.stats.backup_tokens
    assert cache.evict(16) == 16
    assert cache.stats.backup_tokens == backups
    info = cache.tree.node_info(child)
    assert not info.has_device_value and info.has_host_value
    assert cache.tree.node_info(parent).has_device_value

    # Host pressure: only the child is host-evictable; the parent (on device, with a backed-up
    # child) must keep its host copy.
    assert cache.tree.host_evictable_size() == 16
    assert cache.evict_host(10_000) == 16
    assert not cache.tree.contains_node(child)
    assert _host_value(cache, parent)
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)

    # Once the parent is host-only and childless it is evictable, and goes.
    assert cache.evict(16) == 16
    assert cache.tree.host_evictable_size() == 16
    assert cache.evict_host(16) == 16
    assert cache.tree.num_nodes() == 0
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    assert cache.host_pool.allocator.available_size() == cache.host_pool.num_slots


def test_host_eviction_never_takes_a_parent_before_its_backed_up_child():
    """Both host-only: whatever the access order, host eviction takes the child first."""
    cache = make_cache("write_back", device_slots=64, host_slots=64)
    run_request(cache, CHILD)
    parent = cache.match_prefix(PARENT).last_device_node
    cache.evict(64)
    # Whatever is touched (the parent's prefix alone, or the child's path, which touches the parent
    # after the child), the host LRU's back stays the child: it loses a page at a time, the parent
    # keeps its host copy and its child.
    for key in (PARENT, CHILD, PARENT):
        cache.match_prefix(key)
        cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
        freed = cache.evict_host(4)  # one page: from the child's tail
        assert freed == 4
        assert _host_value(cache, parent)
        assert cache.tree.node_info(parent).num_children == 1
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
