"""The storage (L3) tier: page hashes that key stored pages across processes and machines."""

from hicache.storage.page_hash import block_hash, namespace_seed, page_hashes

__all__ = ["block_hash", "namespace_seed", "page_hashes"]
