# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
# (bounds checks are off because every array crossing into C++ is validated here first.)
"""Cython wrapper of the C++ radix tree core (``cpp/include/hicache/radix_tree.h``).

Nodes cross the boundary as integer ids; inputs are borrowed for the duration of a call; outputs are
owned buffers exposed to torch without a copy. The tree is not thread-safe: callers serialise every
call (``hicache.cache.HiCache`` holds one lock for that).
"""

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t
from libc.string cimport memcpy
from libcpp.string_view cimport string_view

from array import array

import torch

from hicache.errors import IndexOutOfRangeError, InvalidArgumentError, InvariantError
from hicache.results import (
    EvictResult, InsertResult, LockReceipt, MatchResult, NodeInfo, TransferPlan)

set_hicache_error_types(InvalidArgumentError, IndexOutOfRangeError, InvariantError)

cdef int64_t _TOKEN_MIN = -2147483648
cdef int64_t _TOKEN_MAX = 2147483647
_INT32_FORMATS = frozenset(("i", "=i", "<i", "@i"))
_INT64_FORMATS = frozenset(("l", "q", "=l", "=q", "<l", "<q", "@l", "@q"))


cdef class Int64Buffer:
    """An owned ``int64`` array exposed through the buffer protocol (zero-copy into torch)."""

    def __getbuffer__(self, Py_buffer* view, int flags):
        self.shape[0] = <Py_ssize_t>self.data.size()
        self.strides[0] = sizeof(int64_t)
        view.buf = <void*>self.data.data()
        view.obj = self
        view.len = self.shape[0] * sizeof(int64_t)
        view.readonly = 0
        view.itemsize = sizeof(int64_t)
        view.format = NULL
        if flags & PyBUF_FORMAT:
            view.format = b"q"
        view.ndim = 1
        view.shape = NULL
        if flags & PyBUF_ND:
            view.shape = self.shape
        view.strides = NULL
        if flags & PyBUF_STRIDES:
            view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        pass


cdef object _to_tensor(vector[SlotIndex]& values):
    """Moves ``values`` into a new int64 CPU tensor without copying the elements."""
    if values.size() == 0:
        return torch.empty(0, dtype=torch.int64)
    cdef Int64Buffer buf = Int64Buffer.__new__(Int64Buffer)
    buf.data.swap(values)
    return torch.frombuffer(buf, dtype=torch.int64)


cdef object _evict_result(CEvictResult& r):
    return EvictResult(_to_tensor(r.device_freed), _to_tensor(r.host_freed), r.demoted_tokens,
                       r.dropped_tokens, r.needs_backup, _to_tensor(r.mamba_freed),
                       _to_tensor(r.swa_freed))


cdef object _plan(CTransferPlan& plan):
    return TransferPlan(list(plan.nodes), list(plan.lengths), _to_tensor(plan.indices),
                        tuple(plan.states), tuple([bool(f) for f in plan.swa]),
                        _to_tensor(plan.swa_indices))


cdef int _check_cpu_vector(object t, str name) except -1:
    # (is_cpu / ndim: these checks run on every call, and t.device builds an object each time.)
    if t.ndim != 1:
        raise InvalidArgumentError(f"{name} must be a 1-D tensor, got shape {tuple(t.shape)}")
    if not t.is_cpu:
        raise InvalidArgumentError(
            f"{name} must be a CPU tensor (the tree lives in host memory), got device {t.device}")
    if not t.is_contiguous():
        raise InvalidArgumentError(f"{name} must be contiguous")
    return 0


cdef object _optional_slots(object indices, str name, const SlotIndex** out, size_t* n):
    """Points ``out`` at optional int64 CPU slot indices (None: none); returns the tensor that
    owns them, which the caller keeps alive while ``out`` is used."""
    if indices is None:
        return None
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(indices, dtype=torch.int64)
    _check_cpu_vector(indices, name)
    if indices.dtype != torch.int64:
        raise InvalidArgumentError(f"{name} must be int64, got {indices.dtype}")
    n[0] = <size_t>indices.numel()
    out[0] = <const SlotIndex*><uintptr_t>indices.data_ptr()
    return indices


cdef object _int64_array(object seq, str name):
    """Copies a Python sequence of ints into an int64 ``array`` (the convenience path for lists)."""
    try:
        return array("q", seq)
    except (TypeError, OverflowError) as e:
        raise InvalidArgumentError(f"{name} must hold int64-range integers ({e})") from None


cdef object _as_flat_memoryview(object obj, str name):
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidArgumentError(
            f"{name} must be a 1-D sequence of integers (list, tuple, range, torch tensor, numpy "
            f"array), got {type(obj).__name__}") from None
    if view.ndim != 1 or not view.c_contiguous:
        raise InvalidArgumentError(f"{name} must be a contiguous 1-D array, got ndim={view.ndim}")
    return view


cdef bytes _encode_extra_key(object extra_key):
    if extra_key is None:
        return b""
    if not isinstance(extra_key, str):
        raise InvalidArgumentError(f"extra_key must be a str or None, got {type(extra_key).__name__}")
    return (<str>extra_key).encode("utf-8")


cdef inline string_view _view(bytes b):
    return string_view(<const char*>b, len(b))


