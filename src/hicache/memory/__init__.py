"""KV memory: the paged slot allocator, the device KV pool and the host (L2) KV pool."""

from hicache.memory.allocator import PageAllocator
from hicache.memory.device_pool import DeviceKVPool
from hicache.memory.host_pool import HostKVPool, HostLayout

__all__ = ["DeviceKVPool", "HostKVPool", "HostLayout", "PageAllocator"]
