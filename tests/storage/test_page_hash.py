"""Page hashes equal SGLang 0.5.23's for the same tokens (vectors computed by its own function)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hicache.storage import block_hash, namespace_seed, page_hashes
from tests.conftest import REPO_ROOT

VECTORS = REPO_ROOT.parent / "shared" / "reference" / "sglang_page_hash_vectors.json"


def _cases():
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} is absent (the shared reference folder is not beside the checkout)")
    return json.loads(VECTORS.read_text())["cases"]


def test_page_hashes_match_sglang_vectors():
    cases = _cases()
    assert len(cases) >= 9
    for case in cases:
        seed = namespace_seed(case["extra_key"], case["cache_salt"])
        assert (seed.hex() if seed else None) == case["namespace_seed"], case["name"]
        got = [d.hex() for d in page_hashes(case["tokens"], case["page_size"], seed)]
        assert got == case["page_hashes"], case["name"]


def test_chain_continues_from_a_prefix_digest():
    tokens = np.arange(40) * 7
    whole = page_hashes(tokens, 8)
    assert page_hashes(tokens[16:], 8, prefix_digest=whole[1]) == whole[2:]
    assert page_hashes(tokens[:16], 8) == whole[:2]
    assert len(set(whole)) == 5


def test_namespaces_separate_equal_tokens():
    tokens = [5, 6, 7, 8]
    plain = page_hashes(tokens, 4)
    a = page_hashes(tokens, 4, namespace_seed("tenant-a"))
    b = page_hashes(tokens, 4, namespace_seed("tenant-b"))
    assert len({plain[0], a[0], b[0]}) == 3
    assert namespace_seed("") != namespace_seed(None, "")


def test_block_hash_is_the_first_16_hex_digits_as_signed_int64():
    digest = bytes.fromhex("ff" * 8 + "00" * 24)
    assert block_hash(digest) == -1
    digest = bytes.fromhex("0123456789abcdef" + "00" * 24)
    assert block_hash(digest) == 0x0123456789ABCDEF


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="page_size"):
        page_hashes([1], 0)
    with pytest.raises(ValueError, match="tokens: expected >= 0"):
        page_hashes([1, -2], 2)
