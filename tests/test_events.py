"""KV events: a subscriber that applies them in order holds the cache's contents, per medium."""

from __future__ import annotations

import pytest
import torch

from hicache.cache import HiCache
from hicache.events import AllBlocksCleared, BlockRemoved, BlockStored, Medium
from hicache.memory import DeviceKVPool
from hicache.replay import bundled_trace_path, load_trace
from hicache.replay.trace import block_tokens
from hicache.storage import block_hash, namespace_seed, page_hashes
from tests.regressions.helpers import make_cache, run_request

PAGE = 4


class Rebuilt:
    """The contents per medium, from the events alone: block hash -> the page's tokens."""

    def __init__(self) -> None:
        self.media: dict[Medium, dict[int, tuple[int, ...]]] = {m: {} for m in Medium}
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, AllBlocksCleared):
            for pages in self.media.values():
                pages.clear()
        elif isinstance(event, BlockStored):
            pages = self.media[event.medium]
            size = event.block_size
            assert len(event.token_ids) == size * len(event.block_hashes)
            for i, h in enumerate(event.block_hashes):
                assert h not in pages, f"{h} stored twice on {event.medium}"
                pages[h] = tuple(event.token_ids[i * size : (i + 1) * size])
        elif isinstance(event, BlockRemoved):
            pages = self.media[event.medium]
            for h in event.block_hashes:
                assert h in pages, f"{h} removed from {event.medium} but never stored there"
                del pages[h]


def tree_contents(cache: HiCache) -> dict[Medium, dict[int, tuple[int, ...]]]:
    """The same, from the tree itself: every node's pages, hashed along their path."""
    tree, ps = cache.tree, cache.page_size
    paths: dict[int, list[int]] = {tree.root_id: []}
    out: dict[Medium, dict[int, tuple[int, ...]]] = {m: {} for m in Medium}
    for node_id in tree.node_ids():  # parents first
        info = tree.node_info(node_id)
        parent_path = paths[info.parent_id]
        path = parent_path + tree.node_key(node_id)
        paths[node_id] = path
        digests = page_hashes(path, ps, namespace_seed(info.extra_key))
        first = len(parent_path) // ps
        own = {
            block_hash(digests[i]): tuple(path[i * ps : (i + 1) * ps])
            for i in range(first, len(digests))
        }
        if info.has_device_value and not info.load_pending:
            out[Medium.GPU].update(own)
        if info.has_host_value and not info.backup_pending:
            out[Medium.CPU].update(own)
    return out


@pytest.mark.parametrize("policy", ["write_through", "write_back", "write_through_selective"])
def test_replay_contents_rebuild_from_events_alone(policy):
    """A real trace through a small two-tier cache: evictions, demotions, load-backs, drops."""
    cache = make_cache(policy, 1024, 16384, PAGE, enable_kv_events=True)
    rebuilt = Rebuilt()
    cache.kv_events.subscribe(rebuilt)
    requests = load_trace(bundled_trace_path(), 600)
    host_hits = 0
    for i, request in enumerate(requests):
        tokens = block_tokens(request.hash_ids, 4)
        host_hits += cache.match_prefix(tokens).host_hit_length
        run_request(cache, tokens)
        if i % 100 == 0 or i == len(requests) - 1:
            assert rebuilt.media == tree_contents(cache), f"after request {i}"
    assert {type(e) for e in rebuilt.events} == {BlockStored, BlockRemoved}
    assert {e.medium for e in rebuilt.events} == {Medium.GPU, Medium.CPU}
    if policy != "write_through_selective":  # selective backs up little of this trace
        assert cache.stats.demoted_tokens > 0 and cache.stats.host_evicted_tokens > 0
        assert host_hits > 0 and cache.stats.load_back_tokens > 0  # loads: GPU stores
    cache.reset()
    assert isinstance(rebuilt.events[-1], AllBlocksCleared)
    assert rebuilt.media == tree_contents(cache) == {m: {} for m in Medium}
    cache.close()


