"""Differential property tests: ``RadixTree`` against the page-level ``ReferenceTree``.

A hypothesis state machine drives both with the same random inserts, matches, locks, unlocks, host
locks, backups (write-through plans and their commits), host inserts of prefetched pages, device
evictions (write-through and write-back: demotion, drops, backup requests), host evictions, load-
backs (kept in flight while other operations run, inserts over them and loads chained under them
included) and their acks (finished or failed, oldest first as the controller delivers them, a failed
one possibly locked by requests) and resets, in any interleaving, and after every step checks the
tree's own invariants and that every size and every held device and host slot agree with the model,
including the slots of failed loads handed back when their last lock goes, and that the tree's nodes
are the model's: the same paths (so splits happen where the model says), each with the model's
tiers, locks, hits and in-flight marks. Node ids in results (match anchors, insert's last node, lock
receipts, backup plans, write-back requests) are checked to name the node at the model's path. Keys
are built from a few page-sized blocks out of a small pool so that prefixes are shared, nodes split
and branches compete in eviction. The machine also runs Mamba trees (``test_differential_mamba``)
and SWA trees (``test_differential_swa``): then the model predicts the states, the SWA KV, window
locks and host SWA copies too (every step compares them; they are empty in trees without those
components).

Profiles: ``ci`` (default) and ``long``; pick one with ``HYPOTHESIS_PROFILE=long``.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache._tree import RadixTree
from hicache.results import LockReceipt, NodeInfo
from tests.reference.model import PageKey, ReferenceTree

settings.register_profile(
    "ci",
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=1000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NUM_BLOCKS_IN_POOL = 3
MAX_BLOCKS = 6  # per key


def make_block_pool(page_size: int) -> list[list[int]]:
    """Page-sized token blocks differing only in their last token: only whole pages can match."""
    return [[7] * (page_size - 1) + [100 + b] for b in range(NUM_BLOCKS_IN_POOL)]


class TreeVsModel(RuleBasedStateMachine):
    """Runs ``RadixTree`` and ``ReferenceTree`` side by side; subclasses fix the configuration."""

    page_size = 1
    extra_keys: tuple[str | None, ...] = (None,)
    mamba = False
    window = 0  # sliding_window_size (0: no SWA component)

    def __init__(self) -> None:
        super().__init__()
        self.tree = RadixTree(
            page_size=self.page_size, mamba=self.mamba, sliding_window_size=self.window
        )
        self.model = ReferenceTree(
            page_size=self.page_size, mamba=self.mamba, sliding_window_size=self.window
        )
        self.block_pool = make_block_pool(self.page_size)
        # Fresh slots come from these counters, a whole page (or one state) at a time (never
        # reused, so a slot owned twice would show).
        self.next_page = 0
        self.next_host_page = 0
        self.next_swa_host_page = 0
        self.next_state = 0
        # Held locks: (receipt, extra_key, locked key prefix) for device locks (the receipt goes
        # back to dec_lock_ref), (node id, extra_key, host-locked key prefix) for host locks.
        self.locks: list[tuple[LockReceipt, str | None, list[int]]] = []
        self.host_locks: list[tuple[int, str | None, list[int]]] = []
        # In-flight transfers, as the cache holds them: (ack id, extra_key, model pages, locked
        # prefix, lock receipt); a load also holds a host lock on the same prefix.
        self.backups: list[tuple[int, str | None, list, list[int], LockReceipt]] = []
        self.loads: list[tuple[int, str | None, list, list[int], LockReceipt]] = []

    def _key(self, blocks: list[int], tail_len: int) -> list[int]:
        key = [token for b in blocks for token in self.block_pool[b]]
        return key + [5] * min(tail_len, self.page_size - 1)

    def _fresh(self, num_tokens: int, host: bool = False, swa_host: bool = False) -> list[int]:
        num_pages = -(-num_tokens // self.page_size)
        if swa_host:
            start = self.next_swa_host_page * self.page_size
            self.next_swa_host_page += num_pages
        elif host:
            start = self.next_host_page * self.page_size
            self.next_host_page += num_pages
        else:
            start = self.next_page * self.page_size
            self.next_page += num_pages
        return list(range(start, start + num_tokens))

    def _nodes(self) -> dict[PageKey, NodeInfo]:
        """The tree's nodes by path: ``(extra_key, tokens from the root to the node's end)``,
        the model's key of the page ending the node."""
        paths: dict[int, tuple[int, ...]] = {self.tree.root_id: ()}
        nodes = {}
        for node_id in self.tree.node_ids():  # parents first
            info = self.tree.node_info(node_id)
            paths[node_id] = paths[info.parent_id] + tuple(self.tree.node_key(node_id))
            nodes[(info.extra_key, paths[node_id])] = info
        return nodes

    def _node_at(self, extra_key: str | None, prefix: list[int]) -> int:
        """The id of the tree's node ending ``prefix`` (the root for an empty one)."""
        if not prefix:
            return self.tree.root_id
        return self._nodes()[(extra_key, tuple(prefix))].node_id

    def _device_part(self, prefix: list[int], extra_key: str | None) -> list[int]:
        """The leading part of a cached ``prefix`` that is on device (a root-anchored run)."""
        return prefix[: self.model.device_len(prefix, extra_key)]

    def _match(self, blocks: list[int], tail_len: int, extra_index: int):
        """Matches in both; returns (result, extra_key, device prefix, validated prefix, prefix
        the Full walk matched)."""
        extra_key = self.extra_keys[extra_index % len(self.extra_keys)]
        key = self._key(blocks, tail_len)
        result = self.tree.match_prefix(key, extra_key)
        out = self.model.match_prefix(key, extra_key)
        assert result.device_indices.dtype == torch.int64
        assert result.device_indices.tolist() == out.device_slots
        assert result.device_prefix_len == out.device_len
        assert result.host_hit_length == out.host_len
        assert result.mamba_branching_seqlen == out.mamba_branching_seqlen
        assert result.swa_branching_seqlen == out.swa_branching_seqlen
        assert result.last_host_node == result.best_match_node
        prefix, validated = key[: out.device_len], key[: out.device_len + out.host_len]
        assert result.last_device_node == self._node_at(extra_key, prefix)
        assert result.best_match_node == self._node_at(extra_key, validated)
        if not self.mamba and not self.window:
            assert out.full_len == len(validated)  # every matched node validates
        return result, extra_key, prefix, validated, key[: out.full_len]

    blocks_st = st.lists(st.integers(0, NUM_BLOCKS_IN_POOL - 1), min_size=1, max_size=MAX_BLOCKS)
    tail_st = st.integers(0, 63)
    extra_st = st.integers(0, 2)

    def _insert(self, blocks: list[int], tail_len: int, extra_index: int, with_state: bool) -> None:
        extra_key = self.extra_keys[extra_index % len(self.extra_keys)]
        self._insert_key(self._key(blocks, tail_len), extra_key, with_state)

    def _insert_key(
        self,
        key: list[int],
        extra_key: str | None,
        with_state: bool,
        swa_evicted_seqlen: int = 0,
        own: list[int] | None = None,
    ) -> None:
        """Inserts ``key`` in both with the slots ``own`` (the tree's, of a matched prefix) then
        fresh ones (and a fresh state); compares the results."""
        own = own or []
        value = own + self._fresh(len(key) - len(own))
        state = None
        if with_state:
            state, self.next_state = self.next_state, self.next_state + 1
        result = self.tree.insert(
            key,
            torch.tensor(value, dtype=torch.int64),
            extra_key,
            mamba_value=-1 if state is None else state,
            swa_evicted_seqlen=swa_evicted_seqlen,
        )
        out = self.model.insert(
            key, value, extra_key, mamba_value=state, swa_evicted_seqlen=swa_evicted_seqlen
        )
        assert (result.prefix_len, result.adopted_len, result.cached_len) == out[:3]
        assert (result.mamba_exist, result.mamba_taken) == (out.mamba_exist, out.mamba_taken)
        assert tuple(result.swa_remap_dst.tolist()) == out.swa_remap_dst
        assert tuple(result.swa_remap_src.tolist()) == out.swa_remap_src
        assert result.last_node == self._node_at(extra_key, key[: result.cached_len])

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st)
    def insert(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        self._insert(blocks, tail_len, extra_index, with_state=False)

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st)
    def match(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        self._match(blocks, tail_len, extra_index)

    def _lock(self, node_id: int, extra_key: str | None, prefix: list[int]) -> LockReceipt:
        """Locks node ``node_id``, which ends ``prefix``, in both; the receipt names the node
        ending the device part of ``prefix`` (locking skips the evicted bottom)."""
        receipt = self.tree.inc_lock_ref(node_id)
        device_prefix = self._device_part(prefix, extra_key)
        assert receipt.node_id == self._node_at(extra_key, device_prefix)
        out = self.model.lock(device_prefix, extra_key)
        assert receipt.delta == out.delta
        assert receipt.mamba_node_id == (receipt.node_id if out.mamba_locked else -1)
        assert receipt.swa_lock_tokens == out.swa_lock_tokens
        return receipt

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st, deep=st.booleans())
    def match_and_lock(
        self, blocks: list[int], tail_len: int, extra_index: int, deep: bool
    ) -> None:
        # The cache locks the match's anchor; deep: the end of the Full walk (a request's
        # last_node may be a Mamba tombstone, which locks no state).
        result, extra_key, _, validated, full = self._match(blocks, tail_len, extra_index)
        prefix = full if deep else validated
        receipt = self._lock(self._node_at(extra_key, prefix), extra_key, prefix)
        if receipt.node_id != self.tree.root_id:
            self.locks.append((receipt, extra_key, self._device_part(prefix, extra_key)))

    @precondition(lambda self: self.locks)
    @rule(index=st.integers(0, 1 << 16))
    def unlock(self, index: int) -> None:
        receipt, extra_key, prefix = self.locks.pop(index % len(self.locks))
        self._unlock(receipt, extra_key, prefix)

    def _unlock(self, receipt: LockReceipt, extra_key: str | None, prefix: list[int]) -> None:
        """Releases a lock in both; load-failed nodes it frees are demoted, their slots handed
        back."""
        delta = self.tree.dec_lock_ref(
            receipt.node_id, receipt.mamba_node_id, receipt.swa_lock_tokens
        )
        assert delta == self.model.unlock(
            prefix, extra_key, receipt.mamba_node_id != -1, receipt.swa_lock_tokens
        )
        freed = self.tree.take_failed_load_slots().tolist()
        assert sorted(freed) == sorted(self.model.take_failed_load_slots())

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st, deep=st.booleans())
    def match_and_host_lock(
        self, blocks: list[int], tail_len: int, extra_index: int, deep: bool
    ) -> None:
        result, extra_key, _, validated, full = self._match(blocks, tail_len, extra_index)
        prefix = full if deep else validated
        if not prefix:
            return
        node_id = self._node_at(extra_key, prefix)
        assert self.tree.inc_host_lock_ref(node_id) == self.model.host_lock(prefix, extra_key)
        self.host_locks.append((node_id, extra_key, prefix))

    @precondition(lambda self: self.host_locks)
    @rule(index=st.integers(0, 1 << 16))
    def host_unlock(self, index: int) -> None:
        node_id, extra_key, prefix = self.host_locks.pop(index % len(self.host_locks))
        assert self.tree.dec_host_lock_ref(node_id) == self.model.host_unlock(prefix, extra_key)

    def _commit_backup(self, node_id: int, pages: list[PageKey], with_swa: bool) -> None:
        """Commits a backup of node ``node_id`` (the model's ``pages``) in both, with fresh host
        slots, and fresh host SWA slots if ``with_swa`` and its SWA KV is live."""
        host = self._fresh(len(pages) * self.page_size, host=True)
        swa_host = None
        if with_swa and self.model.pages[pages[-1]].swa:
            swa_host = self._fresh(len(host), swa_host=True)
        self.tree.commit_backup(
            node_id,
            torch.tensor(host),
            host_swa_indices=None if swa_host is None else torch.tensor(swa_host),
        )
        self.model.commit_backup(pages, host, swa_host)

    @rule(
        blocks=blocks_st,
        tail_len=tail_st,
        extra_index=extra_st,
        min_hit_count=st.integers(1, 3),
        deep=st.booleans(),
        with_swa=st.booleans(),
    )
    def write_through(
        self,
        blocks: list[int],
        tail_len: int,
        extra_index: int,
        min_hit_count: int,
        deep: bool,
        with_swa: bool,
    ) -> None:
        result, extra_key, prefix, _, full = self._match(blocks, tail_len, extra_index)
        if deep:  # the device part of the Full walk (Mamba trees: tombstones below the match)
            prefix = self._device_part(full, extra_key)
        plan = self.tree.backup_plan(self._node_at(extra_key, prefix), min_hit_count)
        model_plan = self.model.backup_plan(prefix, min_hit_count, extra_key)
        expected = [s for k in model_plan for s in self.model.pages[k].device]
        assert plan.indices.tolist() == expected
        assert sum(plan.lengths) == plan.num_tokens == len(expected)
        start = 0
        for i, (node_id, length) in enumerate(zip(plan.node_ids, plan.lengths, strict=True)):
            pages = model_plan[start // self.page_size : (start + length) // self.page_size]
            node_prefix = list(pages[-1][1])
            assert node_id == self._node_at(extra_key, node_prefix)
            if self.window:  # whether its SWA KV goes along
                assert plan.swa[i] == self.model.pages[pages[-1]].swa
            self._commit_backup(node_id, pages, with_swa)
            start += length
            # The cache locks the node until the copy's ack (a path lock up to the root).
            receipt = self._lock(node_id, extra_key, node_prefix)
            self.backups.append((node_id, extra_key, pages, node_prefix, receipt))

    @precondition(lambda self: self.backups)
    @rule(index=st.integers(0, 1 << 16), fail=st.booleans())
    def backup_ack(self, index: int, fail: bool) -> None:
        node_id, extra_key, pages, prefix, receipt = self.backups.pop(index % len(self.backups))
        assert self.tree.node_info(node_id).backup_pending
        if fail:
            freed = self.tree.abort_backup(node_id)
            assert sorted(freed.tolist()) == sorted(self.model.abort_backup(pages))
        else:
            self.tree.finish_backup(node_id)
            self.model.finish_backup(pages)
        self._unlock(receipt, extra_key, prefix)

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st, request_lock=st.booleans())
    def load_back(
        self, blocks: list[int], tail_len: int, extra_index: int, request_lock: bool
    ) -> None:
        # The anchor is the end of the Full walk: best_match_node, except in a Mamba tree, where
        # host-only nodes never validate (no host states), so the cache never loads; the tree
        # loads them all the same, which puts load-pending and load-failed nodes in the way of
        # the tombstone cascade.
        result, extra_key, _, _, matched = self._match(blocks, tail_len, extra_index)
        if not matched:
            return
        anchor = self._node_at(extra_key, matched)
        # As the cache does it: host-lock the anchor from plan to commit.
        assert self.tree.inc_host_lock_ref(anchor) == self.model.host_lock(matched, extra_key)
        plan = self.tree.load_back_plan(anchor)
        model_plan = self.model.load_back_plan(matched, extra_key)
        assert plan.indices.tolist() == [s for k in model_plan for s in self.model.pages[k].host]
        assert plan.num_tokens == len(model_plan) * self.page_size
        swa_host = [s for k in model_plan for s in self.model.pages[k].swa_host or []]
        assert plan.swa_indices.tolist() == swa_host
        if self.window:  # per node: whether its host SWA copy comes back
            ends = [k for k in model_plan if k in self.model.ends]
            assert list(plan.swa) == [self.model.pages[k].swa_host is not None for k in ends]
        device = self._fresh(plan.num_tokens)
        self.tree.commit_load_back(anchor, torch.tensor(device, dtype=torch.int64))
        self.model.commit_load_back(matched, device, extra_key)
        assert self.tree.node_info(anchor).has_device_value
        if not model_plan:
            assert self.tree.dec_host_lock_ref(anchor) == self.model.host_unlock(matched, extra_key)
            return
        # In flight until its ack: the anchor stays locked and host-locked.
        receipt = self._lock(anchor, extra_key, matched)
        assert receipt.node_id == anchor
        self.loads.append((anchor, extra_key, model_plan, matched, receipt))
        if request_lock:  # the request that asked for the load uses it (and outlives its ack)
            self.locks.append((self._lock(anchor, extra_key, matched), extra_key, matched))

    @precondition(lambda self: self.loads)
    @rule(fail=st.booleans())
    def load_ack(self, fail: bool) -> None:
        # Oldest first, as the controller acknowledges loads; the outcome is recorded while the
        # load's lock is held, then the lock is released (demoting a failed load's nodes unless
        # requests still lock them: then their unlock does).
        anchor, extra_key, pages, prefix, receipt = self.loads.pop(0)
        assert self.tree.node_info(anchor).load_pending
        if fail:
            assert self.tree.abort_load_back(anchor) == self.model.abort_load_back(pages)
            assert self.tree.node_info(anchor).load_failed
        else:
            self.tree.finish_load_back(anchor)
            self.model.finish_load_back(pages)
        assert not self.tree.node_info(anchor).load_pending
        self._unlock(receipt, extra_key, prefix)
        assert self.tree.dec_host_lock_ref(anchor) == self.model.host_unlock(prefix, extra_key)

    # Hybrid trees need a state / a window with the pages (the model has neither): their
    # insert_host is covered by tests/tree/test_insert_host.py and tests/storage.
    @precondition(lambda self: not self.mamba and not self.window)
    @rule(
        blocks=blocks_st,
        tail_len=tail_st,
        extra_index=extra_st,
        rest=st.lists(st.integers(0, NUM_BLOCKS_IN_POOL - 1), min_size=0, max_size=4),
        rest_tail=tail_st,
    )
    def prefetch_insert_host(
        self, blocks: list[int], tail_len: int, extra_index: int, rest: list[int], rest_tail: int
    ) -> None:
        # Pages prefetched from storage, inserted host-only below a match's last_host_node.
        result, extra_key, _, validated, _ = self._match(blocks, tail_len, extra_index)
        anchor = result.last_host_node
        key = self._key(rest, rest_tail)
        host = self._fresh(len(key), host=True)
        got = self.tree.insert_host(anchor, key, torch.tensor(host, dtype=torch.int64), extra_key)
        out = self.model.insert_host(validated, key, host, extra_key)
        assert (got.prefix_len, got.adopted_len, got.cached_len) == out[:3]
        assert got.last_node == self._node_at(extra_key, validated + key[: got.cached_len])

    def _check_evicted(self, result, out) -> None:
        assert result.device_indices.dtype == torch.int64
        assert sorted(result.device_indices.tolist()) == sorted(out.device_freed)
        assert sorted(result.host_indices.tolist()) == sorted(out.host_freed)
        assert result.mamba_indices.tolist() == out.mamba_freed  # victims in LRU order
        assert result.demoted_tokens == out.demoted_tokens
        assert result.dropped_tokens == out.dropped_tokens
        assert result.swa_indices.tolist() == out.swa_freed  # victims in LRU order

    @rule(num_pages=st.integers(0, 8), extra_tokens=st.integers(0, 63), write_back=st.booleans())
    def evict(self, num_pages: int, extra_tokens: int, write_back: bool) -> None:
        num_tokens = num_pages * self.page_size + extra_tokens % self.page_size
        result = self.tree.evict(num_tokens, write_back=write_back)
        out = self.model.evict(num_tokens, write_back=write_back)
        self._check_evicted(result, out)
        if out.needs_backup is None:
            assert result.needs_backup == -1
            return
        # Back the reported node up (a write-back): the model's victim's node, split off.
        self._write_back(result, out)

    def _write_back(self, result, out) -> None:
        """Backs up the node an eviction reported in both (SWA KV included), synchronously."""
        extra_key, tokens = out.needs_backup
        assert result.needs_backup == self._node_at(extra_key, list(tokens))
        pages = self.model.node_pages(out.needs_backup)
        self._commit_backup(result.needs_backup, pages, with_swa=True)
        self.tree.finish_backup(result.needs_backup)  # write_back backs up synchronously
        self.model.finish_backup(pages)

    @rule()
    def write_back_everything(self) -> None:
        """Backs up and demotes everything evictable, so that host hits, load-backs and their
        failures are common (each round is one write-back eviction step, as in :meth:`evict`)."""
        for _ in range(64):
            before = (self.tree.total_size(), self.tree.host_total_size())
            self.evict(num_pages=8, extra_tokens=0, write_back=True)
            if (self.tree.total_size(), self.tree.host_total_size()) == before:
                return

    @rule(num_pages=st.integers(0, 8), extra_tokens=st.integers(0, 63))
    def evict_host(self, num_pages: int, extra_tokens: int) -> None:
        num_tokens = num_pages * self.page_size + extra_tokens % self.page_size
        freed = self.tree.evict_host(num_tokens)
        assert sorted(freed.tolist()) == sorted(self.model.evict_host(num_tokens))

    @precondition(lambda self: not (self.locks or self.host_locks or self.backups or self.loads))
    @rule()
    def reset(self) -> None:
        assert sorted(self.tree.all_host_indices().tolist()) == sorted(self.model.all_host_slots())
        assert sorted(self.tree.all_mamba_indices().tolist()) == sorted(
            self.model.all_mamba_slots()
        )
        assert sorted(self.tree.all_swa_host_indices().tolist()) == sorted(
            self.model.all_swa_host_slots()
        )
        assert sorted(self.tree.reset().tolist()) == sorted(self.model.reset())
        assert self.tree.num_nodes() == 0  # the root is not counted
        assert self.tree.host_total_size() == 0

    @invariant()
    def agrees_with_model(self) -> None:
        self.tree.check_invariants()
        assert self.tree.total_size() == self.model.total_size()
        assert self.tree.evictable_size() == self.model.evictable_size()
        assert self.tree.protected_size() == self.model.protected_size()
        assert self.tree.host_total_size() == self.model.host_total_size()
        assert self.tree.host_evictable_size() == self.model.host_evictable_size()
        assert self.tree.load_failed_size() == self.model.load_failed_size()
        assert self.tree.mamba_evictable_size() == self.model.mamba_evictable_size()
        assert self.tree.mamba_protected_size() == self.model.mamba_protected_size()
        assert self.model.failed_load_slots == []  # every step takes what it demoted
        assert self.tree.take_failed_load_slots().numel() == 0
        slots = self.tree.all_device_indices().tolist()
        assert len(slots) == self.tree.total_size()
        assert sorted(slots) == sorted(self.model.all_slots())
        host_slots = self.tree.all_host_indices().tolist()
        assert sorted(host_slots) == sorted(self.model.all_host_slots())
        mamba_slots = self.tree.all_mamba_indices().tolist()
        assert sorted(mamba_slots) == sorted(self.model.all_mamba_slots())
        assert self.tree.swa_evictable_size() == self.model.swa_evictable_size()
        assert self.tree.swa_protected_size() == self.model.swa_protected_size()
        assert self.tree.swa_host_size() == self.model.swa_host_size()
        swa_slots = self.tree.all_swa_indices().tolist()
        assert sorted(swa_slots) == sorted(self.model.all_swa_slots())
        swa_host_slots = self.tree.all_swa_host_indices().tolist()
        assert sorted(swa_host_slots) == sorted(self.model.all_swa_host_slots())
        freed_swa_host = self.tree.take_freed_swa_host_slots().tolist()  # each step's
        assert sorted(freed_swa_host) == sorted(self.model.take_freed_swa_host_slots())
        self._same_nodes()

    def _same_nodes(self) -> None:
        """The tree's nodes are the model's: one per page in ``ends``, with that node's pages,
        children, tiers, locks, hits, in-flight marks and state."""
        nodes = self._nodes()
        assert set(nodes) == self.model.ends
        num_children = Counter(self.model.parent(k) for k in self.model.pages)
        for end, info in nodes.items():
            pages = self.model.node_pages(end)
            assert info.num_tokens == len(pages) * self.page_size, end
            assert info.num_children == num_children[end], end
            for page_key in pages:
                page = self.model.pages[page_key]
                assert (
                    page.device is not None,
                    page.host is not None,
                    page.lock_count,
                    page.host_lock_count,
                    page.hit_count,
                    page.backup_pending,
                    page.load_pending,
                    page.load_failed,
                    page.swa,
                    page.swa_host is not None,
                    page.swa_lock_count,
                ) == (
                    info.has_device_value,
                    info.has_host_value,
                    info.lock_ref,
                    info.host_ref_counter,
                    info.hit_count,
                    info.backup_pending,
                    info.load_pending,
                    info.load_failed,
                    info.has_swa_value,
                    info.has_swa_host_value,
                    info.swa_lock_ref,
                ), page_key
                state = page.mamba if page.mamba is not None else -1
                if page_key == end:
                    assert (state, page.mamba_lock_count) == (info.mamba_value, info.mamba_lock_ref)
                else:  # a state sits at a node's end
                    assert (state, page.mamba_lock_count) == (-1, 0), page_key


def make_machine(page_size: int, with_extra_keys: bool) -> type[TreeVsModel]:
    extra_keys = (None, "a", "b") if with_extra_keys else (None,)
    name = f"TreeVsModelPage{page_size}{'Extra' if with_extra_keys else ''}"
    return type(name, (TreeVsModel,), {"page_size": page_size, "extra_keys": extra_keys})


@pytest.mark.parametrize("with_extra_keys", [False, True], ids=["no_extra_key", "extra_key"])
@pytest.mark.parametrize("page_size", [1, 4, 16, 64, 128])  # SGLang's full-only page matrix
def test_tree_matches_reference(page_size: int, with_extra_keys: bool) -> None:
    make_machine(page_size, with_extra_keys).TestCase().runTest()
