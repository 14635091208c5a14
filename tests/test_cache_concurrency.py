"""Concurrency stress on CPU: a scheduler thread against the controller's worker threads.

The scheduler thread replays requests through a HiCache with a small device and host pool
(match with load-back, per-layer waits, lock, alloc, write KV, cache_finished_req, and
``check_hicache_events`` without blocking, so acks land whenever the workers are done), while the
transfer functions sleep at random to widen every race window, and a second thread keeps matching
prefixes (HiCache's lock serialises tree calls). After draining, every device and host slot is
free or owned by exactly one node, and every request's prefix reads back the KV written for it.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest
import torch

from hicache import transfer
from hicache.cache import HiCache, Req
from hicache.errors import PoolExhaustedError
from hicache.memory import DeviceKVPool, HostKVPool, MambaHostPool, MambaStatePool
from hicache.replay.runner import expected_kv, expected_state

PAGE = 4
NO_SLOTS = torch.empty(0, dtype=torch.int64)


def _keys(num: int, seed: int) -> list[torch.Tensor]:
    """Multi-turn-like keys: a few roots, each request extends an earlier one or starts fresh."""
    rng = random.Random(seed)
    keys: list[list[int]] = []
    for i in range(num):
        if keys and rng.random() < 0.7:
            base = rng.choice(keys[-20:])
            key = base + [10_000 + 1000 * i + j for j in range(PAGE * rng.randint(1, 4))]
        else:
            key = [1000 * (i % 5) + j for j in range(PAGE * rng.randint(1, 6))]
        keys.append(key[: PAGE * 24])
    return [torch.tensor(k, dtype=torch.int32) for k in keys]


def _jitter(fn, rng: random.Random, lock: threading.Lock):
    def slow(*args, **kwargs):
        with lock:
            delay = rng.random() * 0.002
        time.sleep(delay)
        return fn(*args, **kwargs)

    return slow


@contextlib.contextmanager
def racing_matcher(cache: HiCache, keys: list[torch.Tensor]):
    """Runs a second thread that keeps matching ``keys`` while the block runs (HiCache's lock
    serialises tree calls); re-raises what it hit when the block ends."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def matcher() -> None:
        i = 0
        while not stop.is_set():
            try:
                assert cache.match_prefix(keys[i % len(keys)]).device_prefix_len % PAGE == 0
            except BaseException as e:  # noqa: BLE001 -- re-raised by the main thread
                errors.append(e)
                return
            i += 1

    thread = threading.Thread(target=matcher)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]


def _run_request(cache: HiCache, tokens: torch.Tensor) -> None:
    pool = cache.device_pool
    m = cache.match_prefix(tokens, load_back=True)
    consumer = cache.ready_to_load_host_cache()
    for layer in range(pool.num_layers):
        cache.wait_until_layer_ready(layer, consumer)
    hit = m.device_prefix_len
    got = pool.read(m.device_indices)
    for g, w in zip(got, expected_kv(tokens[:hit], pool), strict=True):
        assert torch.equal(g, w), "a hit read back KV that differs from what was written"
    receipt = cache.inc_lock_ref(m.last_device_node)
    try:
        slots = cache.alloc(len(tokens) - hit)
    except PoolExhaustedError:
        cache.dec_lock_ref(receipt.node_id)
        return
    pool.write(slots[: len(tokens) - hit], *expected_kv(tokens[hit:], pool))
    req = Req(tokens, kv_indices=torch.cat((m.device_indices, slots)), prefix_len=hit)
    req.last_node = receipt.node_id
    cache.cache_finished_req(req)
    cache.check_hicache_events()  # non-blocking: acks land whenever the workers finish


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_scheduler_and_workers_race_without_losing_a_slot(monkeypatch, policy):
    rng, rng_lock = random.Random(7), threading.Lock()
    for name in ("backup_all_layers", "load_layer"):
        monkeypatch.setattr(
            transfer.KVTransfer, name, _jitter(getattr(transfer.KVTransfer, name), rng, rng_lock)
        )
    pool = DeviceKVPool(160, 2, 2, 4, torch.float16, "cpu")
    cache = HiCache(pool, PAGE, HostKVPool(pool, 320, PAGE, "page_first"), policy)
    keys = _keys(300, seed=11)
    with racing_matcher(cache, keys):
        for step, tokens in enumerate(keys):
            _run_request(cache, tokens)
            if step % 50 == 0:
                cache.check_invariants(request_slots=NO_SLOTS)
    cache.flush()
    cache.check_invariants(request_slots=NO_SLOTS)
    assert cache.stats.load_back_tokens > 0 and cache.stats.demoted_tokens > 0
    # Every key again: device hits and loaded-back host hits read back what was written.
    for tokens in keys[-60:]:
        _run_request(cache, tokens)
    cache.flush()
    cache.check_invariants(request_slots=NO_SLOTS)
    cache.close()


