"""hicache replay with the host (L2) tier: the two-level hit rule on both traces, L2 integrity."""

from __future__ import annotations

import json

import pytest
import torch

from hicache.cli import main
from hicache.replay import ReplayConfig, load_trace, run_replay
from hicache.replay.runner import KVIntegrityError
from tests.reference.two_level_reference import two_level_hit_blocks
from tests.replay.test_replay import CONVERSATION, _trace


def _capacity(requests, pct: int) -> int:
    return len({h for r in requests for h in r.hash_ids}) * pct // 100


def _check_two_level(requests, name: str, pct: int, ratio: float, page_size: int) -> None:
    config = ReplayConfig(
        page_size=page_size, device_ratio=pct / 100, hicache_ratio=ratio, check_every=500
    )
    report = run_replay(requests, config, name)
    device_blocks = _capacity(requests, pct)
    host_blocks = int(device_blocks * ratio)
    assert max(len(r.hash_ids) for r in requests) <= device_blocks  # the rule's precondition
    assert report.host_capacity_blocks == host_blocks
    expected = two_level_hit_blocks([r.hash_ids for r in requests], device_blocks, host_blocks)
    assert (report.device_hit_blocks, report.host_hit_blocks) == expected
    assert report.hit_blocks == sum(expected)
    # Every hit was read back and compared, the L2 ones after their load-back.
    assert report.verified_tokens == report.hit_blocks * config.block_tokens
    assert report.load_back_tokens == report.host_hit_blocks * config.block_tokens


@pytest.mark.parametrize(
    ("name", "pct", "ratio"), [("conversation", 10, 2.0), ("synthetic", 5, 2.0)]
)
def test_full_trace_matches_two_level_rule(name, pct, ratio):
    requests = _trace(name)
    _check_two_level(requests, name, pct, ratio, page_size=16)
    assert requests  # the shared traces are real


@pytest.mark.parametrize("name", ["conversation", "synthetic"])
@pytest.mark.parametrize(("page_size", "pct", "ratio"), [(1, 10, 1.0), (4, 5, 3.0), (16, 10, 1.5)])
def test_subset_matches_two_level_rule(name, page_size, pct, ratio):
    _check_two_level(_trace(name, limit=600), name, pct, ratio, page_size)


def test_host_tier_adds_hits_over_device_only():
    requests = _trace("conversation", limit=1500)
    device_only = run_replay(requests, ReplayConfig(device_ratio=0.05))
    two_level = run_replay(requests, ReplayConfig(device_ratio=0.05, hicache_ratio=4))
    assert two_level.device_hit_blocks == device_only.hit_blocks
    assert two_level.host_hit_blocks > 0


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_write_back_replay_verifies_l2_hits(layout):
    config = ReplayConfig(
        device_ratio=0.02,
        hicache_ratio=4,
        write_policy="write_back",
        host_layout=layout,
        page_size=4,
        check_every=100,
        device="cpu",
    )
    report = run_replay(_trace("conversation", limit=1000), config)
    assert report.host_hit_blocks > 0
    assert report.verified_tokens == report.hit_blocks * config.block_tokens
    stats = report.cache_stats
    # Backed up only when evicted, then demoted (the host never runs out here); a loaded-back node
    # keeps its host copy, so evicting it again demotes it without a second backup.
    assert 0 < stats["backup_tokens"] <= stats["demoted_tokens"]
    assert stats["demoted_tokens"] <= stats["backup_tokens"] + report.load_back_tokens
    assert stats["dropped_tokens"] == 0


def test_write_through_selective_backs_up_only_reused_nodes():
    requests = _trace("conversation", limit=1000)
    reports = {
        policy: run_replay(
            requests,
            ReplayConfig(device_ratio=0.02, hicache_ratio=4, write_policy=policy, device="cpu"),
        )
        for policy in ("write_through", "write_through_selective")
    }
    selective = reports["write_through_selective"].cache_stats["backup_tokens"]
    assert 0 < selective < reports["write_through"].cache_stats["backup_tokens"] // 100
    for report in reports.values():
        assert report.verified_tokens == report.hit_blocks * 16


def test_mla_host_tier_replay_verifies_hits():
    config = ReplayConfig(
        kind="mla", num_heads=1, dtype="bfloat16", device_ratio=0.02, hicache_ratio=4, device="cpu"
    )
    report = run_replay(_trace("conversation", 1000), config)
    assert report.host_hit_blocks > 0
    assert report.verified_tokens == report.hit_blocks * config.block_tokens


def test_corrupted_host_copy_is_detected(monkeypatch):
    """An L2 hit whose host bytes were damaged must raise, not count as a hit."""
    from hicache import transfer

    original = transfer.KVTransfer.load_layer

    def corrupting_load_layer(self, indices, layer):
        original(self, indices, layer)
        self.device_pool.k_buffer[layer, indices.device_indices[0]] += 1

    monkeypatch.setattr(transfer.KVTransfer, "load_layer", corrupting_load_layer)
    config = ReplayConfig(device_ratio=0.05, hicache_ratio=3, device="cpu")
    with pytest.raises(KVIntegrityError, match="loaded back from host"):
        run_replay(_trace("conversation", 800), config)


def test_cli_replay_with_host_tier(tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["replay", "--limit", "300", "--quiet", "--device", "cpu", "--json", str(out)]
    argv += ["--device-ratio", "0.05", "--hicache-ratio", "2", "--hicache-mem-layout", "page_first"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    requests = load_trace(CONVERSATION, 300)
    expected = two_level_hit_blocks(
        [r.hash_ids for r in requests],
        report["capacity_blocks"],
        report["host_capacity_blocks"],
    )
    assert (report["device_hit_blocks"], report["host_hit_blocks"]) == expected
    assert report["io_backend"] == "direct"
    captured = capsys.readouterr()
    assert "host (L2) hit blocks" in captured.out and "write_through / direct" in captured.out
    if not torch.cuda.is_available():
        assert "io_backend auto -> direct" in captured.err  # the choice and its reason


def test_cli_rejects_unknown_io_backend(capsys):
    argv = ["replay", "--limit", "5", "--quiet", "--hicache-ratio", "2"]
    with pytest.raises(SystemExit) as info:  # argparse rejects it, listing the choices
        main([*argv, "--hicache-io-backend", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--hicache-io-backend" in err and "'nope'" in err and "kernel" in err


def test_cli_plot_and_timeline_add_up_to_the_report(tmp_path):
    image, out = tmp_path / "report.png", tmp_path / "report.json"
    argv = ["replay", "--limit", "1500", "--quiet", "--device", "cpu", "--json", str(out)]
    argv += ["--device-ratio", "0.05", "--hicache-ratio", "2", "--plot", str(image)]
    assert main(argv) == 0
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 20_000
    report = json.loads(out.read_text())
    timeline = report["timeline"]
    assert 150 <= len(timeline) <= 200 and timeline[-1]["requests"] == report["requests"]
    assert sum(p["l1_hit_blocks"] for p in timeline) == report["device_hit_blocks"]
    assert sum(p["l2_hit_blocks"] for p in timeline) == report["host_hit_blocks"] > 0
    assert sum(p["blocks"] for p in timeline) == report["total_blocks"]
    metrics = report["metrics"]
    assert (
        sum(p["backup_bytes"] for p in timeline)
        == metrics["hicache_transfer_bytes_total{direction=backup}"]
    )
    assert metrics["hicache_hit_tokens_total{component=full,tier=L2}"] > 0
