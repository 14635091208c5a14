"""Tree throughput: hicache's C++ radix tree against SGLang's RadixCache (pure Python) and
SGLang 0.5.23's UnifiedRadixCache with its Rust tree core, on the same Mooncake request sequence,
in the same run.

All three replay the engine loop of ``shared/baselines/sglang_radix_baseline.py``: per request,
block id ``b`` becomes tokens ``b*bt .. b*bt+bt-1``; timed: match_prefix -> lock -> evict to make
room -> build the value (``torch.arange`` over fresh slots, never reused) -> insert -> unlock.
Capacity is ``unique_blocks * pct // 100`` blocks. Only the time inside the cache calls counts
(per-request ``perf_counter``, as the baselines do).

hicache runs in this process (median of ``--repeat`` runs); the baselines run once each
(``--baseline-repeat``) as subprocesses of SGLang's venv python
(``shared/baselines/install_sglang.sh`` installs it and prints its path).

Usage:
  python benchmarks/tree_throughput.py [--trace FILE] [--pcts 10 50] [--bt 16] [--page 16]
      [--repeat 3] [--baseline-repeat 1] [--skip-python] [--skip-rust] [--limit N]
      [--json FILE] [--profile]

``--profile`` adds a per-call breakdown of our loop (µs per match/lock/evict/arange/insert/unlock).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hicache import RadixTree

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BASELINES = SHARED / "baselines"
DEFAULT_SGLANG_PYTHON = Path.home() / ".cache/hicache-baselines/sglang/bin/python"

# Reference LRU hit blocks (shared/traces/README.md), block-granular: valid for page == bt.
# Keyed by (requests in the file, unique blocks) so a renamed copy of a trace is still recognised.
REFERENCE_HITS = {
    "conversation": {1: 15_136, 5: 56_479, 10: 80_466, 25: 101_978, 50: 104_759, 100: 105_710},
    "synthetic": {1: 4_644, 5: 19_087, 10: 31_973, 25: 54_123, 50: 71_763, 100: 77_953},
}
TRACE_SHAPES = {(12_031, 182_790): "conversation", (3_993, 43_924): "synthetic"}


def default_trace() -> Path:
    """The package's bundled conversation trace if there is one, else the shared copy."""
    for p in (
        REPO / "src/hicache/data/conversation_trace.jsonl",
        SHARED / "traces/conversation_trace.jsonl",
    ):
        if p.exists():
            return p
    return SHARED / "traces/conversation_trace.jsonl"


def load_trace(path: Path, limit: int) -> list[list[int]]:
    with open(path) as f:
        reqs = [json.loads(line)["hash_ids"] for line in f if line.strip()]
    return reqs[:limit] if limit else reqs


def token_arrays(reqs: list[list[int]], bt: int) -> list[np.ndarray]:
    """Block ids -> contiguous int32 token arrays, built before any timing."""
    offs = np.arange(bt, dtype=np.int64)
    return [
        np.ascontiguousarray(
            (np.asarray(ids, dtype=np.int64)[:, None] * bt + offs).ravel(), dtype=np.int32
        )
        for ids in reqs
    ]


def run_hicache(keys: list[np.ndarray], cap_blocks: int, bt: int, page: int) -> dict:
    """The baseline's engine loop on hicache's tree: hits and seconds inside the cache calls."""
    tree = RadixTree(page_size=page)
    cap_tokens = cap_blocks * bt
    next_slot = 0
    hit_blocks = 0
    t_cache = 0.0
    perf = time.perf_counter
    arange = torch.arange
    i64 = torch.int64
    for toks in keys:
        t = perf()
        m = tree.match_prefix(toks)
        hit = m.device_prefix_len
        node = m.last_device_node
        tree.inc_lock_ref(node)
        n = len(toks)
        over = tree.total_size() + (n - hit) - cap_tokens
        if over > 0:
            tree.evict(over)
        value = arange(next_slot, next_slot + n, dtype=i64)
        next_slot += n
        tree.insert(toks, value)
        tree.dec_lock_ref(node)
        t_cache += perf() - t
        hit_blocks += hit // bt
    tree.check_invariants()
    return {
        "hit_blocks": hit_blocks,
        "cache_seconds": t_cache,
        "requests_per_s_cache": len(keys) / t_cache,
    }


