"""The replay with a Valkey/Redis storage tier on a real server, healthy and killed mid-replay.

The server is a real ``valkey-server`` / ``redis-server`` on a loopback port (the fixture in
``conftest.py``); nothing is mocked. Every hit's KV (L3 hits included) is read back and compared
with what the replay wrote for those tokens, and the cache's invariants and slot ownership are
checked every 20 requests and at the end.
"""

from __future__ import annotations

import pytest

from hicache.replay import ReplayConfig, load_trace, run_replay
from hicache.replay.trace import bundled_trace_path

pytestmark = pytest.mark.valkey

LIMIT = 100


def _config(server, policy: str = "wait_complete") -> ReplayConfig:
    extra = {"host": server.host, "port": server.port, "socket_timeout": 1}
    extra["prefetch_threshold"] = 16
    return ReplayConfig(
        device_ratio=0.2,
        hicache_ratio=1.0,
        host_layout="page_first",
        check_every=20,
        storage_backend="valkey",
        storage_extra_config=extra,
        prefetch_policy=policy,
    )


def _check(report) -> None:
    assert report.verified_tokens == report.hit_blocks * report.config["block_tokens"]
    assert report.hit_blocks == (
        report.device_hit_blocks + report.host_hit_blocks + report.storage_hit_blocks
    )


def test_a_second_replay_hits_what_the_first_stored_in_valkey(valkey_server):
    requests = load_trace(bundled_trace_path(), LIMIT)
    first = run_replay(requests, _config(valkey_server), "first")
    assert first.storage_stats["controller"]["backup_pages"] > 0
    _check(first)
    second = run_replay(requests, _config(valkey_server), "second")
    _check(second)
    assert second.storage_hit_blocks > 0
    assert second.hit_blocks > first.hit_blocks
    assert second.storage_stats["backend"]["failed_ops"] == 0


def test_killing_the_server_mid_replay_costs_hits_not_correctness(valkey_server):
    requests = load_trace(bundled_trace_path(), LIMIT)
    run_replay(requests, _config(valkey_server), "warm")  # storage holds the trace's pages

    def kill_halfway(done: int) -> None:
        if done == LIMIT // 2:
            valkey_server.kill()

    report = run_replay(requests, _config(valkey_server, "timeout"), "killed", kill_halfway)
    assert report.requests == LIMIT  # the replay went on
    _check(report)  # every hit's KV verified, invariants checked (no host page leaked)
    assert report.storage_hit_blocks > 0  # before the kill
    backend = report.storage_stats["backend"]
    assert backend["failed_ops"] > 0 and backend["corrupt_pages"] == 0
    counters = report.storage_stats["controller"]
    assert counters["prefetch_failed_ops"] > 0 or counters["backup_failed_pages"] > 0
