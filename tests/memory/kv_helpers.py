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


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of a float ``dtype`` (any sign, exponent, mantissa), all finite, CPU.

    Subnormals and negative zeros included: a copy that converts, rounds or flushes shows up.
    """
    raw = torch.randint(-(2**15), 2**15, (*shape, dtype.itemsize // 2), generator=gen)
    values = raw.to(torch.int16).view(-1).view(dtype).reshape(shape)
    return torch.where(torch.isfinite(values), values, torch.ones((), dtype=dtype))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers on the CPU, so that ``torch.equal`` is bit equality."""
    return t.cpu().contiguous().view(_INT_OF_SIZE[t.element_size()])
