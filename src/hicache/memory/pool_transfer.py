"""The transfer record of one extra (non-KV) pool of a hybrid model (SGLang's ``PoolTransfer``).

A hybrid model keeps, next to the full-attention KV, other per-node state: the sliding-window KV
of its SWA layers, the conv and temporal states of its Mamba layers. A backup (device -> host) or
a load-back (host -> device) of a node moves that state too, one :class:`PoolTransfer` per extra
pool, carried by the cache operation next to the KV indices.

Why the record copies its tensors and cannot be changed (DESIGN.md failure class 1): SGLang once
moved a queued transfer's indices to the GPU *in place*; the tree node that still referenced the
same object then held GPU indices, and a later host eviction freed them in the host pool. Here a
transfer owns clones of its index tensors from construction on, and its fields cannot be
reassigned: code that needs other indices (on the device, merged, ...) builds a new record
(``dataclasses.replace`` does, and clones again). Nobody writes into the tensors of a transfer.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hicache.errors import InvalidArgumentError

__all__ = ["PoolHitPolicy", "PoolTransfer"]


class PoolHitPolicy(str, enum.Enum):
    """Which storage (L3) pages of an extra pool a prefix hit needs (SGLang's ``PoolHitPolicy``).

    Values are SGLang's strings.
    """

    # Every page of the hit must exist in the pool (e.g. a per-token indexer buffer).
    ALL_PAGES = "all_pages"
    # Only the last pages must exist: a Mamba state at the end of the prefix, an SWA window.
    TRAILING_PAGES = "trailing_pages"


def _owned_indices(value: object, name: str) -> torch.Tensor:
    """Checks ``[n]`` int64 CPU indices and returns a contiguous copy that nobody else holds."""
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(
            f"PoolTransfer: {name}: expected a torch.Tensor, got {type(value).__name__}"
        )
    if value.dtype != torch.int64:
        raise InvalidArgumentError(
            f"PoolTransfer: {name}: expected dtype torch.int64, got {value.dtype}"
        )
    if value.device.type != "cpu":
        raise InvalidArgumentError(
            f"PoolTransfer: {name}: expected a CPU tensor, got device {value.device}"
        )
    if value.dim() != 1:
        raise InvalidArgumentError(
            f"PoolTransfer: {name}: expected a 1-D tensor, got {value.dim()}-D"
        )
    return value.clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True, eq=False)
class PoolTransfer:
    """The slots of one extra pool that a backup or load-back moves, owned by the transfer.

    Slot ``device_indices[i]`` pairs with slot ``host_indices[i]``; what a slot is depends on the
    pool: one token of the SWA KV pool, one state of the Mamba pool. Immutable: the fields cannot
    be reassigned, and the index tensors are clones made by the constructor, so a transfer never
    aliases the caller's tensors or tree state (DESIGN.md failure class 1). Two transfers compare
    equal only when they are the same object (tensors have no boolean ``==``).

    Attributes:
        name: the pool, e.g. ``"mamba"`` or ``"swa"``; non-empty.
        host_indices: ``[n]`` int64 CPU host slot indices, owned by the transfer.
        device_indices: ``[n]`` int64 CPU device slot indices, owned by the transfer. The
            transfer functions copy them to the device on the stream that runs the copy
            (DESIGN.md failure class 2); the record itself stays on the CPU.
        keys: storage (L3) keys of the pool's pages for the host <-> storage path, e.g.
            ``"{last_page_hash}.mamba"``; ``None`` when there is no storage tier. A tuple, copied
            from the given sequence.
        hit_policy: how a storage prefix hit counts this pool's pages; ``None`` when there are no
            keys to look up.

    Raises:
        InvalidArgumentError: ``name`` is not a non-empty str; an index tensor is not a 1-D
            int64 CPU tensor; the two lengths differ; ``keys`` is not a
            sequence of str; ``hit_policy`` is not a :class:`PoolHitPolicy` value.
    """

    name: str
    host_indices: torch.Tensor
    device_indices: torch.Tensor
    keys: tuple[str, ...] | None = None
    hit_policy: PoolHitPolicy | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgumentError(
                f"PoolTransfer: name: expected a non-empty str, got {self.name!r}"
            )
        host = _owned_indices(self.host_indices, "host_indices")
        device = _owned_indices(self.device_indices, "device_indices")
        if host.numel() != device.numel():
            raise InvalidArgumentError(
                f"PoolTransfer: device_indices: length {device.numel()} differs from "
                f"host_indices length {host.numel()}"
            )
        keys = self.keys
        if keys is not None:
            if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
                raise InvalidArgumentError(
                    f"PoolTransfer: keys: expected a sequence of str, got {type(keys).__name__}"
                )
            keys = tuple(keys)
            bad = [k for k in keys if not isinstance(k, str)]
            if bad:
                raise InvalidArgumentError(
                    f"PoolTransfer: keys: expected str keys, got {type(bad[0]).__name__}"
                )
        policy = self.hit_policy
        if policy is not None:
            try:
                policy = PoolHitPolicy(policy)
            except (ValueError, TypeError):
                values = [p.value for p in PoolHitPolicy]
                raise InvalidArgumentError(
                    f"PoolTransfer: hit_policy: expected one of {values} or None, got {policy!r}"
                ) from None
        # The only writes to the fields, before anyone else can see the object.
        object.__setattr__(self, "host_indices", host)
        object.__setattr__(self, "device_indices", device)
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "hit_policy", policy)

    @property
    def num_slots(self) -> int:
        """Slots moved, ``n``."""
        return int(self.host_indices.numel())
