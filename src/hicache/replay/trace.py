"""Mooncake-format request traces (FAST'25): loading and expansion of block ids into tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from hicache.errors import InvalidArgumentError

__all__ = ["TRACE_BLOCK_TOKENS", "TraceRequest", "bundled_trace_path", "block_tokens", "load_trace"]

TRACE_BLOCK_TOKENS = 512  # tokens per hash_ids block in Mooncake traces


@dataclass(frozen=True)
class TraceRequest:
    """One trace line.

    Attributes:
        timestamp_ms: arrival time in ms from the start of the trace.
        input_length: prompt tokens (real, unscaled).
        output_length: generated tokens.
        hash_ids: one id per 512-token block of the prompt, in order; equal ids = same prefix block.
    """

    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def bundled_trace_path() -> Path:
    """Path of the Mooncake conversation trace shipped with the package."""
    return Path(str(resources.files("hicache") / "data" / "conversation_trace.jsonl"))


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Reads a Mooncake JSONL trace.

    Args:
        path: the ``.jsonl`` file, one request per line with ``timestamp``, ``input_length``,
            ``output_length`` and ``hash_ids``.
        limit: read only the first ``limit`` requests (None: all).

    Returns:
        list[TraceRequest]: the requests in file order.

    Raises:
        InvalidArgumentError: a line is not valid JSON, misses a field, or has an empty or
            negative ``hash_ids``; the message names the line.
        FileNotFoundError: ``path`` does not exist.
    """
    requests: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                req = TraceRequest(
                    int(row["timestamp"]),
                    int(row["input_length"]),
                    int(row["output_length"]),
                    tuple(int(h) for h in row["hash_ids"]),
                )
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidArgumentError(
                    f"{path}:{lineno}: not a Mooncake trace line ({e})"
                ) from e
            if not req.hash_ids or min(req.hash_ids) < 0:
                raise InvalidArgumentError(f"{path}:{lineno}: hash_ids must be non-empty, >= 0")
            requests.append(req)
    return requests


def block_tokens(hash_ids: tuple[int, ...], tokens_per_block: int) -> torch.Tensor:
    """Expands block ids into deterministic token ids: block ``b`` -> ``b*n .. b*n+n-1``.

    Distinct (block, position) pairs get distinct tokens, so equal token prefixes mean equal block
    prefixes. Every block, the trace's partial last one included, expands to ``tokens_per_block``
    tokens, as the block-level reference counts it whole (traces/README.md).

    Args:
        hash_ids: the request's block ids.
        tokens_per_block: tokens per block after scaling (``--block-tokens``).

    Returns:
        torch.Tensor: ``[len(hash_ids) * tokens_per_block]`` int32 CPU tensor.

    Raises:
        InvalidArgumentError: a token id would not fit int32.
    """
    ids = torch.tensor(hash_ids, dtype=torch.int64)
    if int(ids.max()) >= (2**31 - 1) // tokens_per_block:
        raise InvalidArgumentError(
            f"block id {int(ids.max())} x {tokens_per_block} tokens per block overflows int32"
        )
    offsets = torch.arange(tokens_per_block, dtype=torch.int64)
    return (ids[:, None] * tokens_per_block + offsets[None, :]).reshape(-1).to(torch.int32)
