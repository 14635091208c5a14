"""HiCache with a sliding-window (SWA) KV pool: frontier, tombstones, host round trips, races.

Each request runs the engine's steps: match (with load-back), wait for the layers, check that the
hit's Full KV and the SWA KV of its last ``window`` tokens read back what was written for those
tokens (a wrong mapping, a stale SWA slot or a bad load would show here), lock, allocate (new full
slots get SWA slots), write both pools, drop the SWA KV that left the window
(``free_swa_out_of_window``, SGLang PR #29860's frontier), then ``cache_finished_req``. After every
request the slot ownership of every pool is checked (``check_invariants``).
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from hicache import transfer
from hicache.cache import HiCache, Req
from hicache.errors import InvalidArgumentError, PoolExhaustedError
from hicache.memory import DeviceKVPool, HostKVPool, MambaStatePool, SWAKVPool
from hicache.replay.runner import expected_kv
from tests.test_cache_concurrency import NO_SLOTS, _jitter, _keys, racing_matcher

PAGE = 4
WINDOW = 8


def make_cache(
    num_slots: int = 160,
    swa_slots: int = 96,
    host_slots: int = 0,
    policy: str = "write_through",
    window: int = WINDOW,
) -> HiCache:
    pool = DeviceKVPool(num_slots, 2, 1, 4, torch.float32, "cpu")
    swa = SWAKVPool(
        swa_slots, 1, 1, 4, torch.float32, "cpu", num_full_slots=num_slots, page_size=PAGE
    )
    host = swa_host = None
    if host_slots:
        host = HostKVPool(pool, host_slots, PAGE, "page_first")
        swa_host = HostKVPool(swa, host_slots, PAGE, "page_first")
    return HiCache(
        pool,
        PAGE,
        host,
        policy,
        swa_pool=swa,
        swa_host_pool=swa_host,
        sliding_window_size=window,
    )


def check_hit(cache: HiCache, tokens: torch.Tensor, device_indices: torch.Tensor) -> None:
    """The hit's Full KV, and the SWA KV of its last window, are those written for its tokens."""
    hit = device_indices.numel()
    for got, want in zip(
        cache.device_pool.read(device_indices),
        expected_kv(tokens[:hit], cache.device_pool),
        strict=True,
    ):
        assert torch.equal(got, want), "a hit's Full KV differs from what was written"
    start = max(hit - cache.sliding_window_size, 0)
    window = cache.swa_pool.translate(device_indices[start:])  # raises if a token has no SWA KV
    for got, want in zip(
        cache.swa_pool.read(window), expected_kv(tokens[start:hit], cache.swa_pool), strict=True
    ):
        assert torch.equal(got, want), "a hit's SWA window differs from what was written"


def serve(cache: HiCache, tokens: torch.Tensor, check: bool = True, strict: bool = False) -> int:
    """One request through the engine's steps; returns its device hit (after load-back).

    A full pool skips the request (as a scheduler would retry it later), unless ``strict``."""
    m = cache.match_prefix(tokens, load_back=True)
    consumer = cache.ready_to_load_host_cache()
    for layer in range(cache.device_pool.num_layers):
        cache.wait_until_layer_ready(layer, consumer)
    check_hit(cache, tokens, m.device_indices)
    hit = m.device_prefix_len
    receipt = cache.inc_lock_ref(m.last_device_node)
    try:
        slots = cache.alloc(len(tokens) - hit)
    except PoolExhaustedError:
        cache.dec_lock_ref(receipt.node_id, receipt.mamba_node_id, receipt.swa_lock_tokens)
        if strict:
            raise
        return hit
    new = slots[: len(tokens) - hit]
    cache.device_pool.write(new, *expected_kv(tokens[hit:], cache.device_pool))
    cache.swa_pool.write(cache.swa_pool.translate(new), *expected_kv(tokens[hit:], cache.swa_pool))
    req = Req(
        tokens,
        kv_indices=torch.cat((m.device_indices, slots)),
        last_node=receipt.node_id,
        prefix_len=hit,
        swa_lock_tokens=receipt.swa_lock_tokens,
    )
    cache.free_swa_out_of_window(req)
    if check:
        cache.check_invariants(request_slots=req.kv_indices[hit:])
    cache.cache_finished_req(req)
    cache.check_hicache_events()
    if check:
        cache.check_invariants(request_slots=NO_SLOTS)
    return hit


def test_the_frontier_leaves_one_window_live_and_the_next_turn_hits_behind_it():
    cache = make_cache()
    first = torch.arange(40, dtype=torch.int32)
    assert serve(cache, first) == 0
    # 40 tokens, window 8, page 4: SWA freed below 40 - 8 = 32, one window stays live.
    assert cache.stats.swa_window_freed_tokens == 32
    assert cache.tree.swa_evictable_size() == 8
    # The next turn matches all 40 (the last 8 are live) and reads its window back.
    assert serve(cache, torch.cat((first, torch.arange(100, 112, dtype=torch.int32)))) == 40
    # A request stopping inside the tombstoned part cannot end there: no live window behind it.
    m = cache.match_prefix(first[:24])
    assert m.device_prefix_len == 0 and m.swa_branching_seqlen == 24


