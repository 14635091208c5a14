"""The ``swa-hybrid`` hit rule, replayed on the pure-Python reference model (device tier).

The same engine loop as ``hicache replay --model swa-hybrid`` without a host tier
(``hicache.replay.runner``, ``_SWAModel``), call for call, on
:class:`tests.reference.model.ReferenceTree` instead of the C++ tree: match (the validated prefix
is the hit) -> lock -> allocate the missing KV (evicting LRU pages when the full pool is short, then
SWA KV when the SWA pool is short) -> a request whose match stopped at an SWA tombstone caches its
prefix up to that branching point with its window live (free the SWA KV before that window, insert,
re-match, lock the new end, unlock the old) -> free the SWA KV before the window ending at the last
complete block of input -> insert the key with that frontier -> unlock. Slot counts stand in for
the allocators: the full pool is full when the tree and the request hold every slot; the SWA pool
when the tree's live SWA tokens fill it (the request maps its slots only after its own alloc).
"""

from __future__ import annotations

from hicache.replay.trace import TRACE_BLOCK_TOKENS, TraceRequest, block_tokens
from tests.reference.model import ReferenceTree


def swa_hit_blocks(
    requests: list[TraceRequest], capacity_blocks: int, swa_slots: int, window: int, bt: int
) -> int:
    """Hit blocks of a device-only ``swa-hybrid`` replay (page size = ``bt`` tokens)."""
    tree = ReferenceTree(page_size=bt, sliding_window_size=window)
    capacity = capacity_blocks * bt
    keep = -(-max(window, bt) // bt) * bt  # the window free_swa_out_of_window keeps live
    next_slot = 0
    hits = 0

    def frontier(seqlen: int) -> int:
        return max(seqlen - keep, 0) // bt * bt

    for request in requests:
        key = block_tokens(request.hash_ids, bt).tolist()
        m = tree.match_prefix(key)
        hit = m.device_len
        hits += hit // bt
        locked = key[:hit]
        lock = tree.lock(locked)
        need = len(key) - hit
        free_kv = capacity - tree.total_size()
        if need > free_kv:
            tree.evict(need - free_kv)
        assert need <= capacity - tree.total_size(), "the replay would raise PoolExhaustedError"
        free_swa = swa_slots - len(tree.all_swa_slots())
        if need > free_swa:
            tree.evict_swa(need - free_swa)
        assert need <= swa_slots - len(tree.all_swa_slots()), "SWA pool exhausted"
        value = m.device_slots + list(range(next_slot, next_slot + need))
        next_slot += need
        prefix_len, evicted = hit, 0
        branch = max(m.swa_branching_seqlen, 0) // bt * bt
        if branch > hit:  # the branch checkpoint (cache_unfinished_req of the prefix)
            if frontier(branch) > hit:
                evicted = frontier(branch)
            tree.insert(key[:branch], value[:branch], swa_evicted_seqlen=evicted)
            again = tree.match_prefix(key[:branch])
            assert again.device_len == branch
            new_lock = tree.lock(key[:branch])
            tree.unlock(locked, swa_lock_tokens=lock.swa_lock_tokens)
            locked, lock = key[:branch], new_lock
            value[:branch] = again.device_slots
            prefix_len = branch
            evicted = max(evicted, branch)
        complete = min(request.input_length // TRACE_BLOCK_TOKENS, len(request.hash_ids))
        end = frontier(complete * bt)
        if end > max(evicted, prefix_len):
            evicted = end
        tree.insert(key, value, swa_evicted_seqlen=evicted)
        tree.unlock(locked, swa_lock_tokens=lock.swa_lock_tokens)
    return hits
