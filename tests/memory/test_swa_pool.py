"""Tests of :class:`hicache.memory.SWAKVPool`: the SWA allocator, the full -> SWA mapping, and
host round trips of the SWA window through :class:`HostKVPool`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hicache import transfer
from hicache.errors import IndexOutOfRangeError, InvalidArgumentError, PoolExhaustedError
from hicache.memory import (
    DeviceKVPool,
    HostKVPool,
    HostLayout,
    PageAllocator,
    PoolTransfer,
    SWAKVPool,
)
from tests.memory.kv_helpers import bits, page_indices, random_bits

FULL_SLOTS, SWA_SLOTS, HOST_SLOTS = 64, 32, 48
NUM_LAYERS, NUM_HEADS, HEAD_DIM = 2, 2, 8
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LAYOUTS = list(HostLayout)
SENTINEL = -7.0


def _pool(
    page_size: int = 1,
    num_slots: int = SWA_SLOTS,
    kind: str = "mha",
    dtype: torch.dtype = torch.float16,
    device: str = "cpu",
) -> SWAKVPool:
    heads = NUM_HEADS if kind == "mha" else 1
    return SWAKVPool(
        num_slots,
        NUM_LAYERS,
        heads,
        HEAD_DIM,
        dtype,
        device,
        kind,
        num_full_slots=FULL_SLOTS,
        page_size=page_size,
    )


def _pages(*pages: int, page_size: int) -> torch.Tensor:
    """Slot indices of whole ``pages``, page by page."""
    return torch.tensor(
        [p * page_size + i for p in pages for i in range(page_size)], dtype=torch.int64
    )


def _state(pool: SWAKVPool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Mapping, free SWA slots and free-queue order, to check that a failed call changed nothing."""
    return (
        pool.full_to_swa.clone(),
        pool.allocator.free_slot_indices(),
        pool.allocator._free_pages.tolist(),
    )


def _assert_state(pool: SWAKVPool, before: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
    after = _state(pool)
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[1], before[1])
    assert after[2] == before[2]


def _check_invariants(pool: SWAKVPool) -> None:
    """Mapped SWA slots are distinct, allocated, and exactly the allocated ones."""
    mapped = pool.full_to_swa[pool.full_to_swa != -1]
    assert mapped.unique().numel() == mapped.numel()
    assert pool.num_mapped() == mapped.numel()
    assert pool.num_mapped() + pool.available_size() == pool.num_slots
    if mapped.numel():
        assert not bool(pool.allocator.is_free(mapped).any())
        # Page to page, offset to offset.
        full = torch.nonzero(pool.full_to_swa != -1).flatten()
        assert torch.equal(full % pool.page_size, mapped % pool.page_size)


# --- construction --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_construction(kind: str) -> None:
    pool = _pool(4, kind=kind, dtype=torch.bfloat16)
    assert isinstance(pool, DeviceKVPool)
    heads = NUM_HEADS if kind == "mha" else 1
    bufs = [pool.k_buffer, pool.v_buffer] if kind == "mha" else [pool.kv_buffer]
    for buf in bufs:
        assert buf.shape == (NUM_LAYERS, SWA_SLOTS, heads, HEAD_DIM)
        assert buf.dtype == torch.bfloat16 and buf.device.type == "cpu"
    assert (pool.num_slots, pool.num_full_slots, pool.page_size) == (SWA_SLOTS, FULL_SLOTS, 4)
    assert pool.full_to_swa.shape == (FULL_SLOTS,)
    assert pool.full_to_swa.dtype == torch.int64 and pool.full_to_swa.device.type == "cpu"
    assert bool((pool.full_to_swa == -1).all())
    assert isinstance(pool.allocator, PageAllocator)
    assert (pool.allocator.num_slots, pool.allocator.page_size) == (SWA_SLOTS, 4)
    assert pool.available_size() == SWA_SLOTS and pool.num_mapped() == 0


