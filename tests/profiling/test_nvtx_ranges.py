"""Every NVTX stage reaches a profiler, under its name, in domain "hicache", nested as documented.

No Nsight needed: ``nvtx_recorder.c`` is an NVTX injection library (the mechanism Nsight Systems
uses) that writes each push/pop, start/end and mark with its thread, domain, message and payload to
a file. The tests compile it with ``cc``, run a short ``hicache replay`` with
``NVTX_INJECTION64_PATH`` pointing at it, and check the recording against
:mod:`hicache.profiling`: the exact set of stages a replay exercises, only listed names, balanced
pushes and pops per thread, every range directly inside a stage that :data:`profiling.NESTING`
allows (and the nesting edges the code is known to produce actually observed), one ``load_layer``
per layer per ``load_batch``, and payloads that add up to the replay's own token counts. The
kernel ranges (C++) need a GPU for a real replay (``cuda`` marker); on the CPU, a launch that fails
for want of a GPU still pushes and pops its range, which checks the C++ side's domain and names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from hicache import profiling, transfer

RECORDER_SOURCE = Path(__file__).with_name("nvtx_recorder.c")
# Without a storage backend (these replays have none) the storage stages never run.
STORAGE_RUN_STAGES = frozenset(profiling.STORAGE_STAGES) | {
    profiling.PREFETCH,
    profiling.PREFETCH_DONE,
}
PY_STAGES = frozenset(profiling.STAGES) - frozenset(profiling.CPP_STAGES) - STORAGE_RUN_STAGES
NUM_LAYERS = 3  # not the replay's default of 2, so that a per-layer count cannot match by chance
# Small enough for a few seconds on 2 cores; the bundled trace's first 400 requests at this size
# evict to host, evict host leaves and load some host hits back (both policies).
REPLAY_ARGS = ["--limit", "400", "--hicache-ratio", "4", "--device-ratio", "0.05"]
REPLAY_ARGS += ["--layers", str(NUM_LAYERS), "--quiet"]

# Nesting edges (child, parent; None: outermost) that the code produces on every such replay, per
# write policy: observing them proves the ranges sit where cache.py and controller.py open them.
COMMON_EDGES = {(name, None) for name in ("match_prefix", "insert", "evict", "load_back", "ack")}
COMMON_EDGES |= {
    ("enqueue_load", "load_back"),  # init_load_back queues the load
    ("ack_write", "ack"),  # check_hicache_events pops both kinds of acks
    ("ack_load", "ack"),
    ("load_layer", "load_batch"),
}
REQUIRED_EDGES = {
    # The insert queues the write-through backups, evicting host leaves to make room.
    "write_through": COMMON_EDGES | {("enqueue_write", "insert"), ("evict_host", "insert")},
    # Write-back eviction backs each node up and waits for it, inside evict.
    "write_back": COMMON_EDGES
    | {("enqueue_write", "evict"), ("ack_write", "evict"), ("evict_host", "evict")},
}


# ---- building the recorder ----------------------------------------------------------------------


def _nvtx_include_dir() -> Path | None:
    """A directory holding ``nvtx3/nvToolsExt.h``: the CUDA toolkit's, else nvidia-nvtx's."""
    candidates = [
        Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ
    ]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    try:  # the nvidia-nvtx wheel: site-packages/nvidia/cu13/include/nvtx3
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        candidates += [inc for base in nvidia.__path__ for inc in Path(base).glob("*/include")]
    return next((c for c in candidates if (c / "nvtx3" / "nvToolsExt.h").is_file()), None)


@pytest.fixture(scope="module")
def recorder(tmp_path_factory) -> Path:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler (cc or gcc on PATH, or $CC) to build the NVTX recorder")
    include = _nvtx_include_dir()
    if include is None:
        pytest.skip(
            "needs the NVTX3 headers (nvtx3/nvToolsExt.h): install the CUDA toolkit (or set "
            "CUDA_HOME), or `pip install nvidia-nvtx`"
        )
    lib = tmp_path_factory.mktemp("nvtx") / "libnvtx_recorder.so"
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{include}"]
    cmd += [str(RECORDER_SOURCE), "-o", str(lib), "-lpthread"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    return lib


def _record(lib: Path, out: Path, argv: list[str]) -> str:
    """Runs ``python argv`` with the recorder injected; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "NVTX_DISABLE"}
    env.update(NVTX_INJECTION64_PATH=str(lib), NVTX_RECORDER_FILE=str(out))
    proc = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# ---- reading a recording ------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """One pushed range of the recording, with the range enclosing it on its thread."""

    name: str
    tid: int
    parent: str | None  # the innermost open range of the same domain on the same thread
    payload: str  # "" when none


