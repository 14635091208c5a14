"""The storage (L3) controller: a prefetch thread and a backup thread around a storage backend.

SGLang 0.5.23's ``HiCacheController`` storage half (reference §3.8, §4): the cache
(:class:`hicache.cache.HiCache`) decides what to prefetch and what to back up; this controller
runs the storage I/O on two threads so that the scheduler never waits for storage.

Prefetch (``prefetch_thread_func`` + ``prefetch_io_aux_func`` in SGLang): per operation, hash
the request's new pages (the chain continues from the anchor's last page hash), ask the backend
how many leading pages it has (``exists``, batches of :data:`BATCH_PAGES`), and only then
allocate host pages, for the hit only (upstream PR #19320: no host memory is taken for a miss);
a hit shorter than the threshold is revoked. Then ``get`` the pages in batches into those host
pages, publishing the completed count after each batch. The cache's scheduler thread polls
(:meth:`PrefetchOperation.completed_pages`) and terminates an operation when its policy says
(see :data:`PREFETCH_POLICIES`); it then owns the completed pages, and the thread frees the rest
once its batch in flight is done, so no page is freed while a ``get`` writes into it.

Backup (``backup_thread_func``): after a device -> host copy is acknowledged, the cache queues
the node's host pages with their page hashes; keys already queued are dropped (deduplicated by
key; the backend itself skips keys it stores), and the thread ``set`` s the rest in batches,
stopping at the first failure. The cache host-locks the node until the ack
(:meth:`pop_backup_acks`) so that its host pages are not freed while they are read.

Hybrid models (reference §3.11): a node's host Mamba state is stored under its last page's hash
in a second backend whose identity is the Mamba host pool's; a node's host SWA copy (the
sliding-window layers' KV of its pages) is stored page by page under the same page hashes in a
third backend whose identity is the SWA host pool's. A hybrid prefetch is all-or-nothing: it is
cut back to the deepest stored page that also has a stored state (Mamba) and whose window (the
``ceil(window / page_size)`` pages ending there, or every page from the prefetch's start when
fewer) has stored SWA pages (SWA), and publishes its pages only once every page, that state and
that window are read.

Faults never propagate: a :class:`~hicache.errors.StorageError`, a short ``get`` (a missing or
corrupt page) or a short ``set`` (a full backend) ends that operation's I/O early, is counted in
:attr:`StorageController.counters`, and the request proceeds with what completed.

Threading: host pages are allocated and freed through callbacks that take the cache's lock (the
tree's single lock, DESIGN.md threading contract); every field shared with the scheduler thread
is guarded by the operation's or the controller's lock, never held while a callback runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from hicache import profiling
from hicache.errors import InvalidArgumentError, StorageError
from hicache.memory import HostKVPool, MambaHostPool
from hicache.storage.base import StorageBackend
from hicache.storage.page_hash import page_hashes

__all__ = [
    "BATCH_PAGES",
    "PREFETCH_POLICIES",
    "PrefetchConfig",
    "PrefetchOperation",
    "StorageController",
    "StorageCounters",
]

logger = logging.getLogger(__name__)

#: Pages per ``exists`` / ``get`` / ``set`` call (SGLang's storage batch size).
BATCH_PAGES = 128

#: SGLang's ``--hicache-storage-prefetch-policy`` values: when the scheduler stops waiting.
#: ``best_effort``: at the first progress check, with whatever has completed;
#: ``wait_complete``: only once every hit page is read; ``timeout``: once every hit page is read
#: or ``timeout_base + timeout_per_ki_token * tokens / 1024`` seconds have passed.
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")


# A queued backup: (ack node id, page keys, their host slots, (state key, host state slot)s,
# SWA page keys, their host SWA slots).
_BackupItem = tuple[int, list[str], torch.Tensor, list[tuple[str, int]], list[str], torch.Tensor]


@dataclass(frozen=True)
class PrefetchConfig:
    """The prefetch knobs, with SGLang's defaults (reference §3.8, §6.4).

    Attributes:
        policy: one of :data:`PREFETCH_POLICIES`.
        threshold_tokens: prefetch only when the new tokens, and then the storage hit, are at
            least this many (raised to at least one page).
        timeout_base_s: the ``timeout`` policy's fixed part, seconds.
        timeout_per_ki_token_s: its part per 1024 prefetched tokens, seconds.
    """

    policy: str = "best_effort"
    threshold_tokens: int = 256
    timeout_base_s: float = 1.0
    timeout_per_ki_token_s: float = 0.25

    def __post_init__(self) -> None:
        """Validates the fields.

        Raises:
            InvalidArgumentError: an unknown policy, a negative threshold or timeout.
        """
        if self.policy not in PREFETCH_POLICIES:
            raise InvalidArgumentError(
                f"PrefetchConfig: policy: expected one of {list(PREFETCH_POLICIES)}, got "
                f"{self.policy!r}"
            )
        if self.threshold_tokens < 0 or self.timeout_base_s < 0 or self.timeout_per_ki_token_s < 0:
            raise InvalidArgumentError(
                f"PrefetchConfig: threshold_tokens, timeout_base_s and timeout_per_ki_token_s "
                f"must be >= 0, got {self.threshold_tokens}, {self.timeout_base_s}, "
                f"{self.timeout_per_ki_token_s}"
            )

    @classmethod
    def from_extra_config(cls, policy: str, extra_config: dict | None) -> PrefetchConfig:
        """The config from SGLang's extra-config keys (reference §6.4).

        Reads ``prefetch_threshold``, ``prefetch_timeout_base`` and
        ``prefetch_timeout_per_ki_token``; other keys are ignored (they belong to the backend).

        Raises:
            InvalidArgumentError: a value of the wrong type, or as :meth:`__post_init__`.
        """
        config = extra_config or {}
        try:
            return cls(
                policy,
                int(config.get("prefetch_threshold", cls.threshold_tokens)),
                float(config.get("prefetch_timeout_base", cls.timeout_base_s)),
                float(config.get("prefetch_timeout_per_ki_token", cls.timeout_per_ki_token_s)),
            )
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"PrefetchConfig: bad extra config value ({e})") from None

    def timeout_s(self, num_tokens: int) -> float:
        """The ``timeout`` policy's limit for a prefetch of ``num_tokens`` tokens, seconds."""
        return self.timeout_base_s + self.timeout_per_ki_token_s * num_tokens / 1024