@pytest.mark.parametrize(
    ("num_slots", "num_full_slots", "page_size", "match"),
    [
        (80, 64, 1, "num_slots: expected at most num_full_slots"),
        (30, 64, 4, "num_slots"),
        (0, 64, 1, "num_slots"),
        (32, 62, 4, "num_full_slots"),
        (32, 0, 1, "num_full_slots"),
        (32, 64.0, 1, "num_full_slots"),
        (32, 64, 0, "page_size"),
    ],
)
def test_construction_rejects(
    num_slots: int, num_full_slots: int, page_size: int, match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        SWAKVPool(
            num_slots,
            NUM_LAYERS,
            NUM_HEADS,
            HEAD_DIM,
            device="cpu",
            num_full_slots=num_full_slots,
            page_size=page_size,
        )


# --- alloc_for / translate -----------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 4])
def test_alloc_for_records_the_mapping(page_size: int) -> None:
    pool = _pool(page_size)
    full = _pages(9, 2, 15, page_size=page_size)  # unsorted pages, with the last full page
    swa = pool.alloc_for(full)
    assert swa.dtype == torch.int64 and swa.device.type == "cpu" and swa.numel() == full.numel()
    assert torch.equal(pool.full_to_swa[full], swa)
    assert torch.equal(pool.translate(full), swa)
    assert torch.equal(pool.translate(full[[2, 0]]), swa[[2, 0]])
    assert bool(pool.is_mapped(full).all())
    others = torch.nonzero(pool.full_to_swa == -1).flatten()
    assert not bool(pool.is_mapped(others).any())
    assert pool.available_size() == SWA_SLOTS - full.numel()
    _check_invariants(pool)
    # Whole SWA pages, page to page at equal offsets.
    assert torch.equal(swa % page_size, full % page_size)


def test_translate_returns_a_copy() -> None:
    pool = _pool()
    full = torch.tensor([5, 3])
    swa = pool.translate(torch.tensor([], dtype=torch.int64))
    assert swa.numel() == 0
    swa = pool.alloc_for(full)
    out = pool.translate(full)
    out.fill_(0)
    assert torch.equal(pool.translate(full), swa)


def test_translate_of_unmapped_raises_unless_skipped() -> None:
    pool = _pool()
    full = torch.tensor([7, 1, 20])
    swa = pool.alloc_for(full[[0, 2]])
    with pytest.raises(InvalidArgumentError, match="full slot 1 has no SWA slot"):
        pool.translate(full)
    assert torch.equal(pool.translate(full, skip_unmapped=True), swa)
    assert pool.translate(torch.tensor([1, 2]), skip_unmapped=True).numel() == 0


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("already_mapped", InvalidArgumentError, "already mapped"),
        ("repeated", InvalidArgumentError, "repeated"),
        ("partial_page", InvalidArgumentError, "multiple of page_size"),
        ("misaligned_page", InvalidArgumentError, "not one whole page"),
        ("unordered_page", InvalidArgumentError, "not one whole page"),
        ("out_of_range", IndexOutOfRangeError, "out of range"),
        ("dtype", InvalidArgumentError, "int64"),
        ("exhausted", PoolExhaustedError, "pages"),
    ],
)
def test_alloc_for_rejects_and_changes_nothing(case: str, error: type, match: str) -> None:
    pool = _pool(4)
    pool.alloc_for(_pages(3, page_size=4))
    full = {
        "already_mapped": _pages(5, 3, page_size=4),
        "repeated": _pages(5, 5, page_size=4),
        "partial_page": torch.arange(20, 26),
        "misaligned_page": torch.arange(21, 25),
        "unordered_page": torch.tensor([24, 26, 25, 27]),
        "out_of_range": _pages(16, page_size=4),
        "dtype": _pages(5, page_size=4).int(),
        "exhausted": _pages(*range(4, 12), page_size=4),  # 8 pages, 7 free
    }[case]
    before = _state(pool)
    with pytest.raises(error, match=match):
        pool.alloc_for(full)
    _assert_state(pool, before)


