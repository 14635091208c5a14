"""Device-tier memory: the paged slot allocator and the KV pool it indexes."""

from hicache.memory.allocator import PageAllocator
from hicache.memory.device_pool import DeviceKVPool

__all__ = ["DeviceKVPool", "PageAllocator"]
