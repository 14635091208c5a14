"""hicache replay with the storage (L3) tier: a second process hits what the first stored.

Each replay runs in its own Python process (as two engine restarts would) against the same file
backend directory; every hit's KV, L3 hits included, is read back and compared with the KV the
replay writes for those tokens, so a page read from the wrong key or a corrupt page would fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

ARGS = ["--limit", "120", "--hicache-ratio", "1", "--device-ratio", "0.2", "--quiet"]
ARGS += ["--hicache-mem-layout", "page_first", "--check-every", "40"]


def _replay(tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    config = json.dumps({"path": str(tmp_path / "storage"), "prefetch_threshold": 16})
    argv = [sys.executable, "-m", "hicache.cli", "replay", *ARGS, "--json", str(out)]
    argv += ["--hicache-storage-backend", "file", "--hicache-storage-backend-extra-config", config]
    subprocess.run([*argv, *extra], check=True, cwd=REPO_ROOT, capture_output=True, timeout=120)
    return json.loads(out.read_text())


@pytest.mark.parametrize("policy", ["wait_complete", "timeout"])
def test_a_second_process_hits_l3_and_the_kv_is_intact(tmp_path, policy):
    first = _replay(tmp_path, "first", "--hicache-storage-prefetch-policy", policy)
    stored = first["storage_stats"]["controller"]["backup_pages"]
    assert stored > 0
    assert first["verified_tokens"] == first["hit_blocks"] * first["config"]["block_tokens"]

    second = _replay(tmp_path, "second", "--hicache-storage-prefetch-policy", policy)
    assert second["storage_hit_blocks"] > 0
    assert second["hit_blocks"] == (
        second["device_hit_blocks"] + second["host_hit_blocks"] + second["storage_hit_blocks"]
    )
    assert second["hit_blocks"] > first["hit_blocks"]
    # Every hit, the L3 ones included, was read back and compared after its load-back.
    assert second["verified_tokens"] == second["hit_blocks"] * second["config"]["block_tokens"]
    backend = second["storage_stats"]["backend"]
    assert backend["corrupt_pages"] == 0 and backend["failed_ops"] == 0
    assert second["metrics"]["hicache_hit_tokens_total{component=full,tier=L3}"] > 0


def test_storage_needs_the_host_tier(tmp_path):
    argv = [sys.executable, "-m", "hicache.cli", "replay", "--limit", "5", "--quiet"]
    argv += ["--hicache-storage-backend", "file"]
    argv += ["--hicache-storage-backend-extra-config", json.dumps({"path": str(tmp_path)})]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "host tier" in done.stderr


@pytest.mark.parametrize("model", ["swa-hybrid", "swa-mamba-hybrid"])
def test_a_second_swa_process_hits_l3_and_every_window_is_intact(tmp_path, model):
    extra = ("--model", model, "--hicache-storage-prefetch-policy", "wait_complete")
    first = _replay(tmp_path, "first", *extra)
    assert first["storage_stats"]["controller"]["backup_swa_pages"] > 0
    second = _replay(tmp_path, "second", *extra)
    assert second["storage_hit_blocks"] > 0
    assert second["storage_stats"]["controller"]["prefetch_swa_pages"] > 0
    # Every hit's KV and the SWA KV of its last window (the L3 hits' read from storage, then
    # loaded back) were compared with what the replay writes for those tokens.
    assert second["verified_tokens"] == second["hit_blocks"] * second["config"]["block_tokens"]
    assert second["swa_verified_tokens"] > 0
    assert second["storage_stats"]["swa_backend"]["corrupt_pages"] == 0