def profile_hicache(keys: list[np.ndarray], cap_blocks: int, bt: int, page: int) -> dict:
    """The same loop with a timer around each call: mean µs per call of each kind, and counts."""
    tree = RadixTree(page_size=page)
    cap_tokens = cap_blocks * bt
    perf = time.perf_counter
    names = (
        "match_prefix",
        ".device_prefix_len/.last_device_node",
        "inc_lock_ref",
        "total_size",
        "evict",
        "torch.arange",
        "insert",
        "dec_lock_ref",
    )
    tot = dict.fromkeys(names, 0.0)
    cnt = dict.fromkeys(names, 0)
    evicted_tokens = 0
    next_slot = 0
    for toks in keys:
        t0 = perf()
        m = tree.match_prefix(toks)
        t1 = perf()
        hit = m.device_prefix_len
        node = m.last_device_node
        t2 = perf()
        tree.inc_lock_ref(node)
        t3 = perf()
        n = len(toks)
        size = tree.total_size()
        t4 = perf()
        over = size + (n - hit) - cap_tokens
        t5 = perf()
        if over > 0:
            ev = tree.evict(over)
            evicted_tokens += len(ev.device_indices)
            cnt["evict"] += 1
        t6 = perf()
        value = torch.arange(next_slot, next_slot + n, dtype=torch.int64)
        next_slot += n
        t7 = perf()
        tree.insert(toks, value)
        t8 = perf()
        tree.dec_lock_ref(node)
        t9 = perf()
        for k, dt in zip(
            names,
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5, t7 - t6, t8 - t7, t9 - t8),
            strict=True,
        ):
            tot[k] += dt
        for k in names:
            if k != "evict":
                cnt[k] += 1
    # perf_counter's own cost, to subtract from each bracket.
    reps = 200_000
    a = perf()
    for _ in range(reps):
        perf()
    timer_us = (perf() - a) / reps * 1e6
    nreq = len(keys)
    rows = []
    for k in names:
        calls = cnt[k]
        raw = tot[k] / calls * 1e6 if calls else 0.0
        rows.append(
            {
                "call": k,
                "calls": calls,
                "us_per_call": max(raw - timer_us, 0.0),
                "us_per_request": max(tot[k] - timer_us * calls * 1e-6, 0.0) / nreq * 1e6,
            }
        )
    return {
        "rows": rows,
        "timer_us": timer_us,
        "evicted_tokens": evicted_tokens,
        "tokens_per_request": sum(len(k) for k in keys) / nreq,
    }


def micro_variants(keys: list[np.ndarray], cap_blocks: int, bt: int, page: int) -> list[dict]:
    """Boundary costs of alternative key/value types, on a tree warmed at this capacity."""
    tree = RadixTree(page_size=page)
    cap_tokens = cap_blocks * bt
    next_slot = 0
    for toks in keys:  # warm the tree to its steady state
        m = tree.match_prefix(toks)
        tree.inc_lock_ref(m.last_device_node)
        over = tree.total_size() + len(toks) - m.device_prefix_len - cap_tokens
        if over > 0:
            tree.evict(over)
        tree.insert(toks, torch.arange(next_slot, next_slot + len(toks)))
        next_slot += len(toks)
        tree.dec_lock_ref(m.last_device_node)
    sample = keys[-2000:]
    perf = time.perf_counter
    out = []

    def bench(label, fn, args_list):
        t = perf()
        for a in args_list:
            fn(*a)
        out.append({"variant": label, "us_per_call": (perf() - t) / len(args_list) * 1e6})

    t32 = [(torch.from_numpy(k),) for k in sample]
    t64 = [(torch.from_numpy(k.astype(np.int64)),) for k in sample]
    np32 = [(k,) for k in sample]
    np64 = [(k.astype(np.int64),) for k in sample]
    bench("match_prefix(numpy int32)", tree.match_prefix, np32)
    bench("match_prefix(torch int32)", tree.match_prefix, t32)
    bench("match_prefix(numpy int64)", tree.match_prefix, np64)
    bench("match_prefix(torch int64)", tree.match_prefix, t64)
    ms = [tree.match_prefix(k) for k in sample[:200]]
    bench("MatchResult.device_prefix_len", lambda m: m.device_prefix_len, [(m,) for m in ms] * 10)
    bench(
        "MatchResult.device_indices.shape[0]",
        lambda m: m.device_indices.shape[0],
        [(m,) for m in ms] * 10,
    )
    bench("total_size()", lambda: tree.total_size(), [()] * 20_000)
    bench(
        "inc_lock_ref+dec_lock_ref (root)",
        lambda: (tree.inc_lock_ref(0), tree.dec_lock_ref(0)),
        [()] * 20_000,
    )
    n = int(statistics.median(len(k) for k in keys))
    bench(
        f"torch.arange(int64, n={n})",
        lambda s: torch.arange(s, s + n, dtype=torch.int64),
        [(i * n,) for i in range(20_000)],
    )
    bench(
        f"np.arange(int64, n={n})",
        lambda s: np.arange(s, s + n, dtype=np.int64),
        [(i * n,) for i in range(20_000)],
    )
    bench(
        "torch.empty(0) (floor of any tensor return)",
        lambda: torch.empty(0, dtype=torch.int64),
        [()] * 20_000,
    )
    bench(
        "torch.frombuffer of 1 page (tensor return)",
        lambda b: torch.frombuffer(b, dtype=torch.int64),
        [(bytearray(8 * page),)] * 20_000,
    )
    return out