@dataclass
class Recording:
    ranges: list[Range]  # push/pop ranges of the domain, in push order
    others: list[tuple[str, str]]  # (kind, message) of its start and mark events


def _read(path: Path, domain: str = profiling.DOMAIN) -> Recording:
    """Parses the recorder's file; asserts that pushes and pops balance per thread."""
    stacks: dict[int, list[str]] = defaultdict(list)
    open_ids: set[str] = set()
    recording = Recording([], [])
    lines = path.read_text().splitlines() if path.exists() else []
    for lineno, line in enumerate(lines, 1):
        kind, tid_text, line_domain, message, payload, range_id = line.split("\t")
        if line_domain != domain:
            continue
        tid = int(tid_text)
        stack = stacks[tid]
        if kind == "push":
            recording.ranges.append(Range(message, tid, stack[-1] if stack else None, payload))
            stack.append(message)
        elif kind == "pop":
            assert stack, f"line {lineno}: a pop on thread {tid} with no range open"
            stack.pop()
        elif kind == "start":
            open_ids.add(range_id)
            recording.others.append((kind, message))
        elif kind == "end":
            assert range_id in open_ids, f"line {lineno}: end of range id {range_id} never started"
            open_ids.remove(range_id)
        else:
            recording.others.append((kind, message))
    unclosed = {tid: stack for tid, stack in stacks.items() if stack}
    assert not unclosed, f"ranges pushed and never popped, per thread: {unclosed}"
    assert not open_ids, f"ranges started and never ended: {sorted(open_ids)}"
    return recording


def _check_common(rec: Recording) -> None:
    """What holds for every replay: listed names only, each nested as NESTING allows."""
    names = {r.name for r in rec.ranges} | {message for _, message in rec.others}
    assert names <= set(profiling.STAGES), f"unlisted names: {names - set(profiling.STAGES)}"
    bad = Counter(
        (r.name, r.parent) for r in rec.ranges if r.parent not in profiling.NESTING[r.name]
    )
    assert not bad, f"(range, enclosing range) pairs that NESTING does not allow: {dict(bad)}"
    batches = [r for r in rec.ranges if r.name in ("load_batch", "load_layer")]
    for tid in {r.tid for r in batches}:
        on_thread = [r for r in batches if r.tid == tid]
        layers = [r.payload for r in on_thread if r.name == "load_layer"]
        num_batches = sum(r.name == "load_batch" for r in on_thread)
        # One load_layer per layer, in order, inside each load_batch (NESTING puts them there).
        assert layers == [str(i) for i in range(NUM_LAYERS)] * num_batches, (
            f"thread {tid}: {num_batches} load batches, load_layer payloads {layers}"
        )


def _check_emitted(rec: Recording, expected: frozenset[str]) -> None:
    emitted = {r.name for r in rec.ranges}
    assert not expected - emitted, f"stages never emitted: {sorted(expected - emitted)}"
    assert not emitted - expected, f"stages emitted unexpectedly: {sorted(emitted - expected)}"


def _edges(rec: Recording) -> set[tuple[str, str | None]]:
    return {(r.name, r.parent) for r in rec.ranges}


def _tokens(rec: Recording, name: str) -> int:
    return sum(int(r.payload) for r in rec.ranges if r.name == name)


# ---- the recorder itself ------------------------------------------------------------------------


