"""Memory: the paged slot allocator, the KV pools and the transfer records of extra pools.

KV: :class:`DeviceKVPool`, :class:`HostKVPool`. Hybrid models: the :class:`PoolTransfer` record of
an extra pool's copies.
"""

from hicache.memory.allocator import PageAllocator
from hicache.memory.device_pool import DeviceKVPool
from hicache.memory.host_pool import HostKVPool, HostLayout
from hicache.memory.pool_transfer import PoolHitPolicy, PoolTransfer

__all__ = [
    "DeviceKVPool",
    "HostKVPool",
    "HostLayout",
    "PageAllocator",
    "PoolHitPolicy",
    "PoolTransfer",
]
