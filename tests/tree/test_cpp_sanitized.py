"""The C++ tree core under AddressSanitizer + UBSan, driven by random operations.

Builds ``cpp/tests/random_ops.cc`` with ``HICACHE_SANITIZE=ON`` and runs it: thousands of random
insert/match/lock/unlock/evict steps with ``check_invariants()`` after each, so a use-after-free,
a leak or undefined behaviour in the core fails here even when the Python-level tests pass.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def random_ops_binary(tmp_path_factory):
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("needs cmake and a C++ compiler")
    build = tmp_path_factory.mktemp("asan-build")
    configure = [
        "cmake",
        "-S",
        str(REPO_ROOT),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Debug",
        "-DHICACHE_SANITIZE=ON",
        "-DHICACHE_BUILD_CPP_TESTS=ON",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, capture_output=True)
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "hicache_random_ops"],
        check=True,
        capture_output=True,
    )
    return build / "hicache_random_ops"


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_are_clean_under_asan_and_ubsan(random_ops_binary, seed):
    result = subprocess.run(
        [str(random_ops_binary), "2000", str(seed)],
        capture_output=True,
        text=True,
        env={
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
            "ASAN_OPTIONS": "detect_leaks=1",
        },
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ok" in result.stdout