def test_recorder_records_names_domains_payloads_and_threads(recorder, tmp_path):
    out = tmp_path / "events.tsv"
    script = (
        "import threading, nvtx\n"
        "with nvtx.annotate('outer', domain='d1', payload=7):\n"
        "    with nvtx.annotate('inner', domain='d1'):\n"
        "        nvtx.mark('here', domain='d1')\n"
        "rid = nvtx.start_range('span', domain='d2', payload=2.5)\n"
        "t = threading.Thread(target=lambda: nvtx.end_range(rid)); t.start(); t.join()\n"
        "nvtx.push_range('plain'); nvtx.pop_range()\n"
    )
    _record(recorder, out, ["-c", script])
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    kinds = [(kind, domain, message, payload) for kind, _, domain, message, payload, _ in rows]
    assert kinds == [
        ("push", "d1", "outer", "7"),
        ("push", "d1", "inner", ""),
        ("mark", "d1", "here", ""),
        ("pop", "d1", "", ""),
        ("pop", "d1", "", ""),
        ("start", "d2", "span", "2.5"),
        ("end", "d2", "", ""),
        ("push", "", "plain", ""),
        ("pop", "", "", ""),
    ]
    start, end = rows[5], rows[6]
    assert start[5] == end[5] != "" and start[1] != end[1]  # one range id, two threads
    assert [r.name for r in _read(out, "d1").ranges] == ["outer", "inner"]


# ---- a CPU replay: every Python stage ------------------------------------------------------------


@pytest.fixture(scope="module", params=["write_through", "write_back"])
def cpu_replay(request, recorder, tmp_path_factory):
    policy = request.param
    tmp = tmp_path_factory.mktemp(f"replay_{policy}")
    out, report = tmp / "events.tsv", tmp / "report.json"
    argv = ["-m", "hicache.cli", "replay", *REPLAY_ARGS, "--device", "cpu"]
    argv += ["--hicache-write-policy", policy, "--json", str(report)]
    _record(recorder, out, argv)
    return policy, _read(out), json.loads(report.read_text())


def test_cpu_replay_emits_every_python_stage_nested_as_documented(cpu_replay):
    policy, rec, report = cpu_replay
    _check_common(rec)
    _check_emitted(rec, PY_STAGES)
    missing = REQUIRED_EDGES[policy] - _edges(rec)
    assert not missing, f"{policy}: expected nesting never observed: {sorted(missing)}"
    # Payloads: the batches carry exactly the tokens the cache queued.
    assert _tokens(rec, "write_batch") == report["cache_stats"]["backup_tokens"] > 0
    assert _tokens(rec, "load_batch") == report["load_back_tokens"] > 0
    assert sum(r.name == "match_prefix" for r in rec.ranges) >= report["requests"]


def test_cpu_replay_runs_batches_on_one_worker_thread_per_direction(cpu_replay):
    _, rec, _ = cpu_replay
    threads = {name: {r.tid for r in rec.ranges if r.name == name} for name in PY_STAGES}
    (scheduler,) = threads["match_prefix"]
    (writer,) = threads["write_batch"]
    (loader,) = threads["load_batch"]
    assert len({scheduler, writer, loader}) == 3
    assert threads["load_layer"] == {loader}
    for stage in set(PY_STAGES) - {"write_batch", "load_batch", "load_layer"}:
        assert threads[stage] == {scheduler}, stage
    assert all(r.parent is None for r in rec.ranges if r.name in profiling.WORKER_STAGES)


# ---- C++ ranges ---------------------------------------------------------------------------------


