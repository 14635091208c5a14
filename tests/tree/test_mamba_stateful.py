"""Random operations on a Mamba tree: invariants, slot accounting and validators after every step.

Every slot handed to the tree (device KV, host KV, Mamba state) is tracked: the tree must hold
exactly the slots it was given and has not handed back (through insert's ``prefix_len`` /
``mamba_exist``, an eviction's result, ``abort_backup`` or ``evict_host``), so nothing leaks and
nothing is freed twice, whatever the interleaving of inserts with states, matches, locks with
receipts, device/host/Mamba evictions, backups (acknowledged or failed) and host locks.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache._tree import RadixTree
from tests.tree import test_differential  # noqa: F401 -- registers and loads the "ci"/"long" profiles

ALPHABET = 3  # distinct pages: small, so keys share prefixes and split nodes often
MAX_PAGES = 5


class MambaTreeMachine(RuleBasedStateMachine):
    page_size = 1

    def __init__(self) -> None:
        super().__init__()
        self.tree = RadixTree(self.page_size, 0, 0, mamba=True)
        self.next_slot = 0
        self.next_host = 0
        self.next_state = 0
        self.next_host_state = 0
        self.device: set[int] = set()  # slots the tree must hold
        self.host: set[int] = set()
        self.states: set[int] = set()
        self.host_states: set[int] = set()
        self.receipts: list = []
        self.host_locked: list[int] = []

    def _key(self, pages: list[int]) -> list[int]:
        return [p * 100 + i for p in pages for i in range(self.page_size)]

    def _fresh(self, n: int, attr: str) -> torch.Tensor:
        start = getattr(self, attr)
        setattr(self, attr, start + n)
        return torch.arange(start, start + n, dtype=torch.int64)

    def _drain(self) -> None:
        """Takes the tree's outboxes of freed host states and failed loads' slots."""
        for pool, freed in (
            (self.host_states, self.tree.take_freed_mamba_host_slots()),
            (self.device, self.tree.take_failed_load_slots()),
            (self.states, self.tree.take_failed_load_states()),
        ):
            for slot in freed.tolist():
                assert slot in pool, f"slot {slot} handed back but not held by the tree"
                pool.remove(slot)

    def _returned(self, result) -> None:
        for pool, freed in (
            (self.device, result.device_indices),
            (self.host, result.host_indices),
            (self.states, result.mamba_indices),
        ):
            for slot in freed.tolist():
                assert slot in pool, f"slot {slot} freed but not held by the tree"
                pool.remove(slot)

    pages_st = st.lists(st.integers(0, ALPHABET - 1), min_size=1, max_size=MAX_PAGES)

    @rule(pages=pages_st, with_state=st.booleans())
    def insert(self, pages: list[int], with_state: bool) -> None:
        key = self._key(pages)
        value = self._fresh(len(key), "next_slot")
        state = int(self._fresh(1, "next_state")[0]) if with_state else -1
        r = self.tree.insert(key, value, mamba_value=state)
        self.device.update(value[r.prefix_len : r.cached_len].tolist())
        assert not (r.mamba_taken and r.mamba_exist)
        if with_state and r.cached_len == len(key):
            assert r.mamba_taken or r.mamba_exist
        if r.mamba_taken:
            self.states.add(state)

    @rule(pages=pages_st)
    def match(self, pages: list[int]) -> None:
        key = self._key(pages)
        m = self.tree.match_prefix(key)
        # The match ends at the root or at a node holding a usable state (a device node's device
        # state, a host-only node's host state), and covers its whole path.
        if m.best_match_node != self.tree.root_id:
            best = self.tree.node_info(m.best_match_node)
            usable = best.has_mamba_value if best.has_device_value else best.has_mamba_host_value
            assert usable
        if m.last_device_node != self.tree.root_id:
            assert self.tree.node_info(m.last_device_node).has_mamba_value
        path, node = 0, m.best_match_node
        while node != self.tree.root_id:
            info = self.tree.node_info(node)
            path += info.num_tokens
            node = info.parent_id
        assert m.device_prefix_len + m.host_hit_length == path
        assert m.device_indices.tolist() == key[:0] or len(m.device_indices) == m.device_prefix_len
        if m.mamba_branching_seqlen >= 0:
            assert m.mamba_branching_seqlen > path

    @rule(pages=pages_st)
    def lock(self, pages: list[int]) -> None:
        m = self.tree.match_prefix(self._key(pages))
        self.receipts.append(self.tree.inc_lock_ref(m.best_match_node))

    @precondition(lambda self: self.receipts)
    @rule(data=st.data())
    def unlock(self, data) -> None:
        receipt = self.receipts.pop(data.draw(st.integers(0, len(self.receipts) - 1)))
        self.tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)

    @rule(pages=st.integers(0, 6), write_back=st.booleans())
    def evict(self, pages: int, write_back: bool) -> None:
        r = self.tree.evict(pages * self.page_size, write_back)
        self._returned(r)
        if r.needs_backup >= 0:
            n = self.tree.node_info(r.needs_backup).num_tokens
            host = self._fresh(n, "next_host")
            self.tree.commit_backup(r.needs_backup, host)
            self.tree.finish_backup(r.needs_backup)
            self.host.update(host.tolist())

    @rule(states=st.integers(0, 3))
    def evict_mamba(self, states: int) -> None:
        self._returned(self.tree.evict_mamba(states))

    @rule(pages=st.integers(0, 6))
    def evict_host(self, pages: int) -> None:
        for slot in self.tree.evict_host(pages * self.page_size).tolist():
            self.host.remove(slot)

    @rule(pages=pages_st, fail=st.booleans(), with_states=st.booleans())
    def backup(self, pages: list[int], fail: bool, with_states: bool) -> None:
        m = self.tree.match_prefix(self._key(pages))
        plan = self.tree.backup_plan(m.last_device_node, 1)
        for node, length, state in zip(plan.node_ids, plan.lengths, plan.states, strict=True):
            host = self._fresh(length, "next_host")
            host_state = -1
            if state >= 0 and with_states:  # else: the host state pool was full, KV only
                host_state = int(self._fresh(1, "next_host_state")[0])
                self.host_states.add(host_state)
            self.tree.commit_backup(node, host, host_state)
            receipt = self.tree.inc_lock_ref(node)
            self.host.update(host.tolist())
            if fail:
                for slot in self.tree.abort_backup(node).tolist():
                    self.host.remove(slot)
            else:
                self.tree.finish_backup(node)
            self.tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)

    @rule(pages=pages_st, fail=st.booleans())
    def state_backup(self, pages: list[int], fail: bool) -> None:
        """Incremental backups of states published after their node's KV backup."""
        node = self.tree.match_prefix(self._key(pages)).last_device_node
        plan = self.tree.state_backup_plan(node)
        for node_id in plan.node_ids:
            host_state = int(self._fresh(1, "next_host_state")[0])
            self.tree.commit_state_backup(node_id, host_state)
            self.host_states.add(host_state)
            receipt = self.tree.inc_lock_ref(node_id)
            if fail:
                self.tree.abort_state_backup(node_id)  # the outbox hands the slot back
            else:
                self.tree.finish_state_backup(node_id)
            self.tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)

    @rule(pages=pages_st, fail=st.booleans())
    def load_back(self, pages: list[int], fail: bool) -> None:
        anchor = self.tree.match_prefix(self._key(pages)).best_match_node
        plan = self.tree.load_back_plan(anchor)
        if not plan.node_ids:
            return
        self.tree.inc_host_lock_ref(anchor)
        device = self._fresh(plan.num_tokens, "next_slot")
        device_state = -1
        if plan.states[-1] >= 0:
            device_state = int(self._fresh(1, "next_state")[0])
            self.states.add(device_state)
        self.tree.commit_load_back(anchor, device, device_state)
        self.device.update(device.tolist())
        receipt = self.tree.inc_lock_ref(anchor)
        if fail:
            self.tree.abort_load_back(anchor)
        else:
            self.tree.finish_load_back(anchor)
        self.tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
        self.tree.dec_host_lock_ref(anchor)

    @rule(pages=pages_st, lock=st.booleans())
    def host_lock(self, pages: list[int], lock: bool) -> None:
        if lock or not self.host_locked:
            node = self.tree.match_prefix(self._key(pages)).best_match_node
            self.tree.inc_host_lock_ref(node)
            self.host_locked.append(node)
        else:
            self.tree.dec_host_lock_ref(
                self.host_locked.pop(random.randrange(len(self.host_locked)))
            )

    @invariant()
    def consistent(self) -> None:
        self._drain()
        self.tree.check_invariants()
        assert set(self.tree.all_device_indices().tolist()) == self.device
        assert set(self.tree.all_host_indices().tolist()) == self.host
        assert set(self.tree.all_mamba_indices().tolist()) == self.states
        assert set(self.tree.all_mamba_host_indices().tolist()) == self.host_states
        held = self.tree.mamba_evictable_size() + self.tree.mamba_protected_size()
        assert held == len(self.states)

    def teardown(self) -> None:
        for receipt in self.receipts:
            self.tree.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
        for node in self.host_locked:
            self.tree.dec_host_lock_ref(node)
        self._returned(self.tree.evict(1 << 30, False))
        for slot in self.tree.evict_host(1 << 30).tolist():
            self.host.remove(slot)
        self.consistent()
        assert self.tree.num_nodes() == 0 and not self.states and not self.host_states


# SGLang's configuration matrix for full + mamba: page 1, 4, 64, 128.
MACHINES = {
    page: type(f"MambaTreePage{page}", (MambaTreeMachine,), {"page_size": page})
    for page in (1, 4, 64, 128)
}


@pytest.mark.parametrize("page_size", sorted(MACHINES), ids=lambda p: f"page{p}")
def test_mamba_tree_random_operations(page_size: int) -> None:
    random.seed(0)
    case = MACHINES[page_size].TestCase
    case.settings = settings(settings(), max_examples=80, stateful_step_count=40)
    case().runTest()
