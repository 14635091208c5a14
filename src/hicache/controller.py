"""The cache controller: host <-> device copies, queued, run asynchronously, acknowledged in order.

SGLang's ``HiCacheController`` for the L1 <-> L2 tier. The cache queues one
:class:`CacheOperation` per node to back up (:meth:`CacheController.write`) or load back
(:meth:`CacheController.load`); :meth:`~CacheController.start_writing` and
:meth:`~CacheController.start_loading` merge each queue into one batch and submit it;
:meth:`~CacheController.writing_check` and :meth:`~CacheController.loading_check` return the ack ids
of finished batches, oldest first, for the cache to apply to the tree.

Where the copies run:

- device pool on CUDA: on two dedicated side streams (one for writes, one for loads). Each batch
  first waits for the current (forward) stream, so that KV written by the model is complete and
  slots the model still uses are not overwritten early (SGLang's write/load fences, PR #36738);
  then records a CUDA event after each layer of a load and at the end of every batch.
- otherwise: on two worker threads (one per direction), with a ``threading.Event`` per layer and
  per batch, so that the same pipeline (and its races) runs on CPU-only machines.

Ownership (DESIGN.md failure classes 1 and 2): a :class:`CacheOperation` owns copies of its index
tensors, so queued work never aliases tree state; a batch keeps them alive until its ack is popped.
On CUDA, the copies of the indices on the device are made by the transfer functions *on the side
stream that uses them*, so the caching allocator never hands their memory to another stream before
that stream's copies have run (the ownership rule ``record_stream`` exists to restore for tensors
made on one stream and used on another). The controller validates indices on the CPU when they are
queued, and passes CPU indices on, so that no range check ever synchronises with a stream.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hicache import profiling, transfer
from hicache.errors import IndexOutOfRangeError, InvalidArgumentError, TransferError
from hicache.memory.device_pool import DeviceKVPool
from hicache.memory.host_pool import HostKVPool, check_transfer_indices
from hicache.memory.pool_transfer import PoolTransfer

__all__ = ["CacheController", "CacheOperation", "TransferCounters"]


@dataclass
class TransferCounters:
    """Completed copies of one direction, counted when their acks are popped.

    Attributes:
        batches: batches that finished without an error.
        tokens: tokens they copied (all layers).
        bytes: KV bytes they copied (all layers, K and V).
        seconds: time the copies took (CUDA: stream time between the batch's events; threads:
            the worker's wall clock). ``bytes / seconds`` is the achieved bandwidth.
        failed_batches: batches that raised.
    """

    batches: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failed_batches: int = 0

    @property
    def gb_per_s(self) -> float:
        """Achieved bandwidth in GB/s (1e9 bytes), 0 before the first batch."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class CacheOperation:
    """One queued copy between the host and device pools (SGLang's ``CacheOperation``).

    Attributes:
        host_indices: ``[n]`` int64 CPU host slots, owned by the operation.
        device_indices: ``[n]`` int64 CPU device slots, owned by the operation.
        ack_ids: node ids reported by the ack when the copy has finished.
        pool_transfers: the copies of extra pools that go with it (hybrid models: ``"mamba"``
            states), immutable :class:`~hicache.memory.PoolTransfer`s that own their indices
            (DESIGN.md failure class 1); at most one per pool.
    """

    host_indices: torch.Tensor
    device_indices: torch.Tensor
    ack_ids: tuple[int, ...]
    pool_transfers: tuple[PoolTransfer, ...] = ()

    @classmethod
    def create(
        cls,
        host_indices: torch.Tensor,
        device_indices: torch.Tensor,
        ack_id: int,
        pool_transfers: tuple[PoolTransfer, ...] = (),
    ) -> CacheOperation:
        """An operation owning copies of the given indices (never views of the caller's)."""
        return cls(host_indices.clone(), device_indices.clone(), (int(ack_id),), pool_transfers)

    @classmethod
    def merge(cls, ops: Sequence[CacheOperation]) -> CacheOperation:
        """One operation doing all of ``ops`` in order; the inputs are not modified.

        Raises:
            InvalidArgumentError: ``ops`` is empty.
        """
        if not ops:
            raise InvalidArgumentError("CacheOperation.merge: no operations to merge")
        if len(ops) == 1:
            return ops[0]
        by_pool: dict[str, list[PoolTransfer]] = {}
        for op in ops:
            for t in op.pool_transfers:
                by_pool.setdefault(t.name, []).append(t)
        merged = tuple(
            PoolTransfer(
                name,
                torch.cat([t.host_indices for t in ts]),
                torch.cat([t.device_indices for t in ts]),
            )
            for name, ts in sorted(by_pool.items())  # sorted: one order, whatever the op order
        )
        return cls(
            torch.cat([op.host_indices for op in ops]),
            torch.cat([op.device_indices for op in ops]),
            tuple(itertools.chain.from_iterable(op.ack_ids for op in ops)),
            merged,
        )

    @property
    def num_tokens(self) -> int:
        """Tokens copied."""
        return int(self.host_indices.numel())


class _Batch:
    """A submitted batch: its operation, completion signals per layer and overall, its error.

    On CUDA the signals are events recorded on the side stream; on the thread path they are
    ``threading.Event``s set by the worker. The operation's tensors live as long as the batch.
    """

    def __init__(self, op: CacheOperation, num_layers: int, cuda: bool) -> None:
        self.op = op
        self.error: Exception | None = None
        self.layers_done = 0  # layers whose copies were issued without an error
        self.cuda = cuda
        # torch.cuda.Event on CUDA, threading.Event otherwise.
        self.layer_events: list[Any]
        self.done_event: Any
        if cuda:
            self.layer_events = [torch.cuda.Event() for _ in range(num_layers)]
            # Timed, so that the ack can report the batch's time on its stream.
            self.start_event: Any = torch.cuda.Event(enable_timing=True)
            self.done_event = torch.cuda.Event(enable_timing=True)
        else:
            self.layer_events = [threading.Event() for _ in range(num_layers)]
            self.done_event = threading.Event()
        # perf_counter() at the start and end of the copies (thread path only).
        self.started = self.ended = 0.0

    def start(self) -> None:
        """Marks the start of the batch's copies (on CUDA: where the stream reaches this point)."""
        if self.cuda:
            self.start_event.record()
        else:
            self.started = time.perf_counter()

    def seconds(self) -> float:
        """Time the batch's copies took, once it is done: on its stream (CUDA) or wall clock."""
        if self.cuda:
            return self.start_event.elapsed_time(self.done_event) / 1e3
        return self.ended - self.started

    def layer_done(self, layer: int) -> None:
        self.layers_done = layer + 1
        if self.cuda:
            self.layer_events[layer].record()
        else:
            self.layer_events[layer].set()

    def finish(self) -> None:
        """Marks the batch complete (on CUDA: once the stream reaches this point)."""
        if self.cuda:
            self.done_event.record()
        else:
            self.ended = time.perf_counter()
            for event in self.layer_events:
                event.set()  # also after an error: nobody waits forever
            self.done_event.set()

    def is_done(self) -> bool:
        return self.done_event.query() if self.cuda else self.done_event.is_set()

    def wait(self) -> None:
        if self.cuda:
            self.done_event.synchronize()
        else:
            self.done_event.wait()

    def wait_layer(self, layer: int) -> None:
        """CUDA: the current stream waits for the layer; threads: block until it is copied.

        Raises:
            TransferError: the batch failed before this layer was copied: its KV is not there.
        """
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.layer_events[layer])
        else:
            self.layer_events[layer].wait()
        if self.error is not None and layer >= self.layers_done:
            raise TransferError(
                f"layer {layer} of a load batch was never copied: {self.error!r}", self.op.ack_ids
            ) from self.error


