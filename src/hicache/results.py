"""Result records returned by the tree (:mod:`hicache._tree`) and the cache (:mod:`hicache.cache`).

Plain ``NamedTuple``s: cheap to build on the request path, and familiar to SGLang users
(``MatchResult`` has the fields of SGLang 0.5.23's ``MatchResult`` that apply).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MatchResult(NamedTuple):
    """The longest cached prefix of a key.

    Attributes:
        device_indices: ``[device_prefix_len]`` int64 CPU tensor, the device KV slots of the matched
            prefix in token order. Owned by the caller (a copy of tree state, never a view of it).
        last_device_node: id of the deepest matched node whose KV is on device. The node to lock.
        last_host_node: id of the deepest matched node whose KV is on device or host.
        best_match_node: id of the deepest node every component accepts; the only valid anchor
            for an L2 load-back (DESIGN.md failure class 4).
        host_hit_length: tokens validated below ``last_device_node``: host-only ones, and in SWA
            trees any device SWA tombstone between it and a host-only window (SGLang's
            ``best_match_device_node`` rule; the load-back brings the host-only nodes only).
        mamba_branching_seqlen: Mamba trees: the Full tokens matched (page-aligned) when more
            than the prefix a state validates (``device_prefix_len + host_hit_length``), where a
            scheduler may checkpoint a new state; -1 otherwise (SGLang's field of that name).
        swa_branching_seqlen: SWA trees: the same for the SWA window rule (the match ends where
            a run of ``sliding_window_size`` tokens with SWA KV ends); -1 otherwise.
    """

    device_indices: torch.Tensor
    last_device_node: int
    last_host_node: int
    best_match_node: int
    host_hit_length: int
    mamba_branching_seqlen: int = -1
    swa_branching_seqlen: int = -1

    @property
    def device_prefix_len(self) -> int:
        """Matched tokens with device KV: ``len(device_indices)``, a multiple of page_size."""
        return int(self.device_indices.shape[0])


class InsertResult(NamedTuple):
    """Outcome of an insert.

    Attributes:
        prefix_len: tokens of the page-aligned key that were already cached on device. The caller
            owns its own slots for them (``value[:prefix_len]``) and must free those it does not
            need; every slot of ``value[prefix_len:cached_len]`` now belongs to the tree.
        last_node: id of the node that ends the inserted key (where the insert stopped, if it
            did).
        adopted_len: tokens of host-only (evicted) nodes on the path that took the caller's slots
            instead of being loaded back (SGLang's ``_unevict_node_on_insert``); they follow the
            ``prefix_len`` device tokens.
        cached_len: tokens of the page-aligned key cached after the insert: all of them, or
            ``prefix_len`` when the insert stopped at a node whose load-back is in flight or has
            failed (its device KV may be or is garbage; nothing goes under it). The caller keeps
            ``value[cached_len:]``: still its own, valid KV, not cached.
        mamba_exist: Mamba trees, with a state given: the node ending the key already held a
            state; the caller frees its copy (SGLang's ``mamba_exist``).
        mamba_taken: the tree took the caller's state slot. With neither (the insert stopped
            early), the caller keeps its state.
        swa_remap_dst, swa_remap_src: SWA trees: ``[k]`` int64 CPU tensors. Device SWA
            tombstones inside the caller's live window took the caller's SWA KV: point the SWA
            mapping of each ``swa_remap_dst[i]`` (the node's Full slot) at the SWA slot of
            ``swa_remap_src[i]`` (the caller's duplicate Full slot, then freed Full-only).
        swa_host_spare: SWA trees, :meth:`RadixTree.insert_host`: ``[k]`` int64 CPU tensor of
            the given host SWA slots the tree did not take; the caller frees them.
    """

    prefix_len: int
    last_node: int
    adopted_len: int = 0
    cached_len: int = 0
    mamba_exist: bool = False
    mamba_taken: bool = False
    swa_remap_dst: torch.Tensor = torch.empty(0, dtype=torch.int64)
    swa_remap_src: torch.Tensor = torch.empty(0, dtype=torch.int64)
    swa_host_spare: torch.Tensor = torch.empty(0, dtype=torch.int64)


class LockReceipt(NamedTuple):
    """What :meth:`RadixTree.inc_lock_ref` locked (SGLang 0.5.23's ``IncLockRefResult``).

    Attributes:
        node_id: the node actually locked: the deepest node with device KV at or above the node
            asked for (locking skips the evicted bottom of the path). Pass it to ``dec_lock_ref``.
        delta: tokens moved from evictable to protected.
        mamba_node_id: Mamba trees: ``node_id`` when its state was locked too (a single-node
            lock), -1 otherwise. Pass it to ``dec_lock_ref`` with ``node_id``.
        swa_lock_tokens: SWA trees: tokens of the SWA window segment locked upwards from
            ``node_id`` (0 at the root or without SWA). Pass it to ``dec_lock_ref`` too.
    """

    node_id: int
    delta: int
    mamba_node_id: int = -1
    swa_lock_tokens: int = 0


class EvictResult(NamedTuple):
    """What a device eviction did; the caller frees the slots in their pools.

    Attributes:
        device_indices: ``[n]`` int64 CPU tensor of freed device slots.
        host_indices: ``[m]`` int64 CPU tensor of freed host slots (host-only descendants dropped
            with an unbacked leaf; usually empty).
        demoted_tokens: backed-up tokens that stayed in the tree as host-only (``evicted``).
        dropped_tokens: device tokens removed from the tree (their KV is lost): unbacked ones, and
            in Mamba trees those the tombstone cascade deletes with their host copy (a demoted
            victim it deletes counts here, not in ``demoted_tokens``).
        needs_backup: under ``write_back``, the id of the LRU device leaf that must be backed up
            (``commit_backup`` + a finished copy) before eviction can go on; -1 otherwise.
        mamba_indices: ``[k]`` int64 CPU tensor of freed Mamba state slots (Mamba trees).
        swa_indices: SWA trees: ``[s]`` int64 CPU tensor of the Full slots of nodes that became
            SWA tombstones and keep their Full KV: free their SWA side only. (The SWA side of
            ``device_indices`` is freed with them, skipping unmapped slots.)
    """

    device_indices: torch.Tensor
    host_indices: torch.Tensor
    demoted_tokens: int
    dropped_tokens: int
    needs_backup: int
    mamba_indices: torch.Tensor = torch.empty(0, dtype=torch.int64)
    swa_indices: torch.Tensor = torch.empty(0, dtype=torch.int64)


class TransferPlan(NamedTuple):
    """Nodes and source slots of a backup or a load-back, root-first.

    Attributes:
        node_ids: ids of the nodes to transfer, root-first.
        lengths: tokens per node, same order.
        indices: ``[sum(lengths)]`` int64 CPU tensor of the source slots, node after node: device
            slots for a backup (device -> host), host slots for a load-back (host -> device).
        states: Mamba trees: per node, the source Mamba state slot that goes with it (its device
            state for a backup; for a load-back only the anchor, last, carries its host state);
            -1 for none. Empty otherwise.
        swa: SWA trees: per node, whether its SWA KV goes along (backup: live on device;
            load-back: has a host copy). Empty otherwise.
        swa_indices: SWA trees, load-back: ``[t]`` int64 CPU tensor of the host SWA slots of the
            nodes flagged in ``swa``, root-first. Empty otherwise.
    """

    node_ids: list[int]
    lengths: list[int]
    indices: torch.Tensor
    states: tuple[int, ...] = ()
    swa: tuple[bool, ...] = ()
    swa_indices: torch.Tensor = torch.empty(0, dtype=torch.int64)

    @property
    def num_tokens(self) -> int:
        """Tokens to transfer: ``len(indices)``."""
        return int(self.indices.shape[0])


class NodeInfo(NamedTuple):
    """A snapshot of one node's bookkeeping, for tests and debugging (not the request path).

    ``has_host_value`` is set when a backup is committed (queued); the node is ``backuped`` in
    SGLang's sense (a complete host copy) once ``backup_pending`` is also False. ``load_failed``:
    a load-back of the node (or above it) failed while it was locked; its device KV is garbage,
    never served, and it goes back to host-only when its last lock is released: a request locking
    it must be aborted.
    """

    node_id: int
    parent_id: int
    num_tokens: int
    num_children: int
    lock_ref: int
    host_ref_counter: int
    hit_count: int
    last_access_time: int
    has_device_value: bool
    has_host_value: bool
    backup_pending: bool
    load_pending: bool
    load_failed: bool
    extra_key: str | None
    has_mamba_value: bool = False  # Mamba trees: holds a device state (else a tombstone)
    mamba_value: int = -1  # its state slot
    mamba_lock_ref: int = 0
    has_mamba_host_value: bool = False  # holds a host state (its backup)
    mamba_host_value: int = -1
    has_swa_value: bool = False  # SWA trees: device SWA KV live (else an SWA tombstone)
    swa_lock_ref: int = 0
    has_swa_host_value: bool = False  # a host SWA copy