def test_stored_events_chain_and_carry_the_namespace():
    pool = DeviceKVPool(64, 1, 1, 4, torch.float16, "cpu")
    cache = HiCache(pool, PAGE, enable_kv_events=True)
    events: list = []
    unsubscribe = cache.kv_events.subscribe(events.append)
    first = torch.arange(12, dtype=torch.int32)
    cache.insert(first, cache.alloc(12))
    longer = torch.arange(20, dtype=torch.int32)
    slots = cache.alloc(20)
    result = cache.insert(longer, slots)
    assert result.prefix_len == 12
    cache.free(slots[:12])
    cache.insert(first, cache.alloc(12), extra_key="tenant-a")
    a, b, c = events
    digests = page_hashes(longer.tolist(), PAGE)
    assert a.block_hashes == tuple(block_hash(d) for d in digests[:3])
    assert a.parent_block_hash is None and a.token_ids == tuple(range(12))
    assert b.block_hashes == tuple(block_hash(d) for d in digests[3:])
    assert b.parent_block_hash == a.block_hashes[-1] and b.token_ids == tuple(range(12, 20))
    assert b.medium is Medium.GPU and b.block_size == PAGE and b.extra_key is None
    seeded = page_hashes(first.tolist(), PAGE, namespace_seed("tenant-a"))
    assert c.block_hashes == tuple(block_hash(d) for d in seeded) and c.extra_key == "tenant-a"
    assert not set(c.block_hashes) & set(a.block_hashes)
    unsubscribe()
    cache.evict(4)
    assert len(events) == 3  # unsubscribed: nothing more delivered


def test_eviction_reports_removals_per_medium():
    cache = make_cache("write_through", 32, 32, PAGE, enable_kv_events=True)
    rebuilt = Rebuilt()
    cache.kv_events.subscribe(rebuilt)
    key = torch.arange(32, dtype=torch.int32)
    run_request(cache, key)
    assert len(rebuilt.media[Medium.GPU]) == len(rebuilt.media[Medium.CPU]) == 8
    cache.evict(32)  # demoted: gone from GPU, still on CPU
    assert rebuilt.media[Medium.GPU] == {} and len(rebuilt.media[Medium.CPU]) == 8
    assert isinstance(rebuilt.events[-1], BlockRemoved) and rebuilt.events[-1].medium is Medium.GPU
    cache.evict_host(32)
    assert rebuilt.media[Medium.CPU] == {}
    assert rebuilt.media == tree_contents(cache)
    cache.close()


def test_events_are_off_by_default():
    cache = make_cache("write_through")
    assert cache.kv_events is None
    cache.close()


def test_an_insert_stopped_at_a_pending_load_reports_only_what_the_tree_took():
    """An insert that stops at a load-pending node leaves the caller its slots from there on.

    Reporting those pages stored (at slots the tree does not own) left phantom GPU blocks that
    no BlockRemoved ever clears, and the load's ack then stored the same blocks a second time.
    """
    cache = make_cache("write_through", 64, 128, PAGE, enable_kv_events=True)
    rebuilt = Rebuilt()
    cache.kv_events.subscribe(rebuilt)
    run_request(cache, torch.arange(8, dtype=torch.int32))
    cache.evict(8)  # demoted: host-only
    match = cache.match_prefix(torch.arange(8, dtype=torch.int32), load_back=True)
    assert cache.tree.node_info(match.last_device_node).load_pending  # not acknowledged yet
    slots = cache.alloc(12)
    result = cache.insert(torch.arange(12, dtype=torch.int32), slots)
    assert result.cached_len == 0  # stopped at the pending load: the caller keeps every slot
    assert rebuilt.media == tree_contents(cache)
    cache.free(slots)
    cache.flush()  # the load's ack: its pages are stored on GPU now, once
    assert rebuilt.media == tree_contents(cache)
    assert len(rebuilt.media[Medium.GPU]) == 2
    cache.close()
