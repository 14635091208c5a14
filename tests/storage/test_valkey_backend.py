"""The valkey backend on a real server: dead server, restart, full server, mid-batch failure."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from hicache.errors import InvalidArgumentError, StorageError
from hicache.storage import StorageIdentity, create_backend
from hicache.storage.valkey import ValkeyStorage
from tests.storage.conftest import make_keys, make_kv_pool, page_slots, same_page

pytestmark = pytest.mark.valkey


def _backend(server, pool, **config):
    config = {"host": server.host, "port": server.port, "socket_timeout": 2, **config}
    return create_backend("valkey", StorageIdentity.from_host_pool(pool, "m"), config)


def test_dead_server_raises_storage_error_and_restart_recovers(valkey_server):
    src = make_kv_pool(seed=1)
    dst = make_kv_pool(seed=None)
    backend = _backend(valkey_server, src)
    keys = make_keys(2)
    assert backend.set(keys, src, page_slots(src, [0, 1])) == 2
    valkey_server.kill()
    for call in (
        lambda: backend.exists(keys),
        lambda: backend.get(keys, dst, page_slots(dst, [0, 1])),
        lambda: backend.set(keys, src, page_slots(src, [0, 1])),
    ):
        with pytest.raises(
            StorageError, match=f"valkey at {valkey_server.address}: .*Error"
        ) as info:
            call()
        assert info.value.backend == f"valkey at {valkey_server.address}"
    assert int(dst.kv_buffer.view(torch.uint8).count_nonzero()) == 0
    assert backend.stats_snapshot().failed_ops == 3
    # A fresh (empty) server on the same port: the same backend works again.
    valkey_server.restart()
    assert backend.exists(keys) == 0
    assert backend.set(keys, src, page_slots(src, [0, 1])) == 2
    assert backend.get(keys, dst, page_slots(dst, [0, 1])) == 2
    assert same_page(src, 1, dst, 1)


def test_full_server_stores_a_leading_run_then_raises(valkey_server):
    src = make_kv_pool(page_size=16, num_layers=4, head_dim=64, num_pages=12, seed=1)
    dst = make_kv_pool(page_size=16, num_layers=4, head_dim=64, num_pages=12, seed=None)
    value_nbytes = src.size_bytes // src.num_pages  # 32 KiB
    # Two pages per pipeline: the server counts a pipeline's query buffer as used memory.
    backend = _backend(valkey_server, src, max_batch_bytes=2 * value_nbytes)
    used = int(valkey_server.command("INFO", "memory")["used_memory"])
    valkey_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    valkey_server.command("CONFIG", "SET", "maxmemory", str(used + 6 * value_nbytes))
    keys = make_keys(10)
    stored = backend.set(keys, src, page_slots(src, range(10)))
    assert 0 < stored < 10
    assert backend.exists(keys) == stored
    assert backend.stats_snapshot().failed_ops == 1
    # Nothing beyond the leading run counts; the server is still full: the next new page fails.
    with pytest.raises(StorageError, match="OutOfMemoryError"):
        backend.set(keys[stored:], src, page_slots(src, range(stored, 10)))
    # What was stored reads back whole.
    assert backend.get(keys, dst, page_slots(dst, range(10))) == stored
    assert all(same_page(src, i, dst, i) for i in range(stored))
    assert int(dst.read(page_slots(dst, [stored]))[0].view(torch.uint8).count_nonzero()) == 0


def test_get_failing_mid_batch_returns_the_pages_written_before(valkey_server, monkeypatch):
    src = make_kv_pool(seed=1)
    dst = make_kv_pool(seed=None)
    value_nbytes = src.size_bytes // src.num_pages
    # One page per MGET, so that the server can die between two batches.
    backend = _backend(valkey_server, src, max_batch_bytes=value_nbytes + 64)
    keys = make_keys(4)
    assert backend.set(keys, src, page_slots(src, range(4))) == 4
    real_mget = backend.client.mget
    calls = []

    def mget_then_kill(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            valkey_server.kill()
        return real_mget(batch)

    monkeypatch.setattr(backend.client, "mget", mget_then_kill)
    assert backend.get(keys, dst, page_slots(dst, range(4))) == 2
    assert calls == [1, 1, 1]
    assert all(same_page(src, i, dst, i) for i in range(2))
    for page in (2, 3):
        assert int(dst.read(page_slots(dst, [page]))[0].view(torch.uint8).count_nonzero()) == 0
    assert backend.stats_snapshot().failed_ops == 1


def test_values_are_batched_by_bytes(valkey_server):
    src = make_kv_pool(seed=1)
    dst = make_kv_pool(seed=None)
    value_nbytes = src.size_bytes // src.num_pages
    backend = _backend(valkey_server, src, max_batch_bytes=3 * value_nbytes)
    keys = make_keys(8)
    assert backend.set(keys[:2], src, page_slots(src, [0, 1])) == 2
    assert backend.set(keys, src, page_slots(src, range(8))) == 8
    assert backend.get(keys, dst, page_slots(dst, range(8))) == 8
    assert all(same_page(src, i, dst, i) for i in range(8))
    stats = backend.stats_snapshot()
    assert (stats.set_pages, stats.dedup_pages) == (8, 2)


def test_url_and_redis_alias(valkey_server):
    pool = make_kv_pool(seed=1)
    identity = StorageIdentity.from_host_pool(pool, "m")
    backend = create_backend("redis", identity, f'{{"url": "redis://{valkey_server.address}/0"}}')
    assert isinstance(backend, ValkeyStorage)
    assert backend.description == f"valkey at {valkey_server.address}"
    assert backend.set(make_keys(1), pool, page_slots(pool, [0])) == 1
    backend.close()


def test_wrong_password_is_a_storage_error(valkey_server):
    valkey_server.command("CONFIG", "SET", "requirepass", "secret")
    pool = make_kv_pool(seed=1)
    with pytest.raises(StorageError, match=valkey_server.address):
        _backend(valkey_server, pool, password="wrong").exists(make_keys(1))
    assert _backend(valkey_server, pool, password="secret").exists(make_keys(1)) == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"port": "6379"}, "port: expected an integer"),
        ({"port": 70000}, "port: expected <= 65535"),
        ({"port": True}, "port: expected an integer"),
        ({"cluster": "yes"}, "cluster: expected true or false"),
        ({"socket_timeout": 0}, "socket_timeout: expected > 0"),
        ({"db": -1}, "db: expected >= 0"),
        ({"cluster": True, "db": 1}, "db: a cluster has only db 0"),
        ({"url": "http://x:1"}, "url: expected valkey://"),
        ({"hots": "x"}, "unknown key 'hots'"),
    ],
)
def test_bad_config_names_the_key(config, message):
    identity = StorageIdentity("m", "page_first", "bfloat16", 4)
    with pytest.raises(InvalidArgumentError, match=message):
        create_backend("valkey", identity, config)


def test_cluster_round_trip_dedup_and_corruption(valkey_cluster):
    src = make_kv_pool(seed=1)
    dst = make_kv_pool(seed=None)
    value_nbytes = src.size_bytes // src.num_pages
    node = valkey_cluster[0]
    backend = _backend(node, src, cluster=True, max_batch_bytes=3 * value_nbytes)
    assert backend.description == f"valkey cluster at {node.address}"
    keys = make_keys(8)  # spread over the nodes' hash slots
    assert backend.set(keys[:3], src, page_slots(src, [0, 1, 2])) == 3
    assert backend.set(keys, src, page_slots(src, range(8))) == 8
    assert backend.exists(keys) == 8
    assert backend.get(keys, dst, page_slots(dst, range(8))) == 8
    assert all(same_page(src, i, dst, i) for i in range(8))
    backend.client.setrange(backend.storage_key(keys[5]), 100, b"\0\1\2")
    fresh = make_kv_pool(seed=None)
    assert backend.get(keys, fresh, page_slots(fresh, range(8))) == 5
    stats = backend.stats_snapshot()
    assert (stats.dedup_pages, stats.corrupt_pages) == (3, 1)
    assert backend.exists(keys) == 5
    backend.close()


def test_unresponsive_server_times_out_with_a_storage_error(valkey_server):
    pool = make_kv_pool(seed=1)
    backend = _backend(valkey_server, pool, socket_timeout=0.3)
    keys = make_keys(1)
    assert backend.set(keys, pool, page_slots(pool, [0])) == 1
    valkey_server.proc.send_signal(signal.SIGSTOP)  # alive, accepting, never answering
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=f"{valkey_server.address}: exists failed: Timeout"):
            backend.exists(keys)
        assert time.monotonic() - t0 < 3
    finally:
        valkey_server.proc.send_signal(signal.SIGCONT)
    assert backend.exists(keys) == 1
