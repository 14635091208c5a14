"""HiCache with a Mamba state pool: copy-on-write, checkpoints, state eviction, slot ownership."""

from __future__ import annotations

import pytest
import torch

from hicache.cache import HiCache, Req
from hicache.errors import InvalidArgumentError, PoolExhaustedError, TransferError
from hicache.memory import DeviceKVPool, HostKVPool, MambaHostPool, MambaStatePool

PAGE = 4


def make_cache(num_states: int = 4) -> HiCache:
    pool = DeviceKVPool(128, 1, 1, 4, torch.float16, "cpu")
    states = MambaStatePool(num_states, 2, (3, 2), (2, 2), torch.float32, torch.float32, "cpu")
    return HiCache(pool, PAGE, mamba_pool=states)


def state_of(cache: HiCache, slot: int) -> torch.Tensor:
    conv, temporal = cache.mamba_pool.read(torch.tensor([slot]))
    return torch.cat((conv.flatten(), temporal.flatten()))


def write_state(cache: HiCache, slot: int, value: float) -> None:
    conv, temporal = cache.mamba_pool.read(torch.tensor([slot]))
    cache.mamba_pool.write(torch.tensor([slot]), conv.fill_(value), temporal.fill_(value + 0.5))


def serve(cache: HiCache, tokens: list[int], checkpoints: dict[int, float]) -> tuple[int, int]:
    """One request: match, lock, fork, compute, publish; returns (hit tokens, forked-from value)."""
    key = torch.tensor(tokens, dtype=torch.int32)
    m = cache.match_prefix(key)
    receipt = cache.inc_lock_ref(m.last_device_node)
    working = cache.fork_mamba(m.last_device_node)
    seen = float(state_of(cache, working)[0])
    hit = m.device_prefix_len
    slots = cache.alloc(len(tokens) - hit)
    published = []
    for num_tokens, value in sorted(checkpoints.items()):
        slot = int(cache.alloc_mamba(1)[0])
        write_state(cache, slot, value)
        published.append((num_tokens, slot))
    cache.free_mamba(torch.tensor([working]))
    req = Req(
        key,
        kv_indices=torch.cat((m.device_indices, slots)),
        last_node=receipt.node_id,
        prefix_len=hit,
        mamba_node_id=receipt.mamba_node_id,
        mamba_checkpoints=published,
    )
    cache.cache_finished_req(req)
    cache.check_invariants(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    return hit, seen


def test_requests_continue_from_published_checkpoints_through_copies():
    cache = make_cache()
    first = list(range(12))
    assert serve(cache, first, {8: 1.0, 12: 2.0}) == (0, 0.0)  # root: the initial (zero) state
    assert cache.stats.mamba_published == 2
    # A turn extending the first: matches up to the deepest state (12 tokens) and copies it.
    assert serve(cache, [*first, 12, 13, 14, 15], {16: 3.0}) == (12, 2.0)
    # A request branching inside the first one's last page: the 8-token checkpoint serves it.
    m = cache.match_prefix(torch.tensor([*first[:8], 99, 99, 99, 99], dtype=torch.int32))
    assert m.device_prefix_len == 8 and m.mamba_branching_seqlen == -1
    assert cache.stats.mamba_forks == 1  # the root fork is no copy
    # The node's own state is untouched by what the request did with its copy.
    node = cache.tree.node_info(cache.match_prefix(torch.tensor(first)).last_device_node)
    assert float(state_of(cache, node.mamba_value)[0]) == 2.0


def test_an_existing_checkpoint_keeps_the_trees_state_and_frees_the_copy():
    cache = make_cache()
    serve(cache, list(range(8)), {8: 1.0})
    free_before = cache.mamba_pool.available_size()
    serve(cache, list(range(8)), {8: 5.0})
    assert cache.stats.mamba_existed == 1
    assert cache.mamba_pool.available_size() == free_before
    node = cache.tree.node_info(cache.match_prefix(torch.arange(8)).last_device_node)
    assert float(state_of(cache, node.mamba_value)[0]) == 1.0


def test_state_pressure_evicts_least_recently_used_states():
    cache = make_cache(num_states=4)
    for base in (0, 100, 200):
        serve(cache, [base + i for i in range(8)], {8: float(base)})
    assert cache.tree.mamba_evictable_size() == 3
    cache.match_prefix(torch.arange(8))  # the 0-based path is now the most recent
    slots = cache.alloc_mamba(3)  # one free + two evicted: 100 and 200, the older ones
    assert cache.stats.mamba_evicted_states == 2
    assert cache.match_prefix(torch.arange(8)).device_prefix_len == 8
    assert cache.match_prefix(torch.arange(100, 108)).device_prefix_len == 0
    receipt = cache.inc_lock_ref(cache.match_prefix(torch.arange(8)).last_device_node)
    with pytest.raises(PoolExhaustedError, match="locked by running requests"):
        cache.alloc_mamba(1)
    cache.check_invariants(torch.empty(0, dtype=torch.int64), slots)
    cache.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
    cache.free_mamba(slots)
    cache.check_invariants(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))