cdef class RadixTree:
    """A radix tree over page-aligned token keys holding device (L1) and host (L2) KV slot indices.

    SGLang's radix cache and HiRadixCache tree with a C++ core: ``match_prefix``, ``insert``, path
    locks (``inc_lock_ref``/``dec_lock_ref``), host locks, LRU eviction of device KV (``evict``,
    which demotes backed-up nodes to host-only) and of host KV (``evict_host``), and the plans and
    commits of backups and load-backs. The tree decides, the caller executes: every call returns
    the slots to free or copy; nothing here touches a pool.

    Node states: device-only, device+host (``backuped``), host-only (``evicted``). Device nodes form
    a root-anchored prefix of every path. Eviction is page-granular: it takes the least recently
    used leaf's tail pages instead of whole nodes (SGLang takes whole nodes), and costs O(1) per
    freed page whatever the tree size (intrusive LRU lists instead of SGLang's per-call heaps).

    Failed load-backs: a committed load's nodes are device nodes at once (load-pending until the
    ack) and may be matched and locked meanwhile. ``insert`` never walks into a load-pending or
    load-failed node (it stops there; the caller keeps its own slots). When the copy fails,
    :meth:`abort_load_back` marks the load's nodes and the device nodes below them load-failed:
    never matched, nothing loaded under them, demoted to host-only once no lock holds them (then
    :meth:`take_failed_load_slots` hands their device slots back).

    Recency: ``match_prefix`` and ``insert`` touch their path deepest-first (ancestors end up more
    recent than descendants); ``dec_lock_ref``/``dec_host_lock_ref`` touch nodes released to 0;
    demotion touches the demoted node. A node is evictable from device when it has device KV and
    ``lock_ref == 0``; from host when it is host-only and ``host_lock_ref == 0``.

    Mamba component (``mamba=True``, hybrid Mamba + attention models; SGLang's UnifiedRadixCache
    with FULL + MAMBA; device tier only so far): a node may hold one Mamba state slot, the
    recurrent state after its last token; a node without one is a Mamba tombstone. A match ends
    at the deepest matched node holding a state (``mamba_branching_seqlen`` reports the Full
    tokens matched beyond it); ``insert(..., mamba_value=s)`` gives the node ending the key the
    state ``s`` unless it has one (``mamba_exist``); locks lock the locked node's state too (the
    receipt's ``mamba_node_id``, which :meth:`dec_lock_ref` requires); :meth:`evict_mamba` frees
    the least recently used unlocked states. A childless tombstone is useless and is deleted with
    its KV, cascading up through tombstone parents, stopping at any node locked or host-locked in
    any component or with a transfer in flight (DESIGN.md failure class 5).

    SWA component (``sliding_window_size > 0``, hybrid sliding-window attention models; SGLang's
    UnifiedRadixCache with FULL + SWA): a node's sliding-window KV is live on device (found
    through its Full slots' full -> SWA mapping) or gone (an SWA tombstone, its Full KV kept),
    and may have a host copy. A match ends only where a run of ``sliding_window_size`` tokens
    with SWA KV ends (``swa_branching_seqlen`` reports the Full tokens matched beyond it);
    ``insert(..., swa_evicted_seqlen=f)`` inserts the caller's tokens below ``f`` as SWA
    tombstones (it freed their SWA KV) and lets tombstones above ``f`` take the caller's SWA KV
    (``swa_remap_dst``/``swa_remap_src``); locks hold the SWA window ending at the locked node
    (the receipt's ``swa_lock_tokens``); :meth:`evict_swa` frees the least recently used
    unlocked SWA KV (internal nodes become SWA tombstones, leaves go whole); a childless node
    with SWA on neither tier is a useless tombstone for the cascade.

    Args:
        page_size: tokens per page, >= 1. Keys and values are used in whole pages.
        num_device_slots: size of the device pool in slots (tokens). When > 0, device slot indices
            given to the tree must lie in ``[0, num_device_slots)``; 0 disables that check.
        num_host_slots: the same for the host pool.
        mamba: add the Mamba component.
        num_mamba_slots: the same check for Mamba state slots (one slot per state).
        num_mamba_host_slots: the same for host Mamba state slots.
        sliding_window_size: > 0 adds the SWA component with this window, in tokens.
        num_swa_host_slots: the slot check for host SWA slots (0 disables it).
        page_hashes: give every node SGLang's chained SHA-256 digest of each page (the storage
            tier's keys, :mod:`hicache.storage.page_hash`), computed in C++ when a node is
            created and sliced by a split; see :meth:`node_page_hashes`. Off by default: without
            a storage tier the insert path hashes nothing.

    Raises:
        InvalidArgumentError: ``page_size < 1`` or a negative pool size or window.
    """

    def __cinit__(self, int64_t page_size=1, int64_t num_device_slots=0,
                  int64_t num_host_slots=0, bint mamba=False, int64_t num_mamba_slots=0,
                  int64_t num_mamba_host_slots=0, int64_t sliding_window_size=0,
                  int64_t num_swa_host_slots=0, bint page_hashes=False):
        self._tree.reset(new CRadixTree(page_size, num_device_slots, num_host_slots, mamba,
                                        num_mamba_slots, num_mamba_host_slots,
                                        sliding_window_size, num_swa_host_slots))
        self.sliding_window_size = sliding_window_size
        self.num_swa_host_slots = num_swa_host_slots
        if page_hashes:
            self._tree.get().enable_page_hashes()
        self.page_size = page_size
        self.num_device_slots = num_device_slots
        self.num_host_slots = num_host_slots
        self.mamba = mamba
        self.num_mamba_slots = num_mamba_slots
        self.num_mamba_host_slots = num_mamba_host_slots

    @property
    def root_id(self) -> int:
        """The root's node id (0): the empty prefix, never locked or evicted."""
        return 0

    cdef int _as_tokens(self, object key, const Token** out, size_t* n) except -1:
        """Points ``out`` at ``key`` as int32 tokens, borrowing it when possible, else converting."""
        cdef const int32_t[::1] v32
        cdef const int64_t[::1] v64
        cdef const int64_t* src
        cdef Py_ssize_t i, length
        cdef int64_t t
        if isinstance(key, (list, tuple, range)):
            key = _int64_array(key, "key")
        if isinstance(key, torch.Tensor):
            _check_cpu_vector(key, "key")
            if key.dtype == torch.int32:
                n[0] = <size_t>key.numel()
                out[0] = <const Token*><uintptr_t>key.data_ptr()
                return 0
            if key.dtype != torch.int64:
                raise InvalidArgumentError(f"key must be an int32 or int64 tensor, got {key.dtype}")
            length = key.numel()
            src = <const int64_t*><uintptr_t>key.data_ptr()
        else:
            view = _as_flat_memoryview(key, "key")
            if view.itemsize == 4 and view.format in _INT32_FORMATS:
                v32 = view
                n[0] = <size_t>v32.shape[0]
                out[0] = &v32[0] if v32.shape[0] > 0 else self._key_scratch.data()
                return 0
            if not (view.itemsize == 8 and view.format in _INT64_FORMATS):
                raise InvalidArgumentError(
                    f"key must hold int32 or int64 token ids, got buffer format {view.format!r}")
            v64 = view
            length = v64.shape[0]
            src = &v64[0] if length > 0 else NULL
        self._key_scratch.resize(length)
        for i in range(length):
            t = src[i]
            if t < _TOKEN_MIN or t > _TOKEN_MAX:
                raise InvalidArgumentError(f"key[{i}] = {t} does not fit a token id (int32)")
            self._key_scratch[i] = <Token>t
        n[0] = <size_t>length
        out[0] = self._key_scratch.data()
        return 0

    cdef int _as_slots(self, object value, const SlotIndex** out, size_t* n) except -1:
        """Points ``out`` at ``value`` as int64 slot indices (borrowed tensors/arrays, copied lists)."""
        cdef const int64_t[::1] v64
        if isinstance(value, (list, tuple, range)):
            # Copied: the temporary array dies when this method returns, the scratch does not.
            v64 = _int64_array(value, "value")
            self._value_scratch.resize(v64.shape[0])
            if v64.shape[0] > 0:
                memcpy(self._value_scratch.data(), &v64[0], v64.shape[0] * sizeof(int64_t))
            n[0] = <size_t>v64.shape[0]
            out[0] = self._value_scratch.data()
            return 0
        if isinstance(value, torch.Tensor):
            _check_cpu_vector(value, "value")
            if value.dtype != torch.int64:
                raise InvalidArgumentError(f"value must be an int64 tensor of slot indices, got "
                                           f"{value.dtype}")
            n[0] = <size_t>value.numel()
            out[0] = <const SlotIndex*><uintptr_t>value.data_ptr()
            return 0
        view = _as_flat_memoryview(value, "value")
        if not (view.itemsize == 8 and view.format in _INT64_FORMATS):
            raise InvalidArgumentError(
                f"value must hold int64 slot indices, got buffer format {view.format!r}")
        v64 = view
        n[0] = <size_t>v64.shape[0]
        out[0] = &v64[0] if v64.shape[0] > 0 else self._value_scratch.data()
        return 0

    def match_prefix(self, key, extra_key=None):
        """Finds the longest cached prefix of ``key``.

        The key is floored to a multiple of ``page_size``. The walk goes through device and
        host-only nodes; it stops above a load-failed node (its device KV is garbage). A match
        ending inside a node splits it: the node keeps its id as the lower part, the new upper
        part gets a fresh id. The matched path is touched (most recently used).

        Args:
            key: ``[num_tokens]`` token ids: a list, an int32/int64 CPU tensor or a numpy array.
            extra_key: namespace (e.g. a LoRA id or a tenant salt); keys with different extra keys
                never share cached pages. ``None`` and ``""`` mean no namespace.

        Returns:
            MatchResult: ``device_indices`` (int64 CPU tensor, owned by the caller: the device
            slots of the matched device nodes), ``last_device_node`` (deepest matched device node),
            ``last_host_node`` = ``best_match_node`` (deepest matched node, on device or host: the
            load-back anchor) and ``host_hit_length`` (tokens matched in host-only nodes). In a
            Mamba tree these stop at the deepest node holding a state, and
            ``mamba_branching_seqlen`` is the Full tokens matched when more (else -1).

        Raises:
            InvalidArgumentError: ``key`` has a wrong type, dtype, device or shape, or a token
                outside int32.
        """
        cdef const Token* tokens
        cdef size_t n
        cdef bytes holder = _encode_extra_key(extra_key)
        cdef string_view ns = _view(holder)
        self._as_tokens(key, &tokens, &n)
        cdef CMatchResult r = self._tree.get().match_prefix(tokens, n, ns)
        return MatchResult(_to_tensor(r.device_indices), r.last_device_node, r.last_host_node,
                           r.best_match_node, r.host_hit_length, r.mamba_branching_seqlen,
                           r.swa_branching_seqlen)

    def insert(self, key, value, extra_key=None, int64_t mamba_value=-1,
               int64_t swa_evicted_seqlen=0):
        """Inserts ``key`` with its device KV slots ``value``.

        Only the page-aligned part ``key[:floor(len/page_size)*page_size]`` is inserted. Device
        nodes that already cache a prefix keep their own slots; host-only nodes on the path adopt
        the caller's slots for their tokens (no load-back needed); the new tail takes the rest.
        Every node walked counts a hit (``write_through_selective`` uses it). The walk stops at a
        node whose load-back is in flight or has failed: its device KV may be garbage, so the
        caller's own slots are not traded for it and nothing is inserted under it.

        Args:
            key: ``[num_tokens]`` token ids (as in :meth:`match_prefix`).
            value: ``[num_tokens]`` int64 device slot indices (CPU tensor, numpy array or list),
                made of whole pages when ``page_size > 1`` (each page ``page_size`` consecutive
                slots starting at a multiple of ``page_size``).
            extra_key: namespace, as in :meth:`match_prefix`.
            mamba_value: Mamba trees: the state slot holding the recurrent state after the
                aligned key, or -1 for none.
            swa_evicted_seqlen: SWA trees: the caller already freed the SWA KV of
                ``value[:swa_evicted_seqlen]`` (page-floored; SGLang's ``swa_evicted_seqlen``)
                and its own slots above are SWA-mapped. 0 for none.

        Returns:
            InsertResult: ``prefix_len`` (tokens already on device: the caller still owns
            ``value[:prefix_len]`` and frees what it does not need), ``last_node``,
            ``adopted_len`` and ``cached_len`` (the aligned length unless the walk stopped); the
            tree owns ``value[prefix_len:cached_len]``, the caller keeps ``value[cached_len:]``.
            With a ``mamba_value``: ``mamba_taken`` (the tree owns it now) or ``mamba_exist``
            (the node already had a state: the caller frees its copy); neither when the walk
            stopped early (the caller keeps it). SWA trees: ``swa_remap_dst``/``swa_remap_src``
            (move those SWA mappings before freeing the duplicates).

        Raises:
            InvalidArgumentError: wrong type/dtype/device/shape, ``len(value) != len(key)``, a
                negative slot, slots not made of whole pages, or a ``mamba_value`` in a tree
                without the Mamba component.
            IndexOutOfRangeError: a slot ``>= num_device_slots``, or a ``mamba_value`` out of
                ``[0, num_mamba_slots)``.
        """
        cdef const Token* tokens
        cdef const SlotIndex* slots
        cdef size_t n, m
        cdef bytes holder = _encode_extra_key(extra_key)
        cdef string_view ns = _view(holder)
        self._as_tokens(key, &tokens, &n)
        self._as_slots(value, &slots, &m)
        cdef CInsertResult r = self._tree.get().insert(tokens, n, slots, m, ns, mamba_value,
                                                       swa_evicted_seqlen)
        return InsertResult(r.prefix_len, r.last_node, r.adopted_len, r.cached_len,
                            r.mamba_exist, r.mamba_taken, _to_tensor(r.swa_remap_dst),
                            _to_tensor(r.swa_remap_src))

    def inc_lock_ref(self, int64_t node_id):
        """Locks a node's device KV and its ancestors' against eviction (a path lock).

        The lock starts at the deepest node with device KV at or above ``node_id``: the evicted
        bottom of the path is skipped (DESIGN.md failure class 4).

        Returns:
            LockReceipt: ``node_id`` (the node locked: pass it to :meth:`dec_lock_ref`),
            ``delta`` (tokens moved from evictable to protected) and, in a Mamba tree where that
            node holds a state, ``mamba_node_id`` (its state is locked too; else -1); in an
            SWA tree ``swa_lock_tokens`` (the SWA window segment locked upwards from it).

        Raises:
            IndexOutOfRangeError: unknown node id.
        """
        cdef CLockReceipt r = self._tree.get().inc_lock_ref(node_id)
        return LockReceipt(r.node_id, r.delta, r.mamba_node_id, r.swa_lock_tokens)

    def dec_lock_ref(self, int64_t node_id, int64_t mamba_node_id=-1,
                     int64_t swa_lock_tokens=0):
        """Releases one lock taken by :meth:`inc_lock_ref`; ``node_id`` is its receipt's node.

        Nodes whose ``lock_ref`` drops to 0 become evictable and count as just used; load-failed
        ones are demoted to host-only instead (collect their device slots with
        :meth:`take_failed_load_slots`).

        Returns:
            int: tokens moved from protected back to evictable.

        Args:
            node_id: the receipt's ``node_id``.
            mamba_node_id: the receipt's ``mamba_node_id`` (-1: no Mamba lock to release).
            swa_lock_tokens: the receipt's ``swa_lock_tokens`` (SWA trees).

        Raises:
            InvalidArgumentError: the node is not locked, the Mamba part of the receipt is wrong
                (names another node, or a node without a Mamba lock, or is missing where every
                Full lock on the node came with a Mamba lock), the SWA part is wrong (missing, or
                not ending on an SWA-locked segment's boundary), or the call would release a
                load-failed node whose own load is still pending (release a load's lock after its
                :meth:`finish_load_back` / :meth:`abort_load_back`). Nothing changed.
            IndexOutOfRangeError: unknown node id.
        """
        return self._tree.get().dec_lock_ref(node_id, mamba_node_id, swa_lock_tokens)

    def inc_host_lock_ref(self, int64_t node_id):
        """Protects the host KV of ``node_id`` and its ancestors while a host operation runs.

        SGLang's ``host_ref_counter`` / ``host_lock_ref``, as a path lock: a host-locked node is
        never host-evicted nor removed from the tree.

        Returns:
            int: host tokens moved out of the host-evictable set.

        Raises:
            IndexOutOfRangeError: unknown node id.
        """
        return self._tree.get().inc_host_lock_ref(node_id)

    def dec_host_lock_ref(self, int64_t node_id):
        """Releases one :meth:`inc_host_lock_ref` on ``node_id``; released nodes count as used.

        Returns:
            int: host tokens moved back into the host-evictable set.

        Raises:
            InvalidArgumentError: the node is not host-locked.
            IndexOutOfRangeError: unknown node id.
        """
        return self._tree.get().dec_host_lock_ref(node_id)

    def evict(self, int64_t num_tokens, bint write_back=False):
        """Evicts ``ceil(num_tokens / page_size)`` pages of device KV, least recently used first.

        Takes the LRU leaf's tail pages first. A backed-up victim is demoted (it stays in the tree
        as host-only, SGLang's ``_demote``); an unbacked one is dropped with any host-only
        descendants. Under ``write_back`` an unbacked victim is not dropped: the call stops and
        names it in ``needs_backup`` (already trimmed to the pages still to free), to be backed up
        and evicted by the next call (SGLang's ``BackupKV`` action). Stops early when nothing
        evictable is left, or at an unbacked leaf whose subtree is host-locked.

        Returns:
            EvictResult: freed device and host slots (the caller frees them in its pools), the
            demoted and dropped token counts, and ``needs_backup`` (-1 for none).

        Raises:
            InvalidArgumentError: ``num_tokens < 0``.
        """
        cdef CEvictResult r = self._tree.get().evict(num_tokens, write_back)
        return _evict_result(r)

    def evict_mamba(self, int64_t num_states, bint write_back=False):
        """Mamba trees: frees ``num_states`` device Mamba states, least recently used first.

        Never a locked state. The victim becomes a Mamba tombstone; a childless one is then
        deleted with its KV by the tombstone cascade (which stops at locked, host-locked or
        in-flight nodes), so the result may hold device and host slots too. Under
        ``write_back`` a victim without a host copy is not tombstoned: the call stops and names
        it in ``needs_backup``; back it up (its state with it) and call again, and its state
        then survives on host (SGLang PR #28468).

        Returns:
            EvictResult: ``mamba_indices`` (freed state slots), the device and host slots the
            cascade freed (with ``dropped_tokens``), and ``needs_backup`` (-1 for none).

        Raises:
            InvalidArgumentError: ``num_states < 0``.
        """
        cdef CEvictResult r = self._tree.get().evict_mamba(num_states, write_back)
        return _evict_result(r)

    def evict_swa(self, int64_t num_tokens, bint write_back=False):
        """SWA trees: frees ``ceil(num_tokens / page_size)`` pages of device SWA KV, LRU first.

        Never a locked one. A device leaf (no device child, unlocked) is evicted whole as
        :meth:`evict` would (demoted or dropped; its Full slots in ``device_indices``); an internal
        node becomes an SWA tombstone (its Full slots in ``swa_indices``: free their SWA side
        only) and loses its Mamba state (SGLang's SWA -> Mamba cascade). Under ``write_back`` an
        unbacked victim stops the call in ``needs_backup`` (SGLang PR #28468).

        Returns:
            EvictResult: as :meth:`evict`, plus ``swa_indices``.

        Raises:
            InvalidArgumentError: ``num_tokens < 0``.
        """
        cdef CEvictResult r = self._tree.get().evict_swa(num_tokens, write_back)
        return _evict_result(r)

    def evict_host(self, int64_t num_tokens):
        """Evicts ``ceil(num_tokens / page_size)`` pages of host KV (SGLang's ``evict_host``).

        Takes host-only leaves, least recently used first, from their tail pages; never a
        host-locked node, never a node with device KV (its host copy stays while it is on device).

        Returns:
            torch.Tensor: ``[n]`` int64 CPU tensor of the freed host slots.

        Raises:
            InvalidArgumentError: ``num_tokens < 0``.
        """
        return _to_tensor(self._tree.get().evict_host(num_tokens))

    def backup_plan(self, int64_t node_id, uint64_t min_hit_count=1):
        """What write-through must back up on the path root..``node_id``.

        The device nodes without a host value and with ``hit_count >= min_hit_count``, root-first
        (SGLang's ``BackupKV`` chain; 1 for ``write_through``, 2 for ``write_through_selective``).

        Returns:
            TransferPlan: node ids, tokens per node and their device slots.

        Raises:
            IndexOutOfRangeError: unknown node id.
        """
        cdef CTransferPlan p = self._tree.get().backup_plan(node_id, min_hit_count)
        return _plan(p)

    def commit_backup(self, int64_t node_id, host_indices, int64_t host_state=-1,
                      host_swa_indices=None):
        """Records that device node ``node_id`` is backed up in host slots ``host_indices``.

        Called when the device -> host copy is queued (SGLang's ``commit_backup``): the node is
        backup-pending under ack id ``node_id`` until :meth:`finish_backup` or
        :meth:`abort_backup`, and the caller keeps it locked until then.

        Args:
            node_id: a device node without a host value.
            host_indices: ``[num_tokens of the node]`` int64 CPU host slots, whole pages.
            host_state: Mamba trees: the host slot of the backup of the node's device state (the
                plan's ``states`` entry), or -1 to back up the KV only.
            host_swa_indices: SWA trees: ``[num_tokens of the node]`` int64 CPU tensor of the
                host SWA slots backing up its live SWA KV (the plan's ``swa`` flag), or None.

        Raises:
            InvalidArgumentError: the node is evicted or already backed up, a wrong length, slots
                not made of whole pages, or a ``host_state`` for a node without a device state.
            IndexOutOfRangeError: unknown node id, a slot ``>= num_host_slots``, or a
                ``host_state`` out of ``[0, num_mamba_host_slots)``.
        """
        cdef const SlotIndex* slots
        cdef const SlotIndex* swa_slots = NULL
        cdef size_t m, k = 0
        host_swa_indices = _optional_slots(host_swa_indices, "host_swa_indices", &swa_slots, &k)
        self._as_slots(host_indices, &slots, &m)
        self._tree.get().commit_backup(node_id, slots, m, host_state, swa_slots, k)

    def state_backup_plan(self, int64_t node_id):
        """Mamba trees: the incremental state backups the path root..``node_id`` needs.

        SGLang's ``needs_incremental_backup``: nodes whose KV is backed up (no backup in flight)
        but whose device state has no host copy, because it was published after the KV's backup.

        Returns:
            TransferPlan: node ids root-first, ``lengths`` all 0, no ``indices``, and ``states``
            their device state slots.

        Raises:
            IndexOutOfRangeError: unknown node id.
        """
        cdef CTransferPlan p = self._tree.get().state_backup_plan(node_id)
        return _plan(p)

    def commit_state_backup(self, int64_t node_id, int64_t host_state):
        """Records that node ``node_id``'s state is backed up in host state slot ``host_state``.

        Pending under ack id ``node_id`` until :meth:`finish_state_backup` or
        :meth:`abort_state_backup`; the caller keeps the node locked until then.

        Raises:
            InvalidArgumentError: not a node :meth:`state_backup_plan` names.
            IndexOutOfRangeError: unknown node id, or ``host_state`` out of range.
        """
        self._tree.get().commit_state_backup(node_id, host_state)

    def finish_state_backup(self, int64_t ack_id):
        """The state backup ``ack_id`` finished.

        Raises:
            InvalidArgumentError: none in flight under ``ack_id``.
        """
        self._tree.get().finish_state_backup(ack_id)

    def abort_state_backup(self, int64_t ack_id):
        """The state backup ``ack_id`` failed: the host state slot goes to the outbox
        (:meth:`take_freed_mamba_host_slots`).

        Raises:
            InvalidArgumentError: none in flight under ``ack_id``.
        """
        self._tree.get().abort_state_backup(ack_id)

    def finish_backup(self, int64_t ack_id):
        """The copy of backup ``ack_id`` (the node id given to :meth:`commit_backup`) finished.

        Clears the pending mark on the node and on every fragment split off it meanwhile.

        Raises:
            InvalidArgumentError: no backup is in flight under ``ack_id``.
            IndexOutOfRangeError: unknown node id.
        """
        self._tree.get().finish_backup(ack_id)

    def abort_backup(self, int64_t ack_id):
        """The copy of backup ``ack_id`` failed: the node and its fragments lose their host value.

        Their host bytes are garbage and must never be served.

        Returns:
            torch.Tensor: int64 CPU tensor of the host slots to free.

        Raises:
            InvalidArgumentError: no backup is in flight under ``ack_id``.
            IndexOutOfRangeError: unknown node id.
        """
        return _to_tensor(self._tree.get().abort_backup(ack_id))

    def load_back_plan(self, int64_t anchor):
        """What loading ``anchor`` back must copy: the host-only nodes from its deepest device
        ancestor down to ``anchor``, root-first, with their host slots (SGLang's
        ``build_load_back_spec``). Empty when ``anchor`` is on device, or when that ancestor is
        load-failed (nothing is loaded under garbage). It may be load-pending: loads chain.

        Raises:
            IndexOutOfRangeError: unknown node id.
        """
        cdef CTransferPlan p = self._tree.get().load_back_plan(anchor)
        return _plan(p)

    def commit_load_back(self, int64_t anchor, device_indices, int64_t device_state=-1):
        """Gives the nodes of ``load_back_plan(anchor)`` the device slots ``device_indices``.

        Called when the host -> device copy is queued (SGLang's ``commit_load_back``): the nodes
        become device+host, unlocked, just used and load-pending under ack id ``anchor``; the
        caller locks ``anchor`` until after :meth:`finish_load_back` or :meth:`abort_load_back`.
        Mamba trees: when the plan carries the anchor's host state (``states[-1] >= 0``),
        ``device_state`` is the device slot it is loaded into (the anchor's device state from
        now on); otherwise it must be -1.

        Raises:
            InvalidArgumentError: a length other than the plan's tokens, slots not made of whole
                pages, an anchor under a load-failed node, or a missing / unexpected
                ``device_state``.
            IndexOutOfRangeError: unknown node id, a slot ``>= num_device_slots``, or a
                ``device_state`` out of ``[0, num_mamba_slots)``.
        """
        cdef const SlotIndex* slots
        cdef size_t m
        self._as_slots(device_indices, &slots, &m)
        self._tree.get().commit_load_back(anchor, slots, m, device_state)

    def finish_load_back(self, int64_t ack_id):
        """The load ``ack_id`` (the anchor given to :meth:`commit_load_back`) finished.

        Clears the pending marks. Nodes that are load-failed because a load above them failed
        stay so (their KV is served only under that garbage).

        Raises:
            InvalidArgumentError: no load is in flight under ``ack_id``.
            IndexOutOfRangeError: unknown node id.
        """
        self._tree.get().finish_load_back(ack_id)

    def abort_load_back(self, int64_t ack_id):
        """The load ``ack_id`` failed: its nodes' device KV is garbage; they go back to host-only.

        The load's nodes and every device node below them (loads chained under it) become
        load-failed: never matched again, nothing loaded under them. Those nobody locks are
        demoted at once; the others when :meth:`dec_lock_ref` releases their last lock (a request
        that locked them must be aborted: its prefix is garbage). The device slots of demoted
        nodes are collected with :meth:`take_failed_load_slots`. Call it while still holding the
        load's lock, then release that lock.

        Returns:
            int: tokens of the failed load's nodes.

        Raises:
            InvalidArgumentError: no load in flight under ``ack_id``, or a node below is pending
                under another load whose lock was released early. Nothing changed.
            IndexOutOfRangeError: unknown node id.
        """
        return self._tree.get().abort_load_back(ack_id)

    def take_failed_load_slots(self):
        """Hands over the device slots of load-failed nodes demoted since the last call.

        Demotions happen in :meth:`abort_load_back` and :meth:`dec_lock_ref`; the tree holds the
        slots until this call. Nothing to take while :meth:`load_failed_size` has been 0.

        Returns:
            torch.Tensor: int64 CPU tensor of device slots to free.
        """
        return _to_tensor(self._tree.get().take_failed_load_slots())

    def take_failed_load_states(self):
        """Mamba trees: the device states of load-failed nodes demoted since the last call.

        Returns:
            torch.Tensor: int64 CPU tensor of Mamba state slots to free.
        """
        return _to_tensor(self._tree.get().take_failed_load_states())

    def take_freed_mamba_host_slots(self):
        """Mamba trees: host states freed inside the tree since the last call.

        :meth:`evict_host`, :meth:`abort_backup` and evictions that drop host-only subtrees free
        the host states of the nodes whose host KV they free; their results are KV slots only,
        so the states wait here.

        Returns:
            torch.Tensor: int64 CPU tensor of host Mamba state slots to free.
        """
        return _to_tensor(self._tree.get().take_freed_mamba_host_slots())

    def take_freed_swa_host_slots(self):
        """SWA trees: host SWA slots freed inside the tree since the last call (int64 CPU tensor).

        Freed with the host KV of their nodes (:meth:`evict_host`, :meth:`abort_backup`, the
        tombstone cascade, evictions dropping host-only subtrees); the caller frees them.
        """
        return _to_tensor(self._tree.get().take_freed_swa_host_slots())

    def host_total_size(self):
        """Tokens with host KV in the tree (host-only and device+host nodes)."""
        return self._tree.get().host_total_size()

    def host_evictable_size(self):
        """Tokens of host KV in host-only, host-unlocked nodes: what ``evict_host`` can free."""
        return self._tree.get().host_evictable_size()

    def host_protected_size(self):
        """Host tokens ``evict_host`` cannot free now: on device too, or host-locked."""
        return self._tree.get().host_protected_size()

    def mamba_evictable_size(self):
        """Mamba states in the tree that no lock holds (what :meth:`evict_mamba` can free)."""
        return self._tree.get().mamba_evictable_size()

    def mamba_protected_size(self):
        """Mamba states in the tree held by a lock."""
        return self._tree.get().mamba_protected_size()

    def swa_evictable_size(self):
        """SWA trees: tokens with live device SWA KV not held by an SWA lock."""
        return self._tree.get().swa_evictable_size()

    def swa_protected_size(self):
        """SWA trees: tokens with live device SWA KV held by an SWA (window segment) lock."""
        return self._tree.get().swa_protected_size()

    def swa_host_size(self):
        """SWA trees: tokens with a host SWA copy."""
        return self._tree.get().swa_host_size()

    def load_failed_size(self):
        """Device tokens in load-failed nodes, kept (locked) until their last lock is released."""
        return self._tree.get().load_failed_size()

    def evictable_size(self):
        """Tokens with device KV in unlocked nodes."""
        return self._tree.get().evictable_size()

    def protected_size(self):
        """Tokens with device KV in locked nodes."""
        return self._tree.get().protected_size()

    def total_size(self):
        """Tokens with device KV in the tree: ``evictable_size() + protected_size()``."""
        return self._tree.get().total_size()

    def num_nodes(self):
        """Nodes in the tree, excluding the root."""
        return self._tree.get().num_nodes()

    def contains_node(self, int64_t node_id):
        """Whether ``node_id`` names a node currently in the tree (the root always does)."""
        return self._tree.get().contains_node(node_id)

    def node_info(self, int64_t node_id):
        """Returns a :class:`~hicache.results.NodeInfo` snapshot of one node.

        Raises:
            IndexOutOfRangeError: unknown node id.
        """
        cdef CNodeInfo i = self._tree.get().node_info(node_id)
        return NodeInfo(i.node_id, i.parent_id, i.num_tokens, i.num_children, i.lock_ref,
                        i.host_ref_counter, i.hit_count, i.last_access_time, i.has_device_value,
                        i.has_host_value, i.backup_pending, i.load_pending, i.load_failed,
                        i.extra_key.decode("utf-8") if i.has_extra_key else None,
                        i.has_mamba_value, i.mamba_value, i.mamba_lock_ref,
                        i.has_mamba_host_value, i.mamba_host_value, i.has_swa_value,
                        i.swa_lock_ref, i.has_swa_host_value)

    def node_ids(self):
        """Ids of every node but the root, parents before children (for tests and debugging).

        Returns:
            list[int]: node ids.
        """
        return list(self._tree.get().node_ids())

    def node_key(self, int64_t node_id):
        """A node's own tokens (not its path's), for tests and debugging.

        Returns:
            list[int]: the node's key, a multiple of page_size tokens; ``[]`` for the root.

        Raises:
            IndexOutOfRangeError: unknown node id.
        """
        return list(self._tree.get().node_key(node_id))

    def all_device_indices(self):
        """All device slots held by the tree, as an int64 CPU tensor (order unspecified)."""
        return _to_tensor(self._tree.get().all_device_indices())

    def all_host_indices(self):
        """All host slots held by the tree, as an int64 CPU tensor (order unspecified)."""
        return _to_tensor(self._tree.get().all_host_indices())

    def all_mamba_indices(self):
        """All Mamba state slots held by the tree, as an int64 CPU tensor (order unspecified)."""
        return _to_tensor(self._tree.get().all_mamba_indices())

    def all_mamba_host_indices(self):
        """All host Mamba state slots held by the tree (int64 CPU tensor, order unspecified)."""
        return _to_tensor(self._tree.get().all_mamba_host_indices())

    def all_swa_indices(self):
        """SWA trees: the Full slots of the nodes with live device SWA KV (int64 CPU tensor)."""
        return _to_tensor(self._tree.get().all_swa_indices())

    def all_swa_host_indices(self):
        """SWA trees: all host SWA slots held by the tree (int64 CPU tensor)."""
        return _to_tensor(self._tree.get().all_swa_host_indices())

    def reset(self):
        """Drops every node and returns the device slots they held (int64 CPU tensor).

        Call :meth:`all_host_indices` first to free the host slots. Node ids are not reused.

        Raises:
            InvalidArgumentError: some node is still locked or host-locked.
        """
        return _to_tensor(self._tree.get().reset())

    def pretty_print(self):
        """Returns a human-readable dump of the tree, one node per line."""
        return self._tree.get().pretty_print().decode("utf-8")

    def check_invariants(self):
        """Recomputes every tree invariant of DESIGN.md from scratch (O(tree size)).

        Raises:
            InvariantError: an invariant is broken; the message names the node and the rule.
        """
        self._tree.get().check_invariants()

    # ---- storage tier (L3) ----------------------------------------------------------------------

    @property
    def has_page_hashes(self) -> bool:
        """Whether nodes carry page hashes (the ``page_hashes`` constructor flag)."""
        return self._tree.get().has_page_hashes()

    def node_page_hashes(self, int64_t node_id):
        """The page hashes of a node's own key: one 32-byte SHA-256 digest per page.

        Digest ``i`` is SGLang's ``get_hash_str`` chain value of the node's page ``i`` (it covers
        every page of the path above it and the namespace seed of its ``extra_key``), equal to
        :func:`hicache.storage.page_hashes` over the path's tokens. The root has none.

        Raises:
            InvalidArgumentError: the tree was built without ``page_hashes=True``.
            IndexOutOfRangeError: unknown node id.
        """
        return _digests(self._tree.get().node_page_hashes(node_id))

    def path_page_hashes(self, int64_t node_id):
        """The page hashes of every page on the path root..``node_id``, root-first.

        For a match's ``last_host_node`` these are the storage keys of the matched prefix; the
        last one chains a prefetch of the tokens after it (SGLang's ``get_last_hash_value``).

        Raises:
            InvalidArgumentError: the tree was built without ``page_hashes=True``.
            IndexOutOfRangeError: unknown node id.
        """
        return _digests(self._tree.get().path_page_hashes(node_id))

    def insert_host(self, int64_t anchor, key, host_indices, extra_key=None,
                    int64_t mamba_host_value=-1, host_swa_indices=None):
        """Inserts pages prefetched from storage below ``anchor`` as host-only nodes.

        SGLang's ``insert_host`` (reference §3.8): ``key`` holds the tokens that follow the path
        of ``anchor`` (a match's ``last_host_node``), ``host_indices`` the host slots their KV
        was read into. Nodes already on that path keep their values; the new tail node is
        host-only (evicted + backuped), host-unlocked, in the host LRU, with page hashes when
        the tree has them. The walk stops, as :meth:`insert` does, at a node whose load-back is
        in flight or has failed. No hit is counted; the path is touched.

        Args:
            anchor: node id whose path the key continues (the root for a key from the start).
            key: ``[num_tokens]`` token ids; only whole pages are inserted.
            host_indices: ``[num_tokens]`` int64 host slot indices, whole pages.
            extra_key: the namespace (must be the anchor's below the root).
            mamba_host_value: Mamba trees (required there, -1 elsewhere): the host state slot
                holding the recurrent state after the aligned key (a hybrid prefetch is
                all-or-nothing: KV and the state at its end, reference §3.11).
            host_swa_indices: SWA trees (required there when a whole page is inserted, None
                elsewhere): ``[k]`` int64 CPU tensor, whole pages, ``0 < k <= `` the aligned
                key: the host SWA slots holding the SWA KV of the key's last ``k`` tokens (the
                window a prefetch read). The nodes covering them get host SWA copies: the new
                tail node (split so that exactly its window part has one) and host-only nodes on
                the path without one (split at the window's start).

        Returns:
            InsertResult: ``prefix_len`` tokens were in the tree already (the caller frees
            ``host_indices[:prefix_len]``) and ``host_indices[cached_len:]`` were not taken
            (the unaligned tail, or everything after a stop); the tree owns the rest.
            ``last_node`` is the node ending the inserted key. Mamba trees: ``mamba_taken``
            (the node ending the key took the state) or not (the caller frees it;
            ``mamba_exist`` when that node had a host state already). SWA trees:
            ``swa_host_spare``, the host SWA slots the tree did not take (tokens on device
            nodes or on nodes with a host SWA copy already, or past a stop; the caller frees
            them).

        Raises:
            InvalidArgumentError: bad arrays, ``len(host_indices) != len(key)``, a load-failed
                anchor, another namespace than the anchor's, a Mamba tree without
                ``mamba_host_value`` or another tree with one, an SWA tree without
                ``host_swa_indices`` (or a bad length) or another tree with them.
            IndexOutOfRangeError: unknown anchor, a slot ``>= num_host_slots``, a state
                outside the host Mamba pool, a host SWA slot ``>= num_swa_host_slots``.
        """
        cdef const Token* tokens
        cdef const SlotIndex* slots
        cdef const SlotIndex* swa_slots = NULL
        cdef size_t n, m, k = 0
        cdef bytes holder = _encode_extra_key(extra_key)
        cdef string_view ns = _view(holder)
        host_swa_indices = _optional_slots(host_swa_indices, "host_swa_indices", &swa_slots, &k)
        self._as_tokens(key, &tokens, &n)
        self._as_slots(host_indices, &slots, &m)
        cdef CInsertResult r = self._tree.get().insert_host(anchor, tokens, n, slots, m, ns,
                                                            mamba_host_value, swa_slots, k)
        return InsertResult(r.prefix_len, r.last_node, r.adopted_len, r.cached_len,
                            r.mamba_exist, r.mamba_taken,
                            swa_host_spare=_to_tensor(r.swa_host_spare))

    def storage_backup_plan(self, int64_t ack_id):
        """The nodes of backup ``ack_id`` whose host pages go to storage once it is acked.

        SGLang's ``write_backup_storage`` for every fragment: the node ``ack_id`` and the nodes
        split off above it while its device -> host copy was in flight (the nodes on its root
        path still backup-pending under ``ack_id``). Call it before :meth:`finish_backup`.

        Returns:
            TransferPlan: ``node_ids`` and ``lengths`` root-first, ``indices`` their host slots
            concatenated (int64 CPU tensor); empty when no node is pending under ``ack_id``.
            SWA trees: ``swa`` flags the nodes with a host SWA copy and ``swa_indices`` holds
            their host SWA slots, root-first (stored under the same page hashes).

        Raises:
            IndexOutOfRangeError: unknown node id.
        """
        cdef CTransferPlan plan = self._tree.get().storage_backup_plan(ack_id)
        return _plan(plan)


cdef list _digests(vector[Digest]& digests):
    """Each 32-byte digest as a ``bytes`` object."""
    cdef list out = []
    cdef size_t i
    for i in range(digests.size()):
        out.append(PyBytes_FromStringAndSize(<const char*>digests[i].data(), 32))
    return out
