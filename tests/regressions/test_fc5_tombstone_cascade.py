"""Failure class 5 (DESIGN.md): a tombstone cascade that ignored host references.

Field scenario (SGLang HiMamba, PRs #22592 / #23696): a Mamba tombstone leaf was deleted while its
parent, also a tombstone, was being backed up (or prefetched); the cascade deleted the parent too,
and the backup's ack then looked the parent up under its own parent -> "parent does not have
child key" crash. Rule: the cascade stops at any node locked or host-locked in any component, or
with a transfer in flight; the parent stays, with its host value, and the tree stays consistent.

Tested on the tree core, where the cascade lives (the cache does not drive Mamba states yet).
Caught breakages (each tried, in ``RadixTree::delete_tombstones``): dropping the host-lock stop
fails the host_lock case; dropping the lock and backup-pending stops fails the backup case
(either one alone stops the cascade there, since a pending backup's node is always locked).
"""

from __future__ import annotations

import pytest
import torch

from hicache._tree import RadixTree

PARENT = [1, 2, 3, 4]
LEAF = [*PARENT, 5, 6, 7, 8]


@pytest.mark.parametrize("in_flight", ["backup", "host_lock"])
def test_parent_being_backed_up_survives_the_deletion_of_its_tombstone_leaf(in_flight):
    tree = RadixTree(4, 64, 64, mamba=True, num_mamba_slots=8)
    tree.insert(LEAF, torch.arange(8), mamba_value=3)  # one node; the state sits at its end
    leaf = tree.match_prefix(LEAF[:4] + [9, 9, 9, 9]).best_match_node  # splits: [1..4] | [5..8]
    parent = tree.node_info(tree.match_prefix(LEAF).last_device_node).parent_id
    assert leaf == 0 and not tree.node_info(parent).has_mamba_value  # the parent: a tombstone
    receipt = None
    if in_flight == "backup":
        # Write-through of the parent: host slots committed, node locked until the ack (a
        # pending backup is always of a locked node: check_invariants says so).
        tree.commit_backup(parent, torch.arange(4))
        receipt = tree.inc_lock_ref(parent)
    else:
        tree.inc_host_lock_ref(parent)  # a prefetch or a storage backup reading its host copy
    evicted = tree.evict_mamba(1)  # Mamba pool pressure: the leaf's state goes, then the leaf
    assert evicted.mamba_indices.tolist() == [3]
    assert sorted(evicted.device_indices.tolist()) == [4, 5, 6, 7]  # only the leaf's KV
    tree.check_invariants()
    info = tree.node_info(parent)
    assert info.num_children == 0 and info.has_device_value
    if in_flight == "backup":
        assert info.has_host_value and info.backup_pending
        tree.finish_backup(parent)  # the ack finds its node: no crash
        if receipt is not None:
            tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
        assert tree.node_info(parent).has_host_value
    else:
        tree.dec_host_lock_ref(parent)
    tree.check_invariants()
    # Once released, the useless parent goes with the next eviction that reaches it.
    tree.evict(4, write_back=False)
    assert tree.num_nodes() == 0
    tree.check_invariants()