def test_bad_mamba_use_is_rejected_and_changes_nothing():
    pool = DeviceKVPool(64, 1, 1, 4, torch.float16, "cpu")
    states = MambaStatePool(2, 1, (2,), (2,), torch.float32, torch.float32, "cpu")
    with pytest.raises(InvalidArgumentError, match="needs a mamba_host_pool"):
        HiCache(pool, PAGE, HostKVPool(pool, 64, PAGE), mamba_pool=states)
    other = MambaStatePool(2, 1, (2,), (2,), torch.float32, torch.float32, "cpu")
    with pytest.raises(InvalidArgumentError, match="over that Mamba pool"):
        HiCache(
            pool,
            PAGE,
            HostKVPool(pool, 64, PAGE),
            "write_through",
            "direct",
            False,
            states,
            MambaHostPool(other, 2),
        )
    with pytest.raises(InvalidArgumentError, match="no Mamba pool"):
        HiCache(pool, PAGE).alloc_mamba(1)
    cache = make_cache()
    key = torch.arange(8, dtype=torch.int32)
    slots = cache.alloc(8)
    bad = Req(key, kv_indices=slots, mamba_checkpoints=[(6, 0)])
    with pytest.raises(InvalidArgumentError, match="not a page-aligned prefix"):
        cache.cache_finished_req(bad)
    assert cache.tree.num_nodes() == 0
    with pytest.raises(InvalidArgumentError, match="not supported with a Mamba pool"):
        cache.cache_unfinished_req(Req(key, kv_indices=slots))
    tombstone = cache.insert(key, slots).last_node  # KV without a state
    free_states = cache.mamba_pool.available_size()
    with pytest.raises(InvalidArgumentError, match="holds no Mamba state"):
        cache.fork_mamba(tombstone)
    assert cache.mamba_pool.available_size() == free_states
    assert cache.match_prefix(key).device_prefix_len == 0  # no state to continue from


# --- the host tier: a state goes device -> host -> device bit-identical ------------------------


def make_host_cache(policy: str, layout: str, host_states: int = 8) -> HiCache:
    pool = DeviceKVPool(32, 1, 1, 4, torch.float16, "cpu")
    states = MambaStatePool(4, 3, (4, 2), (2, 4, 4), torch.bfloat16, torch.float32, "cpu")
    return HiCache(
        pool,
        PAGE,
        HostKVPool(pool, 128, PAGE),
        policy,
        mamba_pool=states,
        mamba_host_pool=MambaHostPool(states, host_states, layout),
    )


def fork_after_load(cache: HiCache, node_id: int, consumer: int, written) -> None:
    """Waits for a load's layers, forks the node's state and checks it is ``written``, bit-exact."""
    for layer in range(cache.device_pool.num_layers):
        cache.wait_until_layer_ready(layer, consumer)
    working = cache.fork_mamba(node_id)
    got = cache.mamba_pool.read(torch.tensor([working]))
    pairs = zip(got, written, strict=True)
    assert all(torch.equal(g.view(torch.uint8), w.view(torch.uint8)) for g, w in pairs)
    cache.free_mamba(torch.tensor([working]))


