"""The NVTX stage names of C++ (cpp/include/hicache/nvtx.h) and Python (profiling.py) agree."""

from __future__ import annotations

import re

from hicache import profiling
from tests.conftest import REPO_ROOT

NVTX_HEADER = REPO_ROOT / "cpp" / "include" / "hicache" / "nvtx.h"


def test_cpp_stage_names_are_the_python_ones():
    text = NVTX_HEADER.read_text()
    names = re.findall(r'inline constexpr const char\* k\w+ = "(\w+)";', text)
    domain = re.search(r'static constexpr const char\* name\{"(\w+)"\};', text)
    assert domain is not None and domain.group(1) == profiling.DOMAIN
    assert names and sorted(names) == sorted(profiling.CPP_STAGES)
    assert set(profiling.CPP_STAGES) <= set(profiling.STAGES)
    assert len(set(profiling.STAGES)) == len(profiling.STAGES)


def test_nesting_names_every_stage_and_only_listed_parents():
    assert list(profiling.NESTING) == list(profiling.STAGES)
    parents = set().union(*profiling.NESTING.values())
    assert parents <= set(profiling.STAGES) | {None}
    assert set(profiling.WORKER_STAGES) <= set(profiling.STAGES) - set(profiling.CPP_STAGES)
    # C++ ranges open only inside the Python range that launches them, never outermost.
    assert all(None not in profiling.NESTING[name] for name in profiling.CPP_STAGES)
