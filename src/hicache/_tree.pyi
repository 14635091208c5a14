"""Typed stub of the Cython wrapper around the C++ radix tree core (``cpp/``)."""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

TokenSeq = Sequence[int] | torch.Tensor | np.ndarray | memoryview

class MatchResult(NamedTuple):
    device_indices: torch.Tensor
    last_device_node: int
    last_host_node: int
    best_match_node: int
    host_hit_length: int
    @property
    def device_prefix_len(self) -> int: ...

class InsertResult(NamedTuple):
    prefix_len: int
    last_node: int

class NodeInfo(NamedTuple):
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

class RadixTree:
    page_size: int
    num_device_slots: int
    root_id: int
    def __init__(self, page_size: int = 1, num_device_slots: int = 0) -> None: ...
    def match_prefix(self, key: TokenSeq, extra_key: str | None = None) -> MatchResult: ...
    def insert(
        self, key: TokenSeq, value: TokenSeq, extra_key: str | None = None
    ) -> InsertResult: ...
    def inc_lock_ref(self, node_id: int) -> int: ...
    def dec_lock_ref(self, node_id: int) -> int: ...
    def evict(self, num_tokens: int) -> torch.Tensor: ...
    def evictable_size(self) -> int: ...
    def protected_size(self) -> int: ...
    def total_size(self) -> int: ...
    def num_nodes(self) -> int: ...
    def contains_node(self, node_id: int) -> bool: ...
    def node_info(self, node_id: int) -> NodeInfo: ...
    def all_device_indices(self) -> torch.Tensor: ...
    def reset(self) -> torch.Tensor: ...
    def pretty_print(self) -> str: ...
    def check_invariants(self) -> None: ...
