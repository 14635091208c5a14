"""hicache: a hierarchical prefix KV cache for LLM inference engines.

The radix tree core is C++ (``hicache._tree``); pools, the cache, its controller and the replay tool
are Python.
"""

from hicache._tree import RadixTree
from hicache.cache import HiCache, Req
from hicache.controller import CacheController, CacheOperation
from hicache.errors import (
    HiCacheError,
    IndexOutOfRangeError,
    InvalidArgumentError,
    InvariantError,
    PoolExhaustedError,
    TransferError,
)
from hicache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventPublisher,
    Medium,
)
from hicache.results import (
    EvictResult,
    InsertResult,
    LockReceipt,
    MatchResult,
    NodeInfo,
    TransferPlan,
)
from hicache.transfer import KVTransfer, available_backends

__version__ = "0.1.0"

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "CacheController",
    "CacheOperation",
    "EvictResult",
    "HiCache",
    "HiCacheError",
    "IndexOutOfRangeError",
    "InsertResult",
    "InvalidArgumentError",
    "InvariantError",
    "KVEventPublisher",
    "KVTransfer",
    "LockReceipt",
    "MatchResult",
    "Medium",
    "NodeInfo",
    "PoolExhaustedError",
    "RadixTree",
    "Req",
    "TransferError",
    "TransferPlan",
    "__version__",
    "available_backends",
]
