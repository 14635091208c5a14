"""Memory: the paged slot allocator, the KV pools and the extra pools of hybrid models.

KV: :class:`DeviceKVPool`, :class:`HostKVPool`. Hybrid models: Mamba states
(:class:`MambaStatePool`, :class:`MambaHostPool`), sliding-window KV (:class:`SWAKVPool`, backed
up by a :class:`HostKVPool`), and the :class:`PoolTransfer` record of an extra pool's copies.
"""

from hicache.memory.allocator import PageAllocator
from hicache.memory.device_pool import DeviceKVPool
from hicache.memory.host_pool import HostKVPool, HostLayout
from hicache.memory.mamba_pool import MambaHostPool, MambaStatePool, MambaTransferIndices
from hicache.memory.pool_transfer import PoolHitPolicy, PoolTransfer
from hicache.memory.swa_pool import SWAKVPool

__all__ = [
    "DeviceKVPool",
    "HostKVPool",
    "HostLayout",
    "MambaHostPool",
    "MambaStatePool",
    "MambaTransferIndices",
    "PageAllocator",
    "PoolHitPolicy",
    "PoolTransfer",
    "SWAKVPool",
]