@dataclass
class StorageCounters:
    """What the storage threads did, since construction (pages are ``page_size`` tokens).

    Attributes:
        prefetch_ops: prefetch operations queued.
        prefetch_query_pages: leading pages ``exists`` found in storage.
        prefetch_revoked_ops: operations whose hit was below the threshold, or that found no
            host room for it (nothing allocated, nothing read).
        prefetch_read_pages: pages read and verified into host pages.
        prefetch_failed_ops: operations cut short by a backend failure or a short ``get``
            (a missing or corrupt page).
        backup_ops: backup operations queued (after deduplication left something to store).
        backup_pages: pages stored (or found stored) by the backend.
        backup_dedup_pages: pages dropped before queueing because their key was queued already
            (pages the backend finds stored count in its ``stats.dedup_pages``).
        backup_failed_pages: pages not stored: a failure, or a full backend.
        backup_failed_ops: backup operations cut short.
        prefetch_states: hybrid: states read with their prefetch.
        backup_states: hybrid: node states stored (or found stored).
        backup_failed_states: hybrid: node states not stored.
        prefetch_swa_pages: SWA: window pages read with their prefetch.
        prefetch_swa_cut_pages: SWA: hit pages dropped from prefetches because their window
            was not stored.
        backup_swa_pages: SWA: host SWA pages stored (or found stored).
        backup_failed_swa_pages: SWA: host SWA pages not stored.
    """

    prefetch_ops: int = 0
    prefetch_query_pages: int = 0
    prefetch_revoked_ops: int = 0
    prefetch_read_pages: int = 0
    prefetch_failed_ops: int = 0
    backup_ops: int = 0
    backup_pages: int = 0
    backup_dedup_pages: int = 0
    backup_failed_pages: int = 0
    backup_failed_ops: int = 0
    prefetch_states: int = 0
    backup_states: int = 0
    backup_failed_states: int = 0
    prefetch_swa_pages: int = 0
    prefetch_swa_cut_pages: int = 0
    backup_swa_pages: int = 0
    backup_failed_swa_pages: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


