"""The two-level (device + host, write-through) block-level rule ``hicache replay`` must reproduce.

Written plainly over block ids (ids are chained in the Mooncake traces, so an id stands for its
prefix), independently of the tree. The rule is stated in README.md ("Two-level hit rule"):

1. Lookup: ``h1`` = leading blocks on device; then ``h2`` = following blocks on host (host-only).
2. The ``h2`` blocks are loaded back (they are on device and host afterwards).
3. Touch every block of the request on device, last block first, inserting the missing ones.
4. While more than ``D`` blocks are on device, evict the least recently used device block (a
   leaf). It has a host copy, so it is demoted: it becomes the most recently used host-only block.
5. Write-through: every device block without a host copy gets one. While that would put more than
   ``H`` blocks on host, first evict the least recently used host-only block (a leaf).

Valid while no request is longer than ``D`` blocks and ``H >= D`` (then every backup fits).
"""

from __future__ import annotations

from collections import OrderedDict


def two_level_hit_blocks(
    requests: list[tuple[int, ...]], device_blocks: int, host_blocks: int
) -> tuple[int, int]:
    """Replays block-id lists with the two-level rule; returns ``(device hits, host hits)``."""
    assert host_blocks >= device_blocks
    device: OrderedDict[int, None] = OrderedDict()  # last = most recently used
    host: set[int] = set()  # every block with a host copy
    host_only: OrderedDict[int, None] = OrderedDict()  # host copies not on device, LRU order
    l1 = l2 = 0
    for ids in requests:
        h1 = 0
        while h1 < len(ids) and ids[h1] in device:
            h1 += 1
        h2 = h1
        while h2 < len(ids) and ids[h2] in host_only:
            h2 += 1
        l1 += h1
        l2 += h2 - h1
        for block in ids[h1:h2]:  # load-back
            del host_only[block]
        for block in reversed(ids):
            device[block] = None
            device.move_to_end(block)
        while len(device) > device_blocks:
            victim, _ = device.popitem(last=False)
            assert victim in host  # write-through backed it up when it was inserted
            host_only[victim] = None
        for block in ids:
            if block not in host:
                while len(host) >= host_blocks:
                    evicted, _ = host_only.popitem(last=False)
                    host.remove(evicted)
                host.add(block)
    return l1, l2
