"""A slow, obviously-correct, page-level reference model of ``hicache._tree.RadixTree``.

The model has no nodes at all: it keeps one dict entry per cached page, keyed by
``(extra_key, tokens of the whole prefix up to and including that page)``. Prefix sharing, splits
and node ids do not exist here, so the differential tests compare only what a caller can observe:
matched slots, host hit lengths, insert prefix lengths, lock deltas, sizes, transfer plans and the
slots every eviction frees.

A page lives on device (``device`` slots), on host (``host`` slots), or both; never neither.

Load-backs: committed pages are on device at once and ``load_pending`` until their ack. An insert
stops at the first load-pending or ``load_failed`` page (the caller keeps its slots from there on).
A failed load marks its pages, and every device page extending them, ``load_failed``: a match
stops before such a page, nothing is loaded under it, and it is demoted (device slots handed back
through ``take_failed_load_slots``) when its lock count drops to 0, or at once if unlocked.

LRU rule (the one ``RadixTree`` implements with one tick per node): every page touch takes the next
value of a global tick, and a touched path is touched deepest page first, so ancestors are more
recent. ``match_prefix``, ``insert`` (up to where it stops) and ``load_back`` touch their page
path; ``unlock`` touches the pages whose lock count drops to 0; ``host_unlock`` the host-only pages
whose host lock count drops to 0; demotion (device eviction of a backed-up page, or of a
load-failed page) touches the demoted page unless it is host-locked. Nothing else touches.

Eviction, one page at a time:
- ``evict``: the unlocked device page that no device page extends, with the smallest tick. Backed
  up: demoted (device slots freed, the page stays host-only). Not backed up: under write_back the
  call stops and reports it; otherwise it is dropped with every (host-only) page extending it,
  unless one of them is host-locked, which stops the call.
- ``evict_host``: the host-only, host-unlocked page that no page extends, smallest tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    load_pending: bool = False
    load_failed: bool = False


@dataclass
class EvictOutcome:
    """What :meth:`ReferenceTree.evict` did (slots in eviction order)."""

    device_freed: list[int] = field(default_factory=list)
    host_freed: list[int] = field(default_factory=list)
    demoted_tokens: int = 0
    dropped_tokens: int = 0
    needs_backup: PageKey | None = None


class ReferenceTree:
    """Page-level model of the device and host tiers of ``RadixTree``.

    Args:
        page_size: Tokens per page; keys are floored to a multiple of it.
    """

    def __init__(self, page_size: int = 1) -> None:
        self.page_size = page_size
        self.pages: dict[PageKey, Page] = {}
        self.tick = 0
        self.failed_load_slots: list[int] = []

    # ---- helpers --------------------------------------------------------------------------------

    def _page_keys(self, key: list[int], extra_key: str | None) -> list[PageKey]:
        """Keys of every full page of ``key``, shallowest first."""
        num_pages = len(key) // self.page_size
        return [(extra_key, tuple(key[: k * self.page_size])) for k in range(1, num_pages + 1)]

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

    def page(self, prefix: list[int], extra_key: str | None = None) -> Page:
        """The page ending ``prefix`` (which must be cached)."""
        return self.pages[self._page_keys(prefix, extra_key)[-1]]

    # ---- operations -----------------------------------------------------------------------------

    def match_prefix(
        self, key: list[int], extra_key: str | None = None
    ) -> tuple[int, list[int], int]:
        """Returns ``(device tokens, their slots, host-only tokens)`` of the match; touches it."""
        matched = self._matched(key, extra_key)
        self._touch(matched)
        slots = [
            s for k in matched if self.pages[k].device is not None for s in self.pages[k].device
        ]
        host_only = sum(self.pages[k].device is None for k in matched) * self.page_size
        return len(slots), slots, host_only

    def insert(
        self, key: list[int], value: list[int], extra_key: str | None = None
    ) -> tuple[int, int, int]:
        """Caches the pages of ``key``; new and host-only pages take their slots from ``value``.

        Stops at the first load-pending or load-failed page.

        Returns:
            ``(prefix_len, adopted_len, cached_len)``: tokens already on device (their slots in
            ``value`` are unused), tokens of host-only pages that took their slots from ``value``,
            and tokens of ``key`` cached (all its whole pages, or up to the stop).
        """
        assert len(key) == len(value)
        prefix_len = adopted_len = 0
        walked = []
        for k, page_key in enumerate(self._page_keys(key, extra_key)):
            slots = list(value[k * self.page_size : (k + 1) * self.page_size])
            page = self.pages.get(page_key)
            if page is not None and (page.load_pending or page.load_failed):
                break
            walked.append(page_key)
            if page is None:
                self.pages[page_key] = Page(slots, tick=0)
                continue
            page.hit_count += 1
            if page.device is None:
                page.device = slots
                adopted_len += self.page_size
            else:
                prefix_len += self.page_size
        self._touch(walked)
        return prefix_len, adopted_len, len(walked) * self.page_size

    def lock(self, prefix: list[int], extra_key: str | None = None) -> int:
        """Locks every page of ``prefix`` (cached, on device); returns tokens made protected."""
        num_newly_locked = 0
        for page_key in self._page_keys(prefix, extra_key):
            page = self.pages[page_key]
            assert page.device is not None, page_key
            num_newly_locked += page.lock_count == 0
            page.lock_count += 1
        return num_newly_locked * self.page_size

    def unlock(self, prefix: list[int], extra_key: str | None = None) -> int:
        """Undoes :meth:`lock`, deepest page first: a page left unlocked is touched, or demoted if
        load-failed; returns tokens made evictable."""
        num_unlocked = 0
        for page_key in reversed(self._page_keys(prefix, extra_key)):
            page = self.pages[page_key]
            assert page.lock_count > 0, page_key
            page.lock_count -= 1
            if page.lock_count > 0:
                continue
            if page.load_failed:
                self._demote_failed(page_key)
                continue
            self.tick += 1
            page.tick = self.tick
            num_unlocked += 1
        return num_unlocked * self.page_size

    def _demote_failed(self, page_key: PageKey) -> None:
        page = self.pages[page_key]
        assert page.device is not None and page.host is not None
        assert not any(self.pages[c].device is not None for c in self._children(page_key))
        self.failed_load_slots.extend(page.device)
        page.device = None
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

    def commit_backup(self, page_keys: list[PageKey], host: list[int]) -> None:
        """Gives ``page_keys`` (root-first) the host slots ``host``, a page at a time."""
        assert len(host) == len(page_keys) * self.page_size
        for i, page_key in enumerate(page_keys):
            page = self.pages[page_key]
            assert page.device is not None and page.host is None
            page.host = list(host[i * self.page_size : (i + 1) * self.page_size])

    def abort_backup(self, page_keys: list[PageKey]) -> list[int]:
        """A failed backup: ``page_keys`` lose their host slots, which are returned."""
        freed: list[int] = []
        for page_key in page_keys:
            page = self.pages[page_key]
            assert page.device is not None and page.host is not None
            freed.extend(page.host)
            page.host = None
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
        ack); touches ``prefix``."""
        plan = self.load_back_plan(prefix, extra_key)
        assert len(device) == len(plan) * self.page_size
        for i, page_key in enumerate(plan):
            page = self.pages[page_key]
            page.device = list(device[i * self.page_size : (i + 1) * self.page_size])
            page.load_pending = True
        self._touch(self._page_keys(prefix, extra_key))

    def evict(self, num_tokens: int, write_back: bool = False) -> EvictOutcome:
        """Evicts ``ceil(num_tokens / page_size)`` device pages (see the module docstring)."""
        out = EvictOutcome()
        for _ in range(-(-num_tokens // self.page_size)):
            device_parents = {
                (extra, tokens[: -self.page_size])
                for (extra, tokens), page in self.pages.items()
                if page.device is not None
            }
            leaves = [
                k
                for k, page in self.pages.items()
                if page.device is not None and page.lock_count == 0 and k not in device_parents
            ]
            if not leaves:
                break
            victim = min(leaves, key=lambda k: self.pages[k].tick)
            page = self.pages[victim]
            if page.host is not None:
                out.device_freed.extend(page.device)
                page.device = None
                out.demoted_tokens += self.page_size
                if page.host_lock_count == 0:
                    self._touch([victim])
                continue
            if write_back:
                out.needs_backup = victim
                break
            subtree = self._subtree(victim)
            if any(self.pages[k].host_lock_count > 0 for k in subtree):
                break
            out.device_freed.extend(page.device)
            out.dropped_tokens += self.page_size
            for k in subtree:
                dropped = self.pages.pop(k)
                if k != victim:
                    assert dropped.device is None
                    out.host_freed.extend(dropped.host)
        return out

    def evict_host(self, num_tokens: int) -> list[int]:
        """Evicts ``ceil(num_tokens / page_size)`` host-only pages; returns their host slots."""
        freed: list[int] = []
        for _ in range(-(-num_tokens // self.page_size)):
            parents = {(extra, tokens[: -self.page_size]) for extra, tokens in self.pages}
            leaves = [
                k
                for k, page in self.pages.items()
                if page.device is None and page.host_lock_count == 0 and k not in parents
            ]
            if not leaves:
                break
            victim = min(leaves, key=lambda k: self.pages[k].tick)
            freed.extend(self.pages.pop(victim).host)
        return freed

    def reset(self) -> list[int]:
        """Drops every page; returns all their device slots (and failed-load slots not taken)."""
        assert all(p.lock_count == 0 and p.host_lock_count == 0 for p in self.pages.values())
        slots = self.all_slots() + self.take_failed_load_slots()
        self.pages.clear()
        return slots

    # ---- observation ----------------------------------------------------------------------------

    def all_slots(self) -> list[int]:
        return [s for page in self.pages.values() if page.device is not None for s in page.device]

    def all_host_slots(self) -> list[int]:
        return [s for page in self.pages.values() if page.host is not None for s in page.host]

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
