"""Result records returned by the tree (:mod:`hicache._tree`) and the cache (:mod:`hicache.cache`).

Plain ``NamedTuple``s: cheap to build on the request path, and familiar to SGLang users
(``MatchResult`` has the fields of SGLang 0.5.23's ``MatchResult`` that apply).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MatchResult(NamedTuple):
    """The longest cached prefix of a key.

    Attributes:
        device_indices: ``[device_prefix_len]`` int64 CPU tensor, the device KV slots of the matched
            prefix in token order. Owned by the caller (a copy of tree state, never a view of it).
        last_device_node: id of the deepest matched node whose KV is on device. The node to lock.
        last_host_node: id of the deepest matched node whose KV is on device or host.
        best_match_node: id of the deepest node every component accepts; the only valid anchor
            for an L2 load-back (DESIGN.md failure class 4).
        host_hit_length: tokens matched on host only, below ``last_device_node``.
    """

    device_indices: torch.Tensor
    last_device_node: int
    last_host_node: int
    best_match_node: int
    host_hit_length: int

    @property
    def device_prefix_len(self) -> int:
        """Matched tokens with device KV: ``len(device_indices)``, a multiple of page_size."""
        return int(self.device_indices.shape[0])


class InsertResult(NamedTuple):
    """Outcome of an insert.

    Attributes:
        prefix_len: tokens of the page-aligned key that were already cached. The caller owns its
            own slots for them (``value[:prefix_len]``) and must free those it does not need.
        last_node: id of the node that ends the inserted key.
    """

    prefix_len: int
    last_node: int


class NodeInfo(NamedTuple):
    """A snapshot of one node's bookkeeping, for tests and debugging (not the request path)."""

    node_id: int
    parent_id: int
    num_tokens: int
    num_children: int
    lock_ref: int
    host_ref_counter: int
    hit_count: int
    last_access_time: int
    has_device_value: bool
    extra_key: str | None
