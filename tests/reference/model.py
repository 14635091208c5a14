"""A slow, obviously-correct, page-level reference model of ``hicache._tree.RadixTree``.

The model keeps one dict entry per cached page, keyed by ``(extra_key, tokens of the whole prefix
up to and including that page)``. Prefix sharing and node ids do not exist here. Node boundaries
do, as a set ``ends`` of the pages that end a node: where the tree splits a node, trims it or
evicts a run of it is observable (eviction counts, the tombstone cascade, the tree's node list),
so the model reproduces them with three rules:

- a match or an insert ends a node where its walk over cached pages ends (the tree splits there),
  and an insert's new pages are one node;
- an eviction takes, from its victim page, the deepest pages of that page's node, as many as it
  still has to free, as one run; a run that is demoted or must be backed up first is split off
  (the page above it ends a node), a dropped run is cut off (the same);
- a page is removed only as a leaf; the page above it then ends a node (trimmed, or it did).

A page lives on device (``device`` slots), on host (``host`` slots), or both; never neither.

Load-backs: committed pages are on device at once and ``load_pending`` until their ack. An insert
stops at the first load-pending or ``load_failed`` page (the caller keeps its slots from there on).
A failed load marks its pages, and every device page extending them, ``load_failed``: a match
stops before such a page, nothing is loaded under it, and it is demoted (device slots handed back
through ``take_failed_load_slots``) when its lock count drops to 0, or at once if unlocked.

Mamba component (``mamba=True``): a page may hold the state slot after it (``mamba``; only a page
that ends a node does: a split leaves the state on the lower node, which keeps the end). A match
ends at the deepest matched page holding a state (the empty prefix always validates); the Full
tokens matched beyond it are ``mamba_branching_seqlen``. An insert gives its last page the
caller's state unless it holds one (``mamba_exist``) or the walk stopped (the caller keeps it). A
lock also locks the state of its last page (a single-page lock); the unlock releases it first,
touching that page, then the Full path. ``evict_mamba`` frees the least recently used unlocked
state. Device eviction frees the states of the pages it demotes or drops. The tombstone cascade,
run from where an eviction left off, deletes a childless page without a state and goes on with
its parent, stopping at a page that is locked, host-locked, backup- or load-pending, load-failed
or (host eviction only) on device; a deleted page's slots count as freed (device tokens as
dropped, a demoted victim's included).

SWA component (``sliding_window_size=W > 0``): a page's sliding-window KV is live on device
(``swa``: its Full slots' SWA side is mapped; only a device page can have it) or gone (an SWA
tombstone, its Full KV kept), and may have a host copy (``swa_host``, one host SWA slot per token).
A page "has SWA" if it is on device with ``swa``, or host-only with ``swa_host``.
- Match: a page validates the SWA rule if the run of consecutive pages with SWA ending at it is
  at least W tokens long; the run is unbounded from the root until the first page without SWA.
  The match ends at the deepest matched page that every component validates (SWA and Mamba
  together); the Full tokens matched beyond it are ``swa_branching_seqlen`` (and, in a Mamba model,
  ``mamba_branching_seqlen``: both report the same Full walk). The device part of the match ends at
  its deepest validated page on device (SGLang's ``best_match_device_node``); the validated pages
  below count as host hits, an SWA tombstone on device above a host-only window included.
- Insert with ``swa_evicted_seqlen``: the frontier ``f`` is that, floored to a page and capped at
  the key. Pages starting at or above ``f`` are "above the frontier". A new page is live iff it is
  above; a host-only page that adopts the caller's slots becomes live iff it is above; a device
  page above without SWA takes the caller's SWA KV if the caller's slot for it differs from its
  own (it keeps its Full slots; ``swa_remap_dst`` gets its slots, ``swa_remap_src`` the caller's,
  root-first). Node ends: where an existing node spans ``f`` (its pages just below and at ``f``
  were both walked) and it was host-only or an SWA tombstone, the page below ``f`` ends a node;
  the new pages are one tombstone node below ``f`` and one live node above, and a live new run
  longer than ``cap = ceil(W / page_size) * page_size`` tokens is cut so that its last ``cap``
  tokens are a node of their own (a lock then pins one window).
- Locks: a lock also SWA-locks whole nodes upwards from its last page, until at least W tokens
  are covered or the root is reached (``swa_lock_tokens``, the segment's tokens, which is the last
  ``swa_lock_tokens`` of the locked prefix whatever splits happen later). The unlock releases the
  segment first, deepest first, touching each released page with live SWA, then the state, then
  the Full path.
- ``evict_swa``: the victim is the unlocked page with live SWA with the smallest tick (always the
  end of its node), and its node is the run. Under write_back an unbacked victim stops the call
  and is reported. A victim whose node no lock holds and no device page extends is evicted as
  ``evict`` evicts a whole node (demoted, or dropped). Any other becomes an SWA tombstone (its
  Full slots are reported as ``swa_freed``), loses its Mamba state and starts the cascade.
- Full eviction (demotion, drops, failed loads) drops the device SWA; a demoted page keeps its
  host copy. A backup may give a live page a host copy; a load-back makes the loaded pages with a
  host copy live again. Every host SWA slot freed (a page removed, an aborted backup) goes to an
  outbox, ``take_freed_swa_host_slots``.
- The tombstone cascade also takes a childless page without SWA on either tier, and stops at an
  SWA-locked page.

LRU rule (the one ``RadixTree`` implements with one tick per node): every page touch takes the next
value of a global tick, and a touched path is touched deepest page first, so ancestors are more
recent. ``match_prefix`` (up to where it validates), ``insert`` (up to where it stops) and
``load_back`` touch their page path; ``unlock`` touches the pages with live SWA whose SWA lock
count drops to 0, then the released state's page, then the pages whose lock count drops to 0;
``host_unlock`` the host-only pages whose host lock count drops to 0; demotion (device eviction of
a backed-up page, or of a load-failed page) touches the demoted page unless it is host-locked.
Nothing else touches.

Eviction, a run at a time:
- ``evict``: the victim is the unlocked device page that no device page extends, with the smallest
  tick. Backed up: the run is demoted (device slots freed, the pages stay host-only). Not backed
  up: under write_back the call stops and reports the victim; otherwise the run is dropped with
  every (host-only) page extending it, unless one of them is host-locked, which stops the call.
- ``evict_host``: the victim is the host-only, host-unlocked page that no page extends, smallest
  tick; the run is removed (the cascade runs only once the victim's whole node is gone).
- ``evict_mamba``: the unlocked state with the smallest tick.
- ``evict_swa``: see the SWA component.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

PageKey = tuple[str | None, tuple[int, ...]]


@dataclass
class Page:
    """One cached page: its slots per tier, last-touch tick, lock counts and insert hits."""

    device: list[int] | None
    tick: int
    host: list[int] | None = None
    lock_count: int = 0
    host_lock_count: int = 0
    hit_count: int = 1
    backup_pending: bool = False
    load_pending: bool = False
    load_failed: bool = False
    mamba: int | None = None  # the Mamba state slot after this page (Mamba models)
    mamba_lock_count: int = 0
    swa: bool = False  # device SWA KV live (SWA models; device pages only)
    swa_host: list[int] | None = None  # host SWA slots (SWA models; pages with ``host`` only)
    swa_lock_count: int = 0


class MatchOutcome(NamedTuple):
    """What :meth:`ReferenceTree.match_prefix` found."""

    device_len: int  # tokens down to the deepest validated page on device
    device_slots: list[int]
    host_len: int  # validated tokens below the device ones
    full_len: int  # tokens the Full walk matched (>= device_len + host_len)
    mamba_branching_seqlen: int  # full_len when more than validated in a Mamba model, else -1
    swa_branching_seqlen: int = -1  # the same in an SWA model


class InsertOutcome(NamedTuple):
    """What :meth:`ReferenceTree.insert` did (see the method)."""

    prefix_len: int
    adopted_len: int
    cached_len: int
    mamba_exist: bool = False
    mamba_taken: bool = False
    swa_remap_dst: tuple[int, ...] = ()
    swa_remap_src: tuple[int, ...] = ()


class LockOutcome(NamedTuple):
    """What :meth:`ReferenceTree.lock` locked."""

    delta: int  # tokens made protected
    mamba_locked: bool  # the state of the last page was locked too
    swa_lock_tokens: int = 0  # tokens of the SWA window segment locked (SWA models)


@dataclass
class EvictOutcome:
    """What an eviction did (slots in eviction order)."""

    device_freed: list[int] = field(default_factory=list)
    host_freed: list[int] = field(default_factory=list)
    demoted_tokens: int = 0
    dropped_tokens: int = 0
    needs_backup: PageKey | None = None
    mamba_freed: list[int] = field(default_factory=list)
    swa_freed: list[int] = field(default_factory=list)  # Full slots of new SWA tombstones


class ReferenceTree:
    """Page-level model of the device and host tiers (Mamba states, SWA KV) of ``RadixTree``.

    Args:
        page_size: Tokens per page; keys are floored to a multiple of it.
        mamba: Model the Mamba component.
        sliding_window_size: > 0 models the SWA component with this window, in tokens.
    """

    def __init__(
        self, page_size: int = 1, mamba: bool = False, sliding_window_size: int = 0
    ) -> None:
        self.page_size = page_size
        self.mamba = mamba
        self.window = sliding_window_size
        self.freed_swa_host: list[int] = []
        self.pages: dict[PageKey, Page] = {}
        self.ends: set[PageKey] = set()
        self.tick = 0
        self.failed_load_slots: list[int] = []

    # ---- helpers --------------------------------------------------------------------------------

    def _page_keys(self, key: list[int], extra_key: str | None) -> list[PageKey]:
        """Keys of every full page of ``key``, shallowest first."""
        num_pages = len(key) // self.page_size
        return [(extra_key, tuple(key[: k * self.page_size])) for k in range(1, num_pages + 1)]

    def parent(self, page_key: PageKey) -> PageKey | None:
        """The page above ``page_key``; None for a first page (its parent is the root)."""
        extra, tokens = page_key
        return (extra, tokens[: -self.page_size]) if len(tokens) > self.page_size else None

    def _touch(self, page_keys: list[PageKey]) -> None:
        """Give each page a new tick, deepest first, so that ancestors end up more recent."""
        for page_key in reversed(page_keys):
            self.tick += 1
            self.pages[page_key].tick = self.tick

    def _matched(self, key: list[int], extra_key: str | None) -> list[PageKey]:
        matched = []
        for page_key in self._page_keys(key, extra_key):
            if page_key not in self.pages or self.pages[page_key].load_failed:
                break
            matched.append(page_key)
        return matched

    def _children(self, page_key: PageKey) -> list[PageKey]:
        extra, tokens = page_key
        n = len(tokens) + self.page_size
        return [
            k
            for k in self.pages
            if k[0] == extra and len(k[1]) == n and k[1][: len(tokens)] == tokens
        ]

    def _subtree(self, page_key: PageKey) -> list[PageKey]:
        extra, tokens = page_key
        return [k for k in self.pages if k[0] == extra and k[1][: len(tokens)] == tokens]

    def node_pages(self, end: PageKey) -> list[PageKey]:
        """The pages of the node that ``end`` ends, shallowest first."""
        assert end in self.ends, end
        pages = [end]
        above = self.parent(end)
        while above is not None and above not in self.ends:
            pages.append(above)
            above = self.parent(above)
        return pages[::-1]

    def _split_above(self, page_key: PageKey) -> None:
        """The page above ``page_key`` ends a node (a split there; nothing for a first page)."""
        above = self.parent(page_key)
        if above is not None:
            self.ends.add(above)

    def _remove(self, page_key: PageKey) -> Page:
        """Removes a leaf page; the page above it then ends a node. Its host SWA slots go to the
        outbox."""
        assert not self._children(page_key), page_key
        page = self.pages.pop(page_key)
        self.ends.discard(page_key)
        self._split_above(page_key)
        self.freed_swa_host.extend(page.swa_host or [])
        return page

    def _has_swa(self, page: Page) -> bool:
        """SWA KV usable by a match: live on device, or a host copy of a host-only page."""
        return page.swa if page.device is not None else page.swa_host is not None

    def _free_state(self, page: Page, out: EvictOutcome) -> None:
        """Frees the page's state, if any (the page becomes a Mamba tombstone)."""
        if page.mamba is not None:
            out.mamba_freed.append(page.mamba)
            page.mamba = None

    def _cascade(self, page_key: PageKey | None, out: EvictOutcome, device_ok: bool) -> None:
        """The tombstone cascade (Mamba and SWA models), from ``page_key`` up (see the module
        docstring): a page is useless without a state (Mamba) or without SWA on either tier
        (SWA)."""
        while (self.mamba or self.window) and page_key is not None:
            page = self.pages[page_key]
            useless = (self.mamba and page.mamba is None) or (
                self.window > 0 and not page.swa and page.swa_host is None
            )
            if (
                not useless
                or self._children(page_key)
                or page.lock_count > 0
                or page.swa_lock_count > 0
                or page.host_lock_count > 0
                or page.backup_pending
                or page.load_pending
                or page.load_failed
                or (not device_ok and page.device is not None)
            ):
                return
            self._remove(page_key)
            if page.device is not None:
                out.device_freed.extend(page.device)
                out.dropped_tokens += self.page_size
            if page.host is not None:
                out.host_freed.extend(page.host)
            self._free_state(page, out)
            page_key = self.parent(page_key)

    def device_len(self, prefix: list[int], extra_key: str | None = None) -> int:
        """Tokens of the cached ``prefix`` on device: its leading (root-anchored) device pages."""
        num_pages = 0
        for page_key in self._page_keys(prefix, extra_key):
            if self.pages[page_key].device is None:
                break
            num_pages += 1
        return num_pages * self.page_size

    def page(self, prefix: list[int], extra_key: str | None = None) -> Page:
        """The page ending ``prefix`` (which must be cached)."""
        return self.pages[self._page_keys(prefix, extra_key)[-1]]

    # ---- operations -----------------------------------------------------------------------------

    def match_prefix(self, key: list[int], extra_key: str | None = None) -> MatchOutcome:
        """Matches ``key``: the walk ends a node; touches the validated prefix.

        The device part ends at the deepest validated page on device (SGLang's
        ``best_match_device_node``); the validated pages below it count as host hits, even those
        on device that do not validate themselves (an SWA tombstone above a host-only page with
        host SWA: only the host-only pages are loaded back)."""
        matched = self._matched(key, extra_key)
        if matched:
            self.ends.add(matched[-1])
        num_valid = num_device = 0
        run = float("inf")  # tokens of the run of pages with SWA ending here
        for i, page_key in enumerate(matched):
            page = self.pages[page_key]
            run = run + self.page_size if self._has_swa(page) else 0
            if self.window > 0 and run < self.window:
                continue
            if self.mamba and page.mamba is None:
                continue
            num_valid = i + 1
            if page.device is not None:
                num_device = i + 1
        valid = matched[:num_valid]
        self._touch(valid)
        slots = [s for k in matched[:num_device] for s in self.pages[k].device]
        host_only = (num_valid - num_device) * self.page_size
        full_len = len(matched) * self.page_size
        short = len(matched) > len(valid)
        mamba_branching = full_len if self.mamba and short else -1
        swa_branching = full_len if self.window > 0 and short else -1
        return MatchOutcome(len(slots), slots, host_only, full_len, mamba_branching, swa_branching)

    def insert(
        self,
        key: list[int],
        value: list[int],
        extra_key: str | None = None,
        mamba_value: int | None = None,
        swa_evicted_seqlen: int = 0,
    ) -> InsertOutcome:
        """Caches the pages of ``key``; new and host-only pages take their slots from ``value``.

        Stops at the first load-pending or load-failed page. The last page walked ends a node, and
        so does the last page of the cached pages that existed before. SWA models: see the module
        docstring for ``swa_evicted_seqlen``.

        Returns:
            ``prefix_len``, ``adopted_len``, ``cached_len``: tokens already on device (their slots
            in ``value`` are unused), tokens of host-only pages that took their slots from
            ``value``, and tokens of ``key`` cached (all its whole pages, or up to the stop).
            With a ``mamba_value``: ``mamba_exist`` (the last page holds a state) or
            ``mamba_taken`` (the last page took it); neither if the walk stopped. SWA models:
            ``swa_remap_dst`` / ``swa_remap_src``, the slots of the SWA tombstones that took the
            caller's SWA KV and the caller's slots for them.
        """
        assert len(key) == len(value)
        page_keys = self._page_keys(key, extra_key)
        swa = self.window > 0
        # The first page at or above the frontier (pages from it on are above).
        frontier = min(swa_evicted_seqlen // self.page_size, len(page_keys)) if swa else 0
        prefix_len = adopted_len = 0
        remap_dst: list[int] = []
        remap_src: list[int] = []
        walked = []
        new = []  # indices of the new pages
        existed = None  # the last page walked that was cached before
        spans_changing = False  # the page below the frontier is host-only or an SWA tombstone
        stopped = False
        for k, page_key in enumerate(page_keys):
            slots = list(value[k * self.page_size : (k + 1) * self.page_size])
            page = self.pages.get(page_key)
            if page is not None and (page.load_pending or page.load_failed):
                stopped = True
                break
            walked.append(page_key)
            above = swa and k >= frontier
            if page is None:
                self.pages[page_key] = Page(slots, tick=0, swa=above)
                new.append(k)
                continue
            if swa and k == frontier - 1:
                spans_changing = page.device is None or not page.swa
            if swa and k == frontier and existed == page_keys[k - 1] and spans_changing:
                self.ends.add(existed)  # its node changes SWA state at the frontier: cut there
            existed = page_key
            page.hit_count += 1
            if page.device is None:
                page.device = slots
                page.swa = above
                adopted_len += self.page_size
            else:
                prefix_len += self.page_size
                if above and not page.swa and page.device[0] != slots[0]:
                    remap_dst.extend(page.device)
                    remap_src.extend(slots)
                    page.swa = True
        if existed is not None:
            self.ends.add(existed)
        if walked:
            self.ends.add(walked[-1])
        if swa and new:
            first, end = new[0], len(page_keys)
            if first < frontier < end:  # a tombstone node, then a live one
                self.ends.add(page_keys[frontier - 1])
            cap = -(-self.window // self.page_size)  # pages of a page-aligned window
            live_from = max(first, frontier)
            if live_from < end and end - live_from > cap:  # the live run ends with a window node
                self.ends.add(page_keys[end - cap - 1])
        mamba_exist = mamba_taken = False
        if mamba_value is not None and walked and not stopped:
            last = self.pages[walked[-1]]
            if last.mamba is not None:
                mamba_exist = True
            else:
                last.mamba = mamba_value
                mamba_taken = True
        self._touch(walked)
        return InsertOutcome(
            prefix_len,
            adopted_len,
            len(walked) * self.page_size,
            mamba_exist,
            mamba_taken,
            tuple(remap_dst),
            tuple(remap_src),
        )

    def insert_host(
        self, anchor: list[int], key: list[int], host: list[int], extra_key: str | None = None
    ) -> InsertOutcome:
        """Caches the pages of ``key`` after the cached prefix ``anchor`` as host-only pages.

        Prefetched pages (``RadixTree.insert_host``): a page already cached keeps its slots (its
        slots in ``host`` are the caller's duplicates); a new page takes its slots from ``host``,
        has no device copy and no hit. Stops at the first load-pending or load-failed page. Node
        ends and touches as :meth:`insert` (the anchor's pages are touched too).

        Returns:
            ``prefix_len`` (tokens already cached), ``adopted_len`` (0) and ``cached_len``
            (tokens of ``key`` cached: all its whole pages, or up to the stop).
        """
        assert len(key) == len(host)
        anchor_pages = self._page_keys(anchor, extra_key)
        offset = len(anchor_pages)
        prefix_len = 0
        walked: list[PageKey] = []
        existed = None
        for k, page_key in enumerate(self._page_keys(anchor + key, extra_key)[offset:]):
            page = self.pages.get(page_key)
            if page is not None and (page.load_pending or page.load_failed):
                break
            walked.append(page_key)
            if page is None:
                slots = list(host[k * self.page_size : (k + 1) * self.page_size])
                self.pages[page_key] = Page(None, tick=0, host=slots, hit_count=0)
                continue
            existed = page_key
            prefix_len += self.page_size
        if existed is not None:
            self.ends.add(existed)
        if walked:
            self.ends.add(walked[-1])
        self._touch(anchor_pages + walked)
        return InsertOutcome(prefix_len, 0, len(walked) * self.page_size)

    def lock(self, prefix: list[int], extra_key: str | None = None) -> LockOutcome:
        """Locks every page of ``prefix`` (cached, on device, ending a node), the state of its last
        page, and (SWA models) the SWA window segment ending there."""
        page_keys = self._page_keys(prefix, extra_key)
        num_newly_locked = 0
        for page_key in page_keys:
            page = self.pages[page_key]
            assert page.device is not None, page_key
            num_newly_locked += page.lock_count == 0
            page.lock_count += 1
        mamba_locked = bool(page_keys) and self.pages[page_keys[-1]].mamba is not None
        if mamba_locked:
            self.pages[page_keys[-1]].mamba_lock_count += 1
        swa_lock_tokens = 0
        end = page_keys[-1] if self.window > 0 and page_keys else None
        while end is not None and swa_lock_tokens < self.window:  # whole nodes, upwards
            node = self.node_pages(end)
            for page_key in node:
                self.pages[page_key].swa_lock_count += 1
            swa_lock_tokens += len(node) * self.page_size
            end = self.parent(node[0])
        return LockOutcome(num_newly_locked * self.page_size, mamba_locked, swa_lock_tokens)

    def unlock(
        self,
        prefix: list[int],
        extra_key: str | None = None,
        mamba_locked: bool = False,
        swa_lock_tokens: int = 0,
    ) -> int:
        """Undoes :meth:`lock`: the SWA segment (the last ``swa_lock_tokens`` of ``prefix``,
        deepest first; a page with live SWA left SWA-unlocked is touched), the state (touched when
        released), then the pages, deepest first (a page left unlocked is touched, or demoted if
        load-failed); returns tokens made evictable."""
        page_keys = self._page_keys(prefix, extra_key)
        num_segment = swa_lock_tokens // self.page_size
        for page_key in reversed(page_keys[len(page_keys) - num_segment :]):
            page = self.pages[page_key]
            assert page.swa_lock_count > 0, page_key
            page.swa_lock_count -= 1
            if page.swa_lock_count == 0 and page.swa:
                self._touch([page_key])
        if mamba_locked:
            last = self.pages[page_keys[-1]]
            assert last.mamba_lock_count > 0, page_keys[-1]
            last.mamba_lock_count -= 1
            if last.mamba_lock_count == 0:
                self._touch([page_keys[-1]])
        num_unlocked = 0
        for page_key in reversed(page_keys):
            page = self.pages[page_key]
            assert page.lock_count > 0, page_key
            page.lock_count -= 1
            if page.lock_count > 0:
                continue
            if page.load_failed:
                self._demote_failed(page_key)
                continue
            self._touch([page_key])
            num_unlocked += 1
        return num_unlocked * self.page_size

    def _demote_failed(self, page_key: PageKey) -> None:
        page = self.pages[page_key]
        assert page.device is not None and page.host is not None and page.mamba is None
        assert not any(self.pages[c].device is not None for c in self._children(page_key))
        self.failed_load_slots.extend(page.device)
        page.device = None
        page.swa = False
        page.load_failed = False
        if page.host_lock_count == 0:
            self._touch([page_key])

    def host_lock(self, prefix: list[int], extra_key: str | None = None) -> int:
        """Host-locks every page of ``prefix``; returns host-only tokens made host-protected."""
        newly = 0
        for page_key in self._page_keys(prefix, extra_key):
            page = self.pages[page_key]
            newly += page.host_lock_count == 0 and page.device is None
            page.host_lock_count += 1
        return newly * self.page_size

    def host_unlock(self, prefix: list[int], extra_key: str | None = None) -> int:
        """Undoes :meth:`host_lock`; touches released host-only pages; returns their tokens."""
        released = []
        for page_key in self._page_keys(prefix, extra_key):
            page = self.pages[page_key]
            assert page.host_lock_count > 0, page_key
            page.host_lock_count -= 1
            if page.host_lock_count == 0 and page.device is None:
                released.append(page_key)
        self._touch(released)
        return len(released) * self.page_size

    def lock_count(self, prefix: list[int], extra_key: str | None = None) -> int:
        """Lock count of the deepest page of ``prefix`` (0 for an empty prefix)."""
        page_keys = self._page_keys(prefix, extra_key)
        return self.pages[page_keys[-1]].lock_count if page_keys else 0

    def backup_plan(
        self, prefix: list[int], min_hit_count: int, extra_key: str | None = None
    ) -> list[PageKey]:
        """Device pages of ``prefix`` without host slots and with enough hits, root-first."""
        return [
            k
            for k in self._page_keys(prefix, extra_key)
            if self.pages[k].device is not None
            and self.pages[k].host is None
            and self.pages[k].hit_count >= min_hit_count
        ]

    def commit_backup(
        self, page_keys: list[PageKey], host: list[int], swa_host: list[int] | None = None
    ) -> None:
        """Gives ``page_keys`` (root-first) the host slots ``host`` (and, SWA models, the host SWA
        slots ``swa_host`` if given: the pages must have live SWA), a page at a time; they are
        backup-pending until :meth:`finish_backup` or :meth:`abort_backup`."""
        assert len(host) == len(page_keys) * self.page_size
        assert swa_host is None or len(swa_host) == len(host)
        for i, page_key in enumerate(page_keys):
            page = self.pages[page_key]
            assert page.device is not None and page.host is None
            page.host = list(host[i * self.page_size : (i + 1) * self.page_size])
            page.backup_pending = True
            if swa_host is not None:
                assert page.swa, page_key
                page.swa_host = list(swa_host[i * self.page_size : (i + 1) * self.page_size])

    def finish_backup(self, page_keys: list[PageKey]) -> None:
        """A finished backup: ``page_keys`` are no longer backup-pending."""
        for page_key in page_keys:
            assert self.pages[page_key].backup_pending
            self.pages[page_key].backup_pending = False

    def abort_backup(self, page_keys: list[PageKey]) -> list[int]:
        """A failed backup: ``page_keys`` lose their host slots, which are returned."""
        freed: list[int] = []
        for page_key in page_keys:
            page = self.pages[page_key]
            assert page.device is not None and page.host is not None and page.backup_pending
            freed.extend(page.host)
            page.host = None
            page.backup_pending = False
            self.freed_swa_host.extend(page.swa_host or [])
            page.swa_host = None
        return freed

    def finish_load_back(self, page_keys: list[PageKey]) -> None:
        """A finished load: ``page_keys`` are no longer load-pending."""
        for page_key in page_keys:
            assert self.pages[page_key].load_pending
            self.pages[page_key].load_pending = False

    def abort_load_back(self, page_keys: list[PageKey]) -> int:
        """A failed load: ``page_keys`` and every device page extending them become load-failed;
        the unlocked ones are demoted at once, deepest first. Returns the load's tokens."""
        for page_key in page_keys:
            assert self.pages[page_key].load_pending
            self.pages[page_key].load_pending = False
        failed = [k for k in self._subtree(page_keys[0]) if self.pages[k].device is not None]
        for page_key in failed:
            self.pages[page_key].load_failed = True
        for page_key in sorted(failed, key=lambda k: -len(k[1])):
            if self.pages[page_key].lock_count == 0:
                self._demote_failed(page_key)
        return len(page_keys) * self.page_size

    def take_failed_load_slots(self) -> list[int]:
        """Device slots of load-failed pages demoted since the last call."""
        slots, self.failed_load_slots = self.failed_load_slots, []
        return slots

    def load_back_plan(self, prefix: list[int], extra_key: str | None = None) -> list[PageKey]:
        """The host-only pages of ``prefix`` (its bottom segment), root-first; none when the
        device page above them is load-failed."""
        page_keys = self._page_keys(prefix, extra_key)
        plan = [k for k in page_keys if self.pages[k].device is None]
        above = len(page_keys) - len(plan) - 1
        if plan and above >= 0 and self.pages[page_keys[above]].load_failed:
            return []
        return plan

    def commit_load_back(
        self, prefix: list[int], device: list[int], extra_key: str | None = None
    ) -> None:
        """Gives the host-only pages of ``prefix`` the slots ``device`` (load-pending until the
        ack; those with a host SWA copy have live SWA again); touches ``prefix``."""
        plan = self.load_back_plan(prefix, extra_key)
        assert len(device) == len(plan) * self.page_size
        for i, page_key in enumerate(plan):
            page = self.pages[page_key]
            page.device = list(device[i * self.page_size : (i + 1) * self.page_size])
            page.swa = page.swa_host is not None
            page.load_pending = True
        self._touch(self._page_keys(prefix, extra_key))

    def _device_leaves(self) -> list[PageKey]:
        """Unlocked device pages that no device page extends (each ends its node)."""
        device_parents = {
            self.parent(k) for k, page in self.pages.items() if page.device is not None
        }
        return [
            k
            for k, page in self.pages.items()
            if page.device is not None and page.lock_count == 0 and k not in device_parents
        ]

    def evict(self, num_tokens: int, write_back: bool = False) -> EvictOutcome:
        """Evicts ``ceil(num_tokens / page_size)`` device pages (see the module docstring)."""
        out = EvictOutcome()
        pages_left = -(-num_tokens // self.page_size)
        while pages_left > 0:
            leaves = self._device_leaves()
            if not leaves:
                break
            victim = min(leaves, key=lambda k: self.pages[k].tick)
            num_freed = self._evict_run(
                victim, self.node_pages(victim)[-pages_left:], out, write_back
            )
            if num_freed is None:
                break
            pages_left -= num_freed
        return out

    def _evict_run(
        self, victim: PageKey, run: list[PageKey], out: EvictOutcome, write_back: bool
    ) -> int | None:
        """Evicts ``run``, the deepest pages of the node of device leaf ``victim``, then runs the
        cascade; returns the pages freed, or None when the call must stop."""
        page = self.pages[victim]
        demoted = False
        if page.host is not None:
            self._split_above(run[0])
            for k in run:
                out.device_freed.extend(self.pages[k].device)
                self.pages[k].device = None
                self.pages[k].swa = False  # the host copy (if any) stays
            self._free_state(page, out)
            if page.host_lock_count == 0:
                self._touch(run)
            out.demoted_tokens += len(run) * self.page_size
            demoted = True
            cascade_from: PageKey | None = victim
        elif write_back:
            self._split_above(run[0])
            out.needs_backup = victim
            return None
        else:
            doomed = self._subtree(run[0])
            if any(self.pages[k].host_lock_count > 0 for k in doomed):
                if self._children(victim):  # split off before its subtree is checked
                    self._split_above(run[0])
                return None
            self._free_state(page, out)
            for k in sorted(doomed, key=lambda k: -len(k[1])):  # leaves first
                dropped = self._remove(k)
                if k in run:
                    out.device_freed.extend(dropped.device)
                else:
                    assert dropped.device is None
                out.host_freed.extend(dropped.host or [])
            out.dropped_tokens += len(run) * self.page_size
            cascade_from = self.parent(run[0])
        freed_before = len(out.device_freed)
        self._cascade(cascade_from, out, device_ok=True)
        num_freed = len(run) + (len(out.device_freed) - freed_before) // self.page_size
        if demoted and victim not in self.pages:  # the cascade took its host copy too
            out.demoted_tokens -= len(run) * self.page_size
            out.dropped_tokens += len(run) * self.page_size
        return num_freed

    def evict_swa(self, num_tokens: int, write_back: bool = False) -> EvictOutcome:
        """Frees ``ceil(num_tokens / page_size)`` pages of device SWA KV, a node at a time (see
        the module docstring)."""
        out = EvictOutcome()
        pages_left = -(-num_tokens // self.page_size)
        while pages_left > 0:
            live = [k for k, p in self.pages.items() if p.swa and p.swa_lock_count == 0]
            if not live:
                break
            victim = min(live, key=lambda k: self.pages[k].tick)
            assert victim in self.ends, victim  # touched deepest first: its node's oldest page
            page = self.pages[victim]
            if write_back and page.host is None:
                out.needs_backup = victim
                break
            run = self.node_pages(victim)
            if victim in self._device_leaves():  # a leaf is evicted whole, as evict does
                num_freed = self._evict_run(victim, run, out, write_back)
                if num_freed is None:
                    break
                pages_left -= num_freed
                continue
            for k in run:  # an SWA tombstone from now on
                out.swa_freed.extend(self.pages[k].device)
                self.pages[k].swa = False
            pages_left -= len(run)
            self._free_state(page, out)
            self._cascade(victim, out, device_ok=True)
        return out

    def evict_host(self, num_tokens: int) -> list[int]:
        """Evicts ``ceil(num_tokens / page_size)`` host-only pages; returns their host slots."""
        freed: list[int] = []
        pages_left = -(-num_tokens // self.page_size)
        while pages_left > 0:
            parents = {self.parent(k) for k in self.pages}
            leaves = [
                k
                for k, page in self.pages.items()
                if page.device is None and page.host_lock_count == 0 and k not in parents
            ]
            if not leaves:
                break
            victim = min(leaves, key=lambda k: self.pages[k].tick)
            node = self.node_pages(victim)
            run = node[-pages_left:]
            for k in reversed(run):
                freed.extend(self._remove(k).host)
            pages_left -= len(run)
            if len(run) == len(node):  # the whole node is gone (not trimmed): cascade
                cascade = EvictOutcome()
                self._cascade(self.parent(run[0]), cascade, device_ok=False)
                freed.extend(cascade.host_freed)
                pages_left -= len(cascade.host_freed) // self.page_size
        return freed

    def evict_mamba(self, num_states: int) -> EvictOutcome:
        """Frees up to ``num_states`` unlocked states, least recently used first; each freed
        state's page then starts the tombstone cascade."""
        out = EvictOutcome()
        for _ in range(num_states):
            held = [
                k for k, p in self.pages.items() if p.mamba is not None and p.mamba_lock_count == 0
            ]
            if not held:
                break
            victim = min(held, key=lambda k: self.pages[k].tick)
            self._free_state(self.pages[victim], out)
            self._cascade(victim, out, device_ok=True)
        return out

    def reset(self) -> list[int]:
        """Drops every page; returns all their device slots (and failed-load slots not taken)."""
        assert all(p.lock_count == 0 and p.host_lock_count == 0 for p in self.pages.values())
        slots = self.all_slots() + self.take_failed_load_slots()
        self.pages.clear()
        self.ends.clear()
        self.freed_swa_host.clear()  # the caller takes the outbox first
        return slots

    # ---- observation ----------------------------------------------------------------------------

    def all_slots(self) -> list[int]:
        return [s for page in self.pages.values() if page.device is not None for s in page.device]

    def all_host_slots(self) -> list[int]:
        return [s for page in self.pages.values() if page.host is not None for s in page.host]

    def all_mamba_slots(self) -> list[int]:
        return [page.mamba for page in self.pages.values() if page.mamba is not None]

    def total_size(self) -> int:
        return sum(page.device is not None for page in self.pages.values()) * self.page_size

    def protected_size(self) -> int:
        return (
            sum(page.device is not None and page.lock_count > 0 for page in self.pages.values())
            * self.page_size
        )

    def evictable_size(self) -> int:
        return self.total_size() - self.protected_size()

    def load_failed_size(self) -> int:
        return sum(page.load_failed for page in self.pages.values()) * self.page_size

    def host_total_size(self) -> int:
        return sum(page.host is not None for page in self.pages.values()) * self.page_size

    def host_evictable_size(self) -> int:
        return (
            sum(page.device is None and page.host_lock_count == 0 for page in self.pages.values())
            * self.page_size
        )

    def mamba_evictable_size(self) -> int:
        return sum(p.mamba is not None and p.mamba_lock_count == 0 for p in self.pages.values())

    def mamba_protected_size(self) -> int:
        return sum(p.mamba is not None and p.mamba_lock_count > 0 for p in self.pages.values())

    def take_freed_swa_host_slots(self) -> list[int]:
        """Host SWA slots freed since the last call."""
        slots, self.freed_swa_host = self.freed_swa_host, []
        return slots

    def all_swa_slots(self) -> list[int]:
        """The Full slots of the pages with live SWA."""
        return [s for page in self.pages.values() if page.swa for s in page.device]

    def all_swa_host_slots(self) -> list[int]:
        return [s for page in self.pages.values() for s in page.swa_host or []]

    def swa_evictable_size(self) -> int:
        return sum(p.swa and p.swa_lock_count == 0 for p in self.pages.values()) * self.page_size

    def swa_protected_size(self) -> int:
        return sum(p.swa and p.swa_lock_count > 0 for p in self.pages.values()) * self.page_size

    def swa_host_size(self) -> int:
        return sum(p.swa_host is not None for p in self.pages.values()) * self.page_size
