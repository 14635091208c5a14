"""Differential property tests of Mamba trees: ``RadixTree(mamba=True)`` against the model.

The machine of ``test_differential`` (inserts, matches, locks with their receipts, host locks,
backups and their acks, device and host evictions, write-back, load-backs and their acks, resets;
the tree's invariants, every size, every held slot and every node compared after each step) on a
tree with the Mamba component, plus inserts that hand the tree a state and ``evict_mamba``. The
model predicts where matches end (the deepest state), ``mamba_branching_seqlen``,
``mamba_exist`` / ``mamba_taken``, which receipts lock a state, the freed state slots in order,
and every node the tombstone cascade deletes (DESIGN.md failure class 5: it stops at locked,
host-locked, pending and load-failed nodes). Loads and host locks also anchor at the end of the
Full walk, below the validated prefix, so the cascade meets in-flight nodes.

The ``ci`` profile runs 4 machines x 100 examples x up to 40 steps (over 10,000 steps in all).
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from tests.tree.test_differential import TreeVsModel


class MambaTreeVsModel(TreeVsModel):
    """``TreeVsModel`` on a Mamba tree, with the rules that only a Mamba tree has."""

    mamba = True

    @rule(
        blocks=TreeVsModel.blocks_st,
        tail_len=TreeVsModel.tail_st,
        extra_index=TreeVsModel.extra_st,
    )
    def insert_with_state(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        self._insert(blocks, tail_len, extra_index, with_state=True)

    @rule(
        blocks=TreeVsModel.blocks_st,
        tail_len=TreeVsModel.tail_st,
        extra_index=TreeVsModel.extra_st,
    )
    def insert_with_state_again(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        # The same rule twice, as rules are drawn uniformly: most requests publish a state (the
        # base machine's insert publishes none and leaves a tombstone).
        self._insert(blocks, tail_len, extra_index, with_state=True)

    @rule(
        blocks=TreeVsModel.blocks_st,
        tail_len=TreeVsModel.tail_st,
        extra_index=TreeVsModel.extra_st,
    )
    def checkpoint_at_branching(self, blocks: list[int], tail_len: int, extra_index: int) -> None:
        """A request whose match stopped short of the Full walk (at a state) publishes a state
        at the branching point, as the scheduler does (SGLang's mamba_branching_seqlen)."""
        result, extra_key, _, _, _ = self._match(blocks, tail_len, extra_index)
        if result.mamba_branching_seqlen > 0:
            key = self._key(blocks, tail_len)[: result.mamba_branching_seqlen]
            self._insert_key(key, extra_key, with_state=True)

    @rule(
        blocks=TreeVsModel.blocks_st,
        tail_len=TreeVsModel.tail_st,
        extra_index=TreeVsModel.extra_st,
        load=st.booleans(),
        request_lock=st.booleans(),
    )
    def demote_under_host_lock(
        self, blocks: list[int], tail_len: int, extra_index: int, load: bool, request_lock: bool
    ) -> None:
        """A request publishes its state; a prefetch or a storage backup host-locks its path;
        memory pressure demotes everything it can (the host lock keeps the demoted path from the
        cascade); then, with ``load``, a load-back of the path goes in flight. Host-only nodes
        are rare in a Mamba tree otherwise (a demoted leaf loses its state and is deleted), and
        they are what load-backs, host evictions and cascades stopping at pending and failed
        loads work on."""
        self._insert(blocks, tail_len, extra_index, with_state=True)
        self.match_and_host_lock(blocks, tail_len, extra_index, deep=True)
        self.write_back_everything()
        if load:
            self.load_back(blocks, tail_len, extra_index, request_lock)

    @precondition(
        lambda self: (
            not (self.locks or self.host_locks or self.backups or self.loads)
            and self.model.mamba_evictable_size() > 0
        )
    )
    @rule()
    def reset(self) -> None:
        # Only with states to drop: an unconditional reset (a rule without arguments, drawn
        # often) would keep Mamba trees too small to meet their cascades.
        super().reset()

    @rule(num_states=st.integers(0, 3))
    def evict_mamba(self, num_states: int) -> None:
        self._check_evicted(self.tree.evict_mamba(num_states), self.model.evict_mamba(num_states))


def make_mamba_machine(page_size: int, with_extra_keys: bool) -> type[MambaTreeVsModel]:
    extra_keys = (None, "a", "b") if with_extra_keys else (None,)
    name = f"MambaTreeVsModelPage{page_size}{'Extra' if with_extra_keys else ''}"
    return type(name, (MambaTreeVsModel,), {"page_size": page_size, "extra_keys": extra_keys})


@pytest.mark.parametrize("with_extra_keys", [False, True], ids=["no_extra_key", "extra_key"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_mamba_tree_matches_reference(page_size: int, with_extra_keys: bool) -> None:
    case = make_mamba_machine(page_size, with_extra_keys).TestCase
    steps = max(settings().stateful_step_count, 40)  # the ci profile's 30 steps, and more
    case.settings = settings(settings(), stateful_step_count=steps)
    case().runTest()
