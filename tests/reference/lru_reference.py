"""The block-level LRU prefix-cache rule of ``shared/traces/README.md``, written plainly.

Used to check that ``hicache replay`` reproduces the reference hit counts. Deliberately a flat
OrderedDict over block ids (ids are chained in the Mooncake traces, so an id stands for its prefix).
"""

from __future__ import annotations

from collections import OrderedDict


def reference_hit_blocks(requests: list[tuple[int, ...]], capacity_blocks: int) -> int:
    """Replays block-id lists with the README's rule and returns the total hit blocks."""
    cache: OrderedDict[int, None] = OrderedDict()  # last = most recently used
    hits = 0
    for ids in requests:
        h = 0
        while h < len(ids) and ids[h] in cache:
            h += 1
        hits += h
        for block in reversed(ids):  # last block first, first block last
            cache[block] = None
            cache.move_to_end(block)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return hits