# --- free_full -----------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 4])
def test_free_full_clears_the_mapping_and_frees(page_size: int) -> None:
    pool = _pool(page_size)
    a = pool.alloc_for(_pages(1, 6, page_size=page_size))
    b_full = _pages(4, page_size=page_size)
    b = pool.alloc_for(b_full)
    assert pool.free_full(_pages(6, 1, page_size=page_size)) == a.numel()
    assert not bool(pool.is_mapped(_pages(1, 6, page_size=page_size)).any())
    assert bool(pool.allocator.is_free(a).all())
    assert torch.equal(pool.translate(b_full), b)  # untouched
    _check_invariants(pool)


@pytest.mark.parametrize("page_size", [1, 4])
def test_free_full_skips_unmapped_slots(page_size: int) -> None:
    pool = _pool(page_size)
    mapped = _pages(2, page_size=page_size)
    swa = pool.alloc_for(mapped)
    mixed = torch.cat((_pages(8, page_size=page_size), mapped, _pages(0, page_size=page_size)))
    assert pool.free_full(mixed) == page_size
    assert bool(pool.allocator.is_free(swa).all())
    assert pool.free_full(mixed) == 0  # a second free finds nothing to free
    assert pool.available_size() == SWA_SLOTS
    assert pool.free_full(torch.empty(0, dtype=torch.int64)) == 0


def test_free_full_rejects_and_changes_nothing() -> None:
    pool = _pool(4)
    pool.alloc_for(_pages(1, 2, page_size=4))
    before = _state(pool)
    with pytest.raises(InvalidArgumentError, match="part of SWA page"):
        pool.free_full(torch.tensor([4, 5, 9]))
    with pytest.raises(InvalidArgumentError, match="repeated"):
        pool.free_full(torch.tensor([4, 5, 6, 7, 4]))
    with pytest.raises(IndexOutOfRangeError):
        pool.free_full(torch.tensor([4, FULL_SLOTS]))
    with pytest.raises(InvalidArgumentError, match="CPU|int64"):
        pool.free_full(torch.tensor([4.0]))
    _assert_state(pool, before)


@pytest.mark.parametrize("page_size", [1, 4])
def test_realloc_after_free_gets_a_clean_mapping(page_size: int) -> None:
    pool = _pool(page_size)
    full = _pages(3, 0, page_size=page_size)
    other_full = _pages(7, page_size=page_size)
    other = pool.alloc_for(other_full)
    first = pool.alloc_for(full)
    pool.free_full(full)
    again = pool.alloc_for(full)
    assert torch.equal(pool.translate(full), again)
    assert torch.equal(pool.translate(other_full), other)
    assert not bool(torch.isin(again, other).any())
    # The freed slots went to the back of the FIFO: the new mapping is not the stale one.
    assert not bool(torch.isin(again, first).any())
    _check_invariants(pool)


@pytest.mark.parametrize("page_size", [1, 4])
def test_pr_27586_stale_mapping_never_frees_a_reused_swa_slot(page_size: int) -> None:
    """Free a full slot's SWA, reuse that SWA slot for another full slot, free the first again.

    SGLang PR #27586: the second free went through a stale ``full_to_swa`` entry and released the
    SWA slot now owned by the other full slot. Here the first free cleared the mapping, so the
    second one frees nothing and the other full slot keeps its SWA slot.
    """
    pool = _pool(page_size, num_slots=page_size)  # one SWA page: reuse is forced
    first_full = _pages(2, page_size=page_size)
    second_full = _pages(9, page_size=page_size)
    swa = pool.alloc_for(first_full)
    pool.free_full(first_full)
    reused = pool.alloc_for(second_full)
    assert torch.equal(reused, swa)  # the same SWA slot, now owned by second_full

    assert pool.free_full(first_full) == 0  # the first full slot's mapping is gone
    assert torch.equal(pool.translate(second_full), reused)
    assert not bool(pool.allocator.is_free(reused).any())
    assert pool.available_size() == 0
    with pytest.raises(PoolExhaustedError):  # nobody else can be handed the slot
        pool.alloc_for(_pages(5, page_size=page_size))
    _check_invariants(pool)
    assert pool.free_full(second_full) == page_size
    assert pool.available_size() == page_size


