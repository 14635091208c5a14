"""profiling/capture.sh: the nsys command it runs, its refusal without nsys (no Nsight needed)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "profiling" / "capture.sh"

# Stands in for nsys: logs each call, and runs the profiled command (what follows the options).
STUB_NSYS = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$NSYS_STUB_LOG"
if [[ $1 == profile ]]; then
  shift
  while [[ $1 == --* ]]; do shift; done
  exec "$@"
fi
"""


def _capture(tmp_path, nsys: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NSYS=nsys, PYTHON=sys.executable)
    env["NSYS_STUB_LOG"] = str(tmp_path / "nsys.log")
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_capture_profiles_the_default_replay_with_cuda_nvtx_and_osrt(tmp_path):
    stub = tmp_path / "nsys"
    stub.write_text(STUB_NSYS)
    stub.chmod(0o755)
    report = tmp_path / "out" / "rep"
    proc = _capture(tmp_path, str(stub), "-o", str(report))
    assert proc.returncode == 0, proc.stderr
    profile, stats = (tmp_path / "nsys.log").read_text().splitlines()
    options, command = profile.split(f" {sys.executable} ")
    assert options.split() == [
        "profile",
        "--trace=cuda,nvtx,osrt",
        "--sample=none",
        "--cpuctxsw=none",
        f"--output={report}",
        "--force-overwrite=true",
    ]
    assert command.startswith("-m hicache.cli replay ")
    assert "block hit ratio" in proc.stdout  # the default replay ran, and its arguments are valid
    assert stats == f"stats --report nvtx_sum {report}.nsys-rep"


def test_capture_passes_a_given_command_through(tmp_path):
    stub = tmp_path / "nsys"
    stub.write_text(STUB_NSYS)
    stub.chmod(0o755)
    proc = _capture(tmp_path, str(stub), "--", sys.executable, "-c", "print('profiled')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "profiled"
    assert "--output=hicache_replay " in (tmp_path / "nsys.log").read_text()


def test_capture_refuses_without_nsys_and_says_why(tmp_path):
    proc = _capture(tmp_path, str(tmp_path / "no-nsys-here"))
    assert proc.returncode == 127
    assert "Nsight Systems CLI) was not found" in proc.stderr and "NSYS=" in proc.stderr
    assert not (tmp_path / "nsys.log").exists() and proc.stdout == ""


def test_capture_rejects_an_unknown_option(tmp_path):
    proc = _capture(tmp_path, "nsys", "--bogus")
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr
