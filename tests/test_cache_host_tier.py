"""HiCache with a host (L2) pool: write policies, demotion, load-back, adoption, failures."""

from __future__ import annotations

import pytest
import torch

from hicache import transfer
from hicache.cache import HiCache, Req
from hicache.errors import IndexOutOfRangeError, InvalidArgumentError, TransferError
from hicache.memory import DeviceKVPool, HostKVPool
from hicache.replay.runner import expected_kv
from tests.regressions.helpers import NO_REQUEST_SLOTS, make_cache, run_request

KEY = torch.arange(0, 32)
OTHER = torch.arange(1000, 1032)


def _insert(cache: HiCache, tokens: torch.Tensor) -> int:
    """Caches ``tokens`` as a finished request with fresh KV; returns the last node's id."""
    slots = cache.alloc(len(tokens))
    cache.device_pool.write(slots, *expected_kv(tokens, cache.device_pool))
    cache.cache_finished_req(Req(tokens, kv_indices=slots))
    return cache.match_prefix(tokens).last_device_node


def _kv_ok(cache: HiCache, tokens: torch.Tensor, device_indices: torch.Tensor) -> bool:
    got = cache.device_pool.read(device_indices)
    want = expected_kv(tokens[: len(device_indices)], cache.device_pool)
    return all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_write_through_demotes_and_loads_back_the_same_bytes(layout, page_size):
    cache = make_cache("write_through", 32, 64, page_size, layout=layout)
    node = _insert(cache, KEY)
    info = cache.tree.node_info(node)
    assert info.has_host_value and info.backup_pending and info.lock_ref == 1  # queued, locked
    cache.flush()
    assert cache.tree.host_total_size() == 32
    info = cache.tree.node_info(node)
    assert info.has_host_value and not info.backup_pending and info.lock_ref == 0
    assert cache.stats.backup_tokens == 32
    _insert(cache, OTHER)  # the device holds 32 slots: KEY is demoted, not dropped
    cache.flush()
    assert cache.stats.demoted_tokens == 32 and cache.stats.dropped_tokens == 0
    m = cache.match_prefix(KEY)
    assert (m.device_prefix_len, m.host_hit_length) == (0, 32)
    assert m.last_device_node == cache.tree.root_id
    info = cache.tree.node_info(m.best_match_node)
    assert info.has_host_value and not info.has_device_value
    m = cache.match_prefix(KEY, load_back=True)
    cache.flush()
    assert (m.device_prefix_len, m.host_hit_length) == (32, 0)
    assert _kv_ok(cache, KEY, m.device_indices)
    assert cache.stats.load_back_tokens == 32
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)


def test_write_through_selective_backs_up_at_the_second_insert():
    cache = make_cache("write_through_selective")
    node = _insert(cache, KEY)
    cache.flush()
    assert not cache.tree.node_info(node).has_host_value
    assert cache.tree.host_total_size() == 0
    run_request(cache, KEY)  # a second request walks the node again: hit_count 2
    assert cache.tree.node_info(node).has_host_value
    assert cache.stats.backup_tokens == 32


def test_write_back_backs_up_on_eviction_only():
    cache = make_cache("write_back", 64, 64)
    _insert(cache, KEY)
    cache.flush()
    assert cache.stats.backup_tokens == 0 and cache.tree.host_total_size() == 0
    assert cache.evict(8) == 8  # page-granular: only the evicted tail is backed up
    assert cache.stats.backup_tokens == 8 and cache.stats.demoted_tokens == 8
    assert cache.match_prefix(KEY).host_hit_length == 8
    assert run_request(cache, KEY) == 32  # 24 on device + 8 loaded back, bytes verified
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)


def test_write_back_with_a_full_host_drops_instead_of_demoting():
    """SGLang PR #27108: never demote a node whose backup could not be made."""
    cache = make_cache("write_back", 64, 16, page_size=4)
    _insert(cache, KEY)  # one 32-token node: the 16-slot host cannot take it
    _insert(cache, OTHER)
    assert cache.evict(40) == 40  # KEY dropped whole, then OTHER's tail backed up and demoted
    assert cache.stats.dropped_tokens == 32
    assert cache.stats.demoted_tokens == cache.stats.backup_tokens == 8
    assert cache.stats.backup_failed_tokens == 32
    assert cache.match_prefix(KEY).host_hit_length == 0  # dropped means gone
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    cache.evict(10_000)
    cache.evict_host(10_000)
    assert cache.allocator.available_size() == 64
    assert cache.host_pool.allocator.available_size() == 16


def test_insert_over_host_only_nodes_adopts_the_callers_slots():
    cache = make_cache("write_through", 64, 64)
    run_request(cache, KEY)
    cache.evict(16)  # the tail half of KEY is host-only now
    m = cache.match_prefix(KEY)
    assert (m.device_prefix_len, m.host_hit_length) == (16, 16)
    receipt = cache.inc_lock_ref(m.last_device_node)
    slots = cache.alloc(16)  # recompute the host-only half instead of loading it
    cache.device_pool.write(slots, *expected_kv(KEY[16:], cache.device_pool))
    result = cache.insert(KEY, torch.cat((m.device_indices, slots)))
    assert (result.prefix_len, result.adopted_len) == (16, 16)
    cache.dec_lock_ref(receipt.node_id)
    cache.flush()
    m = cache.match_prefix(KEY)
    assert (m.device_prefix_len, m.host_hit_length) == (32, 0)
    assert m.device_indices[16:].tolist() == slots.tolist()  # the tree took the caller's slots
    assert _kv_ok(cache, KEY, m.device_indices)
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)


def test_load_back_into_a_full_device_backs_off_cleanly():
    cache = make_cache("write_through", 32, 64)
    run_request(cache, KEY)
    run_request(cache, OTHER)  # KEY is host-only
    lock = cache.inc_lock_ref(cache.match_prefix(OTHER).last_device_node)  # device all in use
    m = cache.match_prefix(KEY)
    assert m.host_hit_length == 32
    assert cache.init_load_back(m.best_match_node) == 0
    assert cache.stats.load_back_failed_tokens == 32
    info = cache.tree.node_info(m.best_match_node)
    assert info.host_ref_counter == 0 and not info.has_device_value  # locks released
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    cache.dec_lock_ref(lock.node_id)
    assert run_request(cache, KEY) == 32  # now it fits


def test_failed_backup_is_undone_and_never_served(monkeypatch):
    cache = make_cache("write_through", 64, 64)

    def broken(*args, **kwargs):
        raise RuntimeError("DMA engine on fire")

    monkeypatch.setattr(transfer.KVTransfer, "backup_all_layers", broken)
    node = _insert(cache, KEY)
    with pytest.raises(TransferError, match="DMA engine on fire"):
        cache.flush()
    assert not cache.tree.node_info(node).has_host_value
    assert cache.tree.host_total_size() == 0
    assert cache.stats.backup_failed_tokens == 32
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    assert cache.host_pool.allocator.available_size() == 64
    assert cache.evict(32) == 32 and cache.stats.dropped_tokens == 32  # nothing to demote
    assert cache.match_prefix(KEY).host_hit_length == 0


def test_failed_load_back_returns_nodes_to_host(monkeypatch):
    cache = make_cache("write_through", 32, 64)
    run_request(cache, KEY)
    run_request(cache, OTHER)
    original = transfer.KVTransfer.load_layer
    calls = []

    def broken_on_layer_1(self, indices, layer):
        calls.append(layer)
        if layer == 1:
            raise RuntimeError("PCIe link down")
        original(self, indices, layer)

    monkeypatch.setattr(transfer.KVTransfer, "load_layer", broken_on_layer_1)
    free_before = cache.allocator.available_size()
    m = cache.match_prefix(KEY, load_back=True)
    assert m.device_prefix_len == 32
    with pytest.raises(TransferError, match="PCIe link down"):
        cache.flush()
    m = cache.match_prefix(KEY)
    assert (m.device_prefix_len, m.host_hit_length) == (0, 32)  # host-only again
    assert cache.stats.load_back_failed_tokens == 32
    assert cache.allocator.available_size() >= free_before
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    monkeypatch.setattr(transfer.KVTransfer, "load_layer", original)
    assert run_request(cache, KEY) == 32  # the host copy was intact: a retry serves it


def test_bad_configuration_and_arguments_are_rejected():
    pool = DeviceKVPool(64, 2, 2, 8, torch.float16, "cpu")
    with pytest.raises(InvalidArgumentError, match="page_size"):
        HiCache(pool, 4, HostKVPool(pool, 64, 8))
    with pytest.raises(InvalidArgumentError, match="write_policy"):
        HiCache(pool, 4, HostKVPool(pool, 64, 4), "write_sometimes")
    with pytest.raises(InvalidArgumentError, match="io_backend"):
        HiCache(pool, 4, HostKVPool(pool, 64, 4), io_backend="magic")
    cache = make_cache("write_through")
    with pytest.raises(IndexOutOfRangeError, match="unknown node id"):
        cache.init_load_back(12345)
    with pytest.raises(InvalidArgumentError):
        cache.evict_host(-1)


def test_reset_frees_both_tiers_and_close_is_idempotent():
    cache = make_cache("write_through", 64, 64)
    run_request(cache, KEY)
    run_request(cache, OTHER)
    cache.evict(16)
    assert cache.tree.host_total_size() > 0
    cache.reset()
    assert cache.allocator.available_size() == 64
    assert cache.host_pool.allocator.available_size() == 64
    assert cache.tree.num_nodes() == 0 and cache.stats.backup_tokens == 0
    cache.close()
    cache.close()


def _broken_copy(*args, **kwargs):
    raise RuntimeError("PCIe link down")


def _scribble_free_slots(cache: HiCache) -> None:
    """Fills every free device slot with KV of unrelated tokens: slots never written read wrong."""
    free = cache.allocator.free_slot_indices()
    junk = torch.arange(50_000, 50_000 + len(free))
    cache.device_pool.write(free, *expected_kv(junk, cache.device_pool))


def test_failed_load_back_locked_by_a_request_is_never_served(monkeypatch):
    """A request locks the nodes of a load that then fails: it is told, its unlock works, and once
    it lets go the nodes are host-only again; their never-written device slots are never served."""
    cache = make_cache("write_through", 32, 64)
    run_request(cache, KEY)
    run_request(cache, OTHER)  # KEY is host-only
    _scribble_free_slots(cache)
    original = transfer.KVTransfer.load_layer
    monkeypatch.setattr(transfer.KVTransfer, "load_layer", _broken_copy)
    m = cache.match_prefix(KEY, load_back=True)
    assert m.device_prefix_len == 32
    receipt = cache.inc_lock_ref(m.last_device_node)
    consumer = cache.ready_to_load_host_cache()
    with pytest.raises(TransferError, match="never copied"):
        cache.wait_until_layer_ready(0, consumer)  # the request learns its prefix is not there
    with pytest.raises(TransferError, match="PCIe link down"):
        cache.check_hicache_events(block=True)
    during = cache.match_prefix(KEY)  # still locked by the request: served to nobody meanwhile
    assert during.device_prefix_len == 0
    assert cache.tree.node_info(receipt.node_id).load_failed  # how the engine finds the request
    cache.dec_lock_ref(receipt.node_id)
    m = cache.match_prefix(KEY)
    assert (m.device_prefix_len, m.host_hit_length) == (0, 32)  # host-only again
    assert _kv_ok(cache, KEY, m.device_indices)
    assert cache.protected_size() == 0 and cache.stats.load_back_failed_tokens == 32
    assert cache.allocator.available_size() == 32  # the load's slots came back
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    monkeypatch.setattr(transfer.KVTransfer, "load_layer", original)
    assert run_request(cache, KEY) == 32  # the host copy was intact: a retry serves it


def test_running_request_keeps_its_kv_when_it_caches_over_an_in_flight_load(monkeypatch):
    """A chunked request computed KEY itself while another request's load of KEY is in flight:
    caching its progress must not swap its valid KV for the load's slots, which the failed copy
    never wrote."""
    cache = make_cache("write_through", 128, 128)
    run_request(cache, KEY)
    cache.evict(32)  # KEY is host-only
    _scribble_free_slots(cache)
    original = transfer.KVTransfer.load_layer
    monkeypatch.setattr(transfer.KVTransfer, "load_layer", _broken_copy)
    assert cache.match_prefix(KEY, load_back=True).device_prefix_len == 32  # load in flight
    tokens = torch.cat((KEY, torch.arange(2000, 2016)))
    slots = cache.alloc(len(tokens))
    cache.device_pool.write(slots, *expected_kv(tokens, cache.device_pool))
    req = Req(tokens, kv_indices=slots)
    cache.cache_unfinished_req(req)
    assert _kv_ok(cache, tokens, req.kv_indices[: len(tokens)])
    cache.ready_to_load_host_cache()
    with pytest.raises(TransferError, match="PCIe link down"):
        cache.check_hicache_events(block=True)
    assert _kv_ok(cache, tokens, req.kv_indices[: len(tokens)])  # still the KV it computed
    m = cache.match_prefix(tokens)
    assert _kv_ok(cache, tokens, m.device_indices)
    cache.check_invariants(request_slots=req.kv_indices[req.prefix_len :])
    monkeypatch.setattr(transfer.KVTransfer, "load_layer", original)
    cache.cache_finished_req(req)
    cache.flush()
    m = cache.match_prefix(tokens)
    assert m.device_prefix_len == 48  # its KV is cached now, every byte the one it computed
    assert _kv_ok(cache, tokens, m.device_indices)
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)


def test_insert_over_an_in_flight_load_that_fails_serves_no_garbage(monkeypatch):
    """A finished request caches KEY + X while KEY's load is in flight: the insert stops at KEY
    (nothing is cached under a node whose KV may be garbage), so when the load fails KEY goes back
    to host-only and nothing serves the slots the copy never wrote."""
    cache = make_cache("write_through", 128, 128)
    run_request(cache, KEY)
    cache.evict(32)
    _scribble_free_slots(cache)
    original = transfer.KVTransfer.load_layer
    monkeypatch.setattr(transfer.KVTransfer, "load_layer", _broken_copy)
    cache.match_prefix(KEY, load_back=True)
    tokens = torch.cat((KEY, torch.arange(2000, 2016)))
    slots = cache.alloc(len(tokens))
    cache.device_pool.write(slots, *expected_kv(tokens, cache.device_pool))
    cache.cache_finished_req(Req(tokens, kv_indices=slots))
    cache.ready_to_load_host_cache()
    with pytest.raises(TransferError, match="PCIe link down"):
        cache.check_hicache_events(block=True)
    m = cache.match_prefix(tokens)
    assert _kv_ok(cache, tokens, m.device_indices)
    assert (m.device_prefix_len, m.host_hit_length) == (0, 32)  # KEY's host copy is intact
    assert cache.allocator.available_size() == 128  # the load's and the request's slots are back
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    monkeypatch.setattr(transfer.KVTransfer, "load_layer", original)
    assert run_request(cache, tokens) == 32  # KEY loaded back from host, bytes verified


@pytest.mark.parametrize("load_fails", [False, True], ids=["load_ok", "load_failed"])
def test_request_cached_before_its_load_is_acknowledged(monkeypatch, load_fails):
    """The request loaded KEY, waited for its layers, computed X and is cached before anyone
    applied the load's ack: a finished load is applied first, so X is cached; a failed one is
    not (the request must be aborted), and nothing computed over its garbage is cached."""
    cache = make_cache("write_through", 128, 128)
    run_request(cache, KEY)
    cache.evict(32)
    _scribble_free_slots(cache)
    if load_fails:
        monkeypatch.setattr(transfer.KVTransfer, "load_layer", _broken_copy)
    tokens = torch.cat((KEY, torch.arange(2000, 2016)))
    m = cache.match_prefix(tokens, load_back=True)
    receipt = cache.inc_lock_ref(m.last_device_node)
    consumer = cache.ready_to_load_host_cache()
    if load_fails:
        with pytest.raises(TransferError, match="never copied"):
            cache.wait_until_layer_ready(0, consumer)
    else:
        for layer in range(cache.device_pool.num_layers):
            cache.wait_until_layer_ready(layer, consumer)
    slots = cache.alloc(16)
    cache.device_pool.write(slots, *expected_kv(tokens[32:], cache.device_pool))
    kv = torch.cat((m.device_indices, slots))
    cache.cache_finished_req(Req(tokens, kv_indices=kv, last_node=receipt.node_id, prefix_len=32))
    if load_fails:
        with pytest.raises(TransferError, match="PCIe link down"):
            cache.check_hicache_events()  # the failed batch is still there to undo and report
        m = cache.match_prefix(tokens)
        assert (m.device_prefix_len, m.host_hit_length) == (0, 32)
    else:
        m = cache.match_prefix(tokens)
        assert m.device_prefix_len == 48 and _kv_ok(cache, tokens, m.device_indices)
    cache.flush()
    assert cache.protected_size() == 0
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)


