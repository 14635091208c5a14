"""``hicache replay``: drive the cache with a real request trace, as an engine's scheduler would."""

from hicache.replay.runner import ReplayConfig, ReplayReport, run_replay
from hicache.replay.trace import TraceRequest, bundled_trace_path, load_trace

__all__ = [
    "ReplayConfig",
    "ReplayReport",
    "TraceRequest",
    "bundled_trace_path",
    "load_trace",
    "run_replay",
]
