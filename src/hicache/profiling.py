"""NVTX ranges of hicache: one domain, stable stage names, listed once.

An Nsight Systems timeline of an engine using hicache reads as the cache pipeline: every stage
below is an NVTX push/pop range in the domain ``"hicache"``, named by one of these constants and
nothing else (so the names stay stable across releases and tools can key on them):

============== ===================================================================================
name           what runs inside (payload)
============== ===================================================================================
match_prefix   ``HiCache.match_prefix`` (tree walk, plus load-back when asked)
insert         ``HiCache.insert`` (tree insert and write-through queueing)
evict          ``HiCache.evict`` (device eviction, demotion, write-back backups)
evict_host     ``HiCache.evict_host``
load_back      ``HiCache.init_load_back`` (plan, device allocation, commit, queueing)
enqueue_write  ``CacheController.write``: one backup queued
enqueue_load   ``CacheController.load``: one load-back queued
write_batch    one merged device -> host batch, all layers (tokens in the batch)
load_batch     one merged host -> device batch (tokens in the batch)
load_layer     one layer of a load batch (the layer index)
ack            ``HiCache.check_hicache_events``: backups submitted, acks applied to the tree
ack_write      ``CacheController.writing_check``
ack_load       ``CacheController.loading_check``
kernel_backup  C++ (``cuda/transfer.cu``): one device -> host launch of the transfer kernel
kernel_load    C++ (``cuda/transfer.cu``): one host -> device launch (a layer, or all layers)
prefetch       ``HiCache.prefetch_from_storage``: an L3 prefetch checked and queued (tokens)
prefetch_done  ``HiCache.check_prefetch_progress`` / ``terminate_prefetch`` ending a prefetch:
               its pages inserted as host nodes, duplicates freed (tokens inserted)
storage_query  prefetch thread: page hashes and ``exists`` batches of one prefetch (tokens)
storage_get    prefetch thread: one ``get`` batch from storage into host pages (pages)
storage_backup backup thread: one ``set`` batch from host pages into storage (pages)
============== ===================================================================================

How they nest is :data:`NESTING` (and ``profiling/README.md``, which a test keeps equal to it):
the stages each range may open directly inside, on the same thread. Where the batches run
depends on the device pool: on CUDA, ``write_batch`` and ``load_batch`` are issued on the calling
thread (the ranges time the issue of the copies onto the side streams; the copies themselves are
on the streams' rows of the timeline); without CUDA they run on the controller's worker threads
(``hicache-write``, ``hicache-load``), outermost there (:data:`WORKER_STAGES`). The storage
stages run on the storage controller's threads (``hicache-prefetch``,
``hicache-storage-backup``), outermost there (:data:`STORAGE_STAGES`); that prefetch thread also
opens ``evict_host`` when it makes host room for a storage hit.

The ``kernel_*`` ranges are pushed by the CUDA module, not by Python: their names are listed in
:data:`CPP_STAGES` and, once more, in ``cpp/include/hicache/nvtx.h``; a test checks that the two
lists agree.

Without a profiler attached, ``nvtx`` ranges cost a few hundred nanoseconds each; they wrap
batches and calls, never per-token work.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import nvtx

__all__ = [
    "CPP_STAGES",
    "DOMAIN",
    "NESTING",
    "STAGES",
    "STORAGE_STAGES",
    "WORKER_STAGES",
    "nvtx_range",
]

DOMAIN = "hicache"

MATCH_PREFIX = "match_prefix"
INSERT = "insert"
EVICT = "evict"
EVICT_HOST = "evict_host"
LOAD_BACK = "load_back"
ENQUEUE_WRITE = "enqueue_write"
ENQUEUE_LOAD = "enqueue_load"
WRITE_BATCH = "write_batch"
LOAD_BATCH = "load_batch"
LOAD_LAYER = "load_layer"
ACK = "ack"
ACK_WRITE = "ack_write"
ACK_LOAD = "ack_load"
KERNEL_BACKUP = "kernel_backup"
KERNEL_LOAD = "kernel_load"
PREFETCH = "prefetch"
PREFETCH_DONE = "prefetch_done"
STORAGE_QUERY = "storage_query"
STORAGE_GET = "storage_get"
STORAGE_BACKUP = "storage_backup"

STAGES = (
    MATCH_PREFIX,
    INSERT,
    EVICT,
    EVICT_HOST,
    LOAD_BACK,
    ENQUEUE_WRITE,
    ENQUEUE_LOAD,
    WRITE_BATCH,
    LOAD_BATCH,
    LOAD_LAYER,
    ACK,
    ACK_WRITE,
    ACK_LOAD,
    KERNEL_BACKUP,
    KERNEL_LOAD,
    PREFETCH,
    PREFETCH_DONE,
    STORAGE_QUERY,
    STORAGE_GET,
    STORAGE_BACKUP,
)

# The stages that C++ code emits (hicache::nvtx in cpp/include/hicache/nvtx.h).
CPP_STAGES = (KERNEL_BACKUP, KERNEL_LOAD)

# For each stage, the stages whose range may enclose it directly on the same thread; None: it may be
# outermost on its thread. Read off the callers in cache.py, controller.py and cuda/transfer.cu (the
# public HiCache calls are outermost; init_load_back's allocation may evict and wait for acks;
# write-back eviction backs up and waits right inside evict; check_hicache_events submits the
# queued backups, on CUDA on its own thread). It describes ranges opened through HiCache: a
# CacheController driven directly opens its ranges outermost. tests/profiling asserts that a
# recorded replay nests every range this way and that profiling/README.md lists the same table.
NESTING: dict[str, frozenset[str | None]] = {
    MATCH_PREFIX: frozenset({None}),
    INSERT: frozenset({None}),
    EVICT: frozenset({None, LOAD_BACK}),
    EVICT_HOST: frozenset({None, INSERT, EVICT}),
    LOAD_BACK: frozenset({None, MATCH_PREFIX}),
    ENQUEUE_WRITE: frozenset({INSERT, EVICT}),
    ENQUEUE_LOAD: frozenset({LOAD_BACK}),
    WRITE_BATCH: frozenset({None, ACK, EVICT}),
    LOAD_BATCH: frozenset({None}),
    LOAD_LAYER: frozenset({LOAD_BATCH}),
    ACK: frozenset({None, LOAD_BACK}),
    ACK_WRITE: frozenset({ACK, EVICT}),
    ACK_LOAD: frozenset({ACK}),
    KERNEL_BACKUP: frozenset({WRITE_BATCH}),
    KERNEL_LOAD: frozenset({LOAD_LAYER}),
    PREFETCH: frozenset({None}),
    PREFETCH_DONE: frozenset({None}),
    STORAGE_QUERY: frozenset({None}),
    STORAGE_GET: frozenset({None}),
    STORAGE_BACKUP: frozenset({None}),
}

# The stages that, without CUDA, run on the controller's worker threads (one per direction) and
# open outermost there; on CUDA they run on the submitting thread, nested as NESTING says.
WORKER_STAGES = (WRITE_BATCH, LOAD_BATCH)

# The stages of the storage (L3) controller's threads (prefetch, backup), outermost there.
STORAGE_STAGES = (STORAGE_QUERY, STORAGE_GET, STORAGE_BACKUP)


# Whether a tool (Nsight Systems, an NVTX injection library) collects the domain: the nvtx package
# hands out a dummy domain when none is attached, which it can only be at process start.
_TOOL_ATTACHED = type(nvtx.get_domain(DOMAIN)).__name__ != "DummyDomain"
_NO_RANGE = nullcontext()  # stateless and reentrant: one instance serves every call


def nvtx_range(name: str, payload: int | None = None) -> AbstractContextManager:
    """A push/pop NVTX range ``name`` in the ``hicache`` domain.

    Without a tool attached it returns a shared no-op context manager: ``nvtx.annotate`` would
    build an object per call (~0.4 µs) for nothing.

    Args:
        name: one of :data:`STAGES`.
        payload: an integer attached to the range (e.g. the layer index of ``load_layer``).

    Returns:
        A context manager; the range spans its ``with`` block on the calling thread.
    """
    if not _TOOL_ATTACHED:
        return _NO_RANGE
    return nvtx.annotate(message=name, domain=DOMAIN, payload=payload)
