"""create_backend, the extra config, StorageIdentity and StorageError (no server needed)."""

from __future__ import annotations

import dataclasses

import pytest

from hicache.errors import HiCacheError, InvalidArgumentError, StorageError
from hicache.storage import FileStorage, StorageIdentity, StorageStats, create_backend
from hicache.storage.base import parse_extra_config
from tests.storage.conftest import make_kv_pool, make_mamba_pool

IDENTITY = StorageIdentity("m", "page_first", "bfloat16", 4)


@pytest.mark.parametrize("name", [None, "", "file", "FILE"])
def test_file_is_the_default_backend(tmp_path, name):
    backend = create_backend(name, IDENTITY, {"path": str(tmp_path)})
    assert isinstance(backend, FileStorage)
    assert backend.description == f"file at {tmp_path}"
    assert repr(backend) == f"FileStorage(file at {tmp_path}, identity={IDENTITY.prefix()})"


def test_unknown_backend_name_is_rejected():
    with pytest.raises(
        InvalidArgumentError, match="name: expected one of .*'valkey'.*got 'mooncake'"
    ):
        create_backend("mooncake", IDENTITY, None)
    with pytest.raises(InvalidArgumentError, match="identity: expected a StorageIdentity"):
        create_backend("file", {"model_name": "m"}, None)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (42, "expected a JSON object"),
        ({"max_bytes": "1G"}, "max_bytes: expected an integer, got '1G'"),
        ({"max_bytes": 0}, "max_bytes: expected >= 1"),
        ({"fsync": 1}, "fsync: expected true or false"),
        ({"path": 3}, "path: expected a string"),
        ({"pth": "/tmp"}, "file storage extra config: unknown key 'pth'"),
    ],
)
def test_bad_file_config_names_the_key(config, message):
    with pytest.raises(InvalidArgumentError, match=message):
        create_backend("file", IDENTITY, config)


def test_sglang_controller_keys_are_accepted_and_ignored(tmp_path):
    config = (
        f'{{"path": "{tmp_path}", "prefetch_threshold": 256, "prefetch_timeout_base": 1,'
        ' "prefetch_timeout_per_ki_token": 0.25, "hicache_storage_pass_prefix_keys": false}'
    )
    assert isinstance(create_backend("file", IDENTITY, config), FileStorage)
    assert parse_extra_config(None) == {} and parse_extra_config(" ") == {}
    original = {"path": "x"}
    parsed = parse_extra_config(original)
    assert parsed == original and parsed is not original


def test_identity_prefix_is_stable_and_changes_with_every_field():
    assert IDENTITY.prefix() == StorageIdentity("m", "page_first", "bfloat16", 4).prefix()
    assert len(IDENTITY.prefix()) == 16 and int(IDENTITY.prefix(), 16) >= 0
    changes = {
        "model_name": "n",
        "layout": "layer_first",
        "dtype": "float16",
        "page_size": 8,
        "tp_size": 2,
        "kind": "swa",
        "page_shape": "mha:L1:H1:D1",
    }
    prefixes = {IDENTITY.prefix()}
    for field, value in changes.items():
        prefixes.add(dataclasses.replace(IDENTITY, **{field: value}).prefix())
    prefixes.add(dataclasses.replace(IDENTITY, tp_rank=1, tp_size=2).prefix())
    assert len(prefixes) == len(changes) + 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_name": ""}, "model_name: expected a non-empty str"),
        ({"layout": "page_head"}, "layout: expected one of"),
        ({"dtype": None}, "dtype: expected a non-empty str"),
        ({"page_size": 0}, "page_size: expected >= 1"),
        ({"page_size": 4.0}, "page_size: expected an int"),
        ({"tp_rank": 2, "tp_size": 2}, "tp_rank: expected 0 <= tp_rank < tp_size"),
        ({"kind": "indexer"}, "kind: expected one of"),
    ],
)
def test_bad_identity_is_rejected(fields, message):
    with pytest.raises(InvalidArgumentError, match=message):
        dataclasses.replace(IDENTITY, **fields)


def test_identity_from_host_pools():
    kv = StorageIdentity.from_host_pool(make_kv_pool("layer_first", page_size=4), "llama", 1, 2)
    assert kv == StorageIdentity("llama", "layer_first", "bfloat16", 4, 1, 2, "kv", "mha:L2:H2:D8")
    swa = StorageIdentity.from_host_pool(make_kv_pool(), "llama", kind="swa")
    assert swa.kind == "swa"
    mamba = StorageIdentity.from_host_pool(make_mamba_pool("page_first_direct"), "llama")
    assert (mamba.kind, mamba.layout, mamba.dtype, mamba.page_size) == (
        "mamba",
        "page_first_direct",
        "bfloat16/float32",
        1,
    )
    assert mamba.page_shape == "mamba:L3:conv[6, 3]:temporal[2, 4, 5]"
    with pytest.raises(InvalidArgumentError, match="kind: 'mamba' does not fit a HostKVPool"):
        StorageIdentity.from_host_pool(make_kv_pool(), "llama", kind="mamba")
    with pytest.raises(InvalidArgumentError, match="kind: 'kv' does not fit a MambaHostPool"):
        StorageIdentity.from_host_pool(make_mamba_pool(), "llama", kind="kv")
    with pytest.raises(InvalidArgumentError, match="expected a HostKVPool or MambaHostPool"):
        StorageIdentity.from_host_pool(object(), "llama")


def test_storage_error_and_stats_types():
    error = StorageError("valkey at h:1: get failed: boom", "valkey at h:1")
    assert isinstance(error, HiCacheError) and isinstance(error, RuntimeError)
    assert error.backend == "valkey at h:1"
    stats = StorageStats(get_pages=2)
    assert stats.as_dict()["get_pages"] == 2
    assert set(stats.as_dict()) >= {
        "exists_calls",
        "get_pages",
        "set_pages",
        "get_bytes",
        "set_bytes",
        "corrupt_pages",
        "failed_ops",
        "dedup_pages",
        "evicted_pages",
    }