class PrefetchOperation:
    """One request's prefetch (SGLang's ``PrefetchOperation``), shared by two threads.

    Owned by the cache's scheduler thread (which created it and terminates it) and the prefetch
    thread (which fills it). ``_lock`` guards the mutable fields; the thread never holds it while
    it reads storage or calls back into the cache.

    Attributes:
        req_id: the request's id.
        anchor: the node whose path the tokens continue (host-locked until termination).
        tokens: ``[num_tokens]`` int64 CPU tensor, whole pages: the tokens to prefetch.
        extra_key: the request's namespace.
        previous_digest: the page hash the chain continues from (the anchor's last page hash,
            or the namespace seed below the root; None: unseeded).
        page_size: tokens per page.
        needs_state: a hybrid (Mamba) prefetch: all-or-nothing, with the state at its end.
        swa_pages: SWA models: the window in pages (``ceil(window / page_size)``); the prefetch
            is all-or-nothing and reads the SWA pages of its last ``swa_pages`` pages (all of
            them when fewer). 0 otherwise.
        created_s: ``time.monotonic()`` at creation.
    """

    def __init__(
        self,
        req_id: object,
        anchor: int,
        tokens: torch.Tensor,
        extra_key: str | None,
        previous_digest: bytes | None,
        page_size: int,
        needs_state: bool = False,
        swa_pages: int = 0,
    ) -> None:
        self.req_id = req_id
        self.needs_state = needs_state
        self.swa_pages = swa_pages
        self.state_slot = -1  # hybrid: the host state slot, set with the host slots
        # SWA: the host SWA slots of the window's pages (the last pages), set with the host slots
        self.swa_slots: torch.Tensor | None = None
        self.page_size = page_size
        self.anchor = anchor
        self.tokens = tokens
        self.extra_key = extra_key
        self.previous_digest = previous_digest
        self.created_s = time.monotonic()
        self.keys: list[str] = []  # written by the prefetch thread before host_indices
        self._lock = threading.Lock()
        self._host_indices: torch.Tensor | None = None  # host slots of the hit pages
        self._completed_pages = 0  # leading pages read and verified into _host_indices
        self._terminated = False
        self._taken_pages = 0  # pages the scheduler took at termination
        self._finished = threading.Event()  # the thread is done with this operation

    @property
    def num_tokens(self) -> int:
        """Tokens the operation was asked to prefetch."""
        return int(self.tokens.numel())

    @property
    def all_or_nothing(self) -> bool:
        """Whether the prefetch publishes every hit page or none (hybrid, reference §3.11)."""
        return self.needs_state or self.swa_pages > 0

    def completed_pages(self) -> int:
        """Leading pages read and verified so far."""
        with self._lock:
            return self._completed_pages

    def is_finished(self) -> bool:
        """Whether the prefetch thread is done with this operation (all read, or stopped)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the thread is done with the operation; False on timeout."""
        return self._finished.wait(timeout)

    def terminate(self) -> tuple[int, torch.Tensor | None, torch.Tensor | None, bool]:
        """Stops the operation; the caller takes the completed pages.

        Returns:
            ``(pages, taken, rest, rest_is_yours)``: the completed pages and their host slots
            ``taken`` (``[pages * page_size]``; None when no host slots were attached, then
            ``rest`` is None too), the other attached host slots ``rest``, and whether the
            caller must free ``rest`` now (the thread is done) or the thread frees it when its
            batch in flight ends.
        """
        with self._lock:
            self._terminated = True
            self._taken_pages = self._completed_pages
            host = self._host_indices
            if host is None:
                return 0, None, None, False
            cut = self._taken_pages * self.page_size
            return self._taken_pages, host[:cut], host[cut:], self._finished.is_set()

    # ---- prefetch thread side (under _lock) ----

    def taken_pages(self) -> int:
        """Pages the scheduler took at termination (0 before it)."""
        with self._lock:
            return self._taken_pages

    def _attach(
        self, host: torch.Tensor, state_slot: int = -1, swa_slots: torch.Tensor | None = None
    ) -> bool:
        """Gives the operation its host slots; False (the caller frees them) if terminated."""
        with self._lock:
            if self._terminated:
                return False
            self._host_indices = host
            self.state_slot = state_slot
            self.swa_slots = swa_slots
            return True

    def _is_terminated(self) -> bool:
        with self._lock:
            return self._terminated

    def _advance(self, num_pages: int) -> bool:
        """Publishes ``num_pages`` more completed pages; False if terminated (not published)."""
        with self._lock:
            if self._terminated:
                return False
            self._completed_pages += num_pages
            return True

    def _finish(self) -> torch.Tensor | None:
        """Marks the thread done; returns the host slots it must free (None: none)."""
        with self._lock:
            self._finished.set()
            if not self._terminated or self._host_indices is None:
                return None
            return self._host_indices[self._taken_pages * self.page_size :]


