"""Metrics: the dict view, the Prometheus text view and the values they report."""

from __future__ import annotations

import torch
from prometheus_client.parser import text_string_to_metric_families

from hicache import metrics
from hicache.replay import bundled_trace_path, load_trace
from hicache.replay.trace import block_tokens
from tests.regressions.helpers import make_cache, run_request


def _exercised_cache():
    cache = make_cache("write_through", 1024, 16384, 4)
    for request in load_trace(bundled_trace_path(), 600):
        run_request(cache, block_tokens(request.hash_ids, 4))
    return cache


def test_dict_and_prometheus_report_the_same_values():
    cache = _exercised_cache()
    stats = cache.stats
    assert stats.host_hit_tokens > 0 and stats.device_hit_tokens > 0  # both tiers hit
    values = metrics.as_dict(metrics.collect(cache))
    assert values["hicache_match_calls_total"] == stats.match_calls
    assert values["hicache_hit_tokens_total{component=full,tier=L1}"] == stats.device_hit_tokens
    assert values["hicache_hit_tokens_total{component=full,tier=L2}"] == stats.host_hit_tokens
    assert values["hicache_evicted_tokens_total{tier=L2}"] == stats.host_evicted_tokens
    bytes_per_token = cache.device_pool.size_bytes // cache.device_pool.num_slots
    backup = cache.controller.backup_counters
    assert backup.tokens == stats.backup_tokens  # every queued backup completed
    assert values["hicache_transfer_bytes_total{direction=backup}"] == (
        stats.backup_tokens * bytes_per_token
    )
    assert values["hicache_transfer_tokens_total{direction=load_back}"] == stats.load_back_tokens
    assert values["hicache_transfer_gb_per_second{direction=backup}"] > 0
    assert values["hicache_queue_depth{direction=backup}"] == 0  # run_request flushes
    assert values["hicache_tokens{state=evictable,tier=L1}"] == cache.tree.evictable_size()
    assert values["hicache_capacity_tokens{tier=L2}"] == 16384
    names = {
        name
        for name in metrics.METRICS
        if not name.startswith(("hicache_mamba", "hicache_storage"))
    }
    assert set(s.name for s in metrics.collect(cache)) == names  # no Mamba pool: no Mamba rows

    text = metrics.prometheus_text(cache, const_labels={"tp_rank": "0"})
    parsed = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "tp_rank"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("tp_rank") == "0" and not s.name.endswith("_created")
    }
    for sample in metrics.collect(cache):
        assert parsed[(sample.name, tuple(sorted(sample.labels.items())))] == float(sample.value)
    types = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert types["hicache_hit_tokens"] == "counter" and types["hicache_queue_depth"] == "gauge"
    cache.close()


def test_device_only_cache_reports_device_metrics_only():
    cache = make_cache("write_through")
    cache.controller.close()
    cache.controller = None  # as a cache built without a host pool
    cache.host_pool = None
    cache.match_prefix(torch.arange(8, dtype=torch.int32))
    values = metrics.as_dict(metrics.collect(cache))
    assert values["hicache_match_calls_total"] == 1
    assert not any("direction" in k or "tier=L2" in k and "tokens{" in k for k in values)
    assert "hicache_capacity_tokens{tier=L2}" not in values


def test_mamba_cache_reports_its_states():
    from hicache.cache import HiCache, Req
    from hicache.memory import DeviceKVPool, MambaStatePool

    pool = DeviceKVPool(64, 1, 1, 4, torch.float16, "cpu")
    states = MambaStatePool(4, 1, (2,), (2,), torch.float32, torch.float32, "cpu")
    cache = HiCache(pool, 4, mamba_pool=states)
    key = torch.arange(8, dtype=torch.int32)
    for _ in range(2):
        m = cache.match_prefix(key)
        receipt = cache.inc_lock_ref(m.last_device_node)
        working = cache.fork_mamba(m.last_device_node)
        slots = cache.alloc(8 - m.device_prefix_len)
        req = Req(
            key,
            kv_indices=torch.cat((m.device_indices, slots)),
            last_node=receipt.node_id,
            prefix_len=m.device_prefix_len,
            mamba_node_id=receipt.mamba_node_id,
            mamba_checkpoints=[(8, working)],
        )
        cache.cache_finished_req(req)
    values = metrics.as_dict(metrics.collect(cache))
    assert values["hicache_mamba_states{state=evictable}"] == 1
    assert values["hicache_mamba_capacity_states"] == 4
    assert values["hicache_mamba_forks_total"] == 1  # the second request forked the first's state
    assert values["hicache_mamba_published_total"] == 1
    assert values["hicache_hit_tokens_total{component=full,tier=L1}"] == 8
    assert set(s.name for s in metrics.collect(cache)) == set(metrics.METRICS) - {
        name
        for name in metrics.METRICS
        if "direction" in name or "transfer" in name or name.startswith("hicache_storage")
    } - {"hicache_queue_depth", "hicache_failed_tokens_total"}