def _run_mamba_request(cache: HiCache, tokens: torch.Tensor) -> None:
    """As _run_request, with a Mamba state: forked at the hit (checked), published at the end.

    The state after a prefix is a function of its last token: a token of these keys names its
    whole prefix (roots repeat the same tokens at the same positions; extension tokens are unique
    to the request that made them).
    """
    states = cache.mamba_pool
    m = cache.match_prefix(tokens, load_back=True)
    consumer = cache.ready_to_load_host_cache()
    for layer in range(cache.device_pool.num_layers):
        cache.wait_until_layer_ready(layer, consumer)
    hit = m.device_prefix_len
    receipt = cache.inc_lock_ref(m.last_device_node)
    try:
        working = cache.fork_mamba(m.last_device_node)
    except PoolExhaustedError:
        cache.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
        return
    got = states.read(torch.tensor([working]))
    want = (
        expected_state(tokens[hit - 1 : hit].to(torch.int64), states)
        if hit
        else tuple(torch.zeros_like(g) for g in got)
    )
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), "a wrong state"
    try:
        slots = cache.alloc(len(tokens) - hit)
    except PoolExhaustedError:
        cache.free_mamba(torch.tensor([working]))
        cache.dec_lock_ref(receipt.node_id, receipt.mamba_node_id)
        return
    end = len(tokens) // PAGE * PAGE
    states.write(torch.tensor([working]), *expected_state(tokens[end - 1 : end].long(), states))
    req = Req(
        tokens,
        kv_indices=torch.cat((m.device_indices, slots)),
        last_node=receipt.node_id,
        prefix_len=hit,
        mamba_node_id=receipt.mamba_node_id,
        mamba_checkpoints=[(end, working)],
    )
    cache.cache_finished_req(req)
    cache.check_hicache_events()


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_mamba_states_race_the_workers_without_losing_a_slot(monkeypatch, policy):
    rng, rng_lock = random.Random(5), threading.Lock()
    for cls, names in (
        (transfer.KVTransfer, ("backup_all_layers", "load_layer")),
        (MambaHostPool, ("backup_all_layers", "load_all_layers")),
    ):
        for name in names:
            monkeypatch.setattr(cls, name, _jitter(getattr(cls, name), rng, rng_lock))
    pool = DeviceKVPool(160, 2, 2, 4, torch.float16, "cpu")
    states = MambaStatePool(12, 2, (3, 2), (2, 2), torch.bfloat16, torch.float32, "cpu")
    cache = HiCache(
        pool,
        PAGE,
        HostKVPool(pool, 320, PAGE, "page_first"),
        policy,
        mamba_pool=states,
        mamba_host_pool=MambaHostPool(states, 24),
    )
    keys = _keys(300, seed=13)
    for step, tokens in enumerate(keys):
        _run_mamba_request(cache, tokens)
        if step % 50 == 0:
            cache.check_invariants(request_slots=NO_SLOTS, request_states=NO_SLOTS)
    cache.flush()
    cache.check_invariants(request_slots=NO_SLOTS, request_states=NO_SLOTS)
    stats = cache.stats
    assert stats.load_back_tokens > 0 and stats.mamba_forks > 0 and stats.mamba_evicted_states > 0
    assert cache.tree.all_mamba_host_indices().numel() > 0  # states on the host tier too
    for tokens in keys[-60:]:  # hits again, L2 ones through their load-backs: states check out
        _run_mamba_request(cache, tokens)
    cache.flush()
    cache.check_invariants(request_slots=NO_SLOTS, request_states=NO_SLOTS)
    cache.close()
