"""hicache replay: reference hit counts on the real traces, KV integrity, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from hicache.cli import main
from hicache.replay import ReplayConfig, bundled_trace_path, load_trace, run_replay
from hicache.replay.runner import KVIntegrityError, expected_kv
from tests.conftest import SHARED_TRACES
from tests.reference.lru_reference import reference_hit_blocks

CONVERSATION = bundled_trace_path()
SYNTHETIC = SHARED_TRACES / "synthetic_trace.jsonl"

# traces/README.md, "Reference LRU prefix-cache hit ratios": (file, pct) -> (hit blocks, hit tokens)
REFERENCE = {
    ("conversation", 1): (15_136, 7_745_782),
    ("conversation", 5): (56_479, 28_900_677),
    ("conversation", 10): (80_466, 41_178_281),
    ("conversation", 25): (101_978, 52_187_826),
    ("conversation", 50): (104_759, 53_611_499),
    ("conversation", 100): (105_710, 54_098_411),
    ("synthetic", 1): (4_644, 2_377_124),
    ("synthetic", 5): (19_087, 9_765_587),
    ("synthetic", 10): (31_973, 16_354_464),
    ("synthetic", 25): (54_123, 27_674_678),
    ("synthetic", 50): (71_763, 36_691_512),
    ("synthetic", 100): (77_953, 39_852_661),
}
TRACES = {"conversation": CONVERSATION, "synthetic": SYNTHETIC}


def _trace(name: str, limit: int | None = None):
    path = TRACES[name]
    if not path.exists():
        pytest.skip(f"{path} is missing (the shared traces folder sits beside the repo)")
    return load_trace(path, limit)


def _full_trace_case(name: str, pct: int) -> None:
    report = run_replay(_trace(name), ReplayConfig(device_ratio=pct / 100, check_every=3000), name)
    assert (report.hit_blocks, report.hit_tokens) == REFERENCE[(name, pct)]


@pytest.mark.parametrize(("name", "pct"), [("conversation", 10), ("synthetic", 5)])
def test_full_trace_matches_reference_table(name, pct):
    _full_trace_case(name, pct)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "pct"), sorted(REFERENCE))
def test_full_trace_matches_every_reference_row(name, pct):
    _full_trace_case(name, pct)


@pytest.mark.parametrize("name", ["conversation", "synthetic"])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("pct", [5, 10, 50])
def test_subset_matches_reference_rule(name, page_size, pct):
    requests = _trace(name, limit=600)
    unique = len({h for r in requests for h in r.hash_ids})
    capacity = unique * pct // 100
    # The rule equals "lock, evict, insert" only while no request is longer than the capacity.
    assert max(len(r.hash_ids) for r in requests) <= capacity
    expected = reference_hit_blocks([r.hash_ids for r in requests], capacity)
    config = ReplayConfig(page_size=page_size, device_ratio=pct / 100, check_every=50)
    assert run_replay(requests, config, name).hit_blocks == expected


def test_mla_and_bfloat16_replay_verifies_hits():
    report = run_replay(
        _trace("conversation", 300),
        ReplayConfig(kind="mla", num_heads=1, dtype="bfloat16", device="cpu"),
    )
    assert report.hit_blocks > 0
    assert report.verified_tokens == report.hit_blocks * 16


def test_corrupted_kv_is_detected(monkeypatch):
    """A hit whose KV was overwritten must raise, not count as a hit."""
    from hicache.memory import DeviceKVPool

    original_read = DeviceKVPool.read

    def corrupting_read(self, indices):
        out = original_read(self, indices)
        out[0][0, -1, 0, 0] += 1  # one element of one token of one layer
        return out

    monkeypatch.setattr(DeviceKVPool, "read", corrupting_read)
    with pytest.raises(KVIntegrityError, match="differs"):
        run_replay(_trace("conversation", 50), ReplayConfig(device="cpu"))


def test_expected_kv_distinguishes_tokens():
    from hicache.memory import DeviceKVPool

    pool = DeviceKVPool(16, 2, 2, 8, torch.float16, "cpu")
    k, v = expected_kv(torch.arange(2000, dtype=torch.int32), pool)
    flat = k.transpose(0, 1).reshape(2000, -1)
    assert torch.unique(flat, dim=0).shape[0] == 2000
    assert not torch.equal(k, v)
    assert float(k.max()) <= 255 and float(k.min()) >= 0


def test_cli_replay_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["replay", "--limit", "200", "--quiet", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 200
    assert report["hit_blocks"] == reference_hit_blocks(
        [r.hash_ids for r in load_trace(CONVERSATION, 200)], report["capacity_blocks"]
    )
    assert set(report["op_us_per_request"]) >= {"match_prefix", "cache_finished_req"}
    assert "block hit ratio" in capsys.readouterr().out


def test_cli_reports_bad_trace(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5}\n')
    assert main(["replay", "--trace", str(bad), "--quiet"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["replay", "--trace", str(tmp_path / "missing.jsonl"), "--quiet"]) == 2


def test_cli_rejects_pool_smaller_than_a_page(capsys):
    assert main(["replay", "--limit", "5", "--quiet", "--device-blocks", "0"]) == 2
    assert "no whole page" in capsys.readouterr().err
