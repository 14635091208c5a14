"""The file backend: atomic writes, truncated files, persistence, the LRU size cap, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from hicache.errors import StorageError
from hicache.storage import FileStorage, StorageIdentity, create_backend
from hicache.storage.base import HEADER_SIZE
from tests.conftest import REPO_ROOT
from tests.storage.conftest import make_keys, make_kv_pool, page_slots, same_page


def _backend(tmp_path, pool, **config):
    return create_backend(
        "file", StorageIdentity.from_host_pool(pool, "m"), {"path": str(tmp_path), **config}
    )


def _value_nbytes(pool) -> int:
    return HEADER_SIZE + pool.size_bytes // pool.num_pages


def test_writes_leave_only_whole_page_files(tmp_path):
    pool = make_kv_pool(seed=1)
    backend = _backend(tmp_path, pool)
    keys = make_keys(5)
    assert backend.set(keys, pool, page_slots(pool, range(5))) == 5
    names = sorted(os.listdir(backend.directory))
    assert names == sorted(f"{k}.bin" for k in keys)  # no temporary file remains
    sizes = {os.path.getsize(backend.directory / n) for n in names}
    assert sizes == {_value_nbytes(pool)}
    assert backend.directory == tmp_path / backend.identity.prefix()


@pytest.mark.parametrize(
    "size", ["empty", "header_only", "half", "one_byte_short", "one_byte_long"]
)
def test_truncated_or_padded_file_is_corrupt(tmp_path, size):
    src = make_kv_pool(seed=1)
    dst = make_kv_pool(seed=None)
    backend = _backend(tmp_path, src)
    keys = make_keys(2)
    assert backend.set(keys, src, page_slots(src, [0, 1])) == 2
    path = backend.directory / f"{keys[1]}.bin"
    data = path.read_bytes()
    cut = {
        "empty": b"",
        "header_only": data[:HEADER_SIZE],
        "half": data[: len(data) // 2],
        "one_byte_short": data[:-1],
        "one_byte_long": data + b"\0",
    }[size]
    path.write_bytes(cut)
    assert backend.exists(keys) == 2  # present, not yet verified
    assert backend.get(keys, dst, page_slots(dst, [0, 1])) == 1
    assert same_page(src, 0, dst, 0)
    assert int(dst.read(page_slots(dst, [1]))[0].view(torch.uint8).count_nonzero()) == 0
    assert backend.stats_snapshot().corrupt_pages == 1
    assert not path.exists()


def test_readers_never_see_a_partial_page_while_writers_write(tmp_path):
    src = make_kv_pool(num_pages=16, page_size=16, num_layers=4, head_dim=64, seed=1)
    keys = make_keys(16)
    writer = _backend(tmp_path, src)
    reader = _backend(tmp_path, src)
    dst = make_kv_pool(num_pages=16, page_size=16, num_layers=4, head_dim=64, seed=None)
    done = threading.Event()
    hits = []

    def read_loop():
        while not done.is_set():
            hits.append(reader.get(keys, dst, page_slots(dst, range(16))))

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        for i in range(16):
            assert writer.set(keys[i : i + 1], src, page_slots(src, [i])) == 1
    finally:
        done.set()
        thread.join()
    assert reader.stats_snapshot().corrupt_pages == 0
    assert reader.get(keys, dst, page_slots(dst, range(16))) == 16
    assert all(same_page(src, i, dst, i) for i in range(16))
    assert hits == sorted(hits)


def test_pages_persist_across_backends_and_processes(tmp_path):
    src = make_kv_pool("layer_first", seed=7)
    keys = make_keys(3)
    # Another process writes the pages (same seed: the same bytes) ...
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from tests.storage.conftest import make_keys, make_kv_pool, page_slots\n"
        "from hicache.storage import StorageIdentity, create_backend\n"
        "pool = make_kv_pool('layer_first', seed=7)\n"
        "identity = StorageIdentity.from_host_pool(pool, 'm')\n"
        "b = create_backend('file', identity, {'path': sys.argv[2]})\n"
        "assert b.set(make_keys(3), pool, page_slots(pool, [2, 3, 4])) == 3\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(REPO_ROOT), str(tmp_path)], check=True, timeout=120
    )
    # ... and this one reads them, through two backend instances in turn.
    for _ in range(2):
        dst = make_kv_pool("layer_first", seed=None)
        backend = _backend(tmp_path, src)
        assert backend.exists(keys) == 3
        assert backend.get(keys, dst, page_slots(dst, [0, 1, 2])) == 3
        assert all(same_page(src, a, dst, b) for a, b in ((2, 0), (3, 1), (4, 2)))
        backend.close()


def test_size_cap_evicts_least_recently_used_files(tmp_path):
    pool = make_kv_pool(seed=1)
    dst = make_kv_pool(seed=None)
    value = _value_nbytes(pool)
    backend = _backend(tmp_path, pool, max_bytes=3 * value)
    keys = make_keys(9)
    assert backend.set(keys[:3], pool, page_slots(pool, [0, 1, 2])) == 3
    assert backend.get(keys[:1], dst, page_slots(dst, [0])) == 1  # k0 becomes the most recent
    assert backend.set(keys[3:4], pool, page_slots(pool, [3])) == 1  # evicts k1, the LRU
    present = [k for k in keys if (backend.directory / f"{k}.bin").exists()]
    assert present == [keys[0], keys[2], keys[3]]
    assert backend.total_bytes == 3 * value
    assert backend.stats_snapshot().evicted_pages == 1
    # One call never evicts its own pages: 5 new pages under a 3-page cap store the first 3.
    assert backend.set(keys[4:9], pool, page_slots(pool, [4, 5, 6, 7, 0])) == 3
    present = [k for k in keys if (backend.directory / f"{k}.bin").exists()]
    assert present == keys[4:7]
    assert backend.stats_snapshot().evicted_pages == 4
    assert backend.total_bytes == 3 * value
    assert len(os.listdir(backend.directory)) == 3
    # A restarted backend resumes the recency order from the files' modification times.
    backend2 = _backend(tmp_path, pool, max_bytes=2 * value)
    assert backend2.total_bytes == 2 * value
    assert backend2.stats_snapshot().evicted_pages == 1


def test_page_larger_than_cap_is_not_stored(tmp_path):
    pool = make_kv_pool(seed=1)
    backend = _backend(tmp_path, pool, max_bytes=_value_nbytes(pool) - 1)
    assert backend.set(make_keys(2), pool, page_slots(pool, [0, 1])) == 0
    assert os.listdir(backend.directory) == []


def test_write_failure_raises_storage_error_naming_the_backend(tmp_path):
    pool = make_kv_pool(seed=1)
    backend = _backend(tmp_path, pool)
    keys = make_keys(3)
    assert backend.set(keys[:1], pool, page_slots(pool, [0])) == 1
    # The identity's directory becomes a file: every write fails with an OSError.
    for name in os.listdir(backend.directory):
        os.unlink(backend.directory / name)
    os.rmdir(backend.directory)
    backend.directory.write_bytes(b"not a directory")
    with pytest.raises(StorageError, match=f"file at {tmp_path}: set "):
        backend.set(keys, pool, page_slots(pool, [0, 1, 2]))
    assert backend.stats_snapshot().failed_ops == 1
    with pytest.raises(StorageError, match="cannot open"):
        _backend(tmp_path, pool)


def test_directory_removed_under_a_running_backend_is_recreated(tmp_path):
    pool = make_kv_pool(seed=1)
    backend = _backend(tmp_path, pool)
    os.rmdir(backend.directory)
    assert backend.set(make_keys(1), pool, page_slots(pool, [0])) == 1


def test_default_directory_comes_from_the_environment(tmp_path, monkeypatch):
    pool = make_kv_pool(seed=1)
    monkeypatch.setenv("HICACHE_STORAGE_DIR", str(tmp_path / "env"))
    backend = create_backend("file", StorageIdentity.from_host_pool(pool, "m"), None)
    assert isinstance(backend, FileStorage)
    assert backend.directory.parent == tmp_path / "env"
    monkeypatch.delenv("HICACHE_STORAGE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    backend = create_backend("file", StorageIdentity.from_host_pool(pool, "m"), "")
    assert backend.directory.parent == tmp_path / "xdg" / "hicache" / "storage"
    # SGLang's key for the path works too (reference §6.4).
    backend = create_backend(
        "file",
        StorageIdentity.from_host_pool(pool, "m"),
        {"file_storage_path": str(tmp_path / "s")},
    )
    assert backend.directory.parent == tmp_path / "s"
