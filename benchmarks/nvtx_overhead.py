"""Cost of hicache's NVTX ranges when no profiler is attached: replay time with and without them.

For each write policy it replays the same requests of the bundled trace (or ``--trace``) through a
fresh cache, in one process, with two variants: ``ranges``, the package as shipped, and ``no-op``,
with ``hicache.profiling.nvtx_range`` replaced by a context manager that does nothing (the
baseline: the same code without any range). Each repeat runs both variants back to back, in
alternating order (ABBA), after one warm-up pair; the overhead is the median over the repeats of
``ranges / no-op - 1``, for the replay's wall time (``ReplayReport.wall_seconds``: the request
loop, KV writes and checks, the final flush) and for the CPU time of the process (all threads; less
sensitive to other load on the machine). Target: < 2 %.

Paired ratios of ~1 s replays still move by a few percent on a busy 2-core machine, so the table
also gives the estimate that such noise cannot blur: the ranges one replay opens (counted) times
the cost of one ``nvtx_range`` enter/exit without a tool (``timeit``), as a share of the no-op
replay's wall time.

Run: ``python benchmarks/nvtx_overhead.py`` (defaults: 1000 requests, host tier 4x a device cache of
5 % of the unique blocks, cuda if available). Options: ``--limit``, ``--hicache-ratio``,
``--device-ratio``, ``--policies``, ``--device``, ``--repeat``, ``--no-verify`` (drop the KV
read-back, so that the cache's own calls weigh more in the replay).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import timeit
from pathlib import Path

import torch

from hicache import profiling
from hicache.replay import ReplayConfig, bundled_trace_path, load_trace, run_replay


def _noop_range(name: str, payload: int | None = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _replay_times(requests, config: ReplayConfig, range_fn) -> tuple[float, float]:
    """(wall seconds of the replay, CPU seconds of the process meanwhile) with ``range_fn``."""
    original = profiling.nvtx_range
    profiling.nvtx_range = range_fn
    try:
        cpu = time.process_time()
        wall = run_replay(requests, config).wall_seconds
        return wall, time.process_time() - cpu
    finally:
        profiling.nvtx_range = original


def _count_ranges(requests, config: ReplayConfig) -> int:
    opened = 0
    original = profiling.nvtx_range

    def counting(name: str, payload: int | None = None):
        nonlocal opened
        opened += 1
        return original(name, payload)

    _replay_times(requests, config, counting)
    return opened


def _seconds_per_range() -> float:
    """One ``nvtx_range`` enter/exit with a payload, as the controller opens them, no tool."""

    def once() -> None:
        with profiling.nvtx_range(profiling.LOAD_LAYER, 3):
            pass

    number = 100_000
    return min(timeit.repeat(once, number=number, repeat=5)) / number


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, default=None, help="Mooncake trace (default: bundled)")
    p.add_argument("--limit", type=int, default=1000, help="requests replayed (default 1000)")
    p.add_argument("--hicache-ratio", type=float, default=4.0)
    p.add_argument("--device-ratio", type=float, default=0.05)
    p.add_argument("--policies", nargs="+", default=["write_through", "write_back"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per variant (median)")
    p.add_argument("--no-verify", action="store_true", help="skip the KV read-back of hits")
    args = p.parse_args()
    for var in ("NVTX_INJECTION64_PATH", "NVTX_INJECTION32_PATH"):
        if os.environ.get(var):
            print(f"warning: {var} is set: a tool is attached, this measures it too")

    requests = load_trace(args.trace or bundled_trace_path(), args.limit)
    per_range = _seconds_per_range()
    print(
        f"nvtx_overhead: {len(requests)} requests, device {args.device}, host "
        f"{args.hicache_ratio}x a device cache of {args.device_ratio:.0%} of the unique blocks, "
        f"verify {not args.no_verify}; medians of {args.repeat} interleaved pairs"
    )
    print(f"one nvtx_range enter/exit, no tool attached: {per_range * 1e9:.0f} ns (timeit)")
    header = (
        f"{'policy':<14} {'ranges/replay':>13} {'wall, ranges':>13} {'wall, no-op':>12} "
        f"{'wall overhead':>14} {'CPU overhead':>13} {'estimate':>9}"
    )
    print(header)
    print("-" * len(header))
    for policy in args.policies:
        config = ReplayConfig(
            device_ratio=args.device_ratio,
            hicache_ratio=args.hicache_ratio,
            write_policy=policy,
            device=args.device,
            verify=not args.no_verify,
        )
        num_ranges = _count_ranges(requests, config)
        walls: dict[str, list[float]] = {"ranges": [], "no-op": []}
        wall_ratios, cpu_ratios = [], []
        variants = [("ranges", profiling.nvtx_range), ("no-op", _noop_range)]
        for i in range(args.repeat + 1):  # pair 0 warms both variants up
            order = variants if i % 2 else variants[::-1]  # ABBA: drift hits both alike
            times = {name: _replay_times(requests, config, fn) for name, fn in order}
            if i == 0:
                continue
            walls["ranges"].append(times["ranges"][0])
            walls["no-op"].append(times["no-op"][0])
            wall_ratios.append(times["ranges"][0] / times["no-op"][0] - 1)
            cpu_ratios.append(times["ranges"][1] / times["no-op"][1] - 1)
        t_noop = statistics.median(walls["no-op"])
        print(
            f"{policy:<14} {num_ranges:>13,} {statistics.median(walls['ranges']):>12.3f}s "
            f"{t_noop:>11.3f}s {statistics.median(wall_ratios):>+14.2%} "
            f"{statistics.median(cpu_ratios):>+13.2%} {num_ranges * per_range / t_noop:>+9.2%}"
        )


if __name__ == "__main__":
    main()
