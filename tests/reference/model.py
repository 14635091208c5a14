"""A slow, obviously-correct, page-level reference model of ``hicache._tree.RadixTree``.

The model has no nodes at all: it keeps one dict entry per cached page, keyed by
``(extra_key, tokens of the whole prefix up to and including that page)``. Prefix sharing, splits
and node ids do not exist here, so the differential tests compare only what a caller can observe:
matched slots, insert prefix lengths, lock deltas, sizes and the pages eviction frees.

LRU rule (the one ``RadixTree`` implements with one tick per node): every page touch takes the next
value of a global tick, and a touched path is touched deepest page first, so ancestors are more
recent. ``match_prefix`` and ``insert`` touch their whole page path; ``unlock`` touches the pages
whose lock count drops to 0. Nothing else touches. ``evict`` frees, one page at a time, the unlocked
leaf page (a page no cached page extends) with the smallest tick.
"""

from __future__ import annotations

from dataclasses import dataclass

PageKey = tuple[str | None, tuple[int, ...]]


@dataclass
class Page:
    """One cached page: the slots holding its KV, its last-touch tick, how many locks cover it."""

    slots: list[int]
    tick: int
    lock_count: int = 0


class ReferenceTree:
    """Page-level model of the device tier of ``RadixTree``.

    Args:
        page_size: Tokens per page; keys are floored to a multiple of it.
    """

    def __init__(self, page_size: int = 1) -> None:
        self.page_size = page_size
        self.pages: dict[PageKey, Page] = {}
        self.tick = 0

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
            if page_key not in self.pages:
                break
            matched.append(page_key)
        return matched

    def match_prefix(self, key: list[int], extra_key: str | None = None) -> tuple[int, list[int]]:
        """Returns ``(matched number of tokens, slots of the matched pages)``; touches them."""
        matched = self._matched(key, extra_key)
        self._touch(matched)
        slots = [slot for page_key in matched for slot in self.pages[page_key].slots]
        return len(slots), slots

    def insert(self, key: list[int], value: list[int], extra_key: str | None = None) -> int:
        """Caches the pages of ``key`` not cached yet with their slots from ``value``.

        Returns:
            The number of tokens that were already cached (their slots in ``value`` are unused).
        """
        assert len(key) == len(value)
        page_keys = self._page_keys(key, extra_key)
        prefix_len = len(self._matched(key, extra_key)) * self.page_size
        for k, page_key in enumerate(page_keys):
            if page_key not in self.pages:
                start = k * self.page_size
                self.pages[page_key] = Page(list(value[start : start + self.page_size]), tick=0)
        self._touch(page_keys)
        return prefix_len

    def lock(self, prefix: list[int], extra_key: str | None = None) -> int:
        """Locks every page of ``prefix`` (which must be cached); returns tokens made protected."""
        num_newly_locked = 0
        for page_key in self._page_keys(prefix, extra_key):
            page = self.pages[page_key]
            num_newly_locked += page.lock_count == 0
            page.lock_count += 1
        return num_newly_locked * self.page_size

    def unlock(self, prefix: list[int], extra_key: str | None = None) -> int:
        """Undoes :meth:`lock`; touches pages left unlocked; returns tokens made evictable."""
        unlocked = []
        for page_key in self._page_keys(prefix, extra_key):
            page = self.pages[page_key]
            assert page.lock_count > 0, page_key
            page.lock_count -= 1
            if page.lock_count == 0:
                unlocked.append(page_key)
        self._touch(unlocked)
        return len(unlocked) * self.page_size

    def lock_count(self, prefix: list[int], extra_key: str | None = None) -> int:
        """Lock count of the deepest page of ``prefix`` (0 for an empty prefix)."""
        page_keys = self._page_keys(prefix, extra_key)
        return self.pages[page_keys[-1]].lock_count if page_keys else 0

    def evict(self, num_tokens: int) -> list[int]:
        """Frees ``ceil(num_tokens / page_size)`` least-recently-touched unlocked leaf pages.

        Returns:
            The freed slots, page by page in eviction order.
        """
        num_pages = -(-num_tokens // self.page_size)
        freed: list[int] = []
        for _ in range(num_pages):
            parents = {(extra, tokens[: -self.page_size]) for extra, tokens in self.pages}
            leaves = [
                page_key
                for page_key, page in self.pages.items()
                if page.lock_count == 0 and page_key not in parents
            ]
            if not leaves:
                break
            victim = min(leaves, key=lambda page_key: self.pages[page_key].tick)
            freed.extend(self.pages.pop(victim).slots)
        return freed

    def reset(self) -> list[int]:
        """Drops every page; returns all their slots."""
        assert all(page.lock_count == 0 for page in self.pages.values())
        slots = self.all_slots()
        self.pages.clear()
        return slots

    def all_slots(self) -> list[int]:
        return [slot for page in self.pages.values() for slot in page.slots]

    def total_size(self) -> int:
        return len(self.pages) * self.page_size

    def protected_size(self) -> int:
        return sum(page.lock_count > 0 for page in self.pages.values()) * self.page_size

    def evictable_size(self) -> int:
        return self.total_size() - self.protected_size()
