"""Tests of :class:`hicache.memory.PageAllocator`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError, PoolExhaustedError
from hicache.memory import PageAllocator


def _slots(*pages: int, page_size: int) -> torch.Tensor:
    """Slot indices of whole ``pages``, page by page, as ``alloc`` returns them."""
    return torch.tensor(
        [p * page_size + i for p in pages for i in range(page_size)], dtype=torch.int64
    )


def _snapshot(alloc: PageAllocator) -> tuple[int, list[int], list[int]]:
    """Free size, free slots and free-queue order, for checks that a failed call changed nothing."""
    # The queue order is private, but a failed call must not have appended to it either.
    return (
        alloc.available_size(),
        alloc.free_slot_indices().tolist(),
        alloc._free_pages.tolist(),
    )


# --- construction -------------------------------------------------------------------------------


def test_init_sizes() -> None:
    alloc = PageAllocator(num_slots=32, page_size=4)
    assert alloc.num_slots == 32
    assert alloc.page_size == 4
    assert alloc.num_pages == 8
    assert alloc.num_free_pages == 8
    assert alloc.available_size() == 32
    assert torch.equal(alloc.free_slot_indices(), torch.arange(32, dtype=torch.int64))


@pytest.mark.parametrize(("num_slots", "page_size"), [(0, 1), (-4, 4), (10, 4), (8, 0), (8, -1)])
def test_init_rejects_bad_sizes(num_slots: int, page_size: int) -> None:
    with pytest.raises(InvalidArgumentError):
        PageAllocator(num_slots, page_size)


# --- alloc ---------------------------------------------------------------------------------------


def test_alloc_returns_whole_pages_in_queue_order() -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    first = alloc.alloc(8)
    assert first.dtype == torch.int64 and first.device.type == "cpu" and first.dim() == 1
    assert torch.equal(first, _slots(0, 1, page_size=4))
    assert torch.equal(alloc.alloc(4), _slots(2, page_size=4))
    assert alloc.available_size() == 4
    assert alloc.num_free_pages == 1


def test_alloc_zero_returns_empty() -> None:
    alloc = PageAllocator(num_slots=8, page_size=2)
    out = alloc.alloc(0)
    assert out.shape == (0,) and out.dtype == torch.int64
    assert alloc.available_size() == 8


@pytest.mark.parametrize("num_tokens", [-2, 3, 5])
def test_alloc_rejects_bad_count(num_tokens: int) -> None:
    alloc = PageAllocator(num_slots=8, page_size=2)
    with pytest.raises(InvalidArgumentError):
        alloc.alloc(num_tokens)
    assert alloc.available_size() == 8


def test_alloc_exhausted_allocates_nothing() -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    alloc.alloc(8)
    before = _snapshot(alloc)
    with pytest.raises(PoolExhaustedError, match=r"need 3 pages.*2 pages free"):
        alloc.alloc(12)
    assert _snapshot(alloc) == before
    # The pages that were free are still handed out.
    assert torch.equal(alloc.alloc(8), _slots(2, 3, page_size=4))


def test_freed_pages_go_to_back_of_queue() -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    a = alloc.alloc(8)  # pages 0, 1
    alloc.free(a[:4])  # page 0 to the back: queue = 2, 3, 0
    assert torch.equal(alloc.alloc(12), _slots(2, 3, 0, page_size=4))
    assert alloc.available_size() == 0


def test_page_size_one() -> None:
    alloc = PageAllocator(num_slots=5, page_size=1)
    a = alloc.alloc(3)
    assert a.tolist() == [0, 1, 2]
    alloc.free(torch.tensor([2, 0], dtype=torch.int64))
    assert alloc.alloc(4).tolist() == [3, 4, 2, 0]


# --- free ----------------------------------------------------------------------------------------


def test_free_then_available() -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    a = alloc.alloc(16)
    alloc.free(a[4:12])
    assert alloc.available_size() == 8
    assert alloc.free_slot_indices().tolist() == list(range(4, 12))
    alloc.free(torch.empty(0, dtype=torch.int64))
    assert alloc.available_size() == 8


def test_free_accepts_pages_in_any_order() -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    alloc.alloc(16)
    alloc.free(_slots(3, 1, page_size=4))
    assert alloc.num_free_pages == 2
    assert torch.equal(alloc.alloc(8), _slots(3, 1, page_size=4))


def test_free_accepts_non_contiguous_view() -> None:
    alloc = PageAllocator(num_slots=8, page_size=1)
    alloc.alloc(8)
    alloc.free(torch.arange(8, dtype=torch.int64)[::2])
    assert alloc.free_slot_indices().tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.tensor([0, 1, 2, 3], dtype=torch.int32), "int64"),
        (torch.tensor([[0, 1, 2, 3]], dtype=torch.int64), "1-D"),
        ([0, 1, 2, 3], "torch.Tensor"),
        (torch.tensor([0, 1], dtype=torch.int64), "multiple of page_size=4"),
    ],
)
def test_free_rejects_bad_tensor(bad: object, match: str) -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    alloc.alloc(16)
    with pytest.raises(InvalidArgumentError, match=match):
        alloc.free(bad)  # type: ignore[arg-type]
    assert alloc.available_size() == 0


@pytest.mark.parametrize(
    ("indices", "pos"),
    [
        ([4, 5, 6, 7, 1, 2, 3, 4], 4),  # second run does not start on a page boundary
        ([4, 5, 7, 6], 2),  # not ascending inside the page
        ([4, 5, 6, 7, 8, 9, 10, 12], 7),  # last entry jumps
        ([8, 9, 10, 11, 0, 0, 0, 0], 5),  # repeated slot inside a page
    ],
)
def test_free_rejects_partial_page_and_names_position(indices: list[int], pos: int) -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    alloc.alloc(16)
    with pytest.raises(InvalidArgumentError, match=rf"indices\[{pos}\]"):
        alloc.free(torch.tensor(indices, dtype=torch.int64))
    assert alloc.available_size() == 0  # the valid first page was not freed either


@pytest.mark.parametrize("bad_slot", [16, 100, -1])
def test_free_out_of_range_frees_nothing(bad_slot: int) -> None:
    alloc = PageAllocator(num_slots=16, page_size=1)
    alloc.alloc(16)
    with pytest.raises(IndexOutOfRangeError, match=str(bad_slot)):
        alloc.free(torch.tensor([3, bad_slot], dtype=torch.int64))
    assert alloc.available_size() == 0
    assert not alloc.is_free(torch.tensor([3], dtype=torch.int64)).item()


def test_double_free_of_free_page_frees_nothing() -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    a = alloc.alloc(12)  # pages 0, 1, 2; page 3 free
    alloc.free(a[:4])  # page 0 free
    before = _snapshot(alloc)
    with pytest.raises(InvalidArgumentError, match="double free of page 0"):
        alloc.free(_slots(1, 0, page_size=4))
    assert _snapshot(alloc) == before
    assert not alloc.is_free(_slots(1, page_size=4)).any()


def test_page_repeated_in_one_call_frees_nothing() -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    alloc.alloc(16)
    with pytest.raises(InvalidArgumentError, match="double free of page 2"):
        alloc.free(_slots(1, 2, 2, page_size=4))
    assert alloc.available_size() == 0


def test_never_allocated_page_is_double_free() -> None:
    alloc = PageAllocator(num_slots=8, page_size=2)
    with pytest.raises(InvalidArgumentError, match="double free of page 3"):
        alloc.free(_slots(3, page_size=2))
    assert alloc.num_free_pages == 4


# --- is_free, free_slot_indices, reset -----------------------------------------------------------


def test_is_free_per_slot() -> None:
    alloc = PageAllocator(num_slots=8, page_size=2)
    alloc.alloc(4)  # pages 0, 1
    got = alloc.is_free(torch.tensor([7, 0, 3, 4, 1], dtype=torch.int64))
    assert got.dtype == torch.bool
    assert got.tolist() == [True, False, False, True, False]


def test_is_free_validates() -> None:
    alloc = PageAllocator(num_slots=8, page_size=2)
    with pytest.raises(IndexOutOfRangeError):
        alloc.is_free(torch.tensor([8], dtype=torch.int64))
    with pytest.raises(InvalidArgumentError, match="int64"):
        alloc.is_free(torch.tensor([0], dtype=torch.int32))


def test_free_slot_indices_sorted_after_shuffled_frees() -> None:
    alloc = PageAllocator(num_slots=12, page_size=3)
    alloc.alloc(12)
    alloc.free(_slots(3, page_size=3))
    alloc.free(_slots(0, page_size=3))
    got = alloc.free_slot_indices()
    assert got.dtype == torch.int64
    assert got.tolist() == [0, 1, 2, 9, 10, 11]


def test_reset() -> None:
    alloc = PageAllocator(num_slots=16, page_size=4)
    a = alloc.alloc(12)
    alloc.free(a[:4])
    alloc.reset()
    assert alloc.available_size() == 16
    assert torch.equal(alloc.alloc(16), torch.arange(16, dtype=torch.int64))


# --- property: pages are conserved -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4]),
    num_pages=st.integers(1, 12),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 12), st.randoms()), max_size=40),
)
def test_random_alloc_free_conserves_pages(page_size: int, num_pages: int, ops: list) -> None:
    alloc = PageAllocator(num_slots=num_pages * page_size, page_size=page_size)
    held: list[int] = []  # pages the test owns, in any order
    for is_alloc, count, rnd in ops:
        if is_alloc:
            if count > alloc.num_free_pages:
                with pytest.raises(PoolExhaustedError):
                    alloc.alloc(count * page_size)
            else:
                slots = alloc.alloc(count * page_size)
                assert slots.numel() == count * page_size
                rows = slots.view(-1, page_size)
                assert torch.equal(rows - rows[:, :1], torch.arange(page_size).expand_as(rows))
                held.extend((rows[:, 0] // page_size).tolist())
        elif held:
            rnd.shuffle(held)
            k = min(count, len(held))
            to_free, held = held[:k], held[k:]
            alloc.free(_slots(*to_free, page_size=page_size))
        free_pages = set((alloc.free_slot_indices()[::page_size] // page_size).tolist())
        assert free_pages.isdisjoint(held)
        assert free_pages | set(held) == set(range(num_pages))
        assert len(held) == len(set(held))
        assert alloc.available_size() == len(free_pages) * page_size
        assert alloc.num_free_pages == len(free_pages)