def run_baseline(python: str, script: Path, trace: Path, pct: int, extra: list[str]) -> dict:
    cmd = [python, str(script), str(trace), str(pct), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"baseline failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def median_run(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["cache_seconds"])
    med = dict(runs[len(runs) // 2])
    med["all_cache_seconds"] = [round(r["cache_seconds"], 4) for r in runs]
    return med


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--trace", type=Path, default=None, help=f"Mooncake JSONL trace (default {default_trace()})"
    )
    ap.add_argument(
        "--pcts", type=int, nargs="+", default=[10, 50], help="capacities, %% of unique blocks"
    )
    ap.add_argument("--bt", type=int, default=16, help="tokens per trace block")
    ap.add_argument("--page", type=int, default=16, help="tree page size in tokens")
    ap.add_argument(
        "--repeat", type=int, default=3, help="hicache runs per capacity (median reported)"
    )
    ap.add_argument(
        "--baseline-repeat", type=int, default=1, help="runs of each baseline (median reported)"
    )
    ap.add_argument(
        "--skip-python", action="store_true", help="skip SGLang's pure-Python RadixCache (slow)"
    )
    ap.add_argument(
        "--skip-rust", action="store_true", help="skip SGLang's UnifiedRadixCache (Rust core)"
    )
    ap.add_argument("--limit", type=int, default=0, help="replay only the first N requests")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--profile", action="store_true", help="per-call breakdown of hicache's loop")
    ap.add_argument(
        "--sglang-python",
        default=os.environ.get("HICACHE_SGLANG_PYTHON", str(DEFAULT_SGLANG_PYTHON)),
        help="python of SGLang's venv (shared/baselines/install_sglang.sh prints it)",
    )
    ap.add_argument("--baselines-dir", type=Path, default=BASELINES)
    a = ap.parse_args()
    trace = (a.trace or default_trace()).resolve()
    if a.bt % a.page:
        ap.error(f"--page {a.page} must divide --bt {a.bt}")
    need_sglang = not (a.skip_python and a.skip_rust)
    if need_sglang and not Path(a.sglang_python).exists():
        raise SystemExit(
            f"SGLang venv python not found at {a.sglang_python}: run "
            f"`bash {BASELINES / 'install_sglang.sh'}` (or pass --skip-python --skip-rust)"
        )
    # SGLang's UnifiedRadixCache direct loop runs at tree page = bt only.
    rust_ok = not a.skip_rust and a.page == a.bt

    reqs = load_trace(trace, a.limit)
    unique = len(
        {h for r in reqs for h in r}
    )  # over the replayed requests, as sglang_radix_baseline.py
    total_blocks = sum(len(r) for r in reqs)
    kind = TRACE_SHAPES.get((len(reqs), unique))
    keys = token_arrays(reqs, a.bt)
    print(
        f"trace {trace} ({len(reqs):,} requests, {total_blocks:,} blocks, {unique:,} unique), "
        f"bt={a.bt}, page={a.page}",
        flush=True,
    )
    if a.limit and rust_ok:
        print(
            "note: with --limit, sglang_unified_baseline.py sizes its capacity from the whole "
            "trace's unique blocks, so its hits are not comparable",
            flush=True,
        )

    results = []
    for pct in a.pcts:
        cap_blocks = unique * pct // 100
        row: dict = {"pct": pct, "cap_blocks": cap_blocks, "requests": len(reqs)}
        runs = []
        for _ in range(a.repeat):
            runs.append(run_hicache(keys, cap_blocks, a.bt, a.page))
        row["hicache"] = median_run(runs)
        print(
            f"[{pct}%] hicache: {row['hicache']['requests_per_s_cache']:,.0f} req/s "
            f"(runs {row['hicache']['all_cache_seconds']} s)",
            flush=True,
        )
        limit = ["--limit", str(a.limit)] if a.limit else []
        if not a.skip_python:
            row["python"] = median_run(
                [
                    run_baseline(
                        a.sglang_python,
                        a.baselines_dir / "sglang_radix_baseline.py",
                        trace,
                        pct,
                        ["--bt", str(a.bt), "--page", str(a.page), *limit],
                    )
                    for _ in range(a.baseline_repeat)
                ]
            )
            print(
                f"[{pct}%] SGLang RadixCache (Python): "
                f"{row['python']['requests_per_s_cache']:,.0f} req/s",
                flush=True,
            )
        if rust_ok:
            row["rust"] = median_run(
                [
                    run_baseline(
                        a.sglang_python,
                        a.baselines_dir / "sglang_unified_baseline.py",
                        trace,
                        pct,
                        ["--bt", str(a.bt), "--backend", "rust", *limit],
                    )
                    for _ in range(a.baseline_repeat)
                ]
            )
            if row["rust"].get("backend") != "rust":
                raise SystemExit(
                    f"UnifiedRadixCache ran backend {row['rust'].get('backend')!r}, not rust"
                )
            print(
                f"[{pct}%] SGLang UnifiedRadixCache (Rust): "
                f"{row['rust']['requests_per_s_cache']:,.0f} req/s",
                flush=True,
            )
        ref = REFERENCE_HITS.get(kind, {}).get(pct) if (kind and a.page == a.bt) else None
        row["reference_hit_blocks"] = ref
        row["reference_ok"] = None if ref is None else row["hicache"]["hit_blocks"] == ref
        if a.profile:
            row["profile"] = profile_hicache(keys, cap_blocks, a.bt, a.page)
            row["micro"] = micro_variants(keys, cap_blocks, a.bt, a.page)
        results.append(row)

    print_table(results, trace, a)
    if a.profile:
        print_profile(results)
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "trace": str(trace),
                    "bt": a.bt,
                    "page": a.page,
                    "repeat": a.repeat,
                    "total_blocks": total_blocks,
                    "unique_blocks": unique,
                    "results": results,
                },
                indent=2,
            )
        )
    if any(r["reference_ok"] is False for r in results):
        sys.exit(1)


