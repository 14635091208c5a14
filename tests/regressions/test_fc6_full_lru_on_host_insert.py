"""Failure class 6 (DESIGN.md): the Full LRU not refreshed by an insert over host-only nodes.

Field scenario (SGLang hybrid HiCache): an insert that walked device nodes and took over host-only
ones (a host insert) refreshed only the Mamba LRU; the Full LRU still saw the just-used path as
old and evicted it next, under the request that had just cached it. Rule: every node an insert
walks is touched in every LRU it is in (Full device, host, Mamba), deepest first.

Caught breakage (tried): dropping the device-LRU move in ``RadixTree::touch_path`` fails this test.
"""

from __future__ import annotations

import torch

from hicache._tree import RadixTree

X = list(range(16))
Y = list(range(100, 116))


def test_an_insert_over_host_only_nodes_refreshes_the_full_and_mamba_lrus():
    tree = RadixTree(4, 32, 64, mamba=True, num_mamba_slots=8, num_mamba_host_slots=8)
    x = tree.insert(X, torch.arange(16), mamba_value=1).last_node
    tree.commit_backup(x, torch.arange(16), host_state=1)
    tree.finish_backup(x)
    tree.insert(Y, torch.arange(16, 32), mamba_value=2)  # Y is now more recent than X
    # X's tail pages go to host: X = device head [0, 8) + host-only tail [8, 16) with its state.
    assert tree.evict(8, write_back=False).demoted_tokens == 8
    tail = tree.node_info(x)
    assert not tail.has_device_value and tail.has_mamba_host_value
    # The request recomputed X: its insert walks the device head and takes over the host tail.
    r = tree.insert(X, torch.arange(16))
    assert (r.prefix_len, r.adopted_len) == (8, 8)
    tree.check_invariants()
    # X was just used: eviction must take Y first, KV and state.
    first = tree.evict(8, write_back=False)
    assert set(first.device_indices.tolist()) <= set(range(16, 32))
    tree.check_invariants()
    head = tree.node_info(x).parent_id
    assert tree.node_info(x).has_device_value and tree.node_info(head).has_device_value
