"""Contract of every storage backend (file, valkey): round trips, leading counts, verification."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError
from hicache.storage import StorageIdentity
from hicache.storage.base import HEADER_SIZE
from tests.storage.conftest import (
    BACKENDS,
    corrupt_value,
    make_keys,
    make_kv_pool,
    make_mamba_pool,
    page_slots,
    same_page,
)

KV_CASES = [
    ("layer_first", "mha", torch.bfloat16),
    ("page_first", "mha", torch.bfloat16),
    ("page_first_direct", "mha", torch.bfloat16),
    ("layer_first", "mla", torch.float32),
    ("page_first", "mla", torch.float16),
    ("page_first_direct", "mha", torch.float8_e4m3fn),
]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(("layout", "kind", "dtype"), KV_CASES)
def test_kv_round_trip_is_bit_identical(make_backend, backend_name, layout, kind, dtype):
    src = make_kv_pool(layout, kind=kind, dtype=dtype, seed=1)
    dst = make_kv_pool(layout, kind=kind, dtype=dtype, seed=2)
    before = dst.kv_buffer.clone()
    backend = make_backend(backend_name, StorageIdentity.from_host_pool(src, "m"))
    keys = make_keys(3)
    assert backend.set(keys, src, page_slots(src, [5, 0, 3])) == 3
    assert backend.exists(keys) == 3
    assert backend.get(keys, dst, page_slots(dst, [1, 7, 2])) == 3
    for a, b in ((5, 1), (0, 7), (3, 2)):
        assert same_page(src, a, dst, b)
    # Nothing else in the destination changed.
    for page in (0, 3, 4, 5, 6):
        assert same_page(dst, page, _pool_with(dst, before), page)
    stats = backend.stats_snapshot()
    page_nbytes = src.size_bytes // src.num_pages
    assert (stats.set_pages, stats.set_bytes) == (3, 3 * page_nbytes)
    assert (stats.get_pages, stats.get_bytes, stats.corrupt_pages) == (3, 3 * page_nbytes, 0)


def _pool_with(pool, kv_buffer):
    """A copy of ``pool`` whose buffer is ``kv_buffer`` (for comparing against a snapshot)."""
    copy = make_kv_pool(
        pool.layout.value,
        pool.page_size,
        pool.num_pages,
        pool.dtype,
        pool.kind,
        pool.num_layers,
        pool.num_heads,
        pool.head_dim,
        seed=None,
    )
    copy.kv_buffer.copy_(kv_buffer)
    return copy


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_mamba_round_trip_is_bit_identical(make_backend, backend_name, layout):
    src = make_mamba_pool(layout, seed=3)
    dst = make_mamba_pool(layout, seed=None)
    identity = StorageIdentity.from_host_pool(src, "m")
    assert (identity.kind, identity.page_size) == ("mamba", 1)
    backend = make_backend(backend_name, identity)
    keys = make_keys(4)
    assert backend.set(keys, src, torch.tensor([6, 1, 2, 7])) == 4
    assert backend.get(keys, dst, torch.tensor([0, 5, 3, 4])) == 4
    for a, b in ((6, 0), (1, 5), (2, 3), (7, 4)):
        assert same_page(src, a, dst, b)
    for untouched in (1, 2, 6, 7):
        assert all(
            int(t.view(torch.uint8).count_nonzero()) == 0
            for t in dst.read(torch.tensor([untouched]))
        )


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_exists_and_get_count_leading_pages(make_backend, backend_name):
    src = make_kv_pool(seed=1)
    dst = make_kv_pool(seed=None)
    backend = make_backend(backend_name, StorageIdentity.from_host_pool(src, "m"))
    keys = make_keys(6)
    stored = [0, 1, 2, 4]
    assert backend.set([keys[i] for i in stored], src, page_slots(src, stored)) == 4
    assert backend.exists(keys) == 3
    assert backend.exists(keys[3:]) == 0
    assert backend.exists(keys[4:5]) == 1
    assert backend.exists([]) == 0
    assert backend.get(keys[:5], dst, page_slots(dst, [0, 1, 2, 3, 4])) == 3
    for page in (3, 4):  # the miss and everything after it stay untouched
        assert int(dst.read(page_slots(dst, [page]))[0].view(torch.uint8).count_nonzero()) == 0
    assert backend.get([], dst, torch.empty(0, dtype=torch.int64)) == 0
    stats = backend.stats_snapshot()
    assert (stats.exists_calls, stats.exists_pages) == (4, 4)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_set_deduplicates_stored_pages(make_backend, backend_name):
    src = make_kv_pool(seed=1)
    other = make_kv_pool(seed=9)
    dst = make_kv_pool(seed=None)
    backend = make_backend(backend_name, StorageIdentity.from_host_pool(src, "m"))
    keys = make_keys(4)
    assert backend.set(keys[:2], src, page_slots(src, [0, 1])) == 2
    # Already-stored keys count as stored and are not rewritten with other bytes.
    assert backend.set(keys, other, page_slots(other, [0, 1, 2, 3])) == 4
    stats = backend.stats_snapshot()
    assert (stats.set_pages, stats.dedup_pages) == (4, 2)
    assert backend.get(keys, dst, page_slots(dst, [0, 1, 2, 3])) == 4
    assert same_page(src, 0, dst, 0) and same_page(src, 1, dst, 1)
    assert same_page(other, 2, dst, 2) and same_page(other, 3, dst, 3)


IDENTITY_CHANGES = [
    ("model_name", {"model_name": "other-model"}, {}),
    ("tp_rank", {"tp_rank": 1, "tp_size": 2}, {}),
    ("dtype", {}, {"dtype": torch.float16}),
    ("page_size", {}, {"page_size": 2, "num_pages": 16}),
    ("layout", {}, {"layout": "page_first_direct"}),
    ("shape", {}, {"num_heads": 1, "head_dim": 16}),
]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(("what", "fields", "pool_args"), IDENTITY_CHANGES)
def test_identity_mismatch_misses(make_backend, backend_name, what, fields, pool_args):
    src = make_kv_pool(seed=1)
    writer = make_backend(backend_name, StorageIdentity.from_host_pool(src, "m"))
    keys = make_keys(2)
    assert writer.set(keys, src, page_slots(src, [0, 1])) == 2
    dst = make_kv_pool(**{"seed": None, **pool_args})
    identity = dataclasses.replace(StorageIdentity.from_host_pool(dst, "m"), **fields)
    assert identity.prefix() != writer.identity.prefix(), what
    reader = make_backend(backend_name, identity)
    assert reader.exists(keys) == 0
    assert reader.get(keys, dst, page_slots(dst, [0, 1])) == 0
    assert int(dst.kv_buffer.view(torch.uint8).count_nonzero()) == 0


def _copy_value(backend, src_key: str, dst_key: str, dst_backend=None) -> None:
    """Stores the raw value of ``src_key`` under ``dst_key`` (of ``dst_backend``), unchecked."""
    dst_backend = dst_backend or backend
    if backend.name == "file":
        data = (backend.directory / f"{src_key}.bin").read_bytes()
        (dst_backend.directory / f"{dst_key}.bin").write_bytes(data)
    else:
        data = backend.client.get(backend.storage_key(src_key))
        backend.client.set(dst_backend.storage_key(dst_key), data)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    "damage", ["payload", "checksum", "magic", "identity", "length", "wrong_key", "other_identity"]
)
def test_corrupt_value_is_a_counted_miss(make_backend, backend_name, damage):
    src = make_kv_pool(seed=1)
    dst = make_kv_pool(seed=5)
    before = dst.kv_buffer.clone()
    backend = make_backend(backend_name, StorageIdentity.from_host_pool(src, "m"))
    keys = make_keys(3)
    assert backend.set(keys, src, page_slots(src, [0, 1, 2])) == 3
    offsets = {"payload": HEADER_SIZE + 17, "checksum": 27, "magic": 0, "identity": 9, "length": 16}
    if damage in offsets:
        corrupt_value(backend, keys[1], offsets[damage])
    elif damage == "wrong_key":  # a whole, valid value stored under another page's key
        _copy_value(backend, keys[2], keys[1])
    else:  # a valid value of another identity (another model) under this identity's key
        other = make_backend(backend_name, StorageIdentity.from_host_pool(src, "other"))
        assert other.set(keys[1:2], src, page_slots(src, [1])) == 1
        _copy_value(other, keys[1], keys[1], dst_backend=backend)
    assert backend.get(keys, dst, page_slots(dst, [3, 4, 5])) == 1
    assert same_page(src, 0, dst, 3)
    for page in (4, 5):  # the corrupt page and the one after it are untouched
        assert same_page(dst, page, _pool_with(dst, before), page)
    assert backend.stats_snapshot().corrupt_pages == 1
    # The corrupt value was deleted, so the next backup stores the page again.
    assert backend.exists(keys) == 1
    assert backend.set(keys, src, page_slots(src, [0, 1, 2])) == 3
    assert backend.get(keys, dst, page_slots(dst, [3, 4, 5])) == 3
    assert same_page(src, 1, dst, 4)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_pool_that_does_not_match_identity_is_rejected(make_backend, backend_name):
    src = make_kv_pool("page_first", seed=1)
    backend = make_backend(backend_name, StorageIdentity.from_host_pool(src, "m"))
    keys = make_keys(1)
    for pool, field in (
        (make_kv_pool("layer_first"), "layout"),
        (make_kv_pool(dtype=torch.float16), "dtype"),
        (make_kv_pool(page_size=2, num_pages=16), "page_size"),
        (make_kv_pool(head_dim=16, num_heads=1), "page_shape"),
        (make_mamba_pool(), "does not hold 'kv' pages"),
    ):
        with pytest.raises(InvalidArgumentError, match=field):
            backend.set(keys, pool, page_slots(pool, [0]))
        with pytest.raises(InvalidArgumentError, match=field):
            backend.get(keys, pool, page_slots(pool, [0]))
    with pytest.raises(InvalidArgumentError, match="expected a HostKVPool or MambaHostPool"):
        backend.get(keys, src.kv_buffer, page_slots(src, [0]))


BAD_INDICES = [
    ("dtype", lambda: torch.arange(4, dtype=torch.int32), "torch.int64"),
    ("dim", lambda: torch.arange(4).view(2, 2), "1-D"),
    ("list", lambda: [0, 1, 2, 3], "torch.Tensor"),
    ("short", lambda: torch.arange(3), "len\\(keys\\) \\* page_size = 1 \\* 4 = 4 slots, got 3"),
    ("long", lambda: torch.arange(8), "got 8"),
    ("unaligned", lambda: torch.arange(1, 5), "page 0 is not an aligned run"),
    ("not_a_run", lambda: torch.tensor([4, 5, 7, 6]), "page 0 is not an aligned run"),
]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_bad_arguments_are_rejected_and_name_the_problem(make_backend, backend_name):
    pool = make_kv_pool(seed=1)
    backend = make_backend(backend_name, StorageIdentity.from_host_pool(pool, "m"))
    keys = make_keys(1)
    for op in (backend.get, backend.set):
        for _, make_indices, message in BAD_INDICES:
            with pytest.raises(InvalidArgumentError, match=message):
                op(keys, pool, make_indices())
        with pytest.raises(IndexOutOfRangeError, match="out of range"):
            op(keys, pool, torch.arange(32, 36))
        two_pages = page_slots(pool, [0, 1])
        with pytest.raises(InvalidArgumentError, match="page 1 is not an aligned run"):
            op(make_keys(2), pool, torch.cat((two_pages[:4], two_pages[5:], two_pages[4:5])))
        for bad_keys, message in (
            ("abc", "keys: expected a sequence of str"),
            ([b"ab"], "keys\\[0\\]"),
            (["../etc/passwd"], "keys\\[0\\]"),
            (["ok", ".hidden"], "keys\\[1\\]"),
            ([""], "keys\\[0\\]"),
        ):
            with pytest.raises(InvalidArgumentError, match=message):
                op(bad_keys, pool, page_slots(pool, list(range(len(bad_keys)))))
    with pytest.raises(InvalidArgumentError, match="keys\\[0\\]"):
        backend.exists(["a/b"])
    # Rejected calls had no effect.
    assert backend.exists(keys) == 0
    stats = backend.stats_snapshot()
    assert (stats.get_calls, stats.set_calls, stats.failed_ops) == (0, 0, 0)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_one_backend_shared_by_threads(make_backend, backend_name):
    src = make_kv_pool(num_pages=32, seed=1)
    dst = make_kv_pool(num_pages=32, seed=None)
    backend = make_backend(backend_name, StorageIdentity.from_host_pool(src, "m"))
    keys = make_keys(32)
    errors = []

    def worker(first: int) -> None:
        try:
            for rep in range(5):
                pages = list(range(first, first + 8))
                mine = [keys[p] for p in pages]
                assert backend.set(mine, src, page_slots(src, pages)) == 8
                assert backend.exists(mine) == 8
                assert backend.get(mine, dst, page_slots(dst, pages)) == 8, rep
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(8 * t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert all(same_page(src, p, dst, p) for p in range(32))
    stats = backend.stats_snapshot()
    assert (stats.set_calls, stats.set_pages, stats.dedup_pages) == (20, 32, 128)
    assert (stats.get_pages, stats.exists_pages, stats.corrupt_pages) == (160, 160, 0)
