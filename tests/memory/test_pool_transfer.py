"""Tests of :class:`hicache.memory.PoolTransfer`: owned copies, immutability, validation.

DESIGN.md failure class 1: a queued transfer must never alias the caller's or the tree's tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hicache.errors import InvalidArgumentError
from hicache.memory import PoolHitPolicy, PoolTransfer


def _idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_fields_and_defaults() -> None:
    t = PoolTransfer("mamba", _idx(4, 1), _idx(7, 2))
    assert t.name == "mamba"
    assert torch.equal(t.host_indices, _idx(4, 1))
    assert torch.equal(t.device_indices, _idx(7, 2))
    assert t.keys is None and t.hit_policy is None
    assert t.num_slots == 2


def test_keys_become_a_tuple_and_policy_an_enum() -> None:
    keys = ["abc.mamba"]
    t = PoolTransfer("mamba", _idx(3), _idx(5), keys=keys, hit_policy="trailing_pages")
    assert t.keys == ("abc.mamba",)
    keys.append("other")  # the caller's list is not the transfer's
    assert t.keys == ("abc.mamba",)
    assert t.hit_policy is PoolHitPolicy.TRAILING_PAGES
    assert [p.value for p in PoolHitPolicy] == ["all_pages", "trailing_pages"]


def test_mutating_the_sources_does_not_change_the_transfer() -> None:
    host, device = _idx(10, 11, 12), _idx(0, 1, 2)
    t = PoolTransfer("swa", host, device)
    host.fill_(-1)
    device[1] = 99
    device.resize_(1)
    assert torch.equal(t.host_indices, _idx(10, 11, 12))
    assert torch.equal(t.device_indices, _idx(0, 1, 2))
    assert t.host_indices.data_ptr() != host.data_ptr()
    assert t.device_indices.data_ptr() != device.data_ptr()


def test_views_of_tree_storage_are_copied_contiguous() -> None:
    """A strided view of a larger buffer (what tree storage exposes) is cloned, not kept."""
    storage = torch.arange(20, dtype=torch.int64)
    t = PoolTransfer("mamba", storage[::2][:3], storage[10:13])
    storage.zero_()
    assert torch.equal(t.host_indices, _idx(0, 2, 4))
    assert torch.equal(t.device_indices, _idx(10, 11, 12))
    assert t.host_indices.is_contiguous() and t.device_indices.is_contiguous()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "other"),
        ("host_indices", _idx(1)),
        ("device_indices", _idx(1)),
        ("keys", ("k",)),
        ("hit_policy", PoolHitPolicy.ALL_PAGES),
    ],
)
def test_fields_cannot_be_reassigned(field: str, value: object) -> None:
    t = PoolTransfer("mamba", _idx(1), _idx(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(t, field, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(t, field)


def test_replace_builds_a_new_owned_transfer() -> None:
    t = PoolTransfer("mamba", _idx(1, 2), _idx(3, 4))
    new_device = _idx(5, 6)
    u = dataclasses.replace(t, device_indices=new_device)
    new_device.zero_()
    assert u is not t
    assert torch.equal(u.device_indices, _idx(5, 6))
    assert torch.equal(t.device_indices, _idx(3, 4))
    assert u.host_indices.data_ptr() != t.host_indices.data_ptr()


def test_empty_transfer() -> None:
    empty = torch.empty(0, dtype=torch.int64)
    assert PoolTransfer("swa", empty, empty).num_slots == 0


def test_equality_is_identity() -> None:
    t = PoolTransfer("mamba", _idx(1), _idx(2))
    assert t == t
    assert t != PoolTransfer("mamba", _idx(1), _idx(2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "name"),
        ({"name": 3}, "name"),
        ({"host_indices": [1, 2]}, "host_indices: expected a torch.Tensor"),
        ({"host_indices": _idx(1, 2).int()}, "host_indices: expected dtype torch.int64"),
        ({"device_indices": _idx(1, 2).view(1, 2)}, "device_indices: expected a 1-D"),
        ({"device_indices": _idx(1)}, "length 1 differs"),
        ({"keys": "abc"}, "keys"),
        ({"keys": ["a", 1]}, "keys: expected str keys"),
        ({"hit_policy": "some_pages"}, "hit_policy"),
        ({"hit_policy": ["all_pages"]}, "hit_policy"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    args = {"name": "mamba", "host_indices": _idx(1, 2), "device_indices": _idx(3, 4)}
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        PoolTransfer(**args)


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        PoolTransfer("mamba", _idx(1), _idx(1, 2))


@pytest.mark.cuda
def test_cuda_indices_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="device_indices: expected a CPU tensor"):
        PoolTransfer("mamba", _idx(1), _idx(1).cuda())
