"""Page hashes: SGLang 0.5.23's SHA-256 chain over page tokens (reference §6.1).

Page ``i`` of a key is identified by ``digest_i = SHA256(digest_{i-1} || tokens_i)``: a digest
covers the page and, through the chain, every page before it, so equal digests mean equal
prefixes. ``digest_{-1}`` is absent unless the key has a namespace (``extra_key`` or
``cache_salt``), which seeds the chain so that tenants never share pages (upstream issue #26747,
PR #38577). Tokens are little-endian uint32; a page holding a token >= 2**32 is hashed as a
``0xff`` tag byte followed by little-endian uint64 tokens. These are SGLang's rules
(``get_hash_str`` and ``storage_namespace_seed``), checked against its own outputs in
``tests/storage/test_page_hash.py``, so keys are stable across processes, restarts and engines.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

__all__ = ["block_hash", "namespace_seed", "page_hashes"]

_NAMESPACE_TAG = b"sglang-cache-namespace-v1"
_WIDE_TAG = b"\xff"


def namespace_seed(extra_key: str | None = None, cache_salt: str | None = None) -> bytes | None:
    r"""The 32-byte digest that seeds a namespaced chain, or None without a namespace.

    ``SHA256(b"sglang-cache-namespace-v1" || framed(extra_key) || framed(cache_salt))`` where
    ``framed(None) = b"\x00"`` and ``framed(s) = b"\x01" || len(utf8(s)) as 8-byte LE ||
    utf8(s)``, so an empty string differs from an absent part.

    Args:
        extra_key: the request's namespace (LoRA id, tenant); None for none.
        cache_salt: a per-user salt; None for none.

    Returns:
        The seed digest, or None when both parts are None (unseeded keys stay compatible with
        storage written before namespaces existed).
    """
    if extra_key is None and cache_salt is None:
        return None

    def framed(part: str | None) -> bytes:
        if part is None:
            return b"\x00"
        data = part.encode("utf-8")
        return b"\x01" + struct.pack("<Q", len(data)) + data

    return hashlib.sha256(_NAMESPACE_TAG + framed(extra_key) + framed(cache_salt)).digest()


def page_hashes(
    tokens: Sequence[int] | np.ndarray,
    page_size: int,
    seed: bytes | None = None,
    prefix_digest: bytes | None = None,
) -> list[bytes]:
    """SHA-256 chain digests of the pages of ``tokens``.

    Args:
        tokens: token ids (non-negative ints; a list, numpy array or CPU tensor).
        page_size: tokens per page, >= 1. A short last page is hashed as it is.
        seed: :func:`namespace_seed`'s digest for a namespaced key, else None.
        prefix_digest: the digest of the page before ``tokens[0]`` when ``tokens`` continues a
            hashed prefix (a node below its parent); overrides ``seed``.

    Returns:
        One 32-byte digest per page, in order.

    Raises:
        ValueError: ``page_size < 1`` or a negative token.
    """
    if page_size < 1:
        raise ValueError(f"page_hashes: page_size: expected >= 1, got {page_size}")
    array = np.asarray(tokens, dtype=np.int64)
    if array.size and int(array.min()) < 0:
        raise ValueError(f"page_hashes: tokens: expected >= 0, got {int(array.min())}")
    digests: list[bytes] = []
    previous = prefix_digest if prefix_digest is not None else seed
    narrow = array.astype("<u4")
    wide_pages = array >= 2**32
    for start in range(0, array.size, page_size):
        end = start + page_size
        h = hashlib.sha256()
        if previous is not None:
            h.update(previous)
        if wide_pages[start:end].any():
            h.update(_WIDE_TAG + array[start:end].astype("<u8").tobytes())
        else:
            h.update(narrow[start:end].tobytes())
        previous = h.digest()
        digests.append(previous)
    return digests


def block_hash(digest: bytes) -> int:
    """The KV-event block hash of a page: its digest's first 8 bytes as a signed int64.

    SGLang's ``KVCacheEventRecorder`` uses the first 16 hex digits of the page SHA-256 (vLLM's
    KV events carry int block hashes too).
    """
    return int.from_bytes(digest[:8], "big", signed=True)
