"""The replay loop: an engine scheduler's calls, one request at a time, with KV integrity checks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from hicache import metrics
from hicache.cache import WRITE_POLICIES, HiCache, Req
from hicache.errors import HiCacheError, InvalidArgumentError
from hicache.memory import DeviceKVPool, HostKVPool, MambaHostPool, MambaStatePool, SWAKVPool
from hicache.replay.trace import TRACE_BLOCK_TOKENS, TraceRequest, block_tokens
from hicache.storage.base import StorageIdentity, create_backend, parse_extra_config
from hicache.storage.controller import PrefetchConfig

__all__ = [
    "KVIntegrityError",
    "ReplayConfig",
    "ReplayReport",
    "checkpoint_positions",
    "expected_kv",
    "expected_state",
    "run_replay",
]

MODELS = ("plain", "mamba-hybrid", "swa-hybrid", "swa-mamba-hybrid")

OPERATIONS = (
    "match_prefix",
    "prefetch",
    "load_back",
    "inc_lock_ref",
    "alloc",
    "write_kv",
    "verify_kv",
    "cache_finished_req",
    "check_hicache_events",
)


class KVIntegrityError(HiCacheError, AssertionError):
    """A cache hit returned KV that differs from what was written for those tokens."""


@dataclass
class ReplayConfig:
    """What to replay and how big the cache is.

    Attributes:
        block_tokens: tokens per trace block after scaling (a real block is 512 tokens).
        page_size: tree page size in tokens.
        device_blocks: device pool capacity in trace blocks; None: ``device_ratio`` of the
            trace's unique blocks (``unique * pct // 100`` with ``pct = device_ratio * 100``,
            the reference table's rule).
        device_ratio: see ``device_blocks``.
        num_layers, num_heads, head_dim, dtype, kind: shape of the device KV pool (``kind`` is
            ``"mha"`` or ``"mla"``).
        device: torch device of the pool; None picks CUDA when available.
        verify: read back and compare the KV of every hit (device hits and loaded-back host
            hits alike: the bytes loaded back must equal what was written).
        check_every: run the cache's full invariant and slot-ownership check every N requests
            (0: only at the end).
        host_blocks: host (L2) pool capacity in trace blocks; None: ``hicache_ratio`` times the
            device capacity; both None (or 0): no host tier.
        hicache_ratio: host capacity / device capacity (SGLang's ``--hicache-ratio``).
        hicache_size_gb: host capacity in GB (SGLang's ``--hicache-size``), floored to pages.
        write_policy: SGLang's ``--hicache-write-policy``.
        host_layout: host pool layout (SGLang's ``--hicache-mem-layout``).
        io_backend: transfer backend (SGLang's ``--hicache-io-backend``).
        timeline_points: windows of the report's timeline (hit ratio per tier and transfer
            bandwidth per window of requests); 0 for none.
        model: ``"plain"`` (attention only), ``"mamba-hybrid"`` (Mamba + attention layers: a
            Mamba state pool beside the KV pool; a hit must end on a cached state),
            ``"swa-hybrid"`` (full + sliding-window attention layers: an SWA KV pool beside it;
            a hit must end behind ``sliding_window_size`` tokens of live SWA KV) or
            ``"swa-mamba-hybrid"`` (all three).
        max_mamba_cache_size: Mamba state slots (SGLang's ``--max-mamba-cache-size``); None:
            the states that fit in 0.9x the KV memory at Qwen3-Next-80B-A3B's 3,144 KV tokens per
            state, SGLang's default (``--mamba-full-memory-ratio``), and at least 5.
        sliding_window_size: SWA window in tokens (SGLang's ``--sliding-window-size``); None:
            4,096 real tokens scaled like the blocks (``4096 * block_tokens // 512``, 128 at
            ``block_tokens`` 16), the baseline's default.
        swa_full_tokens_ratio: SWA pool tokens / full pool tokens (SGLang's
            ``--swa-full-tokens-ratio``, default 0.8).
        storage_backend: the storage (L3) tier (SGLang's ``--hicache-storage-backend``):
            ``"file"``, ``"valkey"`` (``"redis"``) or None for none; needs the host tier. With
            ``mamba-hybrid`` a second backend of the same kind stores node states, and a
            prefetch is all-or-nothing (pages and the state at their end).
            Pages backed up to host are stored too, and every request first prefetches from
            storage what follows its L1 + L2 match (see :meth:`HiCache.prefetch_from_storage`).
        storage_extra_config: the backend's config and the prefetch knobs (SGLang's
            ``--hicache-storage-backend-extra-config``): a dict or a JSON object string, e.g.
            ``{"path": "/tmp/hicache", "prefetch_threshold": 64}``.
        prefetch_policy: SGLang's ``--hicache-storage-prefetch-policy``. The replay is
            sequential, so it polls ``check_prefetch_progress`` until it says go: under
            ``best_effort`` that is at once, and only pages already read count (usually none);
            ``wait_complete`` waits for every stored page; ``timeout`` for at most its limit.
        model_name: the model name in the storage identity (two replays share stored pages
            when it, the KV shape, dtype, page size and host layout agree).
    """

    block_tokens: int = 16
    page_size: int = 16
    device_blocks: int | None = None
    device_ratio: float = 0.1
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 8
    dtype: str = "float16"
    kind: str = "mha"
    device: str | None = None
    verify: bool = True
    check_every: int = 0
    host_blocks: int | None = None
    hicache_ratio: float | None = None
    hicache_size_gb: float | None = None
    write_policy: str = "write_through"
    host_layout: str = "layer_first"
    io_backend: str = "auto"
    timeline_points: int = 200
    model: str = "plain"
    max_mamba_cache_size: int | None = None
    sliding_window_size: int | None = None
    swa_full_tokens_ratio: float = 0.8
    storage_backend: str | None = None
    storage_extra_config: dict | str | None = None
    prefetch_policy: str = "best_effort"
    model_name: str = "hicache-replay"


@dataclass
class ReplayReport:
    """Results of a replay. Hit counts follow the block-level rule of traces/README.md.

    ``hit_blocks`` = ``device_hit_blocks`` (L1, on device at match time) + ``host_hit_blocks``
    (L2, host-only at match time and loaded back) + ``storage_hit_blocks`` (L3, prefetched from
    storage, then loaded back). The KV of every hit, L3 hits included, is verified.
    """

    trace: str
    config: dict
    requests: int = 0
    total_blocks: int = 0
    hit_blocks: int = 0
    device_hit_blocks: int = 0
    host_hit_blocks: int = 0
    input_tokens: int = 0
    hit_tokens: int = 0  # real (unscaled) tokens: sum of min(hit_blocks * 512, input_length)
    unique_blocks: int = 0
    capacity_blocks: int = 0
    host_capacity_blocks: int = 0
    evicted_blocks: float = 0.0
    load_back_tokens: int = 0
    cache_stats: dict = field(default_factory=dict)
    io_backend: str = ""
    verified_tokens: int = 0
    wall_seconds: float = 0.0
    op_seconds: dict = field(default_factory=lambda: dict.fromkeys(OPERATIONS, 0.0))
    device: str = ""
    # One dict per window of requests: "requests" (requests done at the window's end), "blocks",
    # "l1_hit_blocks", "l2_hit_blocks", "l3_hit_blocks", and per direction the window's
    # "backup_bytes", "backup_seconds", "load_back_bytes", "load_back_seconds" (bandwidth =
    # bytes / seconds).
    timeline: list = field(default_factory=list)
    # hicache.metrics.as_dict(collect(cache)) at the end of the replay.
    metrics: dict = field(default_factory=dict)
    # Hybrid models: what the Full component alone matched in the same tree (hit_blocks is what
    # every component accepted), the Mamba state pool's size, and tombstones left at the end.
    full_kv_hit_blocks: int = 0
    mamba_states: int = 0
    mamba_host_states: int = 0
    mamba_verified_states: int = 0
    tombstones_at_end: int = 0
    # SWA models: the window, the SWA pools' sizes (tokens), SWA KV tokens verified on hits,
    # requests that re-published the window before their branching point, and SWA tombstone
    # nodes at the end.
    sliding_window_size: int = 0
    swa_slots: int = 0
    swa_host_slots: int = 0
    swa_verified_tokens: int = 0
    swa_branch_checkpoints: int = 0
    swa_tombstones_at_end: int = 0
    # Storage (L3): where ("file at /path"), L3 hit blocks, and the backend's and the storage
    # controller's counters at the end (StorageStats and StorageCounters as dicts).
    storage: str = ""
    storage_hit_blocks: int = 0
    storage_stats: dict = field(default_factory=dict)

    @property
    def block_hit_ratio(self) -> float:
        """Hit blocks / input blocks."""
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def token_hit_ratio(self) -> float:
        """Hit tokens / input tokens (real token counts)."""
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def requests_per_s(self) -> float:
        """Requests replayed per second of wall time (KV writes and checks included)."""
        return self.requests / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict:
        """The report as plain JSON-serialisable data."""
        d = asdict(self)
        d.update(
            block_hit_ratio=self.block_hit_ratio,
            token_hit_ratio=self.token_hit_ratio,
            requests_per_s=self.requests_per_s,
            op_us_per_request={
                k: 1e6 * v / max(self.requests, 1) for k, v in self.op_seconds.items()
            },
        )
        return d


def _check_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], what: str) -> None:
    """Raises KVIntegrityError(``what``) unless every tensor read back equals the one written."""
    if not all(torch.equal(g, w) for g, w in zip(got, want, strict=True)):
        raise KVIntegrityError(what)


def expected_kv(tokens: torch.Tensor, pool: DeviceKVPool) -> tuple[torch.Tensor, ...]:
    """The KV the replay writes for ``tokens``: bytes of a 64-bit hash of each token.

    A token encodes (block id, position), so the KV is a deterministic function of
    (block id, position, layer). Element ``e = (layer, head, dim)`` (flattened) of K is byte
    ``e mod 8`` of a splitmix64 hash of the token, of V byte ``(e + 3) mod 8``: integers in
    [0, 255], exact in fp16/bf16/fp32, and KV read from a wrong slot differs in nearly every
    element.

    Args:
        tokens: ``[n]`` int32/int64 CPU tensor of token ids.
        pool: the pool whose shape, dtype and device the result takes.

    Returns:
        tuple[torch.Tensor, ...]: ``(k, v)`` for MHA or ``(kv,)`` for MLA, each
        ``[num_layers, n, heads, head_dim]`` on the pool's device and dtype.
    """
    heads = 1 if pool.kind == "mla" else pool.num_heads
    x = tokens.to(torch.int64) * -0x61C8864680B583EB + 0x632BE59BD9B4E019  # splitmix64
    x = (x ^ (x >> 30)) * -0x40A7B892E31B1A47
    x = (x ^ (x >> 27)) * -0x6B2FB644ECCEEE15
    x = x ^ (x >> 31)
    hash_bytes = x.view(torch.uint8).view(-1, 8)  # [n, 8]
    num_elements = pool.num_layers * heads * pool.head_dim
    element = torch.arange(num_elements, dtype=torch.int64)
    outputs = []
    for offset in (0,) if pool.kind == "mla" else (0, 3):
        kv = hash_bytes.index_select(1, (element + offset) % 8).to(pool.dtype)
        kv = kv.view(-1, pool.num_layers, heads, pool.head_dim).transpose(0, 1)
        outputs.append(kv.to(pool.device))
    return tuple(outputs)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 of int64 ``x`` (wrapping arithmetic): a well-mixed hash per element."""
    x = x * -0x61C8864680B583EB + 0x632BE59BD9B4E019
    x = (x ^ (x >> 30)) * -0x40A7B892E31B1A47
    x = (x ^ (x >> 27)) * -0x6B2FB644ECCEEE15
    return x ^ (x >> 31)


def expected_state(block_ids: torch.Tensor, pool: MambaStatePool) -> tuple[torch.Tensor, ...]:
    """The Mamba state the replay computes after a block: bytes of a hash of (block id, layer).

    A trace block id names its whole prefix (the ids are prefix hashes), so the state after a
    block is a deterministic function of (block id, layer). Element ``e`` of layer ``l`` is byte
    ``(e + l) mod 8`` of ``splitmix64(block_id * 64 + l)``: integers in [0, 255], exact in every
    float dtype; a state copied from the wrong node differs in nearly every element.

    Args:
        block_ids: ``[n]`` int64 CPU block ids.
        pool: the state pool whose shapes, dtypes and device the result takes.

    Returns:
        ``(conv, temporal)``: ``[num_layers, n, *conv_shape]`` and
        ``[num_layers, n, *temporal_shape]`` on the pool's device.
    """
    layers = torch.arange(pool.num_layers, dtype=torch.int64)[:, None]
    hashes = _splitmix64(block_ids.to(torch.int64)[None, :] * 64 + layers)  # [L, n]
    hash_bytes = hashes.contiguous().view(torch.uint8).view(pool.num_layers, -1, 8)
    out = []
    for shape, dtype in (
        (pool.conv_shape, pool.conv_dtype),
        (pool.temporal_shape, pool.temporal_dtype),
    ):
        count = math.prod(shape)
        element = (torch.arange(count)[None, :] + layers) % 8  # [L, count]
        index = element[:, None, :].expand(-1, hash_bytes.shape[1], -1)  # [L, n, count]
        picked = torch.gather(hash_bytes, 2, index)
        out.append(picked.to(dtype).view(pool.num_layers, -1, *shape).to(pool.device))
    return tuple(out)


def checkpoint_positions(request: TraceRequest, match, block_tokens: int, step: int) -> list[int]:
    """Where a finished ``mamba-hybrid`` request publishes states, ascending (see _MambaModel).

    Args:
        request: the trace request.
        match: its :class:`~hicache.results.MatchResult` at admission.
        block_tokens: tokens per trace block.
        step: positions are multiples of it (``lcm(block_tokens, page_size)``).

    Returns:
        Up to two token counts past the match: the last complete block of input, and the
        branching point when the Full match ran past the deepest cached state.
    """
    complete = min(request.input_length // TRACE_BLOCK_TOKENS, len(request.hash_ids))
    end = complete * block_tokens // step * step
    branch = match.mamba_branching_seqlen // step * step
    return sorted({p for p in (end, branch) if p > match.device_prefix_len})


class _SWAModel:
    """The sliding-window side of an ``swa-hybrid`` replay: its pools and its window frontier.

    The SWA pool has ``swa_full_tokens_ratio`` of the full pool's slots (its host pool, with a
    host tier, as many as the host pool); every new token's SWA KV is written beside its Full KV
    and the SWA KV of a hit's last ``window`` tokens is read back and verified like the Full KV.
    After its prefill a request frees the SWA KV that left its window
    (:meth:`HiCache.free_swa_out_of_window`), as SGLang's ``checkpoint_kv_cache`` does, so older
    prefixes become SWA tombstones. The window kept live is the one that ends at the request's
    last complete block of input: the next turn re-hashes the last, partial block, so its match
    ends there (the position where ``mamba-hybrid`` publishes a state, for the same reason; in an
    engine with real token ids it is the request's last window). A request whose match stopped at
    such a tombstone
    (``swa_branching_seqlen``) first caches its prefix up to that point with a live window (SGLang
    inserts up to ``swa_branching_seqlen`` at the prefill checkpoint), so later requests that
    branch there hit it. With Mamba too, the window before each Mamba checkpoint stays live
    instead (SGLang's ``retain_floor``): a state is only usable behind its window.
    """

    WINDOW_TOKENS = 4096  # real tokens, scaled like the blocks

    def __init__(
        self, config: ReplayConfig, pool: DeviceKVPool, host_pool: HostKVPool | None
    ) -> None:
        bt, ps = config.block_tokens, config.page_size
        self.window = config.sliding_window_size or self.WINDOW_TOKENS * bt // TRACE_BLOCK_TOKENS
        if self.window < 1 or not 0 < config.swa_full_tokens_ratio <= 1:
            raise InvalidArgumentError(
                f"sliding_window_size must be >= 1 and swa_full_tokens_ratio in (0, 1], got "
                f"{self.window} and {config.swa_full_tokens_ratio}"
            )
        num_slots = int(pool.num_slots * config.swa_full_tokens_ratio) // ps * ps
        if num_slots < ps:
            raise InvalidArgumentError(
                f"an SWA pool of {config.swa_full_tokens_ratio} x {pool.num_slots} tokens holds "
                f"no whole page of {ps}"
            )
        self.step = math.lcm(bt, ps)
        self.block_tokens = bt
        self.pool = SWAKVPool(
            num_slots,
            pool.num_layers,
            pool.num_heads,
            pool.head_dim,
            pool.dtype,
            pool.device,
            pool.kind,
            num_full_slots=pool.num_slots,
            page_size=ps,
        )
        self.host_pool = (
            HostKVPool(self.pool, host_pool.num_slots, ps, config.host_layout)
            if host_pool is not None
            else None
        )

    def verify(self, tokens: torch.Tensor, match, i: int) -> int:
        """Checks the SWA KV of the hit's last window; returns the tokens verified."""
        hit = match.device_prefix_len
        start = max(hit - self.window, 0)
        full = match.device_indices[start:hit]
        if not bool(self.pool.is_mapped(full).all()):
            raise KVIntegrityError(
                f"request {i}: its {hit}-token hit ends behind tokens without SWA KV (window "
                f"{self.window})"
            )
        got = self.pool.read(self.pool.translate(full))
        want = expected_kv(tokens[start:hit], self.pool)
        _check_same(
            got,
            want,
            f"request {i}: the SWA KV read back for the last {hit - start} of its {hit} hit "
            "tokens differs from the SWA KV written for them",
        )
        return hit - start

    def write(self, tokens: torch.Tensor, new_slots: torch.Tensor) -> None:
        """Writes the SWA KV of the request's new tokens (their slots' SWA side)."""
        if tokens.numel():
            self.pool.write(self.pool.translate(new_slots), *expected_kv(tokens, self.pool))

    def before_insert(
        self, cache: HiCache, request: TraceRequest, req: Req, match, mamba_positions: list[int]
    ) -> bool:
        """Frees the request's out-of-window SWA KV; returns whether it checkpointed a branch.

        ``mamba_positions``: the request's Mamba checkpoints (``swa-mamba-hybrid``), whose
        windows stay live; else the window ending at its last complete block stays live.
        """
        hit = match.device_prefix_len
        if mamba_positions:
            cache.free_swa_out_of_window(req, min(mamba_positions))
            return False
        branch = match.swa_branching_seqlen // self.step * self.step
        checkpointed = branch > hit
        if checkpointed:  # cache the prefix up to the branching point with its window live
            part = Req(
                req.token_ids[:branch],
                req.extra_key,
                req.kv_indices[:branch],
                req.last_node,
                req.prefix_len,
                swa_lock_tokens=req.swa_lock_tokens,
            )
            cache.free_swa_out_of_window(part)
            cache.cache_unfinished_req(part)
            req.kv_indices = torch.cat((part.kv_indices, req.kv_indices[branch:]))
            req.last_node, req.prefix_len = part.last_node, part.prefix_len
            req.swa_lock_tokens = part.swa_lock_tokens
            req.swa_evicted_seqlen = part.swa_evicted_seqlen
        complete = min(request.input_length // TRACE_BLOCK_TOKENS, len(request.hash_ids))
        cache.free_swa_out_of_window(req, complete * self.block_tokens // self.step * self.step)
        return checkpointed


class _MambaModel:
    """The Mamba side of a ``mamba-hybrid`` replay: its state pool and checkpoint policy.

    Checkpoints (what a finished request publishes): the state after the request's last complete
    block of input (a trace request's last block is usually partial, and the next turn re-hashes
    it: the turn after shares the prefix up to the last complete one), and the state at the
    branching point when the Full match ran past the deepest cached state (later requests that
    branch there find it). At most two per request; the request's working state is donated as
    the first, as SGLang donates ``mamba_pool_idx`` at finish. SGLang 0.5.23's ``extra_buffer``
    tracks one state per prefill, at the branching point or the last grid point, which is why a
    conversation turn mostly reuses an older turn's state (baselines README).
    """

    # Tiny state shapes (the baseline's: conv 16x1, temporal 1x4x4); the budget, not the bytes, is
    # what the hit ratio depends on.
    CONV_SHAPE = (4, 2)
    TEMPORAL_SHAPE = (2, 4, 4)
    # Qwen3-Next-80B-A3B: KV tokens whose memory one Mamba state takes (SGLang's sizing).
    KV_TOKENS_PER_STATE = 3144
    MEMORY_RATIO = 0.9  # SGLang's --mamba-full-memory-ratio default

    def __init__(self, config: ReplayConfig, capacity_blocks: int, device: str) -> None:
        num_states = config.max_mamba_cache_size
        if num_states is None:
            kv_tokens = capacity_blocks * TRACE_BLOCK_TOKENS
            num_states = max(5, int(self.MEMORY_RATIO * kv_tokens / self.KV_TOKENS_PER_STATE))
        if num_states < 2:
            raise InvalidArgumentError(
                f"max_mamba_cache_size: a request needs up to 2 state slots, got {num_states}"
            )
        self.block_tokens = config.block_tokens
        self.step = math.lcm(config.block_tokens, config.page_size)  # a checkpoint position unit
        self.pool = MambaStatePool(
            num_states,
            config.num_layers,
            self.CONV_SHAPE,
            self.TEMPORAL_SHAPE,
            torch.float32,
            torch.float32,
            device,
        )

    def begin(self, cache: HiCache, request: TraceRequest, match, verify: bool, i: int) -> int:
        """Forks the request's working state from the match; checks it is the right state."""
        working = cache.fork_mamba(match.last_device_node)
        hit = match.device_prefix_len
        if verify:
            got = self.pool.read(torch.tensor([working]))
            if hit:
                block = torch.tensor([request.hash_ids[hit // self.block_tokens - 1]])
                want = expected_state(block, self.pool)
            else:
                want = tuple(torch.zeros_like(g) for g in got)
            _check_same(
                got,
                want,
                f"request {i}: the Mamba state copied for its {hit} hit tokens differs from "
                "the state computed after them",
            )
        return working

    def checkpoints(
        self, cache: HiCache, request: TraceRequest, match, working: int
    ) -> list[tuple[int, int]]:
        """The request's checkpoints, its working state holding the one at its last block."""
        bt = self.block_tokens
        positions = checkpoint_positions(request, match, bt, self.step)
        if not positions:
            cache.free_mamba(torch.tensor([working]))
            return []
        slots = [working] + cache.alloc_mamba(len(positions) - 1).tolist()
        blocks = torch.tensor([request.hash_ids[p // bt - 1] for p in positions])
        self.pool.write(torch.tensor(slots), *expected_state(blocks, self.pool))
        return list(zip(positions, slots, strict=True))


def run_replay(
    requests: list[TraceRequest],
    config: ReplayConfig,
    trace_name: str = "",
    progress: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Replays ``requests`` through a fresh :class:`HiCache`, request by request.

    Per request, as an engine scheduler would: ``match_prefix`` -> if part of the match is on
    host only, ``init_load_back`` from ``best_match_node`` and wait for its layers ->
    ``inc_lock_ref`` on the last device node -> read back and verify the hit KV -> ``alloc`` slots
    for the missing tokens (evicting LRU pages as needed, demoting backed-up ones to host) ->
    write their KV -> ``cache_finished_req`` (insert, write-through backups, free duplicates and
    the unaligned tail, unlock) -> ``check_hicache_events`` (waiting for this step's backups, so
    that the replay is deterministic). Only prompts are cached (the trace has no output tokens),
    as the reference rule says.

    Args:
        requests: the trace.
        config: sizes and checks.
        trace_name: recorded in the report.
        progress: called with the number of requests done after each one (a progress bar).

    Returns:
        ReplayReport: hits, evictions and time per operation.

    Raises:
        KVIntegrityError: a hit's KV differs from what was written for its tokens.
        InvalidArgumentError: a bad configuration (sizes, dtype, kind).
        InvariantError: a cache invariant broke (a hicache bug).
    """
    bt, ps = config.block_tokens, config.page_size
    if bt < 1 or ps < 1:
        raise InvalidArgumentError(f"block_tokens and page_size must be >= 1, got {bt}, {ps}")
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"unknown dtype {config.dtype!r}")
    unique = len({h for r in requests for h in r.hash_ids})
    if config.device_blocks is not None:
        capacity = config.device_blocks
    else:
        capacity = unique * round(config.device_ratio * 100) // 100
    num_slots = capacity * bt // ps * ps
    if num_slots < ps:
        raise InvalidArgumentError(
            f"a device pool of {capacity} blocks x {bt} tokens holds no whole page of {ps} tokens"
        )
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pool = DeviceKVPool(
        num_slots, config.num_layers, config.num_heads, config.head_dim, dtype, device, config.kind
    )
    host_pool = _host_pool(config, pool, capacity)
    if config.write_policy not in WRITE_POLICIES:
        raise InvalidArgumentError(
            f"unknown write policy {config.write_policy!r}; expected one of "
            f"{sorted(WRITE_POLICIES)}"
        )
    if config.model not in MODELS:
        raise InvalidArgumentError(f"unknown model {config.model!r}; expected one of {MODELS}")
    mamba_model = config.model in ("mamba-hybrid", "swa-mamba-hybrid")
    mamba = _MambaModel(config, capacity, device) if mamba_model else None
    swa = _SWAModel(config, pool, host_pool) if config.model.startswith("swa") else None
    mamba_host = None
    if mamba is not None and host_pool is not None:
        # The host tier holds states in the proportion it holds KV.
        num_host_states = max(2, mamba.pool.num_slots * host_pool.num_slots // pool.num_slots)
        mamba_host = MambaHostPool(mamba.pool, num_host_states, "page_first")
    backend = state_backend = swa_backend = prefetch_config = None
    if config.storage_backend is not None:
        if host_pool is None:
            raise InvalidArgumentError(
                "a storage backend needs the host tier: give --hicache-ratio, --hicache-size or "
                "--host-blocks"
            )
        extra = parse_extra_config(config.storage_extra_config)
        prefetch_config = PrefetchConfig.from_extra_config(config.prefetch_policy, extra)
        identity = StorageIdentity.from_host_pool(host_pool, config.model_name)
        backend = create_backend(config.storage_backend, identity, extra)
        if mamba_host is not None:  # node states beside the pages, under their own identity
            state_identity = StorageIdentity.from_host_pool(mamba_host, config.model_name)
            state_backend = create_backend(config.storage_backend, state_identity, extra)
        if swa is not None and swa.host_pool is not None:  # SWA pages, under their own identity
            swa_identity = StorageIdentity.from_host_pool(
                swa.host_pool, config.model_name, kind="swa"
            )
            swa_backend = create_backend(config.storage_backend, swa_identity, extra)
    try:
        cache = HiCache(
            pool,
            ps,
            host_pool,
            config.write_policy,
            config.io_backend,
            mamba_pool=mamba.pool if mamba is not None else None,
            mamba_host_pool=mamba_host,
            swa_pool=swa.pool if swa is not None else None,
            swa_host_pool=swa.host_pool if swa is not None else None,
            sliding_window_size=swa.window if swa is not None else 0,
            storage_backend=backend,
            prefetch_config=prefetch_config,
            mamba_storage_backend=state_backend,
            swa_storage_backend=swa_backend,
        )
    except BaseException:
        for b in (backend, state_backend, swa_backend):
            if b is not None:
                b.close()
        raise
    report = ReplayReport(
        trace=trace_name,
        config=asdict(config),
        unique_blocks=unique,
        capacity_blocks=capacity,
        host_capacity_blocks=host_pool.num_slots // bt if host_pool is not None else 0,
        device=str(pool.device),
        io_backend=cache.controller.io_backend if cache.controller is not None else "",
        mamba_states=mamba.pool.num_slots if mamba is not None else 0,
        mamba_host_states=mamba_host.num_slots if mamba_host is not None else 0,
        sliding_window_size=swa.window if swa is not None else 0,
        swa_slots=swa.pool.num_slots if swa is not None else 0,
        swa_host_slots=swa.host_pool.num_slots if swa is not None and swa.host_pool else 0,
        storage=backend.description if backend is not None else "",
    )
    ops = report.op_seconds
    window = -(-len(requests) // config.timeline_points) if config.timeline_points > 0 else 0
    timeline = _Timeline(cache, report, window)
    no_slots = torch.empty(0, dtype=torch.int64)
    clock = time.perf_counter
    start = clock()
    try:
        for i, trace_req in enumerate(requests):
            tokens = block_tokens(trace_req.hash_ids, bt)
            t0 = clock()
            match = cache.match_prefix(tokens)
            t1 = clock()
            device_hit = match.device_prefix_len
            below_l3 = device_hit + match.host_hit_length  # tokens hit on L1 + L2
            if backend is not None and cache.prefetch_from_storage(
                i, match.last_host_node, tokens[below_l3:]
            ):
                while not cache.check_prefetch_progress(i):  # the request waits in the queue
                    cache.wait_prefetch(i, 0.001)
                if cache.pop_prefetch_loaded_tokens(i):
                    match = cache.match_prefix(tokens)
            t1p = clock()
            if match.host_hit_length and cache.init_load_back(match.best_match_node):
                # As a scheduler does: start the batch's loads, let each layer wait for its load.
                consumer = cache.ready_to_load_host_cache()
                for layer in range(pool.num_layers):
                    cache.wait_until_layer_ready(layer, consumer)
                match = cache.match_prefix(tokens)
            t2 = clock()
            receipt = cache.inc_lock_ref(match.last_device_node)
            working = -1
            if mamba is not None:
                working = mamba.begin(cache, trace_req, match, config.verify, i)
                report.mamba_verified_states += int(config.verify)
            t3 = clock()
            hit = match.device_prefix_len
            if config.verify and hit:
                got = pool.read(match.device_indices)
                want = expected_kv(tokens[:hit], pool)
                _check_same(
                    got,
                    want,
                    f"request {i}: the KV read back for its {hit} hit tokens "
                    f"({hit - device_hit} loaded back from host) differs from the KV "
                    "written for them",
                )
                report.verified_tokens += hit
                if swa is not None:
                    report.swa_verified_tokens += swa.verify(tokens, match, i)
            t4 = clock()
            new_slots = cache.alloc(len(tokens) - hit)
            t5 = clock()
            num_new = len(tokens) - hit
            if num_new:
                pool.write(new_slots[:num_new], *expected_kv(tokens[hit:], pool))
                if swa is not None:
                    swa.write(tokens[hit:], new_slots[:num_new])
            t6 = clock()
            req = Req(
                tokens,
                kv_indices=torch.cat((match.device_indices, new_slots)),
                last_node=receipt.node_id,
                prefix_len=hit,
                mamba_node_id=receipt.mamba_node_id,
                swa_lock_tokens=receipt.swa_lock_tokens,
            )
            if mamba is not None:
                req.mamba_checkpoints = mamba.checkpoints(cache, trace_req, match, working)
            if swa is not None:
                positions = [n for n, _ in req.mamba_checkpoints]
                report.swa_branch_checkpoints += swa.before_insert(
                    cache, trace_req, req, match, positions
                )
            cache.cache_finished_req(req)
            t7 = clock()
            # Deterministic replay: this step's backups land before the next step evicts.
            cache.check_hicache_events(block=True)
            t8 = clock()
            ops["match_prefix"] += t1 - t0
            ops["prefetch"] += t1p - t1
            ops["load_back"] += t2 - t1p
            ops["inc_lock_ref"] += t3 - t2
            ops["verify_kv"] += t4 - t3
            ops["alloc"] += t5 - t4
            ops["write_kv"] += t6 - t5
            ops["cache_finished_req"] += t7 - t6
            ops["check_hicache_events"] += t8 - t7

            hit_blocks = hit // bt
            full_hit = max(hit, match.mamba_branching_seqlen, match.swa_branching_seqlen)
            report.full_kv_hit_blocks += full_hit // bt
            report.requests += 1
            report.total_blocks += len(trace_req.hash_ids)
            report.hit_blocks += hit_blocks
            report.device_hit_blocks += device_hit // bt
            storage_hit_blocks = hit_blocks - min(hit, below_l3) // bt
            report.storage_hit_blocks += storage_hit_blocks
            report.host_hit_blocks += hit_blocks - device_hit // bt - storage_hit_blocks
            report.input_tokens += trace_req.input_length
            report.hit_tokens += min(hit_blocks * TRACE_BLOCK_TOKENS, trace_req.input_length)
            timeline.step()
            if config.check_every and (i + 1) % config.check_every == 0:
                cache.check_invariants(request_slots=no_slots, request_states=no_slots)
            if progress is not None:
                progress(i + 1)
        cache.flush()
        timeline.close()
        cache.check_invariants(request_slots=no_slots, request_states=no_slots)
        report.metrics = metrics.as_dict(metrics.collect(cache))
        nodes = [cache.tree.node_info(n) for n in cache.tree.node_ids()]
        if mamba is not None:
            report.tombstones_at_end = sum(not n.has_mamba_value for n in nodes)
        if swa is not None:
            report.swa_tombstones_at_end = sum(
                n.has_device_value and not n.has_swa_value for n in nodes
            )
    finally:
        cache.close()
        if backend is not None:
            report.storage_stats = {
                "backend": backend.stats_snapshot().as_dict(),
                "controller": cache.storage.counters.as_dict() if cache.storage else {},
            }
            backend.close()
        if state_backend is not None:
            report.storage_stats["state_backend"] = state_backend.stats_snapshot().as_dict()
            state_backend.close()
        if swa_backend is not None:
            report.storage_stats["swa_backend"] = swa_backend.stats_snapshot().as_dict()
            swa_backend.close()
    report.wall_seconds = clock() - start
    report.evicted_blocks = cache.num_evicted_tokens / bt
    report.load_back_tokens = cache.stats.load_back_tokens
    report.cache_stats = cache.stats.as_dict()
    return report


class _Timeline:
    """Cuts the replay into windows of ``window`` requests and records each in the report."""

    def __init__(self, cache: HiCache, report: ReplayReport, window: int) -> None:
        self.cache, self.report, self.window = cache, report, window
        self.last = self._totals()

    def _totals(self) -> dict[str, float]:
        r, c = self.report, self.cache.controller
        totals: dict[str, float] = {
            "requests": r.requests,
            "blocks": r.total_blocks,
            "l1_hit_blocks": r.device_hit_blocks,
            "l2_hit_blocks": r.host_hit_blocks,
            "l3_hit_blocks": r.storage_hit_blocks,
        }
        if c is not None:
            for name, counters in (("backup", c.backup_counters), ("load_back", c.load_counters)):
                totals[f"{name}_bytes"] = counters.bytes
                totals[f"{name}_seconds"] = counters.seconds
        return totals

    def step(self) -> None:
        """Called after each request; closes the window when it is full."""
        if self.window and self.report.requests - self.last["requests"] >= self.window:
            self.close()

    def close(self) -> None:
        """Records the window since the last one (if it holds any request)."""
        now = self._totals()
        if self.window and now["requests"] > self.last["requests"]:
            point = {k: v - self.last[k] for k, v in now.items()}
            point["requests"] = now["requests"]
            self.report.timeline.append(point)
        self.last = now


def _host_pool(config: ReplayConfig, pool: DeviceKVPool, capacity: int) -> HostKVPool | None:
    """The host pool ``config`` asks for (None: no host tier)."""
    bt, ps = config.block_tokens, config.page_size
    if config.host_blocks is not None:
        num_slots = config.host_blocks * bt // ps * ps
    elif config.hicache_ratio is not None:
        num_slots = int(capacity * config.hicache_ratio) * bt // ps * ps
    elif config.hicache_size_gb is not None:
        return HostKVPool.from_size_gb(pool, config.hicache_size_gb, ps, config.host_layout)
    else:
        return None
    if num_slots <= 0:
        return None
    return HostKVPool(pool, num_slots, ps, config.host_layout)
