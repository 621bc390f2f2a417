"""Host-side page bookkeeping of the continuous engine: which pages of the paged KV cache
(``drift_jax.models.paged``) hold which tokens of which episode.

``PagePool`` hands out page ids with reference counts, so the K samples of a prompt can
share its pages and an episode can keep its pages between turns. ``EpisodeCaches``
decides what a request reuses: its episode's pages from the previous turn (kept while
the episode waits for its next turn, dropped least recently used first when pages run
short) or its prompt's shared pages, up to the longest prefix still valid. A cache is
only ever a saving, never needed for correctness: a dropped one is rebuilt by prefill.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Sequence

import numpy as np

from drift_jax.rollout.interface import Request


class PoolExhausted(RuntimeError):
    """No free pages left; the caller may free (evict) some and retry."""


class PagePool:
    """Allocator of page ids 1..num_pages-1 with reference counts (page 0 is the trash
    page that padding writes to: ``paged.TRASH_PAGE``)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs >= 2 pages (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.refs = np.zeros(num_pages, np.int32)
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"{n} pages wanted, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self.refs[pages] = 1
        return pages

    def share(self, pages) -> None:
        for p in pages:
            self.refs[p] += 1

    def release(self, pages) -> None:
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self._free.append(p)
            elif self.refs[p] < 0:
                raise RuntimeError(f"page {p} released more often than taken")


@dataclasses.dataclass
class CachedPages:
    """An episode's (or a shared prompt's) pages and the tokens they hold."""

    pages: list
    tokens: list
    remaining: int = 0  # shared prompts: samples still to take a copy


class EpisodeCaches:
    """The pool and the caches it holds besides the running requests': episodes waiting
    between turns (evictable, least recently used first) and shared prompts (evicted
    after them: their samples still to come prefill the prompt themselves)."""

    def __init__(self, num_pages: int, page_size: int):
        self.pool = PagePool(num_pages)
        self.page_size = page_size
        self.waiting: collections.OrderedDict = collections.OrderedDict()
        self.shared: dict = {}
        self.evictions = 0
        self._new_prompts: list = []

    def pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.page_size)

    def allocate(self, n: int) -> list:
        """``n`` pages, dropping caches if needed (waiting episodes, then shared prompts)."""
        while self.pool.free < n and self.waiting:
            _, victim = self.waiting.popitem(last=False)
            self.pool.release(victim.pages)
            self.evictions += 1
        while self.pool.free < n and self.shared:
            _, victim = self.shared.popitem()
            self.pool.release(victim.pages)
            self.evictions += 1
        return self.pool.allocate(n)

    def claim(self, req: Request) -> tuple[CachedPages, int]:
        """The pages ``req`` runs in: the cache it extends, cut to the longest prefix of
        its context still valid, plus new pages up to context + budget. Returns (the
        request's cache, holding ``req.tokens``; ``keep``, how many of them its pages
        already hold). Raises ``PoolExhausted`` with nothing claimed (the valid prefix
        of the episode's cache waits for a later try)."""
        ps = self.page_size
        cache = self._cache_for(req)
        keep = common_prefix(cache.tokens, req.tokens, len(req.tokens) - 1)
        if keep % ps and self.pool.refs[cache.pages[keep // ps]] > 1:
            keep -= keep % ps  # never write into a page another sequence reads
        kept = cache.pages[:self.pages_for(keep)]
        self.pool.release(cache.pages[len(kept):])
        try:
            new = self.allocate(self.pages_for(len(req.tokens) + req.budget) - len(kept))
        except PoolExhausted:
            self.waiting[req.episode] = CachedPages(kept, list(req.tokens[:keep]))
            raise
        return CachedPages(kept + new, list(req.tokens)), keep

    def new_prompts(self) -> list[tuple[int, list, list]]:
        """(turn, pages, tokens) of the shared prompts created since the last call: to
        prefill before any request reads them."""
        created, self._new_prompts = self._new_prompts, []
        return created

    def _cache_for(self, req: Request) -> CachedPages:
        """The cache a request extends: its episode's, a shared prompt's (created if new:
        ``new_prompts``), or an empty one."""
        if req.episode in self.waiting:
            return self.waiting.pop(req.episode)
        if req.share is None:
            return CachedPages([], [])
        entry = self.shared.get(req.share)
        n_shared = (len(req.tokens) - 1) // self.page_size * self.page_size
        if entry is None and n_shared:
            pages = self.allocate(self.pages_for(n_shared))
            entry = self.shared[req.share] = CachedPages(pages, list(req.tokens[:n_shared]))
            entry.remaining = req.share_count
            self._new_prompts.append((req.key_ids[0], pages, req.tokens[:n_shared]))
        if entry is None:
            return CachedPages([], [])
        self.pool.share(entry.pages)
        entry.remaining -= 1
        cache = CachedPages(list(entry.pages), list(entry.tokens))
        if entry.remaining <= 0:  # every sample has its copy: the entry lets go
            self.pool.release(entry.pages)
            del self.shared[req.share]
        return cache

    def close_turn(self, cache: CachedPages, reply: list) -> None:
        """A finished turn's cache holds its context + reply; pages past them go back."""
        cache.tokens = cache.tokens + reply
        keep_pages = self.pages_for(len(cache.tokens))
        self.pool.release(cache.pages[keep_pages:])
        cache.pages = cache.pages[:keep_pages]

    def park(self, episode: int, cache: CachedPages) -> None:
        """Keep an episode's cache for its next turn (evictable from now on)."""
        self.waiting[episode] = cache

    def release(self, cache: CachedPages) -> None:
        self.pool.release(cache.pages)

    def release_shared(self) -> None:
        for entry in self.shared.values():
            self.pool.release(entry.pages)
        self.shared.clear()


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
