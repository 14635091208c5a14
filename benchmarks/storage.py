"""Storage (L3) backend throughput: hicache's file and valkey backends vs raw I/O of the same bytes.

For a realistic page (default: 64 tokens x 8 layers x K,V x 8 heads x 128 dim, fp16 = 2 MiB) and
batches of 1, 8, 32 and 128 pages, it times, in the same run and on the same page bytes:

- ``ours``: ``backend.set`` (fresh keys: no dedup), ``backend.get`` (into a second host pool:
  read, verify header + xxh3 checksum, copy into the pool) and ``backend.exists``;
- ``raw``, the ceiling for the same transport without hicache's work:
  - file: ``open``/``write``/``os.replace`` of the bare page bytes (no header, no checksum),
    ``open``/``readinto`` a preallocated buffer (no verification, no copy into a pool), and
    ``os.stat`` per page;
  - valkey: one ``MSET`` / ``MGET`` of the bare page bytes and one multi-key ``EXISTS`` (what
    one pipelined round trip can do), on a server this script starts on a loopback port
    (``valkey-server`` or ``redis-server`` from PATH, persistence off) like the tests' fixture.

It prints one table: time per batch, pages/s, GB/s (1e9 B/s of payload) and ours/raw (a
throughput ratio: 100% = as fast as the raw transport). Median of ``--repeat`` runs after one
warm-up. The file backend writes into ``--path`` (default: a temporary directory
under /tmp), so its numbers are those of the OS page cache unless the data outgrows memory.

Run: ``python benchmarks/storage.py`` (add ``--backends file`` without a server binary).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import valkey

from hicache.memory import DeviceKVPool, HostKVPool
from hicache.storage import StorageIdentity, create_backend, page_hashes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _start_server(workdir: Path) -> tuple[subprocess.Popen, int, str]:
    binary = shutil.which("valkey-server") or shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no valkey-server or redis-server on PATH: run with --backends file")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--logfile", ""]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = valkey.Valkey(port=port)
    for _ in range(500):
        try:
            version = client.info("server")["redis_version"]
            client.close()
            return proc, port, f"{Path(binary).name} {version}"
        except valkey.exceptions.ConnectionError:
            time.sleep(0.01)
    proc.kill()
    raise SystemExit(f"{binary} did not start")


def _median_seconds(fn, repeat: int, setup=None, teardown=None) -> float:
    """Median time of ``fn(r)`` for ``r`` in ``range(repeat)``, after one untimed warm-up."""
    times = []
    for r in range(-1, repeat):
        if setup is not None:
            setup(r)
        t0 = time.perf_counter()
        fn(r)
        if r >= 0:
            times.append(time.perf_counter() - t0)
        if teardown is not None:
            teardown(r)
    return statistics.median(times)


def _check_same(src: HostKVPool, dst: HostKVPool, idx: torch.Tensor) -> None:
    for a, b in zip(src.read(idx), dst.read(idx), strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "get returned other bytes"


def _keys(num: int, salt: int) -> list[str]:
    tokens = np.arange(salt * 1_000_000, salt * 1_000_000 + num, dtype=np.int64)
    return [d.hex() for d in page_hashes(tokens, 1)]


def _bench_file(args, src, dst, slots, pages_bytes, batch, path: Path) -> dict:
    identity = StorageIdentity.from_host_pool(src, "bench")
    backend = create_backend("file", identity, {"path": str(path)})
    raw_dir = path / "raw"
    raw_dir.mkdir(exist_ok=True)
    idx = slots[: batch * src.page_size]
    value_buf = np.empty(len(pages_bytes[0]), dtype=np.uint8)

    def clear(_r):
        for d in (backend.directory, raw_dir):
            for name in os.listdir(d):
                os.unlink(d / name)

    def ours_set(r):
        assert backend.set(_keys(batch, 100 + r), src, idx) == batch

    def raw_set(r):
        for i, key in enumerate(_keys(batch, 100 + r)):
            tmp = raw_dir / f".{key}.tmp"
            with open(tmp, "wb") as f:
                f.write(pages_bytes[i])
            os.replace(tmp, raw_dir / f"{key}.bin")

    out = {
        "set": (
            _median_seconds(ours_set, args.repeat, clear),
            _median_seconds(raw_set, args.repeat, clear),
        )
    }
    clear(0)
    keys = _keys(batch, 7)
    assert backend.set(keys, src, idx) == batch
    raw_set_keys = _keys(batch, 7)
    for i, key in enumerate(raw_set_keys):
        (raw_dir / f"{key}.bin").write_bytes(pages_bytes[i])

    def ours_get(_r):
        assert backend.get(keys, dst, idx) == batch

    def raw_get(_r):
        for key in raw_set_keys:
            with open(raw_dir / f"{key}.bin", "rb", buffering=0) as f:
                f.readinto(value_buf)

    def ours_exists(_r):
        assert backend.exists(keys) == batch

    def raw_exists(_r):
        for key in raw_set_keys:
            os.stat(raw_dir / f"{key}.bin")

    out["get"] = (_median_seconds(ours_get, args.repeat), _median_seconds(raw_get, args.repeat))
    out["exists"] = (
        _median_seconds(ours_exists, args.repeat),
        _median_seconds(raw_exists, args.repeat),
    )
    _check_same(src, dst, idx)
    clear(0)
    backend.close()
    return out


def _bench_valkey(args, src, dst, slots, pages_bytes, batch, port: int) -> dict:
    identity = StorageIdentity.from_host_pool(src, "bench")
    backend = create_backend("valkey", identity, {"port": port, "socket_timeout": 60})
    client = valkey.Valkey(port=port, socket_timeout=60)
    idx = slots[: batch * src.page_size]

    def flush(_r):
        client.flushall()

    def ours_set(r):
        assert backend.set(_keys(batch, 100 + r), src, idx) == batch

    def raw_set(r):
        client.mset({f"raw/{k}": pages_bytes[i] for i, k in enumerate(_keys(batch, 100 + r))})

    out = {
        "set": (
            _median_seconds(ours_set, args.repeat, flush),
            _median_seconds(raw_set, args.repeat, flush),
        )
    }
    flush(0)
    keys = _keys(batch, 7)
    assert backend.set(keys, src, idx) == batch
    raw_keys = [f"raw/{k}" for k in keys]
    client.mset({k: pages_bytes[i] for i, k in enumerate(raw_keys)})

    def ours_get(_r):
        assert backend.get(keys, dst, idx) == batch

    def raw_get(_r):
        assert len(client.mget(raw_keys)) == batch

    def ours_exists(_r):
        assert backend.exists(keys) == batch

    def raw_exists(_r):
        assert client.exists(*raw_keys) == batch

    out["get"] = (_median_seconds(ours_get, args.repeat), _median_seconds(raw_get, args.repeat))
    out["exists"] = (
        _median_seconds(ours_exists, args.repeat),
        _median_seconds(raw_exists, args.repeat),
    )
    _check_same(src, dst, idx)
    flush(0)
    client.close()
    backend.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="tokens per page")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--layout", default="page_first", help="host layout (page_first: zero-copy)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--backends", nargs="+", default=["file", "valkey"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--path", default=None, help="directory for the file backend")
    args = p.parse_args()

    max_batch = max(args.batches)
    dtype = DTYPES[args.dtype]
    device = DeviceKVPool(args.tokens, args.layers, args.heads, args.head_dim, dtype, device="cpu")
    num_slots = max_batch * args.tokens
    src = HostKVPool(device, num_slots, args.tokens, args.layout, pin_memory=False)
    dst = HostKVPool(device, num_slots, args.tokens, args.layout, pin_memory=False)
    raw = src.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
    page_nbytes = src.size_bytes // src.num_pages
    # The same bytes as the backend's payload, as bare bytes objects, for the raw ceilings.
    slots = torch.randperm(src.num_pages)[:max_batch] * args.tokens
    slots = (slots[:, None] + torch.arange(args.tokens)).reshape(-1)
    k, v = src.read(slots)
    pages_bytes = [
        b"".join(
            t[:, i * args.tokens : (i + 1) * args.tokens].contiguous().view(torch.uint8).numpy()
            for t in (k, v)
        )
        for i in range(max_batch)
    ]
    assert all(len(b) == page_nbytes for b in pages_bytes)

    workdir = Path(tempfile.mkdtemp(prefix="hicache-storage-bench-"))
    path = Path(args.path) if args.path else workdir / "file"
    path.mkdir(parents=True, exist_ok=True)
    server = None
    server_name = "-"
    try:
        if "valkey" in args.backends:
            server, port, server_name = _start_server(workdir)
        print(
            f"page: {args.tokens} tokens x {args.layers} layers x K,V x {args.heads} heads x "
            f"{args.head_dim} dim {args.dtype} = {page_nbytes / 2**20:.2f} MiB "
            f"({page_nbytes} B); host layout {args.layout}; {os.cpu_count()} CPUs; "
            f"server {server_name}; file dir {path}; median of {args.repeat}"
        )
        header = (
            f"{'backend':<8}{'op':<7}{'pages':>6}{'MB':>8}{'ours ms':>10}{'raw ms':>10}"
            f"{'pages/s':>10}{'GB/s':>8}{'raw GB/s':>10}{'ours/raw':>10}"
        )
        print(header)
        print("-" * len(header))
        for backend in args.backends:
            for batch in args.batches:
                if backend == "file":
                    res = _bench_file(args, src, dst, slots, pages_bytes, batch, path)
                else:
                    res = _bench_valkey(args, src, dst, slots, pages_bytes, batch, port)
                nbytes = batch * page_nbytes
                for op in ("set", "get", "exists"):
                    ours, raw_s = res[op]
                    gbps = f"{nbytes / ours / 1e9:>8.2f}" if op != "exists" else f"{'-':>8}"
                    raw_gbps = f"{nbytes / raw_s / 1e9:>10.2f}" if op != "exists" else f"{'-':>10}"
                    # ours/raw as a throughput ratio: 100% = as fast as the raw transport.
                    print(
                        f"{backend:<8}{op:<7}{batch:>6}{nbytes / 1e6:>8.1f}{ours * 1e3:>10.2f}"
                        f"{raw_s * 1e3:>10.2f}{batch / ours:>10.0f}{gbps}{raw_gbps}"
                        f"{raw_s / ours:>10.0%}"
                    )
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
