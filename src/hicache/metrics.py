"""Metrics of a HiCache: hits per tier, evictions, transfers, queue depths, faults.

One snapshot, two views: :func:`collect` returns the samples (name, kind, labels, value, help);
:func:`as_dict` turns them into a plain ``{"name{label=value,...}": value}`` dict for logs and
tests; :func:`prometheus_text` renders them in the Prometheus text exposition format through
``prometheus_client``, and :class:`HiCacheCollector` plugs the same samples into an engine's own
``prometheus_client`` registry (its ``/metrics`` endpoint). Every metric is named
``hicache_<what>_<unit>``; counters end in ``_total`` and count since construction or
:meth:`HiCache.reset`.

=================================== ======= ===================================================
metric                              kind    labels and meaning
=================================== ======= ===================================================
hicache_match_calls_total           counter ``HiCache.match_prefix`` calls
hicache_hit_tokens_total            counter ``tier`` L1 (device) / L2 (host only, loadable),
                                            ``component`` full
hicache_evicted_tokens_total        counter ``tier`` L1 / L2: slots freed by eviction
hicache_demoted_tokens_total        counter L1 evictions that kept a host copy
hicache_dropped_tokens_total        counter L1 evictions without a host copy (KV lost)
hicache_transfer_tokens_total       counter ``direction`` backup (L1->L2) / load_back (L2->L1)
hicache_transfer_bytes_total        counter same, KV bytes (all layers, K and V)
hicache_transfer_seconds_total      counter same, time the copies took
hicache_transfer_gb_per_second      gauge   same, bytes / seconds so far (1e9 B/s)
hicache_transfer_failures_total     counter same, failed batches
hicache_failed_tokens_total         counter same, tokens not copied (no room, or a failure)
hicache_queue_depth                 gauge   same, operations queued or in flight
hicache_tokens                      gauge   ``tier`` L1 / L2, ``state`` evictable / protected
hicache_capacity_tokens             gauge   ``tier`` L1 / L2: pool size
hicache_mamba_states                gauge   ``state`` evictable / protected (Mamba caches)
hicache_mamba_capacity_states       gauge   the Mamba state pool's size
hicache_mamba_forks_total           counter request states copied from cached ones
hicache_mamba_published_total       counter request states the tree took (checkpoints)
hicache_mamba_evicted_states_total  counter states freed by eviction
hicache_storage_pages_total         counter ``op`` query_hit (leading pages ``exists`` found) /
                                            read (prefetched into host) / stored / deduplicated
                                            / not_stored (a failure or a full backend)
hicache_storage_prefetches_total    counter ``outcome`` queued / revoked (hit below the
                                            threshold, or no host room) / cut (a failure or a
                                            missing/corrupt page ended it early)
hicache_storage_failures_total      counter ``kind`` backend_ops (calls that failed) /
                                            corrupt_pages (pages that failed verification)
hicache_storage_queue_depth         gauge   ``direction`` prefetch / backup: operations in flight
=================================== ======= ===================================================

With a Mamba pool, ``hit_tokens`` count what every component accepted (the match ends at a
cached state). With a storage backend, ``hit_tokens{tier=L3}`` counts the tokens prefetched from
storage into the tree (they are then matched as L2 hits and loaded back), and the
``hicache_storage_*`` rows appear.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from hicache.cache import HiCache

__all__ = ["METRICS", "HiCacheCollector", "Sample", "as_dict", "collect", "prometheus_text"]


class Sample(NamedTuple):
    """One metric value.

    Attributes:
        name: the metric's name (``hicache_...``).
        kind: ``"counter"`` or ``"gauge"``.
        help: what it counts, with its unit.
        labels: label name -> value.
        value: the value.
    """

    name: str
    kind: str
    help: str
    labels: dict[str, str]
    value: float


# name -> (kind, help): the one list of metrics (and the module docstring's table).
METRICS: dict[str, tuple[str, str]] = {
    "hicache_match_calls_total": ("counter", "match_prefix calls"),
    "hicache_hit_tokens_total": ("counter", "matched tokens per tier (L2: host-only, loadable)"),
    "hicache_evicted_tokens_total": ("counter", "tokens freed by eviction per tier"),
    "hicache_demoted_tokens_total": ("counter", "L1 tokens evicted with a host copy kept"),
    "hicache_dropped_tokens_total": ("counter", "L1 tokens evicted without a host copy"),
    "hicache_transfer_tokens_total": ("counter", "tokens copied (all layers)"),
    "hicache_transfer_bytes_total": ("counter", "KV bytes copied (all layers, K and V)"),
    "hicache_transfer_seconds_total": ("counter", "seconds the copies took"),
    "hicache_transfer_gb_per_second": ("gauge", "achieved bandwidth so far, 1e9 bytes/s"),
    "hicache_transfer_failures_total": ("counter", "transfer batches that failed"),
    "hicache_failed_tokens_total": ("counter", "tokens not copied: no room, or a failed copy"),
    "hicache_queue_depth": ("gauge", "operations queued or in flight"),
    "hicache_tokens": ("gauge", "tokens held per tier and state"),
    "hicache_capacity_tokens": ("gauge", "pool size per tier, tokens"),
    "hicache_mamba_states": ("gauge", "Mamba states held by the tree, per state"),
    "hicache_mamba_capacity_states": ("gauge", "Mamba state pool size"),
    "hicache_mamba_forks_total": ("counter", "request states copied from cached ones"),
    "hicache_mamba_published_total": ("counter", "request states the tree took"),
    "hicache_mamba_evicted_states_total": ("counter", "Mamba states freed by eviction"),
    "hicache_storage_pages_total": ("counter", "storage (L3) pages per operation outcome"),
    "hicache_storage_prefetches_total": ("counter", "storage prefetches per outcome"),
    "hicache_storage_failures_total": ("counter", "storage backend failures per kind"),
    "hicache_storage_queue_depth": ("gauge", "storage operations in flight per direction"),
}


def collect(cache: HiCache) -> list[Sample]:
    """Reads every metric of ``cache`` (under its lock, so the values are consistent).

    Args:
        cache: the cache.

    Returns:
        The samples, in the order of :data:`METRICS`.
    """
    samples: list[Sample] = []

    def add(name: str, value: float, **labels: str) -> None:
        kind, help_text = METRICS[name]
        samples.append(Sample(name, kind, help_text, labels, value))

    with cache._lock:
        stats = cache.stats
        add("hicache_match_calls_total", stats.match_calls)
        add("hicache_hit_tokens_total", stats.device_hit_tokens, tier="L1", component="full")
        add("hicache_hit_tokens_total", stats.host_hit_tokens, tier="L2", component="full")
        add("hicache_evicted_tokens_total", stats.evicted_tokens, tier="L1")
        add("hicache_evicted_tokens_total", stats.host_evicted_tokens, tier="L2")
        add("hicache_demoted_tokens_total", stats.demoted_tokens)
        add("hicache_dropped_tokens_total", stats.dropped_tokens)
        controller = cache.controller
        if controller is not None:
            directions = (
                (
                    "backup",
                    controller.backup_counters,
                    stats.backup_failed_tokens,
                    controller.num_pending_writes(),
                ),
                (
                    "load_back",
                    controller.load_counters,
                    stats.load_back_failed_tokens,
                    controller.num_pending_loads(),
                ),
            )
            for direction, counters, failed_tokens, depth in directions:
                add("hicache_transfer_tokens_total", counters.tokens, direction=direction)
                add("hicache_transfer_bytes_total", counters.bytes, direction=direction)
                add("hicache_transfer_seconds_total", counters.seconds, direction=direction)
                add("hicache_transfer_gb_per_second", counters.gb_per_s, direction=direction)
                add("hicache_transfer_failures_total", counters.failed_batches, direction=direction)
                add("hicache_failed_tokens_total", failed_tokens, direction=direction)
                add("hicache_queue_depth", depth, direction=direction)
        tree = cache.tree
        tiers = [("L1", tree.evictable_size(), tree.protected_size(), cache.allocator.num_slots)]
        if cache.host_pool is not None:
            host_sizes = (tree.host_evictable_size(), tree.host_protected_size())
            tiers.append(("L2", *host_sizes, cache.host_pool.num_slots))
        for tier, evictable, protected, capacity in tiers:
            add("hicache_tokens", evictable, tier=tier, state="evictable")
            add("hicache_tokens", protected, tier=tier, state="protected")
            add("hicache_capacity_tokens", capacity, tier=tier)
        if cache.mamba_pool is not None:
            add("hicache_mamba_states", tree.mamba_evictable_size(), state="evictable")
            add("hicache_mamba_states", tree.mamba_protected_size(), state="protected")
            add("hicache_mamba_capacity_states", cache.mamba_pool.num_slots)
            add("hicache_mamba_forks_total", stats.mamba_forks)
            add("hicache_mamba_published_total", stats.mamba_published)
            add("hicache_mamba_evicted_states_total", stats.mamba_evicted_states)
        storage = cache.storage
        if storage is not None:
            add("hicache_hit_tokens_total", stats.storage_hit_tokens, tier="L3", component="full")
            with storage._lock:
                c = storage.counters.as_dict()
            pages = (
                ("query_hit", c["prefetch_query_pages"]),
                ("read", c["prefetch_read_pages"]),
                ("stored", c["backup_pages"]),
                ("deduplicated", c["backup_dedup_pages"]),
                ("not_stored", c["backup_failed_pages"]),
            )
            for op, value in pages:
                add("hicache_storage_pages_total", value, op=op)
            add("hicache_storage_prefetches_total", c["prefetch_ops"], outcome="queued")
            add("hicache_storage_prefetches_total", c["prefetch_revoked_ops"], outcome="revoked")
            add("hicache_storage_prefetches_total", c["prefetch_failed_ops"], outcome="cut")
            backend = storage.backend.stats_snapshot()
            add("hicache_storage_failures_total", backend.failed_ops, kind="backend_ops")
            add("hicache_storage_failures_total", backend.corrupt_pages, kind="corrupt_pages")
            add("hicache_storage_queue_depth", len(cache._ongoing_prefetch), direction="prefetch")
            add("hicache_storage_queue_depth", storage.num_pending_backups(), direction="backup")
    return samples


def as_dict(samples: list[Sample]) -> dict[str, float]:
    """The samples as ``{"name{label=value,...}": value}`` (labels sorted; no braces if none)."""
    out: dict[str, float] = {}
    for s in samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class HiCacheCollector:
    """A ``prometheus_client`` collector of one cache's metrics.

    Register it in an engine's registry (``registry.register(HiCacheCollector(cache))``) to
    expose the cache on the engine's ``/metrics`` endpoint; every scrape calls :func:`collect`.

    Args:
        cache: the cache to report.
        const_labels: labels added to every sample (e.g. ``{"tp_rank": "0"}``).
    """

    def __init__(self, cache: HiCache, const_labels: dict[str, str] | None = None) -> None:
        self.cache = cache
        self.const_labels = dict(const_labels or {})

    def collect(self) -> Iterator:
        """Yields one metric family per metric name (the ``prometheus_client`` protocol)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for s in collect(self.cache):
            labels = {**self.const_labels, **s.labels}
            family = families.get(s.name)
            if family is None:
                kind = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                # prometheus_client appends "_total" to counters itself.
                name = s.name.removesuffix("_total") if s.kind == "counter" else s.name
                family = kind(name, s.help, labels=list(labels))
                families[s.name] = family
            family.add_metric(list(labels.values()), s.value)
        yield from families.values()


def prometheus_text(cache: HiCache, const_labels: dict[str, str] | None = None) -> str:
    """The cache's metrics in the Prometheus text exposition format (version 0.0.4).

    Args:
        cache: the cache.
        const_labels: labels added to every sample.

    Returns:
        The exposition text, as ``prometheus_client.generate_latest`` renders it.
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(HiCacheCollector(cache, const_labels))
    return generate_latest(registry).decode("utf-8")
