"""Host <-> device KV transfer bandwidth: hicache's kernels vs a contiguous memcpy vs torch copies.

For a realistic model shape (default: 32 layers x 8 KV heads x 128 head_dim, bf16, K and V) and
batches of scattered whole pages (random page order in both pools, as a radix cache hands them
out), it times, in the same run and on the same pools:

- ``kernel``: hicache's CUDA kernels (``io_backend="kernel"``), one launch per batch;
- ``kernel/layer``: the layer-wise load, one launch per layer (``load_layer``, host -> device only);
- ``memcpy``: one contiguous pinned ``cudaMemcpyAsync`` of the same number of bytes (the ceiling:
  what the link gives a single large copy);
- ``direct``: the torch fallback backend (``io_backend="direct"``).

GB/s counts the KV bytes moved (1e9 bytes), median of ``--repeat`` timed runs after a warm-up,
timed with CUDA events around work on one stream. Targets (issue 4): kernel >= 90% of memcpy for
page >= 16 and >= 3x direct.

Run: ``python benchmarks/transfer.py`` on a machine with a GPU (``--device cpu`` runs the direct
and memcpy columns on the CPU, to check the script itself).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from hicache import transfer
from hicache.memory import DeviceKVPool, HostKVPool
from hicache.memory.host_pool import HostLayout

DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
}


def _timer(device: torch.device):
    """Returns ``time(fn) -> seconds``: CUDA events on the current stream, or perf_counter."""
    if device.type == "cuda":

        def time_cuda(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return time_cuda

    def time_cpu(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return time_cpu


def _median_seconds(timer, fn, repeat: int) -> float:
    fn()  # warm-up (first-touch, allocator, module load)
    return statistics.median(timer(fn) for _ in range(repeat))


def _scattered_pages(num_slots: int, page_size: int, num_tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    pages = torch.randperm(num_slots // page_size, generator=gen)[: num_tokens // page_size]
    return (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)


def _measure(engines, dev_idx, host_idx, nbytes, direction, num_layers, timer, repeat) -> dict:
    """GB/s per column for one batch and direction (see the module docstring)."""
    gbps = {}
    for name, engine in engines.items():
        indices = engine.prepare(dev_idx, host_idx)
        if direction == "d2h":
            run = functools.partial(engine.backup_all_layers, indices)
        else:
            run = functools.partial(engine.load_all_layers, indices)
        gbps[name] = nbytes / _median_seconds(timer, run, repeat) / 1e9
        if name == "kernel" and direction == "h2d":
            by_layer = functools.partial(_load_by_layer, engine, indices, num_layers)
            gbps["kernel/layer"] = nbytes / _median_seconds(timer, by_layer, repeat) / 1e9
    # The ceiling: one contiguous copy of the same bytes between the same two memories.
    device = next(iter(engines.values())).device_pool.device
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
    on_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst, src = (on_host, on_device) if direction == "d2h" else (on_device, on_host)
    copy = functools.partial(dst.copy_, src, non_blocking=True)
    gbps["memcpy"] = nbytes / _median_seconds(timer, copy, repeat) / 1e9
    return gbps


def _load_by_layer(engine, indices, num_layers: int) -> None:
    for layer in range(num_layers):
        engine.load_layer(indices, layer)


def _row(gbps: dict) -> str:
    cols = "".join(
        f"{gbps[name]:>9.1f}" if name in gbps else f"{'n/a':>9}"
        for name in ("kernel", "kernel/layer", "memcpy", "direct")
    )
    k = gbps.get("kernel")
    if k is None:
        return cols + f"{'n/a':>10}{'n/a':>10}"
    return cols + f"{k / gbps['memcpy']:>10.0%}{k / gbps['direct']:>9.1f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--kind", choices=("mha", "mla"), default="mha")
    p.add_argument("--pages", type=int, nargs="+", default=[16, 64])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--layouts", nargs="+", default=[m.value for m in HostLayout])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    heads = 1 if args.kind == "mla" else args.heads
    max_tokens = max(args.tokens)
    backends = transfer.available_backends() if device.type == "cuda" else ["direct"]
    timer = _timer(device)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
        f"shape {args.kind} {args.layers} layers x {heads} heads x {args.head_dim} {args.dtype}; "
        f"backends: {backends}"
    )
    header = (
        f"{'layout':<18}{'dir':<5}{'page':>5}{'tokens':>8}{'MB':>9}"
        f"{'kernel':>9}{'k/layer':>9}{'memcpy':>9}{'direct':>9}{'k/memcpy':>10}{'k/direct':>10}"
    )
    print("GB/s (1e9 B/s), median of", args.repeat)
    print(header)
    print("-" * len(header))
    for page_size in args.pages:
        num_slots = (max_tokens * 5 // 4) // page_size * page_size
        dev = DeviceKVPool(
            num_slots, args.layers, heads, args.head_dim, dtype=dtype, device=device, kind=args.kind
        )
        for layout in args.layouts:
            host = HostKVPool(dev, num_slots, page_size, layout, pin_memory=device.type == "cuda")
            engines = {b: transfer.KVTransfer(dev, host, b) for b in backends}
            for num_tokens in args.tokens:
                dev_idx = _scattered_pages(num_slots, page_size, num_tokens, seed=1)
                host_idx = _scattered_pages(num_slots, page_size, num_tokens, seed=2)
                nbytes = dev.size_bytes // num_slots * num_tokens
                for direction in ("d2h", "h2d"):
                    gbps = _measure(
                        engines,
                        dev_idx,
                        host_idx,
                        nbytes,
                        direction,
                        args.layers,
                        timer,
                        args.repeat,
                    )
                    print(
                        f"{layout:<18}{direction:<5}{page_size:>5}{num_tokens:>8}"
                        f"{nbytes / 1e6:>9.0f}{_row(gbps)}"
                    )


if __name__ == "__main__":
    main()