def test_a_request_ending_in_a_tombstone_republishes_its_window():
    cache = make_cache()
    first = torch.arange(40, dtype=torch.int32)
    serve(cache, first)
    shorter = first[:32]  # ends where the first request's SWA KV was already gone
    m = cache.match_prefix(shorter)
    assert m.device_prefix_len == 0 and m.swa_branching_seqlen == 32
    assert serve(cache, shorter) == 0  # recomputed
    # Its insert gave the tombstone tokens inside its window the request's SWA KV (SGLang's
    # RecoverSWAWithLockedFull): the tree kept its Full slots, the mapping moved.
    assert cache.stats.swa_recovered_tokens == WINDOW
    m = cache.match_prefix(shorter)
    assert m.device_prefix_len == 32
    check_hit(cache, shorter, m.device_indices)


def test_swa_pressure_tombstones_old_windows_and_locked_windows_stay():
    cache = make_cache(num_slots=160, swa_slots=32)
    keys = [torch.arange(1000 * i, 1000 * i + 16, dtype=torch.int32) for i in range(6)]
    for key in keys:
        serve(cache, key)
    assert cache.stats.evicted_tokens + cache.stats.swa_tombstoned_tokens > 0
    # A request holding its window: its SWA KV is protected while it runs.
    m = cache.match_prefix(keys[-1])
    receipt = cache.inc_lock_ref(m.last_device_node)
    assert receipt.swa_lock_tokens >= WINDOW
    for i in range(6, 12):
        serve(cache, torch.arange(1000 * i, 1000 * i + 16, dtype=torch.int32))
    check_hit(cache, keys[-1], cache.match_prefix(keys[-1]).device_indices)
    cache.dec_lock_ref(receipt.node_id, receipt.mamba_node_id, receipt.swa_lock_tokens)
    cache.check_invariants(request_slots=NO_SLOTS)


def test_alloc_fails_cleanly_when_every_window_is_locked():
    cache = make_cache(num_slots=64, swa_slots=16)
    key = torch.arange(16, dtype=torch.int32)
    serve(cache, key)
    m = cache.match_prefix(key)
    receipt = cache.inc_lock_ref(m.last_device_node)
    other = Req(torch.arange(500, 516, dtype=torch.int32), kv_indices=cache.alloc(8))
    with pytest.raises(PoolExhaustedError, match="SWA"):
        cache.alloc(8)
    cache.check_invariants(request_slots=other.kv_indices)  # nothing leaked by the failure
    cache.free(other.kv_indices)
    cache.dec_lock_ref(receipt.node_id, receipt.mamba_node_id, receipt.swa_lock_tokens)
    cache.check_invariants(request_slots=NO_SLOTS)


def test_the_window_goes_to_host_and_comes_back_bit_identical():
    cache = make_cache(num_slots=64, swa_slots=48, host_slots=256)
    key = torch.arange(32, dtype=torch.int32)
    serve(cache, key)
    cache.flush()
    node = cache.match_prefix(key).last_device_node
    assert cache.tree.swa_host_size() == WINDOW  # the live window was backed up with the KV
    # Push everything out of the device: the node is demoted, its window kept on host.
    for i in range(1, 5):
        serve(cache, torch.arange(1000 * i, 1000 * i + 32, dtype=torch.int32))
    cache.flush()
    m = cache.match_prefix(key)
    assert m.host_hit_length > 0, cache.tree.pretty_print()
    assert not cache.tree.node_info(node).has_device_value
    # Load-back: full KV and the SWA window return; serve() reads both back against the writes.
    assert serve(cache, key) == 32
    assert cache.stats.load_back_tokens > 0


