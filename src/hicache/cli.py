"""The ``hicache`` command line: ``hicache replay`` runs the cache on a real request trace."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hicache.errors import HiCacheError

__all__ = ["main"]


def _add_replay_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="replay a Mooncake trace through the cache and report hits",
        description="Replay a Mooncake-format trace (default: the bundled conversation trace) "
        "request by request: match_prefix -> load back host hits -> lock -> allocate (evicting "
        "LRU pages) -> write KV -> insert (write-through backups) -> unlock, verifying the KV of "
        "every hit.",
    )
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="Mooncake JSONL trace (default: the bundled conversation_trace.jsonl)",
    )
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument(
        "--block-tokens",
        type=int,
        default=16,
        help="tokens per 512-token trace block after scaling down (default 16)",
    )
    p.add_argument(
        "--page-size", type=int, default=16, help="tree page size in tokens (default 16)"
    )
    cap = p.add_mutually_exclusive_group()
    cap.add_argument(
        "--device-blocks", type=int, default=None, help="device pool capacity in trace blocks"
    )
    cap.add_argument(
        "--device-ratio",
        type=float,
        default=0.1,
        help="device capacity as a fraction of the trace's unique blocks (default 0.1)",
    )
    host = p.add_mutually_exclusive_group()
    host.add_argument(
        "--host-blocks", type=int, default=None, help="host (L2) pool capacity in trace blocks"
    )
    host.add_argument(
        "--hicache-ratio",
        type=float,
        default=None,
        help="host capacity as a multiple of the device capacity (SGLang's --hicache-ratio)",
    )
    host.add_argument(
        "--hicache-size", type=float, default=None, help="host capacity in GB (1e9 bytes)"
    )
    p.add_argument(
        "--hicache-write-policy",
        choices=("write_through", "write_through_selective", "write_back"),
        default="write_through",
        help="when device KV is backed up to host (default write_through)",
    )
    p.add_argument(
        "--hicache-mem-layout",
        choices=("layer_first", "page_first", "page_first_direct"),
        default="layer_first",
        help="host pool layout (default layer_first)",
    )
    p.add_argument(
        "--hicache-io-backend",
        choices=("auto", "kernel", "direct"),
        default="auto",
        help="host<->device transfer backend: kernel (hicache's CUDA kernels), direct (torch "
        "copies), auto (kernel where it can run; default). The report says which ran.",
    )
    p.add_argument(
        "--hicache-storage-backend",
        choices=("file", "valkey", "redis"),
        default=None,
        help="storage (L3) tier below the host tier (needs --hicache-ratio, --hicache-size or "
        "--host-blocks): file (a directory) or valkey (a Valkey/Redis server); pages backed up "
        "to host are stored, and each request first prefetches what follows its L1+L2 match",
    )
    p.add_argument(
        "--hicache-storage-backend-extra-config",
        default=None,
        help='JSON object: the backend\'s config (file: {"path": DIR, "max_bytes": N}; valkey: '
        '{"host": H, "port": P, ...}) and the prefetch knobs prefetch_threshold (tokens, default '
        "256), prefetch_timeout_base (s, 1), prefetch_timeout_per_ki_token (s, 0.25)",
    )
    p.add_argument(
        "--hicache-storage-prefetch-policy",
        choices=("best_effort", "wait_complete", "timeout"),
        default="best_effort",
        help="when a request stops waiting for its prefetch (SGLang's policies; default "
        "best_effort: at once, which in this sequential replay finds little read)",
    )
    p.add_argument(
        "--model-name",
        default="hicache-replay",
        help="model name in the storage key identity (replays share stored pages when it and "
        "the KV shape, dtype, page size and layout agree)",
    )
    p.add_argument("--layers", type=int, default=2, help="KV layers (default 2)")
    p.add_argument("--heads", type=int, default=2, help="KV heads (default 2; MLA uses 1)")
    p.add_argument("--head-dim", type=int, default=8, help="KV head dim (default 8)")
    p.add_argument("--dtype", default="float16", help="KV dtype: float16, bfloat16, float32")
    p.add_argument("--kind", choices=("mha", "mla"), default="mha", help="KV layout kind")
    p.add_argument("--device", default=None, help="pool device (default: cuda if available)")
    p.add_argument("--no-verify", action="store_true", help="skip the KV read-back on hits")
    p.add_argument(
        "--check-every",
        type=int,
        default=0,
        help="check every cache invariant and slot ownership every N requests",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument(
        "--model",
        choices=("plain", "mamba-hybrid", "swa-hybrid", "swa-mamba-hybrid"),
        default="plain",
        help="plain attention (default); a Mamba + attention hybrid (a Mamba state pool beside "
        "the KV pool; a hit must end on a cached state, verified like KV); a full + sliding-window "
        "attention hybrid (an SWA KV pool; a hit must end behind a window of live SWA KV, "
        "verified like KV); or all three",
    )
    p.add_argument(
        "--sliding-window-size",
        type=int,
        default=None,
        help="SWA window in tokens (default: 4096 real tokens scaled like the blocks, 128 at "
        "--block-tokens 16)",
    )
    p.add_argument(
        "--swa-full-tokens-ratio",
        type=float,
        default=0.8,
        help="SWA pool tokens / full pool tokens (default 0.8, SGLang's)",
    )
    p.add_argument(
        "--max-mamba-cache-size",
        type=int,
        default=None,
        help="Mamba state slots (default: what fits in 0.9x the KV memory at 3,144 KV tokens per "
        "state, SGLang's default sizing)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="draw hit ratio per tier and transfer GB/s over the replay into this image (needs "
        'matplotlib: pip install "hicache[plot]")',
    )


def _print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"hicache replay: {report.trace} ({report.device})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("requests", f"{report.requests:,}"),
        ("capacity (blocks)", f"{report.capacity_blocks:,} of {report.unique_blocks:,} unique"),
    ]
    if report.host_capacity_blocks:
        stats = report.cache_stats
        rows += [
            ("host capacity (blocks)", f"{report.host_capacity_blocks:,}"),
            ("write policy / io backend", f"{report.config['write_policy']} / {report.io_backend}"),
            ("device (L1) hit blocks", f"{report.device_hit_blocks:,}"),
            ("host (L2) hit blocks", f"{report.host_hit_blocks:,}"),
            ("load-back tokens", f"{report.load_back_tokens:,}"),
            ("backup tokens", f"{stats['backup_tokens']:,}"),
            (
                "demoted / dropped tokens",
                f"{stats['demoted_tokens']:,} / {stats['dropped_tokens']:,}",
            ),
            ("host-evicted tokens", f"{stats['host_evicted_tokens']:,}"),
        ]
    if report.storage:
        backend = report.storage_stats.get("backend", {})
        counters = report.storage_stats.get("controller", {})
        rows += [
            ("storage (L3)", f"{report.storage} / {report.config['prefetch_policy']}"),
            ("storage (L3) hit blocks", f"{report.storage_hit_blocks:,}"),
            (
                "L3 pages read / stored / deduplicated",
                f"{counters.get('prefetch_read_pages', 0):,} / "
                f"{counters.get('backup_pages', 0):,} / {counters.get('backup_dedup_pages', 0):,}",
            ),
            (
                "L3 failed ops / corrupt pages / not stored",
                f"{backend.get('failed_ops', 0):,} / {backend.get('corrupt_pages', 0):,} / "
                f"{counters.get('backup_failed_pages', 0):,}",
            ),
        ]
        if "swa_backend" in report.storage_stats:
            rows.append(
                (
                    "L3 SWA window pages read / stored / cut",
                    f"{counters.get('prefetch_swa_pages', 0):,} / "
                    f"{counters.get('backup_swa_pages', 0):,} / "
                    f"{counters.get('prefetch_swa_cut_pages', 0):,}",
                )
            )
    if report.mamba_states:
        stats = report.cache_stats
        rows += [
            (
                "model / Mamba states (host)",
                f"{report.config['model']} / {report.mamba_states:,} "
                f"({report.mamba_host_states:,})",
            ),
            ("Full-only hit blocks (same tree)", f"{report.full_kv_hit_blocks:,}"),
            (
                "Mamba forks / published / existed",
                f"{stats['mamba_forks']:,} / {stats['mamba_published']:,} / "
                f"{stats['mamba_existed']:,}",
            ),
            ("Mamba states evicted", f"{stats['mamba_evicted_states']:,}"),
            ("tombstones at end", f"{report.tombstones_at_end:,}"),
            ("verified Mamba states", f"{report.mamba_verified_states:,}"),
        ]
    if report.swa_slots:
        stats = report.cache_stats
        rows += [
            (
                "SWA window / pool (host) tokens",
                f"{report.sliding_window_size:,} / {report.swa_slots:,} "
                f"({report.swa_host_slots:,})",
            ),
            ("Full-only hit blocks (same tree)", f"{report.full_kv_hit_blocks:,}"),
            (
                "SWA window-freed / tombstoned / recovered tokens",
                f"{stats['swa_window_freed_tokens']:,} / {stats['swa_tombstoned_tokens']:,} / "
                f"{stats['swa_recovered_tokens']:,}",
            ),
            ("SWA branch checkpoints", f"{report.swa_branch_checkpoints:,}"),
            ("SWA tombstone nodes at end", f"{report.swa_tombstones_at_end:,}"),
            ("SWA-verified tokens", f"{report.swa_verified_tokens:,}"),
        ]
    rows += [
        ("block hits", f"{report.hit_blocks:,} / {report.total_blocks:,}"),
        ("block hit ratio", f"{report.block_hit_ratio:.6f}"),
        ("token hits", f"{report.hit_tokens:,} / {report.input_tokens:,}"),
        ("token hit ratio", f"{report.token_hit_ratio:.6f}"),
        ("evicted blocks", f"{report.evicted_blocks:,.0f}"),
        ("KV-verified tokens", f"{report.verified_tokens:,}"),
        ("wall time (s)", f"{report.wall_seconds:.2f}"),
        ("requests/s", f"{report.requests_per_s:,.0f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    ops = Table(title="time per operation")
    ops.add_column("operation")
    ops.add_column("µs / request", justify="right")
    ops.add_column("share", justify="right")
    total = sum(report.op_seconds.values()) or 1.0
    for name, seconds in report.op_seconds.items():
        ops.add_row(
            name, f"{1e6 * seconds / max(report.requests, 1):.1f}", f"{100 * seconds / total:.1f}%"
        )
    console.print(ops)


def _replay(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from hicache.replay import ReplayConfig, bundled_trace_path, load_trace, run_replay

    trace = args.trace or bundled_trace_path()
    requests = load_trace(trace, args.limit)
    config = ReplayConfig(
        block_tokens=args.block_tokens,
        page_size=args.page_size,
        device_blocks=args.device_blocks,
        device_ratio=args.device_ratio,
        num_layers=args.layers,
        num_heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        kind=args.kind,
        device=args.device,
        verify=not args.no_verify,
        check_every=args.check_every,
        host_blocks=args.host_blocks,
        hicache_ratio=args.hicache_ratio,
        hicache_size_gb=args.hicache_size,
        write_policy=args.hicache_write_policy,
        host_layout=args.hicache_mem_layout,
        io_backend=args.hicache_io_backend,
        model=args.model,
        max_mamba_cache_size=args.max_mamba_cache_size,
        sliding_window_size=args.sliding_window_size,
        swa_full_tokens_ratio=args.swa_full_tokens_ratio,
        storage_backend=args.hicache_storage_backend,
        storage_extra_config=args.hicache_storage_backend_extra_config,
        prefetch_policy=args.hicache_storage_prefetch_policy,
        model_name=args.model_name,
    )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=args.quiet,
        transient=True,
    ) as bar:
        task = bar.add_task(f"replay {Path(trace).name}", total=len(requests))
        report = run_replay(
            requests,
            config,
            Path(trace).name,
            progress=lambda done: bar.update(task, completed=done),
        )
    _print_report(report)
    if args.plot is not None:
        from hicache.replay.plot import plot_report

        print(f"plot: {plot_report(report, args.plot)}")
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _log_to_stderr() -> None:
    """Shows the ``hicache`` logger's INFO lines (e.g. the io backend ``auto`` chose) on stderr.

    rich's stderr console looks ``sys.stderr`` up at each write, so a redirected stderr is honoured.
    """
    from rich.console import Console
    from rich.logging import RichHandler

    logger = logging.getLogger("hicache")
    if not logger.handlers:
        console = Console(stderr=True)
        logger.addHandler(RichHandler(console=console, show_time=False, show_path=False))
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hicache`` console script.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        int: the process exit status (0 ok, 2 usage or input error).
    """
    parser = argparse.ArgumentParser(prog="hicache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_replay_parser(sub)
    args = parser.parse_args(argv)
    _log_to_stderr()
    try:
        return _replay(args)
    except (HiCacheError, FileNotFoundError) as e:
        print(f"hicache {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
