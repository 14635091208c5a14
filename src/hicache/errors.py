"""Exception types raised by hicache.

Every error hicache raises on purpose is a :class:`HiCacheError`. Each subclass also inherits the
standard exception a caller would expect (pyarrow's ``ArrowInvalid(ValueError, ArrowException)``
pattern), so ``except ValueError`` keeps working for code that does not know hicache.

The C++ tree core throws standard exceptions; the Cython layer translates them:
``std::invalid_argument`` -> :class:`InvalidArgumentError`, ``std::out_of_range`` ->
:class:`IndexOutOfRangeError`, anything else (a broken invariant: our bug) ->
:class:`InvariantError`.
"""

from __future__ import annotations


class HiCacheError(Exception):
    """Base class of every error hicache raises on purpose."""


class InvalidArgumentError(HiCacheError, ValueError):
    """A caller passed a bad argument: wrong dtype, device, shape, length or value.

    The call had no effect: the cache is unchanged.
    """


class IndexOutOfRangeError(HiCacheError, IndexError):
    """A slot index, page index or node id is out of range or unknown.

    The call had no effect: the cache is unchanged.
    """


class InvariantError(HiCacheError, RuntimeError):
    """An internal invariant is broken. This is a bug in hicache, never a caller mistake."""


class PoolExhaustedError(HiCacheError, RuntimeError):
    """A pool has too few free slots for an allocation, even after evicting everything evictable.

    The allocation had no effect: nothing was allocated and nothing beyond what was evictable was
    evicted.
    """


class TransferError(HiCacheError, RuntimeError):
    """A host <-> device copy failed in the controller's worker or stream.

    Attributes:
        ack_ids: the ack ids (node ids) of every operation of the failed batch; the cache undoes
            them in the tree.
    """

    def __init__(self, message: str, ack_ids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ack_ids = tuple(ack_ids)


class StorageError(HiCacheError, RuntimeError):
    """A storage (L3) backend could not do an operation: server down, timeout, disk full, ...

    The message names the backend (``file at /path`` or ``valkey at host:port``), the operation and
    the cause. The operation left no partial state: no page of the host pool was written with
    unverified bytes, and no partially written value is visible in storage.

    Attributes:
        backend: the backend's description, e.g. ``"valkey at 127.0.0.1:6379"``.
    """

    def __init__(self, message: str, backend: str = "") -> None:
        super().__init__(message)
        self.backend = backend