def test_reset() -> None:
    pool = _pool(4)
    pool.alloc_for(_pages(1, 5, page_size=4))
    pool.reset()
    assert pool.num_mapped() == 0 and pool.available_size() == SWA_SLOTS
    assert bool((pool.full_to_swa == -1).all())


@settings(max_examples=60, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4]),
    ops=st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, FULL_SLOTS // 4 - 1), max_size=6)),
        max_size=30,
    ),
)
def test_random_operations_keep_the_mapping_consistent(
    page_size: int, ops: list[tuple[bool, list[int]]]
) -> None:
    """alloc_for / free_full in any order against a dict model; failures change nothing."""
    pool = _pool(page_size, num_slots=16)
    model: dict[int, int] = {}  # full slot -> SWA slot
    for is_alloc, pages in ops:
        full = _pages(*pages, page_size=page_size)
        before = _state(pool)
        if is_alloc:
            try:
                swa = pool.alloc_for(full)
            except (InvalidArgumentError, PoolExhaustedError):
                assert (
                    len(set(pages)) < len(pages)
                    or any(f in model for f in full.tolist())
                    or full.numel() > pool.num_slots - len(model)
                )
                _assert_state(pool, before)
            else:
                model.update(zip(full.tolist(), swa.tolist(), strict=True))
        else:
            try:
                freed = pool.free_full(full)
            except InvalidArgumentError:
                assert len(set(pages)) < len(pages)
                _assert_state(pool, before)
            else:
                assert freed == sum(f in model for f in full.tolist())
                for f in full.tolist():
                    model.pop(f, None)
        _check_invariants(pool)
        mapped = torch.nonzero(pool.full_to_swa != -1).flatten().tolist()
        assert sorted(model) == mapped
        assert all(int(pool.full_to_swa[f]) == s for f, s in model.items())


# --- host round trips of the SWA window ----------------------------------------------------------


