"""Test data shared by the pool and transfer tests."""

from __future__ import annotations

import torch

from hicache.memory import DeviceKVPool, HostKVPool


def random_kv(pool: DeviceKVPool | HostKVPool, n: int, seed: int = 0) -> list[torch.Tensor]:
    """Random values in [1, 2) (never 0 or a sentinel), ``[layers, n, heads, dim]``, on the pool."""
    gen = torch.Generator().manual_seed(seed)
    shape = (pool.num_layers, n, pool.num_heads, pool.head_dim)
    count = 2 if pool.kind == "mha" else 1
    return [
        (torch.rand(shape, generator=gen) + 1.0).to(pool.dtype).to(pool.device)
        for _ in range(count)
    ]


def page_indices(num_slots: int, page_size: int, num_pages: int, seed: int) -> torch.Tensor:
    """Slots of ``num_pages`` random whole pages in random order, always including the last."""
    gen = torch.Generator().manual_seed(seed)
    total = num_slots // page_size
    pages = torch.randperm(total - 1, generator=gen)[: num_pages - 1]
    pages = torch.cat((pages, torch.tensor([total - 1])))[torch.randperm(num_pages, generator=gen)]
    return (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