class _Lane:
    """One direction of transfer: a side stream (CUDA) or a worker thread running batches."""

    def __init__(self, name: str, cuda: bool) -> None:
        self.stream = torch.cuda.Stream() if cuda else None
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        if not cuda:
            self.thread = threading.Thread(target=self._work, name=f"hicache-{name}", daemon=True)
            self.thread.start()

    def submit(self, batch: _Batch, run: Callable[[_Batch], None]) -> None:
        if self.stream is not None:
            forward = torch.cuda.current_stream()  # the fence: KV the model wrote is complete
            with torch.cuda.stream(self.stream):
                self.stream.wait_stream(forward)
                _run(batch, run)
        else:
            self.queue.put((batch, run))

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            _run(*item)
            del item  # the batch's tensors live as long as the controller holds the batch

    def close(self, timeout: float) -> None:
        """Waits for the submitted batches, then stops the worker."""
        if self.stream is not None:
            self.stream.synchronize()
        if self.thread is not None and self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise TransferError(f"{self.thread.name} did not stop within {timeout} s")


def _run(batch: _Batch, run: Callable[[_Batch], None]) -> None:
    batch.start()
    try:
        run(batch)
    except Exception as e:  # noqa: BLE001 -- reported through the ack, never lost
        batch.error = e
    finally:
        batch.finish()