def random_state(cache: HiCache, slot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    conv, temporal = cache.mamba_pool.read(torch.tensor([slot]))
    conv = torch.randn(conv.shape, generator=gen).to(conv.dtype)
    temporal = torch.randn(temporal.shape, generator=gen).to(temporal.dtype)
    cache.mamba_pool.write(torch.tensor([slot]), conv, temporal)
    return conv, temporal


def finish(cache: HiCache, key: torch.Tensor, state_seed: int | None, also_at: int = 0):
    """One request with a checkpoint at its end (and at ``also_at`` tokens when > 0)."""
    m = cache.match_prefix(key, load_back=True)
    cache.flush()
    receipt = cache.inc_lock_ref(m.last_device_node)
    slots = cache.alloc(len(key) - m.device_prefix_len)
    checkpoints, written = [], None
    if state_seed is not None:
        if also_at:
            slot = int(cache.alloc_mamba(1)[0])
            random_state(cache, slot, state_seed + 1000)
            checkpoints.append((also_at, slot))
        slot = int(cache.alloc_mamba(1)[0])
        written = random_state(cache, slot, state_seed)
        checkpoints.append((len(key), slot))
    req = Req(
        key,
        kv_indices=torch.cat((m.device_indices, slots)),
        last_node=receipt.node_id,
        prefix_len=m.device_prefix_len,
        mamba_node_id=receipt.mamba_node_id,
        mamba_checkpoints=checkpoints,
    )
    cache.cache_finished_req(req)
    cache.flush()
    cache.check_invariants(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    return written


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_a_state_comes_back_from_host_bit_identical(policy, layout):
    cache = make_host_cache(policy, layout)
    key = torch.arange(16, dtype=torch.int32)
    written = finish(cache, key, state_seed=1)
    finish(cache, torch.arange(100, 132, dtype=torch.int32), state_seed=2)  # pushes key to host
    node = cache.tree.node_info(cache.match_prefix(key).best_match_node)
    assert not node.has_device_value and node.has_mamba_host_value  # demoted, state kept
    m = cache.match_prefix(key, load_back=True)
    assert m.device_prefix_len == 16 and cache.stats.load_back_tokens == 16
    with pytest.raises(InvalidArgumentError, match="not started"):
        cache.fork_mamba(m.last_device_node)  # its state is still on host
    fork_after_load(cache, m.last_device_node, cache.ready_to_load_host_cache(), written)
    cache.flush()
    cache.check_invariants(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    cache.close()


def test_a_failed_state_load_frees_the_slot_and_serves_nothing(monkeypatch):
    cache = make_host_cache("write_through", "page_first")
    key = torch.arange(16, dtype=torch.int32)
    finish(cache, key, state_seed=1)
    finish(cache, torch.arange(100, 132, dtype=torch.int32), state_seed=2)

    def broken(self, indices):
        raise RuntimeError("PCIe link down")

    monkeypatch.setattr(MambaHostPool, "load_all_layers", broken)
    cache.match_prefix(key, load_back=True)
    with pytest.raises(TransferError, match="PCIe link down"):
        cache.flush()
    m = cache.match_prefix(key)
    assert (m.device_prefix_len, m.host_hit_length) == (0, 16)  # host-only again, state kept
    cache.check_invariants(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    cache.close()


def test_a_full_host_state_pool_backs_up_kv_only():
    cache = make_host_cache("write_through", "page_first", host_states=1)
    finish(cache, torch.arange(8, dtype=torch.int32), state_seed=1)
    finish(cache, torch.arange(50, 58, dtype=torch.int32), state_seed=2)
    assert cache.stats.mamba_backup_skipped == 1
    assert cache.mamba_host_pool.available_size() == 0
    cache.check_invariants(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    cache.close()


def test_write_back_backs_a_state_up_before_state_pressure_tombstones_it():
    cache = make_host_cache("write_back", "page_first")
    key = torch.arange(8, dtype=torch.int32)
    written = finish(cache, key, state_seed=1)
    assert cache.stats.backup_tokens == 0  # write_back: nothing backed up yet
    # Fill the state pool (4 slots): the LRU state, key's, must be evicted, and is backed up.
    slots = cache.alloc_mamba(4)
    assert cache.stats.backup_tokens == 8 and cache.stats.mamba_evicted_states == 1
    node = cache.tree.node_info(cache.tree.match_prefix(key).best_match_node)
    assert node.node_id == 0  # the device state is gone: no device match ends there ...
    cache.free_mamba(slots)
    cache.evict(32)  # ... but once demoted, key is matched from host and its state reloaded
    cache.match_prefix(key, load_back=True)
    consumer = cache.ready_to_load_host_cache()
    fork_after_load(cache, cache.match_prefix(key).last_device_node, consumer, written)
    cache.flush()
    cache.check_invariants(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    cache.close()


def test_a_checkpoint_on_a_backed_up_node_reaches_the_host_tier():
    cache = make_host_cache("write_through", "page_first")
    finish(cache, torch.arange(16, dtype=torch.int32), state_seed=1)  # KV and state at 16 backed up
    # A request branching at 8 publishes a state there: that node's KV is on host already.
    written = finish(cache, torch.arange(8, dtype=torch.int32), state_seed=2)
    node = cache.tree.node_info(cache.match_prefix(torch.arange(8)).last_device_node)
    assert node.num_tokens == 8 and node.has_mamba_value and node.has_mamba_host_value
    host = cache.mamba_host_pool.read(torch.tensor([node.mamba_host_value]))
    pairs = zip(host, written, strict=True)
    assert all(
        torch.equal(h.flatten().view(torch.uint8), w.flatten().view(torch.uint8)) for h, w in pairs
    )
    cache.check_invariants(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    cache.close()