@pytest.mark.skipif(transfer._cuda_ops is None, reason="hicache._cuda_ops is not built")
def test_cpp_ranges_reach_the_tool_in_the_hicache_domain_without_a_gpu(recorder, tmp_path):
    """A launch that fails (no GPU: cudaGetDevice) has already pushed its range, and pops it."""
    if transfer._cuda_ops.device_count() > 0:
        pytest.skip("a GPU is present: test_kernel_ranges_nest_in_their_batches covers this")
    out = tmp_path / "events.tsv"
    script = (
        "import hicache._cuda_ops as ops\n"
        "p = ops.TransferParams()\n"
        "p.device_buffers = [4096, 8192]; p.host_buffers = [4096, 8192]\n"
        "p.device_indices = p.host_indices = 4096\n"
        "p.num_tokens, p.row_bytes, p.page_size = 1, 16, 1\n"
        "p.device_num_slots = p.host_num_slots = 16\n"
        "p.num_layers, p.layer_begin, p.layer_end = 1, 0, 1\n"
        "for d in (ops.Direction.device_to_host, ops.Direction.host_to_device):\n"
        "    try:\n"
        "        ops.transfer(p, ops.HostLayout.layer_first, d, 0)\n"
        "    except RuntimeError:\n"
        "        print('launch failed')\n"
    )
    assert _record(recorder, out, ["-c", script]).split() == ["launch", "failed"] * 2
    rec = _read(out)
    assert [(r.name, r.parent) for r in rec.ranges] == [
        ("kernel_backup", None),
        ("kernel_load", None),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_kernel_ranges_nest_in_their_batches(recorder, tmp_path, policy):
    reason = transfer.kernel_unavailable_reason()
    if reason:
        pytest.skip(f"the kernel io backend cannot run: {reason}")
    out, report = tmp_path / "events.tsv", tmp_path / "report.json"
    argv = ["-m", "hicache.cli", "replay", *REPLAY_ARGS, "--device", "cuda"]
    argv += ["--hicache-io-backend", "kernel", "--hicache-write-policy", policy]
    _record(recorder, out, [*argv, "--json", str(report)])
    rec = _read(out)
    assert json.loads(report.read_text())["io_backend"] == "kernel"
    _check_common(rec)
    _check_emitted(rec, frozenset(profiling.STAGES) - STORAGE_RUN_STAGES)
    count = Counter(r.name for r in rec.ranges)
    # One launch per write batch (all layers) and per layer of a load batch.
    assert count["kernel_backup"] == count["write_batch"]
    assert count["kernel_load"] == count["load_layer"]
    assert {r.parent for r in rec.ranges if r.name == "kernel_backup"} == {"write_batch"}
    assert {r.parent for r in rec.ranges if r.name == "kernel_load"} == {"load_layer"}
    # On CUDA the batches are issued on the scheduler's thread, inside the call that submits them.
    assert len({r.tid for r in rec.ranges}) == 1
    assert {r.parent for r in rec.ranges if r.name == "load_batch"} == {None}
    assert {r.parent for r in rec.ranges if r.name == "write_batch"} <= {"ack", "evict"}


# ---- a CPU replay with a storage tier: the storage stages --------------------------------------


def test_storage_replay_runs_its_stages_on_the_storage_threads(recorder, tmp_path):
    out, report = tmp_path / "events.tsv", tmp_path / "report.json"
    config = json.dumps({"path": str(tmp_path / "l3"), "prefetch_threshold": 16})
    argv = ["-m", "hicache.cli", "replay", *REPLAY_ARGS, "--device", "cpu", "--json", str(report)]
    argv += ["--hicache-storage-backend", "file", "--hicache-storage-backend-extra-config", config]
    argv += ["--hicache-storage-prefetch-policy", "wait_complete"]
    _record(recorder, out, argv)
    rec = _read(out)
    _check_common(rec)
    _check_emitted(rec, PY_STAGES | STORAGE_RUN_STAGES)
    threads = {name: {r.tid for r in rec.ranges if r.name == name} for name in STORAGE_RUN_STAGES}
    (scheduler,) = {r.tid for r in rec.ranges if r.name == "match_prefix"}
    assert threads["prefetch"] == threads["prefetch_done"] == {scheduler}
    (prefetcher,) = threads["storage_query"]
    (backup,) = threads["storage_backup"]
    assert threads["storage_get"] == {prefetcher}
    assert len({scheduler, prefetcher, backup}) == 3
    assert all(r.parent is None for r in rec.ranges if r.name in profiling.STORAGE_STAGES)
    counters = json.loads(report.read_text())["storage_stats"]["controller"]
    assert _tokens(rec, "storage_get") == counters["prefetch_read_pages"] > 0  # pages per batch