def _random_kv(pool: SWAKVPool, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (pool.num_layers, n, pool.num_heads, pool.head_dim)
    count = 2 if pool.kind == "mha" else 1
    return [random_bits(shape, pool.dtype, gen).to(pool.device) for _ in range(count)]


def _poison(pool: SWAKVPool) -> None:
    for buf in (pool.k_buffer, pool.v_buffer) if pool.kind == "mha" else (pool.kv_buffer,):
        buf.fill_(SENTINEL)


def _assert_bit_equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(bits(g), bits(w))


def _check_window_round_trip(swa: SWAKVPool, host: HostKVPool, layer_wise: bool) -> None:
    """Back up the SWA window of some full slots, drop it (tombstone), load it back elsewhere."""
    page_size = swa.page_size
    num_pages = 3 if page_size > 1 else 10
    window = page_indices(FULL_SLOTS, page_size, num_pages, seed=40)  # unsorted, last full page
    host_idx = page_indices(HOST_SLOTS, page_size, num_pages, seed=41)  # unsorted, last host page
    _poison(swa)
    host.kv_buffer.fill_(SENTINEL)
    swa_idx = swa.alloc_for(window)
    swa.write(swa_idx.to(swa.device), *_random_kv(swa, swa_idx.numel(), seed=42))
    before = tuple(t.cpu().clone() for t in swa.read(swa_idx))

    backup = PoolTransfer("swa", host_idx, swa.translate(window))
    transfer.backup_all_layers(swa, host, backup.device_indices, backup.host_indices)
    if swa.device.type == "cuda":
        torch.cuda.synchronize()
    _assert_bit_equal(host.read(host_idx), before)

    # Drop the device window, let another full page take SWA slots first, reload the window.
    assert swa.free_full(window) == window.numel()
    _poison(swa)
    free_pages = [p for p in range(FULL_SLOTS // page_size) if p * page_size not in window]
    other = swa.alloc_for(_pages(free_pages[0], page_size=page_size))
    new_idx = swa.alloc_for(window)
    assert not bool(torch.isin(new_idx, other).any())
    load = PoolTransfer("swa", host_idx, swa.translate(window))
    engine = transfer.KVTransfer(swa, host)
    indices = engine.prepare(load.device_indices, load.host_indices)
    if layer_wise:
        for layer in range(swa.num_layers):
            engine.load_layer(indices, layer)
    else:
        engine.load_all_layers(indices)
    if swa.device.type == "cuda":
        torch.cuda.synchronize()
    _assert_bit_equal(tuple(t.cpu() for t in swa.read(new_idx)), before)
    mask = torch.ones(swa.num_slots, dtype=torch.bool)
    mask[new_idx] = False
    for got in swa.read(torch.nonzero(mask).flatten().to(swa.device)):
        assert bool((got == SENTINEL).all())


@pytest.mark.parametrize("layer_wise", [False, True])
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_swa_window_round_trip_is_bit_identical(
    layout: HostLayout, kind: str, dtype: torch.dtype, page_size: int, layer_wise: bool
) -> None:
    swa = _pool(page_size, kind=kind, dtype=dtype)
    host = HostKVPool(swa, HOST_SLOTS, page_size, layout, pin_memory=False)
    assert (host.num_layers, host.num_heads, host.head_dim, host.dtype, host.kind) == (
        swa.num_layers,
        swa.num_heads,
        swa.head_dim,
        dtype,
        kind,
    )
    _check_window_round_trip(swa, host, layer_wise)


def test_host_pool_sizing_follows_the_swa_pool() -> None:
    swa = _pool(4, dtype=torch.bfloat16)
    host = HostKVPool.from_ratio(swa, 2.0, 4, "page_first", pin_memory=False)
    assert host.num_slots == 2 * SWA_SLOTS  # the SWA pool's size, not the full pool's


@pytest.mark.cuda
class TestCuda:
    """The SWA window round trip with the pool on CUDA and a pinned host pool (non_blocking)."""

    @pytest.mark.parametrize("layer_wise", [False, True])
    @pytest.mark.parametrize("page_size", [1, 4])
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_swa_window_round_trip(
        self, layout: HostLayout, dtype: torch.dtype, page_size: int, layer_wise: bool
    ) -> None:
        swa = _pool(page_size, dtype=dtype, device="cuda")
        host = HostKVPool(swa, HOST_SLOTS, page_size, layout, pin_memory=True)
        assert host.is_pinned and swa.full_to_swa.device.type == "cpu"
        _check_window_round_trip(swa, host, layer_wise)

    def test_side_stream(self) -> None:
        """SWA backup on a side stream from a PoolTransfer, waited on with an event."""
        swa = _pool(4, dtype=torch.bfloat16, device="cuda")
        host = HostKVPool(swa, HOST_SLOTS, 4, "page_first", pin_memory=True)
        window = page_indices(FULL_SLOTS, 4, 3, seed=43)
        swa_idx = swa.alloc_for(window)
        swa.write(swa_idx.cuda(), *_random_kv(swa, swa_idx.numel(), seed=44))
        host_idx = page_indices(HOST_SLOTS, 4, 3, seed=45)
        backup = PoolTransfer("swa", host_idx, swa.translate(window))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            transfer.backup_all_layers(swa, host, backup.device_indices, backup.host_indices)
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
        _assert_bit_equal(host.read(host_idx), tuple(t.cpu() for t in swa.read(swa_idx)))