class ExtraPool(Protocol):
    """What the controller needs of an extra pool of a hybrid model.

    A :class:`~hicache.memory.MambaHostPool`, or a :class:`~hicache.transfer.KVTransfer` pairing
    the SWA KV pool with its host pool.
    """

    @property
    def num_slots(self) -> int: ...  # host slots

    @property
    def device_pool(self) -> Any: ...  # has num_slots

    def prepare(self, device_indices: torch.Tensor, host_indices: torch.Tensor, fn: str) -> Any: ...
    def backup_all_layers(self, indices: Any) -> None: ...
    def load_all_layers(self, indices: Any) -> None: ...


class CacheController:
    """Runs backups (device -> host) and load-backs (host -> device) off the caller's thread.

    Args:
        device_pool: the device KV pool.
        host_pool: the host KV pool; same kind, layers, heads, head_dim and dtype.
        extra_pools: host pools of the other state kinds of a hybrid model, by the name their
            :class:`~hicache.memory.PoolTransfer` objects use (``{"mamba": MambaHostPool}``, or
            ``{"swa": KVTransfer(swa_pool, swa_host_pool)}`` for the sliding-window KV); each
            knows its device pool. Their copies run in the same batches as the KV; a load
            copies them, all their layers, before it signals layer 0 (a state is small, and a
            model reading any layer after waiting for it then finds every pool's state there).
        io_backend: ``"direct"``, ``"kernel"`` or ``"auto"`` (SGLang's ``--hicache-io-backend``;
            see :func:`hicache.transfer.resolve_backend`). :attr:`io_backend` is the one that runs.

    Raises:
        InvalidArgumentError: an unknown ``io_backend``, ``"kernel"`` where it cannot run, or
            mismatched pools.
    """

    def __init__(
        self,
        device_pool: DeviceKVPool,
        host_pool: HostKVPool,
        io_backend: str = "auto",
        extra_pools: dict[str, ExtraPool] | None = None,
    ) -> None:
        # Validates the pools and the backend; resolves "auto" (logged) to the backend that runs.
        self._transfer = transfer.KVTransfer(device_pool, host_pool, io_backend)
        self.device_pool = device_pool
        self.host_pool = host_pool
        self.io_backend = self._transfer.io_backend  # "kernel" or "direct", never "auto"
        self.extra_pools = dict(extra_pools or {})
        self.num_layers = device_pool.num_layers
        self._cuda = device_pool.device.type == "cuda"
        self.write_queue: list[CacheOperation] = []
        self.load_queue: list[CacheOperation] = []
        self._writes: deque[_Batch] = deque()  # submitted, not yet acknowledged, oldest first
        self._loads: deque[tuple[int, _Batch]] = deque()
        self._next_consumer = 0
        self._write_lane = _Lane("write", self._cuda)
        self._load_lane = _Lane("load", self._cuda)
        self._closed = False
        # Completed copies per direction; written by the ack path (writing_check/loading_check).
        self.backup_counters = TransferCounters()
        self.load_counters = TransferCounters()
        self._bytes_per_token = device_pool.size_bytes // device_pool.num_slots

    # ---- queueing -------------------------------------------------------------------------------

    def write(
        self,
        device_indices: torch.Tensor,
        host_indices: torch.Tensor,
        ack_id: int,
        pool_transfers: tuple[PoolTransfer, ...] = (),
    ) -> None:
        """Queues a backup of ``device_indices`` into ``host_indices`` (copied: owned by the op).

        Args:
            device_indices: ``[n]`` int64 CPU device KV slots.
            host_indices: ``[n]`` int64 CPU host KV slots.
            ack_id: reported by :meth:`writing_check` when the copy has finished.
            pool_transfers: the extra pools' copies that go with it (device -> host too).

        Raises:
            InvalidArgumentError: an index tensor that is not a 1-D int64 CPU tensor, lengths
                that differ, or a pool transfer for an unknown pool. Nothing is queued.
            IndexOutOfRangeError: a slot out of its pool. Nothing is queued.
        """
        with profiling.nvtx_range(profiling.ENQUEUE_WRITE):
            self._check("write", device_indices, host_indices, ack_id, pool_transfers)
            self.write_queue.append(
                CacheOperation.create(host_indices, device_indices, ack_id, pool_transfers)
            )

    def load(
        self,
        host_indices: torch.Tensor,
        device_indices: torch.Tensor,
        ack_id: int,
        pool_transfers: tuple[PoolTransfer, ...] = (),
    ) -> None:
        """Queues a load of ``host_indices`` into ``device_indices`` (copied: owned by the op).

        Raises:
            InvalidArgumentError, IndexOutOfRangeError: as :meth:`write`. Nothing is queued.
        """
        with profiling.nvtx_range(profiling.ENQUEUE_LOAD):
            self._check("load", device_indices, host_indices, ack_id, pool_transfers)
            self.load_queue.append(
                CacheOperation.create(host_indices, device_indices, ack_id, pool_transfers)
            )

    def _check(
        self,
        fn: str,
        device_indices: torch.Tensor,
        host_indices: torch.Tensor,
        ack_id: int,
        pool_transfers: tuple[PoolTransfer, ...] = (),
    ) -> None:
        if self._closed:
            raise InvalidArgumentError(f"CacheController.{fn}: the controller is closed")
        if isinstance(ack_id, bool) or not isinstance(ack_id, int):
            raise InvalidArgumentError(
                f"{fn}: ack_id: expected an int (a node id), got {type(ack_id).__name__}"
            )
        check_transfer_indices(
            device_indices,
            host_indices,
            self.device_pool.num_slots,
            self.host_pool.num_slots,
            fn,
            device_on_cpu=True,
        )
        names = [getattr(t, "name", None) for t in pool_transfers]
        for t in pool_transfers:
            pool = self.extra_pools.get(t.name) if isinstance(t, PoolTransfer) else None
            if pool is None:
                raise InvalidArgumentError(
                    f"{fn}: pool_transfers: expected PoolTransfers of {sorted(self.extra_pools)}, "
                    f"got {t!r}"
                )
            check_transfer_indices(
                t.device_indices,
                t.host_indices,
                pool.device_pool.num_slots,
                pool.num_slots,
                f"{fn}: pool {t.name!r}",
                device_on_cpu=True,
            )
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"{fn}: pool_transfers: one per pool, got {names}")

    # ---- submission -----------------------------------------------------------------------------

    def start_writing(self) -> None:
        """Merges every queued backup into one batch and submits it (no-op when none)."""
        if not self.write_queue:
            return
        op = CacheOperation.merge(self.write_queue)
        self.write_queue = []
        batch = _Batch(op, 0, self._cuda)
        self._writes.append(batch)
        self._write_lane.submit(batch, self._run_write)

    def start_loading(self) -> int:
        """Merges every queued load into one batch and submits it, layer by layer.

        SGLang's ``start_loading`` with its ``LayerDoneCounter``: each layer's completion is
        signalled separately, so the model can run layer ``i`` while ``i + 1`` loads.

        Returns:
            int: the batch's consumer index for :meth:`wait_until_layer_ready`; -1 if none.
        """
        if not self.load_queue:
            return -1
        op = CacheOperation.merge(self.load_queue)
        self.load_queue = []
        batch = _Batch(op, self.num_layers, self._cuda)
        consumer = self._next_consumer
        self._next_consumer += 1
        self._loads.append((consumer, batch))
        self._load_lane.submit(batch, self._run_load)
        return consumer

    def _run_write(self, batch: _Batch) -> None:
        op = batch.op
        with profiling.nvtx_range(profiling.WRITE_BATCH, op.num_tokens):
            self._transfer.backup_all_layers(
                self._transfer.prepare(op.device_indices, op.host_indices, "write")
            )
            for t in op.pool_transfers:
                pool = self.extra_pools[t.name]
                pool.backup_all_layers(pool.prepare(t.device_indices, t.host_indices, "write"))

    def _run_load(self, batch: _Batch) -> None:
        op = batch.op
        with profiling.nvtx_range(profiling.LOAD_BATCH, op.num_tokens):
            indices = self._transfer.prepare(op.device_indices, op.host_indices, "load")
            for t in op.pool_transfers:  # every layer of them, before layer 0 is signalled
                pool = self.extra_pools[t.name]
                pool.load_all_layers(pool.prepare(t.device_indices, t.host_indices, "load"))
            for layer in range(self.num_layers):
                with profiling.nvtx_range(profiling.LOAD_LAYER, layer):
                    self._transfer.load_layer(indices, layer)
                batch.layer_done(layer)

    # ---- completion -----------------------------------------------------------------------------

    def writing_check(self, block: bool = False) -> list[int]:
        """Pops the acks of finished backup batches, oldest first.

        Args:
            block: wait for every submitted batch (queued ones are not submitted: call
                :meth:`start_writing` first).

        Returns:
            list[int]: ack ids of the finished operations, in submission order.

        Raises:
            TransferError: the oldest finished batch failed (raised when no earlier ack is pending
                in the same call); its ``ack_ids`` name the operations to undo.
        """
        with profiling.nvtx_range(profiling.ACK_WRITE):
            return _pop_finished(
                self._writes, block, "backup", lambda b: b, self._count(self.backup_counters)
            )

    def loading_check(self, block: bool = False) -> list[int]:
        """Pops the acks of finished load batches, oldest first (see :meth:`writing_check`)."""
        with profiling.nvtx_range(profiling.ACK_LOAD):
            return _pop_finished(
                self._loads, block, "load", lambda item: item[1], self._count(self.load_counters)
            )

    def _count(self, counters: TransferCounters) -> Callable[[_Batch], None]:
        """A callback that adds a popped batch to ``counters``."""

        def count(batch: _Batch) -> None:
            if batch.error is not None:
                counters.failed_batches += 1
                return
            counters.batches += 1
            counters.tokens += batch.op.num_tokens
            counters.bytes += batch.op.num_tokens * self._bytes_per_token
            counters.seconds += batch.seconds()

        return count

    def pop_oldest_load(self) -> list[int]:
        """Waits for the oldest submitted load batch and pops its acks if it succeeded.

        For a caller that needs one load's outcome applied (batches finish in submission order,
        so a load it has already waited for is done). A failed batch is not popped: the next
        :meth:`loading_check` raises for it.

        Returns:
            list[int]: the batch's ack ids; empty when no batch is submitted or the oldest failed.
        """
        with profiling.nvtx_range(profiling.ACK_LOAD):
            if not self._loads:
                return []
            _, batch = self._loads[0]
            batch.wait()
            if batch.error is not None:
                return []
            self._loads.popleft()
            self._count(self.load_counters)(batch)
            return list(batch.op.ack_ids)

    def wait_until_layer_ready(self, layer: int, consumer_index: int | None = None) -> None:
        """Waits until ``layer`` of a load batch is on the device.

        On CUDA the *current stream* waits for the layer's event (the host does not block); on the
        thread path the caller blocks until the layer has been copied.

        Args:
            layer: layer index in ``[0, num_layers)``.
            consumer_index: a value returned by :meth:`start_loading`; default: the latest one. A
                batch already acknowledged (or none at all) needs no wait.

        Raises:
            IndexOutOfRangeError: ``layer`` out of range.
            InvalidArgumentError: a consumer index never returned by :meth:`start_loading`.
        """
        if not 0 <= layer < self.num_layers:
            raise IndexOutOfRangeError(
                f"wait_until_layer_ready: layer {layer} out of range [0, {self.num_layers})"
            )
        if consumer_index is None:
            consumer_index = self._next_consumer - 1
        if consumer_index < -1 or consumer_index >= self._next_consumer:
            raise InvalidArgumentError(
                f"wait_until_layer_ready: consumer index {consumer_index} was never returned by "
                "start_loading"
            )
        for consumer, batch in list(self._loads):
            if consumer == consumer_index:
                batch.wait_layer(layer)
                return

    def num_pending_writes(self) -> int:
        """Backup operations queued or in flight (not yet acknowledged)."""
        return len(self.write_queue) + sum(len(b.op.ack_ids) for b in self._writes)

    def num_pending_loads(self) -> int:
        """Load operations queued or in flight (not yet acknowledged)."""
        return len(self.load_queue) + sum(len(b.op.ack_ids) for _, b in self._loads)

    def close(self, timeout: float = 30.0) -> None:
        """Waits for the submitted batches and stops the workers. Idempotent.

        Queued (unsubmitted) operations are dropped and unacknowledged acks are not applied: call
        the cache's ``flush`` first (``HiCache.close`` does).

        Raises:
            TransferError: a worker did not stop within ``timeout`` seconds.
        """
        self._closed = True
        self._write_lane.close(timeout)
        self._load_lane.close(timeout)

    def __enter__(self) -> CacheController:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _pop_finished(
    batches: deque, block: bool, what: str, get: Callable, popped: Callable[[_Batch], None]
) -> list[int]:
    """Pops finished batches from the front of ``batches``, telling ``popped`` of each one."""
    ack_ids: list[int] = []
    while batches:
        batch = get(batches[0])
        if block:
            batch.wait()
        elif not batch.is_done():
            break
        if batch.error is not None:
            if ack_ids:
                break  # report the successes first; the next call raises
            batches.popleft()
            popped(batch)
            raise TransferError(
                f"{what} batch of {batch.op.num_tokens} tokens (ack ids "
                f"{list(batch.op.ack_ids)}) failed: {batch.error!r}",
                batch.op.ack_ids,
            ) from batch.error
        batches.popleft()
        popped(batch)
        ack_ids.extend(batch.op.ack_ids)
    return ack_ids
