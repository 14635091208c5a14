"""Differential property tests of SWA trees: ``RadixTree(sliding_window_size=W)`` against the model.

The machine of ``test_differential`` (inserts, matches, locks with their receipts, host locks,
backups and their acks, device and host evictions, write-back, load-backs and their acks, resets;
the tree's invariants, every size, every held slot and every node compared after each step) on a
tree with the SWA component, plus inserts with an SWA frontier (``swa_evicted_seqlen``, page
floored or not, with fresh slots or with the tree's own slots for the matched prefix, as a running
request inserts), checkpoints at ``swa_branching_seqlen`` (which recover the tombstoned window)
and ``evict_swa`` (write-through and write-back). Every step also compares what is SWA-specific:
where matches end under the window rule and ``swa_branching_seqlen``; the remap pairs of
recovered tombstones; where the tree cuts nodes (at the frontier, and a new live leaf's one-window
tail); each node's device SWA flag, host SWA copy and SWA lock count; window-lock receipts
(``swa_lock_tokens``), released with their receipts after later splits; the SWA sizes
(``swa_evictable_size``, ``swa_protected_size``, ``swa_host_size``), the slots with live SWA, the
host SWA slots, the backup and load-back plans' SWA flags and host SWA slots, and the
``take_freed_swa_host_slots`` outbox; what ``evict_swa`` frees (``swa_indices`` in LRU order,
tombstoned tokens, whole leaves through the Full path) and every node the tombstone cascade
deletes (a childless node with SWA on neither tier).

Configurations: SGLang's SWA matrix ``(page_size, window)`` (``test_swa_unittest.py`` and the SWA
configs of ``test_unified_radix_cache_unittest.py``), a non-page-aligned multi-page window, and
FULL + SWA + MAMBA at two of them. Keys are made of page-sized blocks, at most six, so at
``page_size=1`` a 128-token window is longer than any key: only the run from the root validates
there.

The ``ci`` profile runs 11 machines x 100 examples x up to 30 steps: about 59,000 steps in all
(measured), in about 25 s.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import rule

from tests.tree.test_differential import MAX_BLOCKS, TreeVsModel
from tests.tree.test_differential_mamba import MambaTreeVsModel


class SwaTreeVsModel(TreeVsModel):
    """``TreeVsModel`` on an SWA tree, with the rules that only an SWA tree has."""

    window = 4

    frontier_st = st.integers(0, MAX_BLOCKS + 1)  # in pages
    unaligned_st = st.integers(0, 63)  # tokens added to the frontier, modulo page_size

    def _frontier(self, num_pages: int, extra_tokens: int) -> int:
        return num_pages * self.page_size + extra_tokens % self.page_size

    @rule(
        blocks=TreeVsModel.blocks_st,
        tail_len=TreeVsModel.tail_st,
        extra_index=TreeVsModel.extra_st,
        frontier_pages=frontier_st,
        frontier_extra=unaligned_st,
        own=st.booleans(),
        with_state=st.booleans(),
    )
    def insert_with_frontier(
        self,
        blocks: list[int],
        tail_len: int,
        extra_index: int,
        frontier_pages: int,
        frontier_extra: int,
        own: bool,
        with_state: bool,
    ) -> None:
        """A request caches its tokens, having freed the SWA KV below its frontier. ``own``: it
        matched first and gives back the tree's slots for its device prefix (no remap for
        those), else all its slots are its own (tombstones above the frontier take its SWA)."""
        extra_key = self.extra_keys[extra_index % len(self.extra_keys)]
        own_slots = None
        if own:
            result, extra_key, _, _, _ = self._match(blocks, tail_len, extra_index)
            own_slots = result.device_indices.tolist()
        self._insert_key(
            self._key(blocks, tail_len),
            extra_key,
            with_state=with_state and self.mamba,
            swa_evicted_seqlen=self._frontier(frontier_pages, frontier_extra),
            own=own_slots,
        )

    @rule(
        blocks=TreeVsModel.blocks_st,
        tail_len=TreeVsModel.tail_st,
        extra_index=TreeVsModel.extra_st,
        frontier_pages=frontier_st,
        frontier_extra=unaligned_st,
    )
    def checkpoint_at_swa_branching(
        self,
        blocks: list[int],
        tail_len: int,
        extra_index: int,
        frontier_pages: int,
        frontier_extra: int,
    ) -> None:
        """A request whose match stopped short of the Full walk (a tombstoned window) recomputes
        from there and caches up to ``swa_branching_seqlen`` (SGLang's branch insert): with the
        tree's slots for its device prefix and its own above, so the tombstones above its
        frontier take its SWA KV (the remap pairs) and the rematch reaches further."""
        result, extra_key, _, _, _ = self._match(blocks, tail_len, extra_index)
        if result.swa_branching_seqlen <= 0:
            return
        key = self._key(blocks, tail_len)[: result.swa_branching_seqlen]
        self._insert_key(
            key,
            extra_key,
            with_state=self.mamba,
            swa_evicted_seqlen=self._frontier(frontier_pages, frontier_extra),
            own=result.device_indices.tolist(),
        )
        self._match(blocks, tail_len, extra_index)

    @rule(num_pages=st.integers(0, 8), extra_tokens=st.integers(0, 63), write_back=st.booleans())
    def evict_swa(self, num_pages: int, extra_tokens: int, write_back: bool) -> None:
        num_tokens = num_pages * self.page_size + extra_tokens % self.page_size
        result = self.tree.evict_swa(num_tokens, write_back=write_back)
        out = self.model.evict_swa(num_tokens, write_back=write_back)
        self._check_evicted(result, out)
        if out.needs_backup is None:
            assert result.needs_backup == -1
            return
        self._write_back(result, out)  # back the victim up (SWA KV included); it goes next time

    @rule(
        blocks=TreeVsModel.blocks_st,
        tail_len=TreeVsModel.tail_st,
        extra_index=TreeVsModel.extra_st,
        num_pages=st.integers(1, 64),
    )
    def evict_swa_under_a_running_request(
        self, blocks: list[int], tail_len: int, extra_index: int, num_pages: int
    ) -> None:
        """A request caches its tokens and holds its path (the Full KV of all of it, the SWA of
        its last window), then SWA memory runs short: the nodes above its window become SWA
        tombstones (an internal victim; otherwise rare, as the SWA LRU's back is usually a
        leaf)."""
        self._insert(blocks, tail_len, extra_index, with_state=self.mamba)
        self.match_and_lock(blocks, tail_len, extra_index, deep=True)
        self.evict_swa(num_pages, 0, write_back=False)


class SwaMambaTreeVsModel(SwaTreeVsModel, MambaTreeVsModel):
    """FULL + SWA + MAMBA: both machines' rules on one tree (a match ends where both components
    validate; ``evict_swa`` of an internal node frees its state too)."""


def make_swa_machine(page_size: int, window: int, mamba: bool) -> type[SwaTreeVsModel]:
    base = SwaMambaTreeVsModel if mamba else SwaTreeVsModel
    name = f"{base.__name__}Page{page_size}Window{window}"
    return type(name, (base,), {"page_size": page_size, "window": window})


@pytest.mark.parametrize(
    ("page_size", "window", "mamba"),
    [
        # SGLang's SWA matrix (page_size, sliding_window_size).
        (1, 4, False),
        (4, 4, False),
        (4, 2, False),
        (16, 16, False),
        (64, 64, False),
        (128, 128, False),
        (128, 4, False),
        (1, 128, False),
        # A window of several pages, not page-aligned (the one-window tail is 3 pages).
        (2, 5, False),
        # SGLang's FULL + SWA + MAMBA configs.
        (1, 128, True),
        (64, 64, True),
        # A short window over Mamba states: finds the Mamba release's SWA-LRU order bug.
        (1, 4, True),
    ],
    ids=lambda v: str(v) if not isinstance(v, bool) else ("mamba" if v else "swa"),
)
def test_swa_tree_matches_reference(page_size: int, window: int, mamba: bool) -> None:
    make_swa_machine(page_size, window, mamba).TestCase().runTest()
