"""Differential property tests: ``RadixTree`` against the page-level ``ReferenceTree``.

A hypothesis state machine drives both with the same random inserts, matches, locks, unlocks,
evictions and resets, and after every step checks the tree's own invariants and that every size
and every held slot agree with the model. Keys are built from a few page-sized blocks out of a
small pool so that prefixes are shared, nodes split and branches compete in eviction.

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
        self.next_page = 0  # fresh slots come from here, a whole page at a time
        # Held locks: (node_id, extra_key, locked key prefix).
        self.locks: list[tuple[int, str | None, list[int]]] = []

    def _key(self, blocks: list[int], tail_len: int) -> list[int]:
        key = [token for b in blocks for token in self.block_pool[b]]
        return key + [5] * min(tail_len, self.page_size - 1)

    def _fresh_slots(self, num_tokens: int) -> list[int]:
        num_pages = -(-num_tokens // self.page_size)
        start = self.next_page * self.page_size
        self.next_page += num_pages
        return list(range(start, start + num_tokens))

    def _match(self, blocks: list[int], tail_len: int, extra_index: int):
        extra_key = self.extra_keys[extra_index % len(self.extra_keys)]
        key = self._key(blocks, tail_len)
        result = self.tree.match_prefix(key, extra_key)
        model_len, model_slots = self.model.match_prefix(key, extra_key)
        assert result.device_indices.dtype == torch.int64
        assert result.device_indices.tolist() == model_slots
        assert result.device_prefix_len == model_len
        assert result.host_hit_length == 0
        assert result.last_host_node == result.last_device_node
        assert result.best_match_node == result.last_device_node
        if model_len == 0:
            assert result.last_device_node == self.tree.root_id
        else:
            info = self.tree.node_info(result.last_device_node)
            assert info.has_device_value
            assert info.extra_key == extra_key
        return result, extra_key, key[:model_len]

    blocks_st = st.lists(st.integers(0, NUM_BLOCKS_IN_POOL - 1), min_size=1, max_size=MAX_BLOCKS)
    tail_st = st.integers(0, 63)
    extra_st = st.integers(0, 2)

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st)
    def insert(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        extra_key = self.extra_keys[extra_index % len(self.extra_keys)]
        key = self._key(blocks, tail_len)
        value = self._fresh_slots(len(key))
        result = self.tree.insert(key, torch.tensor(value, dtype=torch.int64), extra_key)
        assert result.prefix_len == self.model.insert(key, value, extra_key)
        if len(key) >= self.page_size:
            assert self.tree.node_info(result.last_node).extra_key == extra_key

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st)
    def match(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        self._match(blocks, tail_len, extra_index)

    @rule(blocks=blocks_st, tail_len=tail_st, extra_index=extra_st)
    def match_and_lock(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        result, extra_key, prefix = self._match(blocks, tail_len, extra_index)
        if not prefix:
            return
        node_id = result.last_device_node
        assert self.tree.inc_lock_ref(node_id) == self.model.lock(prefix, extra_key)
        self.locks.append((node_id, extra_key, prefix))

    @precondition(lambda self: self.locks)
    @rule(index=st.integers(0, 1 << 16))
    def unlock(self, index: int) -> None:
        node_id, extra_key, prefix = self.locks.pop(index % len(self.locks))
        assert self.tree.dec_lock_ref(node_id) == self.model.unlock(prefix, extra_key)

    @rule(num_pages=st.integers(0, 8), extra_tokens=st.integers(0, 63))
    def evict(self, num_pages: int, extra_tokens: int) -> None:
        num_tokens = num_pages * self.page_size + extra_tokens % self.page_size
        freed = self.tree.evict(num_tokens)
        model_freed = self.model.evict(num_tokens)
        assert freed.dtype == torch.int64
        assert len(freed) == len(model_freed)
        assert sorted(freed.tolist()) == sorted(model_freed)

    @precondition(lambda self: not self.locks)
    @rule()
    def reset(self) -> None:
        assert sorted(self.tree.reset().tolist()) == sorted(self.model.reset())
        assert self.tree.num_nodes() == 0  # the root is not counted

    @invariant()
    def agrees_with_model(self) -> None:
        self.tree.check_invariants()
        assert self.tree.total_size() == self.model.total_size()
        assert self.tree.evictable_size() == self.model.evictable_size()
        assert self.tree.protected_size() == self.model.protected_size()
        slots = self.tree.all_device_indices().tolist()
        assert len(slots) == self.tree.total_size()
        assert len(set(slots)) == len(slots)
        assert sorted(slots) == sorted(self.model.all_slots())
        for node_id, extra_key, prefix in self.locks:
            assert self.tree.contains_node(node_id)
            assert self.tree.node_info(node_id).lock_ref == self.model.lock_count(prefix, extra_key)


def make_machine(page_size: int, with_extra_keys: bool) -> type[TreeVsModel]:
    extra_keys = (None, "a", "b") if with_extra_keys else (None,)
    name = f"TreeVsModelPage{page_size}{'Extra' if with_extra_keys else ''}"
    return type(name, (TreeVsModel,), {"page_size": page_size, "extra_keys": extra_keys})


@pytest.mark.parametrize("with_extra_keys", [False, True], ids=["no_extra_key", "extra_key"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_tree_matches_reference(page_size: int, with_extra_keys: bool) -> None:
    make_machine(page_size, with_extra_keys).TestCase().runTest()
