"""``hicache replay --model mamba-hybrid``: Mamba states verified on every hit, hits near Full's."""

from __future__ import annotations

import json

import pytest

from hicache.cli import main
from hicache.memory import MambaStatePool
from hicache.replay import ReplayConfig, run_replay
from hicache.replay.runner import KVIntegrityError
from tests.replay.test_replay import _trace


def _config(**kw) -> ReplayConfig:
    return ReplayConfig(model="mamba-hybrid", device="cpu", **kw)


def test_states_are_verified_and_hits_stay_close_to_full_hits():
    requests = _trace("conversation", 3000)
    report = run_replay(requests, _config(check_every=500))
    plain = run_replay(requests, ReplayConfig(device="cpu", verify=False))
    assert report.mamba_verified_states == report.requests == 3000
    assert report.verified_tokens > 0 and report.cache_stats["mamba_forks"] > 2900
    assert report.hit_blocks <= report.full_kv_hit_blocks <= plain.hit_blocks
    # Publishing at the last complete block and the branching point (measured: 92%; 95% on the
    # whole trace, test_whole_trace_keeps_95_percent_of_full_hits).
    assert report.hit_blocks >= 0.9 * plain.hit_blocks
    assert report.cache_stats["mamba_evicted_states"] > 0  # the state budget was exercised


def test_a_wrong_state_served_on_a_hit_is_detected(monkeypatch):
    original = MambaStatePool.init_state

    def off_by_one(self, dst, src=None):
        original(self, dst, None if src is None else (src + 1) % self.num_slots)

    monkeypatch.setattr(MambaStatePool, "init_state", off_by_one)
    with pytest.raises(KVIntegrityError, match="Mamba state copied"):
        run_replay(_trace("conversation", 400), _config())


def test_cli_mamba_hybrid_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["replay", "--limit", "400", "--quiet", "--device", "cpu", "--json", str(out)]
    assert main([*argv, "--model", "mamba-hybrid", "--max-mamba-cache-size", "64"]) == 0
    report = json.loads(out.read_text())
    assert report["mamba_states"] == 64 and report["config"]["model"] == "mamba-hybrid"
    assert report["hit_blocks"] <= report["full_kv_hit_blocks"]
    assert "Full-only hit blocks (same tree)" in capsys.readouterr().out
    assert main([*argv, "--model", "mamba-hybrid", "--max-mamba-cache-size", "1"]) == 2
    assert "a request needs up to 2 state slots" in capsys.readouterr().err


def test_states_come_back_from_the_host_tier_bit_identical_on_every_l2_hit():
    requests = _trace("conversation", 2000)
    report = run_replay(requests, _config(hicache_ratio=2, check_every=500))
    # Every hit's state is checked against the state computed after its last block, L2 hits
    # after their load-back: a state that did not survive device -> host -> device would raise.
    assert report.mamba_verified_states == 2000 and report.host_hit_blocks > 0
    assert report.mamba_host_states == 2 * report.mamba_states
    device_only = run_replay(requests, _config(verify=False))
    assert report.hit_blocks > device_only.hit_blocks


@pytest.mark.slow
def test_whole_trace_keeps_95_percent_of_full_hits():
    requests = _trace("conversation")
    mamba = run_replay(requests, _config(verify=False, timeline_points=0))
    plain = run_replay(requests, ReplayConfig(device="cpu", verify=False, timeline_points=0))
    assert mamba.mamba_states == 2679  # SGLang's default budget at 10%
    assert mamba.hit_blocks >= 0.95 * plain.hit_blocks  # 76,620 vs 80,466 measured


@pytest.mark.parametrize("trace", ["conversation", "synthetic"])
def test_the_hit_rule_matches_the_reference_model(trace):
    """README's mamba-hybrid hit rule, replayed on the pure-Python model, on both traces."""
    from tests.reference.mamba_replay_reference import mamba_hit_blocks

    requests = _trace(trace, 300)
    config = _config(block_tokens=2, page_size=2, device_ratio=0.1, max_mamba_cache_size=40)
    report = run_replay(requests, config)
    expected = mamba_hit_blocks(requests, report.capacity_blocks, 40, 2)
    assert report.hit_blocks == expected > 0
