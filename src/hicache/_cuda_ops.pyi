"""Typed stub of hicache._cuda_ops, the CUDA transfer kernels (cuda/bindings.cpp)."""

import enum

class HostLayout(enum.Enum):
    layer_first = 0
    page_first = 1
    page_first_direct = 2

class Direction(enum.Enum):
    device_to_host = 0
    host_to_device = 1

class TransferParams:
    """What one launch copies; fields as in cuda/transfer.h (bytes, tokens)."""

    device_buffers: list[int]
    host_buffers: list[int]
    @property
    def num_buffers(self) -> int: ...
    device_indices: int
    host_indices: int
    num_tokens: int
    row_bytes: int
    device_num_slots: int
    host_num_slots: int
    num_layers: int
    layer_begin: int
    layer_end: int
    page_size: int
    def __init__(self) -> None: ...

def transfer(
    params: TransferParams, layout: HostLayout, direction: Direction, stream: int
) -> int: ...
def emulate_transfer(params: TransferParams, layout: HostLayout, direction: Direction) -> None: ...
def device_count() -> int: ...
def device_error() -> str: ...