def _fmt_rate(r: dict | None) -> str:
    return f"{r['requests_per_s_cache']:,.0f}" if r else "—"


def _fmt_ratio(ours: dict, base: dict | None) -> str:
    return f"{base['cache_seconds'] / ours['cache_seconds']:,.1f}×" if base else "—"


def _fmt_hits(r: dict | None) -> str:
    return f"{r['hit_blocks']:,}" if r else "—"


def print_table(results: list[dict], trace: Path, a: argparse.Namespace) -> None:
    header = [
        "capacity",
        "hicache req/s",
        "RadixCache (Py) req/s",
        "Unified (Rust) req/s",
        "× Python",
        "× Rust",
        "hicache hits",
        "RadixCache hits",
        "Unified hits",
        "reference hits",
    ]
    rows = []
    for r in results:
        ref = r["reference_hit_blocks"]
        check = (
            "—" if ref is None else (f"{ref:,} ✓" if r["reference_ok"] else f"{ref:,} ✗ MISMATCH")
        )
        rows.append(
            [
                f"{r['pct']}% ({r['cap_blocks']:,} blk)",
                _fmt_rate(r["hicache"]),
                _fmt_rate(r.get("python")),
                _fmt_rate(r.get("rust")),
                _fmt_ratio(r["hicache"], r.get("python")),
                _fmt_ratio(r["hicache"], r.get("rust")),
                _fmt_hits(r["hicache"]),
                _fmt_hits(r.get("python")),
                _fmt_hits(r.get("rust")),
                check,
            ]
        )
    title = (
        f"Tree throughput, {trace.name}, bt={a.bt}, page={a.page} (req/s inside cache calls; "
        f"hicache median of {a.repeat}, baselines median of {a.baseline_repeat})"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        for row in rows:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        return
    t = Table(title=title)
    for h in header:
        t.add_column(h, justify="right")
    for row in rows:
        t.add_row(*row)
    Console(width=200).print(t)


def print_profile(results: list[dict]) -> None:
    for r in results:
        p = r["profile"]
        print(
            f"\nhicache per-call profile at {r['pct']}% (timer overhead {p['timer_us']:.3f} µs "
            f"subtracted; {p['tokens_per_request']:,.0f} tokens/request, "
            f"{p['evicted_tokens']:,} tokens evicted)"
        )
        print(f"{'call':<40}{'calls':>8}{'µs/call':>10}{'µs/request':>12}")
        for row in p["rows"]:
            print(
                f"{row['call']:<40}{row['calls']:>8}{row['us_per_call']:>10.2f}{row['us_per_request']:>12.2f}"
            )
        total = sum(row["us_per_request"] for row in p["rows"])
        print(f"{'sum':<40}{'':>8}{'':>10}{total:>12.2f}")
        print(f"\nboundary variants at {r['pct']}% (warm tree, last 2,000 requests' keys):")
        for m in r["micro"]:
            print(f"  {m['variant']:<50}{m['us_per_call']:>8.2f} µs")


if __name__ == "__main__":
    main()
