"""hicache: a hierarchical prefix KV cache for LLM inference engines.

The radix tree core is C++ (``hicache._tree``); pools, the cache and the replay tool are Python.
"""

from hicache._tree import RadixTree
from hicache.errors import (
    HiCacheError,
    IndexOutOfRangeError,
    InvalidArgumentError,
    InvariantError,
    PoolExhaustedError,
)
from hicache.results import InsertResult, MatchResult, NodeInfo

__version__ = "0.1.0"

__all__ = [
    "HiCacheError",
    "IndexOutOfRangeError",
    "InsertResult",
    "InvalidArgumentError",
    "InvariantError",
    "MatchResult",
    "NodeInfo",
    "PoolExhaustedError",
    "RadixTree",
    "__version__",
]
