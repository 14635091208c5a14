"""Failure class 4 (DESIGN.md): load-back from the wrong anchor.

Field scenario (SGLang PR #25088): a load-back started at ``last_host_node``, the deepest node
matched on host, which a component validator (here Mamba: no state there) does not accept; the
loaded node was then used as a request's starting point without a valid state -> a load of an
invalid node, crashes under concurrency. Rule: the only load-back anchor is ``best_match_node``,
the deepest node every validator accepts, and ``last_host_node`` names it too.

Caught breakage (tried): setting ``last_host_node`` to the deepest matched node in
``RadixTree::match_prefix`` fails this test.
"""

from __future__ import annotations

import torch

from tests.test_cache_mamba import finish, make_host_cache


def test_the_load_back_starts_at_the_deepest_node_holding_a_state():
    cache = make_host_cache("write_through", "page_first")
    finish(cache, torch.arange(16, dtype=torch.int32), state_seed=1, also_at=8)  # states: 8, 16
    cache.tree.match_prefix(torch.arange(12, dtype=torch.int32))  # a stateless node at [8, 12)
    finish(cache, torch.arange(100, 132, dtype=torch.int32), state_seed=3)  # pushes all to host
    probe = torch.cat((torch.arange(12), torch.tensor([99] * 4))).to(torch.int32)
    m = cache.match_prefix(probe)
    anchor = cache.tree.node_info(m.best_match_node)
    assert anchor.has_mamba_host_value and not anchor.has_device_value
    assert m.last_host_node == m.best_match_node  # never the stateless node at 12
    assert m.host_hit_length == 8 and m.mamba_branching_seqlen == 12
    assert cache.init_load_back(m.best_match_node) == 8  # the anchor's path, with its state
    consumer = cache.ready_to_load_host_cache()
    for layer in range(cache.device_pool.num_layers):
        cache.wait_until_layer_ready(layer, consumer)
    m = cache.match_prefix(probe)
    assert m.device_prefix_len == 8
    slot = cache.fork_mamba(m.last_device_node)
    cache.free_mamba(torch.tensor([slot]))
    cache.flush()
    cache.check_invariants(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    cache.close()