def test_bad_swa_configurations_are_named():
    pool = DeviceKVPool(64, 1, 1, 4, torch.float32, "cpu")
    swa = SWAKVPool(32, 1, 1, 4, torch.float32, "cpu", num_full_slots=64, page_size=PAGE)
    with pytest.raises(InvalidArgumentError, match="sliding_window_size must be > 0"):
        HiCache(pool, PAGE, swa_pool=swa)
    with pytest.raises(InvalidArgumentError, match="page size"):
        HiCache(pool, 2 * PAGE, swa_pool=swa, sliding_window_size=8)
    with pytest.raises(InvalidArgumentError, match="swa_host_pool"):
        HiCache(pool, PAGE, HostKVPool(pool, 128, PAGE), swa_pool=swa, sliding_window_size=8)
    with pytest.raises(InvalidArgumentError, match="need a swa_pool"):
        HiCache(pool, PAGE, sliding_window_size=8)
    with pytest.raises(InvalidArgumentError, match="no SWA pool"):
        HiCache(pool, PAGE).free_swa_out_of_window(Req(torch.arange(8)))


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_swa_races_the_workers_without_losing_a_slot(monkeypatch, policy):
    """The concurrency stress of ``test_cache_concurrency`` with an SWA pool and its host pool."""
    rng, rng_lock = random.Random(3), threading.Lock()
    for name in ("backup_all_layers", "load_layer", "load_all_layers"):
        monkeypatch.setattr(
            transfer.KVTransfer, name, _jitter(getattr(transfer.KVTransfer, name), rng, rng_lock)
        )
    cache = make_cache(num_slots=160, swa_slots=64, host_slots=320, policy=policy)
    keys = _keys(300, seed=17)
    with racing_matcher(cache, keys):
        for step, tokens in enumerate(keys):
            serve(cache, tokens, check=step % 25 == 0)
    cache.flush()
    cache.check_invariants(request_slots=NO_SLOTS)
    stats = cache.stats
    assert stats.load_back_tokens > 0 and stats.swa_window_freed_tokens > 0
    assert stats.evicted_tokens + stats.swa_tombstoned_tokens > 0
    assert cache.tree.swa_host_size() > 0
    for tokens in keys[-60:]:  # hits again, L2 ones through their load-backs: windows check out
        serve(cache, tokens)
    cache.flush()
    cache.check_invariants(request_slots=NO_SLOTS)
    cache.close()


def test_checkpoints_below_the_frontier_never_take_swa_kv_from_freed_slots():
    """SWA + Mamba: a request that recomputes a cached prefix (its match stopped early) frees its
    duplicates' SWA KV below the frontier; publishing a Mamba checkpoint there must not give the
    tree's SWA tombstones those (unmapped) slots' SWA KV. Found by the ``swa-mamba-hybrid``
    replay: the checkpoint insert once ignored the frontier."""
    pool = DeviceKVPool(256, 1, 1, 4, torch.float32, "cpu")
    swa = SWAKVPool(128, 1, 1, 4, torch.float32, "cpu", num_full_slots=256, page_size=PAGE)
    states = MambaStatePool(8, 1, (2, 2), (2, 2), torch.float32, torch.float32, "cpu")
    cache = HiCache(pool, PAGE, swa_pool=swa, sliding_window_size=WINDOW, mamba_pool=states)

    def run(key: torch.Tensor, checkpoints: list[int]) -> int:
        m = cache.match_prefix(key)
        receipt = cache.inc_lock_ref(m.last_device_node)
        working = cache.fork_mamba(m.last_device_node)
        hit = m.device_prefix_len
        slots = cache.alloc(len(key) - hit)
        pool.write(slots, *expected_kv(key[hit:], pool))
        swa.write(swa.translate(slots), *expected_kv(key[hit:], swa))
        req = Req(
            key,
            kv_indices=torch.cat((m.device_indices, slots)),
            last_node=receipt.node_id,
            prefix_len=hit,
            mamba_node_id=receipt.mamba_node_id,
            swa_lock_tokens=receipt.swa_lock_tokens,
        )
        extra = cache.alloc_mamba(len(checkpoints) - 1).tolist()
        req.mamba_checkpoints = list(zip(checkpoints, [working, *extra], strict=True))
        cache.free_swa_out_of_window(req, min(checkpoints))
        cache.cache_finished_req(req)
        cache.check_invariants(request_slots=NO_SLOTS, request_states=NO_SLOTS)
        return hit

    first = torch.arange(48, dtype=torch.int32)
    assert run(first, [48]) == 0  # [0, 40) is an SWA tombstone, [40, 48) live with a state
    # Shares [0, 24) (tombstone: no hit), recomputes it, keeps SWA from 8 on (its checkpoint at
    # 16 needs the window [8, 16)): the tree's [8, 24) takes its SWA KV, [0, 8) stays a
    # tombstone whatever the checkpoint insert at 16 walks over.
    second = torch.cat((first[:24], torch.arange(500, 524, dtype=torch.int32)))
    assert run(second, [16, 48]) == 0
    m = cache.match_prefix(second[:16])
    assert m.device_prefix_len == 16
    check_hit(cache, second, m.device_indices)


def test_write_back_swa_pressure_backs_the_victim_up_then_evicts_it():
    """Under write_back an SWA victim without a host copy is backed up first (SGLang PR #28468),
    and the eviction then goes on: the allocation that needed the room succeeds."""
    cache = make_cache(num_slots=160, swa_slots=32, host_slots=320, policy="write_back")
    for i in range(6):
        serve(cache, torch.arange(1000 * i, 1000 * i + 16, dtype=torch.int32), strict=True)
    assert cache.stats.backup_tokens > 0  # victims were backed up, not lost
    assert cache.stats.evicted_tokens + cache.stats.swa_tombstoned_tokens > 0
    cache.check_invariants(request_slots=NO_SLOTS)
