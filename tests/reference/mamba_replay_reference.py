"""The ``mamba-hybrid`` hit rule, replayed on the pure-Python reference model (device tier).

The same engine loop as ``hicache replay --model mamba-hybrid`` without a host tier
(``hicache.replay.runner``), call for call, on :class:`tests.reference.model.ReferenceTree`
instead of the C++ tree: match (the validated prefix is the hit) -> lock -> fork the state (the
state pool evicts when it has no free slot) -> allocate the missing KV (evicting LRU pages) ->
allocate the extra checkpoint states -> insert the key -> publish the checkpoints (the last
complete block, the branching point) -> unlock. Slot counts stand in for the allocators: the
pools are full when the tree and the request hold every slot.
"""

from __future__ import annotations

from hicache.replay.runner import checkpoint_positions
from hicache.replay.trace import TraceRequest, block_tokens
from tests.reference.model import ReferenceTree


class _Match:
    """The fields of a MatchResult that checkpoint_positions reads."""

    def __init__(self, device_prefix_len: int, mamba_branching_seqlen: int) -> None:
        self.device_prefix_len = device_prefix_len
        self.mamba_branching_seqlen = mamba_branching_seqlen


def mamba_hit_blocks(
    requests: list[TraceRequest], capacity_blocks: int, num_states: int, bt: int
) -> int:
    """Hit blocks of a device-only ``mamba-hybrid`` replay (page size = ``bt`` tokens)."""
    tree = ReferenceTree(page_size=bt, mamba=True)
    capacity = capacity_blocks * bt
    next_slot = 0  # fresh slot ids: only counts matter here
    hits = 0

    def free_kv() -> int:
        return capacity - tree.total_size()

    def free_states(held: int) -> int:
        return num_states - len(tree.all_mamba_slots()) - held

    def alloc_states(n: int, held: int) -> list[int]:
        nonlocal next_slot
        missing = n - free_states(held)
        if missing > 0:
            tree.evict_mamba(missing)
        assert free_states(held) >= n, "the replay would raise PoolExhaustedError"
        next_slot += n
        return list(range(next_slot - n, next_slot))

    for request in requests:
        key = block_tokens(request.hash_ids, bt).tolist()
        m = tree.match_prefix(key)
        hit = m.device_len
        hits += hit // bt
        lock = tree.lock(key[:hit])
        (working,) = alloc_states(1, held=0)  # fork_mamba: a copy, or a zeroed root state
        need = len(key) - hit
        if need > free_kv():
            tree.evict(need - free_kv())
        assert need <= free_kv(), "the replay would raise PoolExhaustedError"
        value = list(range(next_slot, next_slot + len(key)))
        next_slot += len(key)
        positions = checkpoint_positions(request, _Match(hit, m.mamba_branching_seqlen), bt, bt)
        states = [working, *alloc_states(len(positions) - 1, held=1)] if positions else []
        tree.insert(key, value)
        for position, state in zip(positions, states, strict=True):
            tree.insert(key[:position], value[:position], mamba_value=state)
        tree.unlock(key[:hit], mamba_locked=lock.mamba_locked)
    return hits
