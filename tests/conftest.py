"""Shared pytest configuration: markers that skip with a reason naming what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO_ROOT.parent / "shared" / "traces"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        # The marker, not ``item.keywords``: keywords include directory names (tests/cuda/).
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)