class StorageController:
    """Runs prefetches from and backups to a storage backend on two threads.

    Args:
        backend: the storage backend (its ``identity`` must describe ``host_pool``).
        host_pool: the host KV pool pages are read into and written from.
        page_size: tokens per page.
        config: the prefetch policy and its knobs.
        alloc_host: ``alloc_host(op, num_tokens, min_tokens)``: called by the prefetch thread;
            allocates between ``min_tokens`` and ``num_tokens`` host slots (whole pages, as many
            as fit), attaches them to ``op`` (``op._attach``, under the cache's lock, so that
            slot ownership is never unaccounted for) and returns them; returns None when fewer
            than ``min_tokens`` fit or ``op`` was terminated meanwhile (then it frees them).
        free_host: ``free_host(op, indices)``: frees host slots of ``op`` that nobody uses
            (and its state slot, for a hybrid prefetch that took no page).
        batch_pages: pages per backend call.
        state_backend: hybrid models: the backend of node states (its identity describes
            ``state_pool``); None otherwise.
        state_pool: hybrid models: the host Mamba state pool.
        swa_backend: SWA models: the backend of SWA pages (its identity describes
            ``swa_pool``, kind ``"swa"``); None otherwise.
        swa_pool: SWA models: the host SWA KV pool.

    Raises:
        InvalidArgumentError: bad ``page_size`` or ``batch_pages``.
    """

    def __init__(
        self,
        backend: StorageBackend,
        host_pool: HostKVPool,
        page_size: int,
        config: PrefetchConfig,
        alloc_host: Callable[[PrefetchOperation, int, int], torch.Tensor | None],
        free_host: Callable[[PrefetchOperation, torch.Tensor], None],
        batch_pages: int = BATCH_PAGES,
        state_backend: StorageBackend | None = None,
        state_pool: MambaHostPool | None = None,
        swa_backend: StorageBackend | None = None,
        swa_pool: HostKVPool | None = None,
    ) -> None:
        if page_size < 1 or batch_pages < 1:
            raise InvalidArgumentError(
                f"StorageController: page_size and batch_pages must be >= 1, got {page_size} "
                f"and {batch_pages}"
            )
        if (state_backend is None) != (state_pool is None):
            raise InvalidArgumentError(
                "StorageController: state_backend and state_pool go together (hybrid models)"
            )
        if (swa_backend is None) != (swa_pool is None):
            raise InvalidArgumentError(
                "StorageController: swa_backend and swa_pool go together (SWA models)"
            )
        self.backend = backend
        self.host_pool = host_pool
        self.state_backend = state_backend
        self.state_pool = state_pool
        self.swa_backend = swa_backend
        self.swa_pool = swa_pool
        self.page_size = page_size
        self.config = config
        self.threshold_tokens = max(config.threshold_tokens, page_size)
        self.batch_pages = batch_pages
        self._alloc_host = alloc_host
        self._free_host = free_host
        self.counters = StorageCounters()
        self._lock = threading.Lock()  # guards counters, the queued keys and the ack list
        self._queued_keys: set[str] = set()
        self._last_queued_extras = 0
        self._backup_acks: list[tuple[int, int, int]] = []
        self._backups_in_flight = 0
        self._backups_done = threading.Condition(self._lock)
        self._prefetch_queue: queue.Queue[PrefetchOperation | None] = queue.Queue()
        self._backup_queue: queue.Queue[_BackupItem | None] = queue.Queue()
        self._closed = False
        self._prefetch_thread = threading.Thread(
            target=self._prefetch_loop, name="hicache-prefetch", daemon=True
        )
        self._backup_thread = threading.Thread(
            target=self._backup_loop, name="hicache-storage-backup", daemon=True
        )
        self._prefetch_thread.start()
        self._backup_thread.start()

    # ---- scheduler side ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (nothing more is queued)."""
        return self._closed

    def prefetch(self, op: PrefetchOperation) -> None:
        """Queues a prefetch operation for the prefetch thread.

        Raises:
            InvalidArgumentError: the controller is closed.
        """
        if self._closed:
            raise InvalidArgumentError("StorageController.prefetch: the controller is closed")
        self._count(prefetch_ops=1)
        self._prefetch_queue.put(op)

    def backup(
        self,
        node_id: int,
        keys: Sequence[str],
        host_indices: torch.Tensor,
        states: Sequence[tuple[str, int]] = (),
        swa_keys: Sequence[str] = (),
        swa_indices: torch.Tensor | None = None,
    ) -> int:
        """Queues pages (node states, SWA pages) of a backed-up node for storage, minus queued keys.

        Args:
            node_id: the ack id (the cache host-locks this node until :meth:`pop_backup_acks`
                returns it).
            keys: one hex page hash per page.
            host_indices: ``[len(keys) * page_size]`` int64 CPU host slots, page by page.
            states: hybrid models: ``(key, host state slot)`` per node state to store (the key
                is the node's last page hash).
            swa_keys: SWA models: one hex page hash per host SWA page to store.
            swa_indices: ``[len(swa_keys) * page_size]`` int64 CPU host SWA slots, page by page.

        Returns:
            The number of pages queued; 0 with no state or SWA page queued means nothing to do
            (or the controller is closed) and no ack will come; see :meth:`num_queued_extras`.
        """
        with self._lock:
            if self._closed:
                return 0
            keep = [i for i, k in enumerate(keys) if k not in self._queued_keys]
            kept_states = [(k, slot) for k, slot in states if "state:" + k not in self._queued_keys]
            keep_swa = [i for i, k in enumerate(swa_keys) if "swa:" + k not in self._queued_keys]
            self.counters.backup_dedup_pages += len(keys) - len(keep)
            self._last_queued_extras = len(kept_states) + len(keep_swa)
            if not keep and not kept_states and not keep_swa:
                return 0
            kept_keys = [keys[i] for i in keep]
            kept_swa_keys = [swa_keys[i] for i in keep_swa]
            self._queued_keys.update(kept_keys)
            self._queued_keys.update("state:" + k for k, _ in kept_states)
            self._queued_keys.update("swa:" + k for k in kept_swa_keys)
            self._backups_in_flight += 1
            self.counters.backup_ops += 1
        pages = self._pages(host_indices, keep, len(keys))
        swa_pages = self._pages(swa_indices, keep_swa, len(swa_keys))
        self._backup_queue.put((node_id, kept_keys, pages, kept_states, kept_swa_keys, swa_pages))
        return len(keep)

    def _pages(self, indices: torch.Tensor | None, keep: list[int], num_pages: int) -> torch.Tensor:
        """The slots of pages ``keep`` (of ``num_pages``) of ``indices``, page by page."""
        if indices is None or not keep:
            return torch.empty(0, dtype=torch.int64)
        if len(keep) == num_pages:
            return indices
        rows = indices.view(-1, self.page_size)
        return rows[torch.tensor(keep, dtype=torch.int64)].reshape(-1)

    def num_queued_extras(self) -> int:
        """States and SWA pages the last :meth:`backup` call queued (scheduler thread only)."""
        return self._last_queued_extras

    def pop_backup_acks(self) -> list[tuple[int, int, int]]:
        """The finished backups since the last call: ``(node_id, stored_pages, failed_pages)``."""
        with self._lock:
            acks, self._backup_acks = self._backup_acks, []
            return acks

    def wait_backups(self, timeout: float | None = None) -> bool:
        """Blocks until every queued backup has finished; False on timeout."""
        with self._backups_done:
            return self._backups_done.wait_for(lambda: self._backups_in_flight == 0, timeout)

    def num_pending_backups(self) -> int:
        """Backups queued or running."""
        with self._lock:
            return self._backups_in_flight

    def close(self, timeout: float = 30.0) -> None:
        """Stops both threads after the queued work. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._prefetch_queue.put(None)
        self._backup_queue.put(None)
        self._prefetch_thread.join(timeout)
        self._backup_thread.join(timeout)

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)

    # ---- prefetch thread ----------------------------------------------------------------------

    def _prefetch_loop(self) -> None:
        while (op := self._prefetch_queue.get()) is not None:
            spare = None
            try:
                self._prefetch_one(op)
            except Exception:  # a bug must not kill the thread and strand every later request
                logger.exception("prefetch of request %r failed", op.req_id)
                self._count(prefetch_failed_ops=1)
            finally:
                spare = op._finish()
            if spare is not None and spare.numel():
                self._free_host(op, spare)

    def _prefetch_one(self, op: PrefetchOperation) -> None:
        ps = self.page_size
        if op._is_terminated():  # ended (e.g. best_effort) before the thread got to it
            return
        with profiling.nvtx_range(profiling.STORAGE_QUERY, op.num_tokens):
            digests = page_hashes(op.tokens.numpy(), ps, prefix_digest=op.previous_digest)
            op.keys = [d.hex() for d in digests]
            hit = 0
            try:
                for start in range(0, len(op.keys), self.batch_pages):
                    batch = op.keys[start : start + self.batch_pages]
                    found = self.backend.exists(batch)
                    hit += found
                    if found < len(batch) or op._is_terminated():
                        break
            except StorageError as e:
                logger.warning("prefetch of request %r: exists failed: %s", op.req_id, e)
                self._count(prefetch_failed_ops=1)
        self._count(prefetch_query_pages=hit)
        if op.all_or_nothing:
            hit = self._deepest_usable(op, hit)
        if hit * ps < self.threshold_tokens:
            self._count(prefetch_revoked_ops=1)
            return
        # A hybrid prefetch is all-or-nothing: exactly the pages up to its cut, or none.
        min_tokens = hit * ps if op.all_or_nothing else self.threshold_tokens
        host = self._alloc_host(op, hit * ps, min_tokens)
        if host is None:
            self._count(prefetch_revoked_ops=1)
            return
        num_pages = host.numel() // ps
        if op.all_or_nothing:
            self._read_all_or_nothing(op, host, num_pages)
            return
        for start in range(0, num_pages, self.batch_pages):
            count = min(self.batch_pages, num_pages - start)
            if op._is_terminated():
                return
            with profiling.nvtx_range(profiling.STORAGE_GET, count):
                try:
                    read = self.backend.get(
                        op.keys[start : start + count],
                        self.host_pool,
                        host[start * ps : (start + count) * ps],
                    )
                except StorageError as e:
                    logger.warning("prefetch of request %r: get failed: %s", op.req_id, e)
                    self._count(prefetch_failed_ops=1)
                    return
            if not op._advance(read):
                return
            self._count(prefetch_read_pages=read)
            if read < count:  # a page vanished or failed verification: the rest is unusable
                self._count(prefetch_failed_ops=1)
                return

    def _deepest_usable(self, op: PrefetchOperation, hit: int) -> int:
        """Hybrid: the deepest cut of the ``hit`` leading pages a hybrid prefetch may end at.

        Mamba: the cut's last page has a stored state (one ``exists`` per page, deepest first:
        states are stored at node ends only). SWA: the window's pages before the cut (the last
        ``op.swa_pages``, or all when fewer) have stored SWA pages; a missing one moves the cut
        to just before it. Returns 0 below the threshold.
        """
        min_pages = max(1, -(-self.threshold_tokens // self.page_size))
        pages = hit
        try:
            while pages >= min_pages:
                if op._is_terminated():
                    return 0
                if op.needs_state:
                    assert self.state_backend is not None
                    if self.state_backend.exists([op.keys[pages - 1]]) != 1:
                        pages -= 1
                        continue
                if op.swa_pages:
                    assert self.swa_backend is not None
                    start = max(0, pages - op.swa_pages)
                    found = self.swa_backend.exists(op.keys[start:pages])
                    if found < pages - start:  # the window must end before the missing page
                        pages = start + found
                        continue
                break
        except StorageError as e:
            logger.warning("prefetch of request %r: hybrid exists failed: %s", op.req_id, e)
            self._count(prefetch_failed_ops=1)
            return 0
        if pages < min_pages:
            pages = 0
        if op.swa_pages:
            self._count(prefetch_swa_cut_pages=hit - pages)
        return pages

    def _read_all_or_nothing(self, op: PrefetchOperation, host: torch.Tensor, pages: int) -> None:
        """Hybrid: reads every page, the state and the SWA window; publishes all or nothing."""
        ps = self.page_size
        try:
            for start in range(0, pages, self.batch_pages):
                count = min(self.batch_pages, pages - start)
                if op._is_terminated():
                    return
                with profiling.nvtx_range(profiling.STORAGE_GET, count):
                    read = self.backend.get(
                        op.keys[start : start + count],
                        self.host_pool,
                        host[start * ps : (start + count) * ps],
                    )
                self._count(prefetch_read_pages=read)
                if read < count:
                    self._count(prefetch_failed_ops=1)
                    return
            if op.needs_state and not self._read_state(op, pages):
                self._count(prefetch_failed_ops=1)
                return
            swa_pages = self._read_swa_window(op, pages)
            if swa_pages < 0:
                self._count(prefetch_failed_ops=1)
                return
        except StorageError as e:
            logger.warning("prefetch of request %r: get failed: %s", op.req_id, e)
            self._count(prefetch_failed_ops=1)
            return
        if op._advance(pages):
            self._count(prefetch_states=int(op.needs_state), prefetch_swa_pages=swa_pages)

    def _read_state(self, op: PrefetchOperation, pages: int) -> bool:
        """Mamba: reads the state stored under the cut's last page; whether it arrived."""
        assert self.state_backend is not None and self.state_pool is not None
        state = torch.tensor([op.state_slot], dtype=torch.int64)
        with profiling.nvtx_range(profiling.STORAGE_GET, 1):
            return self.state_backend.get([op.keys[pages - 1]], self.state_pool, state) == 1

    def _read_swa_window(self, op: PrefetchOperation, pages: int) -> int:
        """SWA: reads the SWA pages of the window ending at the cut into ``op.swa_slots``.

        Returns the pages read (0 without a window), or -1 when one was missing or corrupt.
        """
        if op.swa_slots is None or not op.swa_slots.numel():
            return 0
        assert self.swa_backend is not None and self.swa_pool is not None
        ps = self.page_size
        num = op.swa_slots.numel() // ps
        keys = op.keys[pages - num : pages]
        for start in range(0, num, self.batch_pages):
            count = min(self.batch_pages, num - start)
            if op._is_terminated():
                return -1
            with profiling.nvtx_range(profiling.STORAGE_GET, count):
                read = self.swa_backend.get(
                    keys[start : start + count],
                    self.swa_pool,
                    op.swa_slots[start * ps : (start + count) * ps],
                )
            if read < count:
                return -1
        return num

    # ---- backup thread ------------------------------------------------------------------------

    def _backup_loop(self) -> None:
        while (item := self._backup_queue.get()) is not None:
            node_id, keys, host, states, swa_keys, swa_host = item
            stored = stored_states = stored_swa = 0
            try:
                stored = self._backup_one(keys, host)
                if stored == len(keys):
                    stored_states = self._backup_states(states)
                    stored_swa = self._backup_swa(swa_keys, swa_host)
            except Exception:  # as in _prefetch_loop: count, ack, go on
                logger.exception("storage backup of node %d failed", node_id)
            failed = len(keys) - stored
            with self._lock:
                self._queued_keys.difference_update(keys)
                self._queued_keys.difference_update("state:" + k for k, _ in states)
                self._queued_keys.difference_update("swa:" + k for k in swa_keys)
                self.counters.backup_states += stored_states
                self.counters.backup_failed_states += len(states) - stored_states
                self.counters.backup_swa_pages += stored_swa
                self.counters.backup_failed_swa_pages += len(swa_keys) - stored_swa
                self.counters.backup_pages += stored
                self.counters.backup_failed_pages += failed
                self.counters.backup_failed_ops += int(failed > 0)
                self._backup_acks.append((node_id, stored, failed))
                self._backups_in_flight -= 1
                self._backups_done.notify_all()

    def _backup_states(self, states: list[tuple[str, int]]) -> int:
        """Stores node states (hybrid); stops at the first failure. Returns states stored."""
        if not states:
            return 0
        assert self.state_backend is not None and self.state_pool is not None
        keys = [k for k, _ in states]
        slots = torch.tensor([slot for _, slot in states], dtype=torch.int64)
        with profiling.nvtx_range(profiling.STORAGE_BACKUP, len(keys)):
            try:
                return self.state_backend.set(keys, self.state_pool, slots)
            except StorageError as e:
                logger.warning("storage backup: state set failed: %s", e)
                return 0

    def _backup_swa(self, keys: list[str], host_swa: torch.Tensor) -> int:
        """Stores host SWA pages (SWA models); stops at the first failure. Returns pages stored."""
        if not keys:
            return 0
        assert self.swa_backend is not None and self.swa_pool is not None
        return self._backup_one(keys, host_swa, self.swa_backend, self.swa_pool)

    def _backup_one(
        self,
        keys: list[str],
        host: torch.Tensor,
        backend: StorageBackend | None = None,
        pool: HostKVPool | None = None,
    ) -> int:
        """Stores the pages in batches; stops at the first short batch. Returns pages stored.

        ``backend`` / ``pool``: the KV backend and host pool unless given (SWA pages).
        """
        backend = backend or self.backend
        pool = pool or self.host_pool
        ps = self.page_size
        stored = 0
        for start in range(0, len(keys), self.batch_pages):
            batch = keys[start : start + self.batch_pages]
            with profiling.nvtx_range(profiling.STORAGE_BACKUP, len(batch)):
                try:
                    done = backend.set(batch, pool, host[start * ps : (start + len(batch)) * ps])
                except StorageError as e:
                    logger.warning("storage backup: set failed: %s", e)
                    return stored
            stored += done
            if done < len(batch):
                return stored
        return stored
