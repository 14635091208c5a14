"""Page hashes computed by the C++ tree equal SGLang's (its vectors) and the Python chain.

The tree (``RadixTree(page_hashes=True)``) hashes each node's pages when insert creates it and
slices the digests on a split; ``node_page_hashes`` / ``path_page_hashes`` must then equal
:func:`hicache.storage.page_hashes` over the node's whole path, under every sequence of inserts,
matches (which split), host inserts and evictions, with and without an ``extra_key`` namespace.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hicache._tree import RadixTree
from hicache.errors import InvalidArgumentError
from hicache.storage import namespace_seed, page_hashes
from tests.conftest import REPO_ROOT

VECTORS = REPO_ROOT.parent / "shared" / "reference" / "sglang_page_hash_vectors.json"


def path_tokens(tree: RadixTree, node_id: int) -> list[int]:
    """The tokens from the root to the end of ``node_id``."""
    parts = []
    while node_id != tree.root_id:
        parts.append(tree.node_key(node_id))
        node_id = tree.node_info(node_id).parent_id
    return [t for part in reversed(parts) for t in part]


def expected_hashes(tree: RadixTree, node_id: int) -> list[bytes]:
    info = tree.node_info(node_id)
    seed = namespace_seed(info.extra_key) if info.extra_key is not None else None
    return page_hashes(path_tokens(tree, node_id), tree.page_size, seed)


def assert_hashes(tree: RadixTree) -> None:
    tree.check_invariants()  # recomputes every node's chain in C++ too
    for node_id in tree.node_ids():
        path = expected_hashes(tree, node_id)
        own = tree.node_page_hashes(node_id)
        assert len(own) == tree.node_info(node_id).num_tokens // tree.page_size
        assert own == path[len(path) - len(own) :]
        assert tree.path_page_hashes(node_id) == path


def test_tree_hashes_equal_sglang_vectors() -> None:
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} is absent (the shared reference folder is not beside the checkout)")
    checked = 0
    for case in json.loads(VECTORS.read_text())["cases"]:
        tokens, page_size = case["tokens"], case["page_size"]
        # The tree holds int32 tokens, whole pages, and one namespace string (no cache_salt; ""
        # is "no namespace" there).
        if case["cache_salt"] is not None or case["extra_key"] == "" or max(tokens) >= 2**31:
            continue
        aligned = len(tokens) - len(tokens) % page_size
        tree = RadixTree(page_size, page_hashes=True)
        result = tree.insert(tokens, list(range(len(tokens))), case["extra_key"])
        got = [d.hex() for d in tree.path_page_hashes(result.last_node)]
        assert got == case["page_hashes"][: aligned // page_size], case["name"]
        checked += 1
    assert checked >= 4


def test_split_slices_the_digests() -> None:
    tree = RadixTree(4, page_hashes=True)
    key = list(range(16))
    whole = tree.insert(key, list(range(16))).last_node
    digests = tree.node_page_hashes(whole)
    upper = tree.match_prefix(key[:8]).last_device_node
    assert tree.node_page_hashes(upper) == digests[:2]
    assert tree.node_page_hashes(whole) == digests[2:]
    assert tree.path_page_hashes(whole) == digests
    assert tree.node_info(whole).parent_id == upper


def test_off_by_default_and_only_on_an_empty_tree() -> None:
    tree = RadixTree(2)
    assert not tree.has_page_hashes
    node = tree.insert([1, 2], [0, 1]).last_node
    with pytest.raises(InvalidArgumentError, match="no page hashes"):
        tree.node_page_hashes(node)
    assert RadixTree(2, page_hashes=True).has_page_hashes


blocks = st.lists(st.integers(0, 2), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["insert", "match", "insert_host", "evict", "evict_host"]),
            blocks,
            blocks,
            st.sampled_from([None, "tenant-a", "tenant-b"]),
        ),
        min_size=1,
        max_size=25,
    ),
)
def test_hashes_follow_inserts_splits_and_evictions(page_size, ops) -> None:
    tree = RadixTree(page_size, page_hashes=True)
    pool = [[7] * (page_size - 1) + [100 + b] for b in range(3)]
    next_slot = next_host = 0
    for op, first, second, extra_key in ops:
        key = [t for b in first for t in pool[b]]
        if op == "insert":
            tree.insert(key, list(range(next_slot, next_slot + len(key))), extra_key)
            next_slot += len(key)
        elif op == "match":
            tree.match_prefix(key, extra_key)
        elif op == "insert_host":
            anchor = tree.match_prefix(key, extra_key).last_host_node
            rest = [t for b in second for t in pool[b]]
            host = torch.arange(next_host, next_host + len(rest))
            next_host += len(rest)
            tree.insert_host(anchor, rest, host, extra_key)
        elif op == "evict":
            tree.evict(len(key), write_back=False)
        else:
            tree.evict_host(len(key))
        assert_hashes(tree)