def test_init_load_back_releases_its_locks_when_alloc_raises(monkeypatch):
    """alloc can raise TransferError (a backup it waited for failed): nothing stays locked."""
    cache = make_cache("write_through", 32, 64)
    run_request(cache, KEY)
    cache.evict(16)  # KEY: head on device, tail host-only
    m = cache.match_prefix(KEY)
    assert (m.device_prefix_len, m.host_hit_length) == (16, 16)
    monkeypatch.setattr(transfer.KVTransfer, "backup_all_layers", _broken_copy)
    _insert(cache, OTHER[:16])  # fills the device; its backup's lock holds it until the ack
    with pytest.raises(TransferError, match="PCIe link down"):
        cache.init_load_back(m.best_match_node)
    assert cache.tree.node_info(m.last_device_node).lock_ref == 0
    assert cache.tree.node_info(m.best_match_node).host_ref_counter == 0
    assert cache.protected_size() == 0
    assert cache.tree.host_evictable_size() == 16  # the tail can be host-evicted again
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    cache.reset()  # refuses while anything is locked


def _fail_calls(monkeypatch, name: str, failing_calls: set[int]) -> None:
    original = getattr(transfer.KVTransfer, name)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) in failing_calls:
            raise RuntimeError("DMA engine on fire")
        original(*args, **kwargs)

    monkeypatch.setattr(transfer.KVTransfer, name, flaky)


def test_flush_applies_a_failed_backup_batch_that_follows_a_finished_one(monkeypatch):
    cache = make_cache("write_through", 64, 64)
    _fail_calls(monkeypatch, "backup_all_layers", {2})
    first = _insert(cache, KEY)
    cache.controller.start_writing()  # batch 1 in flight, not acknowledged yet
    second = _insert(cache, OTHER)  # batch 2, submitted by the flush
    with pytest.raises(TransferError, match="DMA engine on fire"):
        cache.flush()
    assert cache.controller.num_pending_writes() == 0
    info = cache.tree.node_info(first)
    assert info.has_host_value and not info.backup_pending
    assert not cache.tree.node_info(second).has_host_value  # the failed backup was undone
    assert cache.protected_size() == 0  # both backups' locks released
    assert cache.host_pool.allocator.available_size() == 32
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)


def test_flush_applies_a_failed_load_batch_that_follows_a_finished_one(monkeypatch):
    cache = make_cache("write_through", 64, 128)
    run_request(cache, KEY)
    run_request(cache, OTHER)
    cache.evict(64)  # both host-only
    _fail_calls(monkeypatch, "load_layer", {3, 4})  # batch 2's layers (2 layers each)
    cache.match_prefix(KEY, load_back=True)
    cache.ready_to_load_host_cache()  # batch 1
    cache.match_prefix(OTHER, load_back=True)  # batch 2, submitted by the flush
    with pytest.raises(TransferError, match="DMA engine on fire"):
        cache.flush()
    assert cache.controller.num_pending_loads() == 0
    assert cache.protected_size() == 0
    m = cache.match_prefix(KEY)
    assert m.device_prefix_len == 32 and _kv_ok(cache, KEY, m.device_indices)
    m = cache.match_prefix(OTHER)
    assert (m.device_prefix_len, m.host_hit_length) == (0, 32)  # the failed load was undone
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)


def test_alloc_applies_a_failed_backup_batch_that_follows_a_finished_one(monkeypatch):
    """alloc waits for backups when their locks pin the device; a failed one is undone, raised."""
    cache = make_cache("write_through", 32, 64)
    _fail_calls(monkeypatch, "backup_all_layers", {2})
    _insert(cache, KEY[:16])
    cache.controller.start_writing()  # batch 1 in flight
    second = _insert(cache, OTHER[:16])  # the device is full of nodes locked by backups
    with pytest.raises(TransferError, match="DMA engine on fire"):
        cache.alloc(16)
    assert cache.controller.num_pending_writes() == 0
    assert not cache.tree.node_info(second).has_host_value
    assert cache.protected_size() == 0
    cache.check_invariants(request_slots=NO_REQUEST_SLOTS)
    assert cache.alloc(16).numel() == 16  # and the next try evicts
