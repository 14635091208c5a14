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
