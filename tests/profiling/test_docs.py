"""profiling/README.md documents the ranges exactly as hicache.profiling defines them."""

from __future__ import annotations

import re

from hicache import profiling
from tests.conftest import REPO_ROOT

README = REPO_ROOT / "profiling" / "README.md"


def test_readme_lists_every_range_with_the_nesting_of_profiling_py():
    """profiling/README.md's table of ranges says what NESTING says, for every stage."""
    documented: dict[str, frozenset[str | None]] = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(\w+)`", cells[0]) if len(cells) >= 3 else None
        if match is None:
            continue
        parents: set[str | None] = set(re.findall(r"`(\w+)`", cells[1]))
        if "outermost" in cells[1]:
            parents.add(None)
        documented[match.group(1)] = frozenset(parents)
    assert documented == profiling.NESTING
