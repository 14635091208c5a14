"""Differential property tests: ``RadixTree`` against the page-level ``ReferenceTree``.

A hypothesis state machine drives both with the same random inserts, matches, locks, unlocks,
host locks, backups (write-through plans and their commits), device evictions (write-through and
write-back: demotion, drops, backup requests), host evictions, load-backs (kept in flight while
other operations run, inserts over them and loads chained under them included) and their acks
(finished or failed, oldest first as the controller delivers them, a failed one possibly locked by
requests) and resets, in any interleaving, and after every step checks the tree's own invariants
and that every size and every held device and host slot agree with the model, including the
slots of failed loads handed back when their last lock goes. Keys are built from a few page-sized
blocks out of a small pool so that prefixes are shared, nodes split and branches compete in
eviction.

Profiles: ``ci`` (default) and ``long``; pick one with ``HYPOTHESIS_PROFILE=long``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache._tree import RadixTree
from tests.reference.model import ReferenceTree

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

    def __init__(self) -> None:
        super().__init__()
        self.tree = RadixTree(page_size=self.page_size)
        self.model = ReferenceTree(page_size=self.page_size)
        self.block_pool = make_block_pool(self.page_size)
        # Fresh slots come from these counters, a whole page at a time (never reused, so a slot
        # owned twice would show).
        self.next_page = 0
        self.next_host_page = 0
        # Held locks: (receipt node id, extra_key, locked key prefix) — device and host.
        self.locks: list[tuple[int, str | None, list[int]]] = []
        self.host_locks: list[tuple[int, str | None, list[int]]] = []
        # In-flight transfers, as the cache holds them: (ack id, extra_key, model pages, locked
        # prefix); a load also holds a host lock on the same prefix.
        self.backups: list[tuple[int, str | None, list, list[int]]] = []
        self.loads: list[tuple[int, str | None, list, list[int]]] = []

    def _key(self, blocks: list[int], tail_len: int) -> list[int]:
        key = [token for b in blocks for token in self.block_pool[b]]
        return key + [5] * min(tail_len, self.page_size - 1)

    def _fresh(self, num_tokens: int, host: bool = False) -> list[int]:
        num_pages = -(-num_tokens // self.page_size)
        if host:
            start = self.next_host_page * self.page_size
            self.next_host_page += num_pages
        else:
            start = self.next_page * self.page_size
            self.next_page += num_pages
        return list(range(start, start + num_tokens))

    def _match(self, blocks: list[int], tail_len: int, extra_index: int):
        """Matches in both; returns (result, extra_key, device prefix, whole matched prefix)."""
        extra_key = self.extra_keys[extra_index % len(self.extra_keys)]
        key = self._key(blocks, tail_len)
        result = self.tree.match_prefix(key, extra_key)
        model_len, model_slots, model_host_len = self.model.match_prefix(key, extra_key)
        assert result.device_indices.dtype == torch.int64
        assert result.device_indices.tolist() == model_slots
        assert result.device_prefix_len == model_len
        assert result.host_hit_length == model_host_len
        assert result.last_host_node == result.best_match_node
        if model_len == 0:
            assert result.last_device_node == self.tree.root_id
        else:
            info = self.tree.node_info(result.last_device_node)
            assert info.has_device_value
            assert info.extra_key == extra_key
        if model_host_len == 0:
            assert result.best_match_node == result.last_device_node
        else:
            info = self.tree.node_info(result.best_match_node)
            assert not info.has_device_value and info.has_host_value
        return result, extra_key, key[:model_len], key[: model_len + model_host_len]

    blocks_st = st.lists(st.integers(0, NUM_BLOCKS_IN_POOL - 1), min_size=1, max_size=MAX_BLOCKS)
    tail_st = st.integers(0, 63)
    extra_st = st.integers(0, 2)

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st)
    def insert(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        extra_key = self.extra_keys[extra_index % len(self.extra_keys)]
        key = self._key(blocks, tail_len)
        value = self._fresh(len(key))
        result = self.tree.insert(key, torch.tensor(value, dtype=torch.int64), extra_key)
        expected = self.model.insert(key, value, extra_key)
        assert (result.prefix_len, result.adopted_len, result.cached_len) == expected
        if result.cached_len >= self.page_size:  # 0 when it stopped above an in-flight load
            assert self.tree.node_info(result.last_node).extra_key == extra_key

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st)
    def match(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        self._match(blocks, tail_len, extra_index)

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st)
    def match_and_lock(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        result, extra_key, prefix, _ = self._match(blocks, tail_len, extra_index)
        # Locking the anchor skips its evicted bottom: the receipt names the last device node.
        receipt = self.tree.inc_lock_ref(result.best_match_node)
        assert receipt.node_id == result.last_device_node
        assert receipt.delta == self.model.lock(prefix, extra_key)
        if prefix:
            self.locks.append((receipt.node_id, extra_key, prefix))

    @precondition(lambda self: self.locks)
    @rule(index=st.integers(0, 1 << 16))
    def unlock(self, index: int) -> None:
        node_id, extra_key, prefix = self.locks.pop(index % len(self.locks))
        self._unlock(node_id, extra_key, prefix)

    def _unlock(self, node_id: int, extra_key: str | None, prefix: list[int]) -> None:
        """Releases a lock in both; load-failed nodes it frees are demoted, their slots handed
        back."""
        assert self.tree.dec_lock_ref(node_id) == self.model.unlock(prefix, extra_key)
        freed = self.tree.take_failed_load_slots().tolist()
        assert sorted(freed) == sorted(self.model.take_failed_load_slots())

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st)
    def match_and_host_lock(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        result, extra_key, _, matched = self._match(blocks, tail_len, extra_index)
        if not matched:
            return
        delta = self.tree.inc_host_lock_ref(result.best_match_node)
        assert delta == self.model.host_lock(matched, extra_key)
        self.host_locks.append((result.best_match_node, extra_key, matched))

    @precondition(lambda self: self.host_locks)
    @rule(index=st.integers(0, 1 << 16))
    def host_unlock(self, index: int) -> None:
        node_id, extra_key, prefix = self.host_locks.pop(index % len(self.host_locks))
        assert self.tree.dec_host_lock_ref(node_id) == self.model.host_unlock(prefix, extra_key)

    @rule(
        blocks=blocks_st,
        tail_len=tail_st,
        extra_index=extra_st,
        min_hit_count=st.integers(1, 3),
    )
    def write_through(
        self, blocks: list[int], tail_len: int, extra_index: int, min_hit_count: int
    ) -> None:
        result, extra_key, prefix, _ = self._match(blocks, tail_len, extra_index)
        plan = self.tree.backup_plan(result.last_device_node, min_hit_count)
        model_plan = self.model.backup_plan(prefix, min_hit_count, extra_key)
        expected = [s for k in model_plan for s in self.model.pages[k].device]
        assert plan.indices.tolist() == expected
        assert sum(plan.lengths) == plan.num_tokens == len(expected)
        host = self._fresh(len(expected), host=True)
        start = 0
        for node_id, length in zip(plan.node_ids, plan.lengths, strict=True):
            pages = model_plan[start // self.page_size : (start + length) // self.page_size]
            self.tree.commit_backup(node_id, torch.tensor(host[start : start + length]))
            self.model.commit_backup(pages, host[start : start + length])
            start += length
            # The cache locks the node until the copy's ack (a path lock up to the root).
            node_prefix = list(pages[-1][1])
            assert self.tree.inc_lock_ref(node_id).delta == self.model.lock(node_prefix, extra_key)
            self.backups.append((node_id, extra_key, pages, node_prefix))

    @precondition(lambda self: self.backups)
    @rule(index=st.integers(0, 1 << 16), fail=st.booleans())
    def backup_ack(self, index: int, fail: bool) -> None:
        node_id, extra_key, pages, prefix = self.backups.pop(index % len(self.backups))
        assert self.tree.node_info(node_id).backup_pending
        if fail:
            freed = self.tree.abort_backup(node_id)
            assert sorted(freed.tolist()) == sorted(self.model.abort_backup(pages))
        else:
            self.tree.finish_backup(node_id)
        self._unlock(node_id, extra_key, prefix)

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st, request_lock=st.booleans())
    def load_back(
        self, blocks: list[int], tail_len: int, extra_index: int, request_lock: bool
    ) -> None:
        result, extra_key, _, matched = self._match(blocks, tail_len, extra_index)
        anchor = result.best_match_node
        if not matched:
            return
        # As the cache does it: host-lock the anchor from plan to commit.
        assert self.tree.inc_host_lock_ref(anchor) == self.model.host_lock(matched, extra_key)
        plan = self.tree.load_back_plan(anchor)
        model_plan = self.model.load_back_plan(matched, extra_key)
        assert plan.indices.tolist() == [s for k in model_plan for s in self.model.pages[k].host]
        assert plan.num_tokens == result.host_hit_length
        device = self._fresh(plan.num_tokens)
        self.tree.commit_load_back(anchor, torch.tensor(device, dtype=torch.int64))
        self.model.commit_load_back(matched, device, extra_key)
        assert self.tree.node_info(anchor).has_device_value
        if not model_plan:
            assert self.tree.dec_host_lock_ref(anchor) == self.model.host_unlock(matched, extra_key)
            return
        # In flight until its ack: the anchor stays locked and host-locked.
        receipt = self.tree.inc_lock_ref(anchor)
        assert receipt.node_id == anchor
        assert receipt.delta == self.model.lock(matched, extra_key)
        self.loads.append((anchor, extra_key, model_plan, matched))
        if request_lock:  # the request that asked for the load uses it (and outlives its ack)
            assert self.tree.inc_lock_ref(anchor).delta == self.model.lock(matched, extra_key)
            self.locks.append((anchor, extra_key, matched))

    @precondition(lambda self: self.loads)
    @rule(fail=st.booleans())
    def load_ack(self, fail: bool) -> None:
        # Oldest first, as the controller acknowledges loads; the outcome is recorded while the
        # load's lock is held, then the lock is released (demoting a failed load's nodes unless
        # requests still lock them: then their unlock does).
        anchor, extra_key, pages, prefix = self.loads.pop(0)
        assert self.tree.node_info(anchor).load_pending
        if fail:
            assert self.tree.abort_load_back(anchor) == self.model.abort_load_back(pages)
            assert self.tree.node_info(anchor).load_failed
        else:
            self.tree.finish_load_back(anchor)
            self.model.finish_load_back(pages)
        assert not self.tree.node_info(anchor).load_pending
        self._unlock(anchor, extra_key, prefix)
        assert self.tree.dec_host_lock_ref(anchor) == self.model.host_unlock(prefix, extra_key)

    @rule(num_pages=st.integers(0, 8), extra_tokens=st.integers(0, 63), write_back=st.booleans())
    def evict(self, num_pages: int, extra_tokens: int, write_back: bool) -> None:
        num_tokens = num_pages * self.page_size + extra_tokens % self.page_size
        result = self.tree.evict(num_tokens, write_back=write_back)
        out = self.model.evict(num_tokens, write_back=write_back)
        assert result.device_indices.dtype == torch.int64
        assert sorted(result.device_indices.tolist()) == sorted(out.device_freed)
        assert sorted(result.host_indices.tolist()) == sorted(out.host_freed)
        assert result.demoted_tokens == out.demoted_tokens
        assert result.dropped_tokens == out.dropped_tokens
        assert (result.needs_backup != -1) == (out.needs_backup is not None)
        if out.needs_backup is None:
            return
        # Back the reported node up (a write-back): its pages end at the model's victim page.
        num_tokens = self.tree.node_info(result.needs_backup).num_tokens
        extra_key, tokens = out.needs_backup
        pages = self.model.backup_plan(list(tokens), 1, extra_key)[-num_tokens // self.page_size :]
        assert pages[-1] == out.needs_backup and len(pages) * self.page_size == num_tokens
        host = self._fresh(num_tokens, host=True)
        self.tree.commit_backup(result.needs_backup, torch.tensor(host))
        self.model.commit_backup(pages, host)
        self.tree.finish_backup(result.needs_backup)  # write_back backs up synchronously

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
        assert self.model.failed_load_slots == []  # every step takes what it demoted
        assert self.tree.take_failed_load_slots().numel() == 0
        slots = self.tree.all_device_indices().tolist()
        assert len(slots) == self.tree.total_size()
        assert sorted(slots) == sorted(self.model.all_slots())
        host_slots = self.tree.all_host_indices().tolist()
        assert sorted(host_slots) == sorted(self.model.all_host_slots())
        for node_id, extra_key, prefix in self.locks:
            assert self.tree.contains_node(node_id)
            assert self.tree.node_info(node_id).lock_ref == self.model.lock_count(prefix, extra_key)
        for node_id, extra_key, prefix in self.host_locks:
            assert self.tree.contains_node(node_id)
            info = self.tree.node_info(node_id)
            assert info.host_ref_counter == self.model.page(prefix, extra_key).host_lock_count


def make_machine(page_size: int, with_extra_keys: bool) -> type[TreeVsModel]:
    extra_keys = (None, "a", "b") if with_extra_keys else (None,)
    name = f"TreeVsModelPage{page_size}{'Extra' if with_extra_keys else ''}"
    return type(name, (TreeVsModel,), {"page_size": page_size, "extra_keys": extra_keys})


@pytest.mark.parametrize("with_extra_keys", [False, True], ids=["no_extra_key", "extra_key"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_tree_matches_reference(page_size: int, with_extra_keys: bool) -> None:
    make_machine(page_size, with_extra_keys).TestCase().runTest()
