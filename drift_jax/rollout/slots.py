"""Host-side state of the continuous engine's decode rows: the queue of requests waiting
for a slot, and per slot the request it serves and what the decode program reads.

A slot's life: ``start`` (a request is admitted: its context's last token is the first
one to feed, at reply step -1), ``advance`` after every decode visit (the reply grows,
the next token and its position move on), ``stop`` once the reply ended (the slot is
free again; its row may still be computed, inactive, as padding of a row bucket).
"""

from __future__ import annotations

import collections
from typing import Iterable

import numpy as np

from drift_jax.rollout.interface import Request
from drift_jax.rollout.page_pool import CachedPages


class RequestQueue:
    """Requests waiting for a slot, in arrival order: follow-ups as their turns finish,
    and the source's lists, pulled only when slots would otherwise idle."""

    def __init__(self, source: Iterable[list[Request]]):
        self._source = iter(source)
        self.waiting: collections.deque = collections.deque()
        self.exhausted = False

    def pull(self, n: int) -> None:
        """Pull from the source until ``n`` requests wait (or it runs dry)."""
        while not self.exhausted and len(self.waiting) < n:
            try:
                self.waiting.extend(next(self._source))
            except StopIteration:
                self.exhausted = True

    def more_may_come(self) -> bool:
        """True while a request waits or the source may still yield one."""
        return bool(self.waiting) or not self.exhausted


class Slots:
    """``n`` decode rows. Per slot, on the host: the request (None: free), its cache, the
    reply and log-probs so far. As ``[S]`` arrays, what the decode program reads: the
    next token to feed and its log-prob, the position it is written at, the reply step
    (-1: the context's last token is still to feed), the budget, whether the slot is
    active, the sampling key ``[S, 2]`` and the block table ``[S, M]``."""

    def __init__(self, n: int, table_width: int):
        self.req: list = [None] * n
        self.cache: list = [None] * n
        self.reply: list = [[] for _ in range(n)]
        self.logps: list = [[] for _ in range(n)]
        self.tok_s = np.zeros(n, np.int32)
        self.lp_s = np.zeros(n, np.float32)
        self.length_s = np.zeros(n, np.int32)
        self.step_s = np.zeros(n, np.int32)
        self.budget_s = np.zeros(n, np.int32)
        self.active_s = np.zeros(n, bool)
        self.keydata_s2 = np.zeros((n, 2), np.uint32)
        self.tables_sm = np.zeros((n, table_width), np.int32)

    def free(self) -> list[int]:
        return [s for s, req in enumerate(self.req) if req is None]

    def busy(self) -> bool:
        return any(req is not None for req in self.req)

    def start(self, s: int, req: Request, cache: CachedPages, keydata_2: np.ndarray) -> None:
        """Slot ``s`` serves ``req``, whose pages hold all but (at most) its last
        context token: that one is fed by the first decode step, which samples reply
        token 0."""
        self.req[s], self.cache[s] = req, cache
        self.reply[s], self.logps[s] = [], []
        self.keydata_s2[s] = keydata_2
        self.tables_sm[s] = 0
        self.tables_sm[s, :len(cache.pages)] = cache.pages
        self.tok_s[s], self.lp_s[s] = req.tokens[-1], 0.0
        self.length_s[s], self.step_s[s] = len(req.tokens) - 1, -1
        self.budget_s[s], self.active_s[s] = req.budget, True

    def decode_inputs(self, rows: np.ndarray) -> tuple:
        """The decode program's per-row inputs for slots ``rows``: tokens, log-probs, key
        data, block tables, positions, steps, budgets, active."""
        return (self.tok_s[rows], self.lp_s[rows], self.keydata_s2[rows], self.tables_sm[rows],
                self.length_s[rows], self.step_s[rows], self.budget_s[rows], self.active_s[rows])

    def advance(self, s: int, tok_n: np.ndarray, lp_n: np.ndarray, next_tok, next_lp, step_end) -> tuple[int, int]:
        """Slot ``s`` after a visit that left it at reply step ``step_end``: its new reply
        tokens and log-probs are the first of ``tok_n``/``lp_n``, its next token to feed
        ``next_tok``. Returns (reply tokens taken, 1 if the visit fed the context's last
        token, else 0)."""
        step = self.step_s[s]
        n = int(step_end - max(step, 0))  # reply tokens taken (not the context's last)
        fed_context = int(step < 0 < step_end - step)
        self.reply[s].extend(tok_n[:n].tolist())
        self.logps[s].append(lp_n[:n])
        self.length_s[s] += step_end - step
        self.step_s[s] = step_end
        self.tok_s[s], self.lp_s[s] = next_tok, next_lp
        return n, fed_context

    def stop(self, s: int) -> tuple[Request, CachedPages, list, np.ndarray]:
        """Free slot ``s``: (its request, cache, reply ids, their log-probs)."""
        done = (self.req[s], self.cache[s], self.reply[s], np.concatenate(self.logps[s]))
        self.req[s], self.cache[s], self.active_s[s] = None, None, False
        self.length_s[s] = 0  # an idle row's position: attention reads its first page only
        return done
