"""The continuous rollout engine: a fixed set of decode slots fed from one queue of
(episode, turn) requests, over a paged KV cache that episodes keep between turns.

Why: with a static batch (``sampling.generate_batched``) every turn of every chunk
re-prefills whole dialogues and decodes until its slowest row stops, so in later turns
most rows are filler. Here:

- a slot is refilled as soon as its row stops, from the queue of next-turn requests
  (first) and new prompts (when the queue runs dry);
- a request prefills only what its episode's cache lacks: the longest common prefix of
  the cached tokens (last turn's context + reply) and the new context is kept, so turn
  t+1 prefills the feedback message and the generation prompt only. The K samples of a
  prompt share the prompt's full pages (prefilled once); each prefills the remainder.
  Prefill computes no logits: a request's last context token is its first decode step,
  which samples the first reply token among the rows being decoded anyway;
- decode runs up to ``steps_per_visit`` tokens per host visit in one compiled program
  (ending early once ``refill_after`` rows stopped while requests wait), and the
  host's work on finished turns (detokenise, verify, render) runs while the device
  decodes the next visit (JAX's asynchronous dispatch);
- when pages run out, the caches of episodes waiting between turns are dropped (least
  recently used first) and rebuilt by prefill when they come back: a cache is only ever
  a saving, never needed for correctness.

A token depends only on (seed, prompt hash, sample, turn, position in the reply), as in
the static sampler (``episodes.episode_keys``): the key is derived in the program from
those integers and folded with the reply position, so samples do not depend on slot
placement. Logits match the static sampler's to float rounding (attention over the same
keys in another order), so greedy tokens agree except at near-ties.

Compiled programs: one decode program per row bucket (``_row_bucket``: rows rounded up
to a multiple of ``num_slots // row_buckets``) and one prefill program per (row bucket, width) with two
widths (``prefill_chunk`` and a quarter of it); block tables have one width and
attention stops at each call's last live page inside the program, so context length
adds no program. A run of any size compiles a bounded set (``Engine.compiled_programs``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Callable, Hashable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drift_jax.models import paged
from drift_jax.rollout.sampling import SamplingParams, sample_token


@dataclasses.dataclass
class Request:
    """One turn of one episode.

    episode: the engine-wide id of the trajectory (whose cache the turn extends).
    tokens: the turn's whole context (dialogue + generation prompt + prefill).
    key_ids: (turn, prompt hash, sample index): with the engine's seed, the sampling key.
    budget: new tokens allowed.
    share: requests with the same ``share`` value and the same tokens (the K turn-1
      samples of a prompt) share the prompt's pages; ``share_count`` of them will come.
    """

    episode: int
    tokens: Sequence[int]
    key_ids: tuple[int, int, int]
    budget: int
    share: Hashable | None = None
    share_count: int = 1


ENGINES = ("continuous", "static")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Which sampler plays episodes, and the continuous engine's knobs.

    kind: "continuous" (this module) or "static" (``sampling.generate_batched``, one call
      per turn: the reference).
    num_slots: decode slots (None: the caller's batch size).
    page_size, num_pages, steps_per_visit, refill_after, row_buckets: as ``Engine``.
    """

    kind: str = "continuous"
    num_slots: int | None = None
    page_size: int = 16
    num_pages: int | None = None
    steps_per_visit: int = 8
    refill_after: int = 1
    row_buckets: int = 8

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise ValueError(f"engine {self.kind!r}: expected one of {ENGINES}")


def engine_options(engine, batch_size: int) -> EngineOptions:
    """``EngineOptions`` from a kind name or options, with ``num_slots`` filled in."""
    opts = EngineOptions(kind=engine) if isinstance(engine, str) else engine
    return opts if opts.num_slots else dataclasses.replace(opts, num_slots=batch_size)


@dataclasses.dataclass
class EngineStats:
    """Work done, device-independent. slot_utilization = useful decoded tokens / (rows
    decoded x decode steps, a request's first step included: ``context_steps`` of them
    feed a request's last context token, not a reply token); prefill_tokens counts the
    context tokens computed (by prefill, and each request's last one by its first
    decode step), prefill_padded_tokens those of the prefill calls with the padding of
    their compiled shapes, prompt_tokens the contexts of all requests (what a sampler
    without reuse prefills)."""

    num_slots: int
    decode_steps: int = 0
    slot_steps: int = 0  # rows decoded x steps (the rows of each visit's bucket)
    useful_tokens: int = 0
    context_steps: int = 0  # row steps feeding a request's last context token (one per request)
    prefill_tokens: int = 0
    prefill_padded_tokens: int = 0
    prompt_tokens: int = 0
    requests: int = 0
    evictions: int = 0
    prefill_tokens_by_turn: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens_by_turn: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def slot_utilization(self) -> float:
        return self.useful_tokens / max(1, self.slot_steps)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(slot_utilization=self.slot_utilization,
                 prefill_tokens_by_turn=dict(sorted(self.prefill_tokens_by_turn.items())),
                 prompt_tokens_by_turn=dict(sorted(self.prompt_tokens_by_turn.items())))
        return d


def request_key_data(seed: int, key_ids_n3: np.ndarray, rows: int | None = None) -> np.ndarray:
    """``[N, 2]`` uint32 key data for (turn, prompt hash, sample) rows: the same bits as
    ``episodes.episode_keys`` (fold_in of turn, then hash, then sample). Rows are padded
    to ``rows`` (None: a power of two), so that admitting any number of requests
    compiles one program (or few)."""
    n = len(key_ids_n3)
    padded_n3 = np.zeros((rows or _pow2(n), 3), np.uint32)
    padded_n3[:n] = key_ids_n3
    # Sliced on the host: slicing the device array would compile a program per ``n``.
    return np.asarray(_key_data(jnp.asarray(seed, jnp.uint32), padded_n3))[:n]


@jax.jit
def _key_data(seed, key_ids_n3):
    def one(ids):
        k = jax.random.fold_in(jax.random.key(seed), ids[0])
        return jax.random.key_data(jax.random.fold_in(jax.random.fold_in(k, ids[1]), ids[2]))

    return jax.vmap(one)(key_ids_n3)


class _Graph:
    """A graphdef as a static jit argument whose hash is computed once: jit hashes its
    static arguments on every call, and hashing a model's graphdef walks every node
    (about half a millisecond a call on CPU, paid by each of a run's many visits)."""

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return other is self or (isinstance(other, _Graph) and self.graphdef == other.graphdef)


@functools.partial(jax.jit, static_argnames=("graph",), donate_argnames=("cache",))
def _prefill(graph: _Graph, state, cache, tokens_nt, start_n, len_n, block_tables_nm):
    """Write the keys and values of ``len_n`` tokens per row, at positions ``start_n..``,
    into the rows' pages. Computes no logits: a request's last context token is its
    first decode step (``_decode``), which samples the first reply token, so a prefill
    costs no ``[N, V]`` head and no sampling, and a row whose cache lacks only that last
    token needs no prefill at all."""
    model = nnx.merge(graph.graphdef, state)
    offsets_t = jnp.arange(tokens_nt.shape[1])
    positions_nt = start_n[:, None] + offsets_t
    valid_nt = offsets_t[None, :] < len_n[:, None]
    _, cache = model.paged_hidden(tokens_nt, cache, block_tables_nm, positions_nt, valid_nt)
    return cache


@functools.partial(jax.jit, static_argnames=("graph", "params", "n_steps"), donate_argnames=("cache",))
def _decode(graph: _Graph, state, cache, tok_r, lp_r, keydata_r2, block_tables_rm, length_r, step_r, budget_r,
            active_r, exit_after, *, params: SamplingParams, n_steps: int):
    """Up to ``n_steps`` decode steps of ``R`` rows (a bucket of the active slots, so a
    draining queue decodes fewer rows). A row feeds its next token ``tok_r``, writes its
    keys at position ``length_r`` and samples the following token from the new logits
    with the key of its reply position; it stops at a stop token or its budget. A new
    request enters with ``step_r = -1`` and its context's last token, so its first step
    finishes the prefill and samples reply token 0. What crosses visits is each row's
    next token (sampled, not yet fed) and its log-prob, never a ``[R, V]`` logits array.
    The visit ends early once ``exit_after`` rows have stopped (a traced scalar: the host
    asks for it when requests wait for a slot), so a stopped row does not idle to the
    visit's end. Returns (cache, reply tokens ``[R, n]`` and log-probs ``[R, n]`` taken
    this visit (row r's in its first columns), next tokens ``[R]``, their log-probs
    ``[R]``, steps ``[R]`` after the visit, stopped ``[R]``, steps run)."""
    model = nnx.merge(graph.graphdef, state)
    keys_r = jax.random.wrap_key_data(keydata_r2)
    stop_ids = jnp.asarray(params.stop_ids or (-1,), jnp.int32)
    r = tok_r.shape[0]
    rows_r = jnp.arange(r)
    first_r = jnp.maximum(step_r, 0)  # reply position of this visit's first column

    def cond(carry):
        i, live_r = carry[0], carry[-3]
        return (i < n_steps) & jnp.any(live_r) & (jnp.sum(active_r & ~live_r) < exit_after)

    def body(carry):
        i, cache, tok_r, lp_r, length_r, step_r, live_r, tok_rn, lp_rn = carry
        hidden_r1d, cache = model.paged_hidden(tok_r[:, None], cache, block_tables_rm, length_r[:, None],
                                               live_r[:, None])
        reply_r = step_r >= 0  # else tok_r is the context's last token: not a reply token
        col_r = jnp.where(live_r & reply_r, step_r - first_r, n_steps)  # n_steps: dropped
        tok_rn = tok_rn.at[rows_r, col_r].set(tok_r, mode="drop")
        lp_rn = lp_rn.at[rows_r, col_r].set(lp_r, mode="drop")
        step_r = step_r + live_r
        length_r = length_r + live_r
        live_r = live_r & ~(reply_r & jnp.isin(tok_r, stop_ids)) & (step_r < budget_r)
        new_tok_r, new_lp_r = sample_token(model.logits(hidden_r1d[:, 0]).astype(jnp.float32),
                                           jax.vmap(jax.random.fold_in)(keys_r, step_r), params)
        tok_r, lp_r = jnp.where(live_r, new_tok_r, tok_r), jnp.where(live_r, new_lp_r, lp_r)
        return i + 1, cache, tok_r, lp_r, length_r, step_r, live_r, tok_rn, lp_rn

    live_r = active_r & (step_r < budget_r)
    init = (jnp.zeros((), jnp.int32), cache, tok_r, lp_r, length_r, step_r, live_r,
            jnp.zeros((r, n_steps), jnp.int32), jnp.zeros((r, n_steps), jnp.float32))
    n_run, cache, tok_r, lp_r, _, step_end_r, live_r, tok_rn, lp_rn = jax.lax.while_loop(cond, body, init)
    return cache, tok_rn, lp_rn, tok_r, lp_r, step_end_r, active_r & ~live_r, n_run


def _row_bucket(n: int, num_slots: int, row_buckets: int) -> int:
    """Rows computed for ``n`` rows of work (decode: the active slots; prefill: the
    requests admitted): the next multiple of ``num_slots // row_buckets``. Each row
    shape is a compile (on CPU about as long as a hundred decode steps of a small model;
    on an accelerator tens of seconds at 3B); at most that many rows compute idle, which
    happens while the queue drains and when few requests are admitted at once."""
    unit = max(1, num_slots // row_buckets)
    return min(num_slots, -(-max(1, n) // unit) * unit)


def _pow2(n: int, floor: int = 4) -> int:
    """The power-of-two bucket of ``n``, at least ``floor``: few distinct shapes, so few
    compiles (each costs seconds), for little padding."""
    return max(floor, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class _Cache:
    """An episode's (or a shared prompt's) pages and the tokens they hold."""

    pages: list
    tokens: list
    remaining: int = 0  # shared prompts: samples still to take a copy


class Engine:
    """Continuous batching over a paged cache for one model and one ``SamplingParams``.

    Args:
      model: the policy (in its sampling dtype).
      params: sampling parameters (temperature 0 = greedy).
      seed: with each request's ``key_ids``, the sampling keys.
      num_slots: rows decoded together.
      page_size: tokens per page.
      num_pages: size of the pool (None: every slot can hold min(max_len, 2,048)
        tokens); caches of episodes between turns are dropped when it runs short.
      steps_per_visit: decode steps per compiled call at most (the host looks in between).
      refill_after: a visit ends early once this many of its rows have stopped while
        requests wait for a slot (1: a slot is refilled at the next step; larger: fewer
        host round trips, for accelerators where a visit's launch is costly).
      row_buckets: row shapes per program: decode and prefill compute a multiple of
        ``num_slots // row_buckets`` rows (fewer shapes: fewer compiles, more idle rows
        while the queue drains).
      prefill_chunk: tokens per prefill call (longer prefills run in chunks): with a
        quarter of it for short prefills, the only two prefill widths compiled.
      max_len: context limit (None: the model's): a request whose context + budget
        exceeds it is an error.
    """

    def __init__(self, model, params: SamplingParams, *, seed: int, num_slots: int = 64, page_size: int = 16,
                 num_pages: int | None = None, steps_per_visit: int = 8, refill_after: int = 1,
                 row_buckets: int = 8, prefill_chunk: int = 128, max_len: int | None = None):
        if min(num_slots, page_size, steps_per_visit, refill_after, row_buckets) < 1 or prefill_chunk < 4:
            raise ValueError("num_slots, page_size, steps_per_visit, refill_after and row_buckets must be "
                             ">= 1, prefill_chunk >= 4")
        self.row_buckets = row_buckets
        self.prefill_chunk = prefill_chunk
        self.refill_after = refill_after
        graphdef, self.state = nnx.split(model)
        self.graph = _Graph(graphdef)
        self.cfg = model.cfg
        self.params = params
        self.seed = seed
        self.num_slots = num_slots
        self.page_size = page_size
        self.max_len = max_len or self.cfg.max_position_embeddings
        # A visit cannot run past a reply's end, so a short budget shortens the visit.
        self.steps_per_visit = min(steps_per_visit, max(1, params.max_new_tokens))
        self.max_pages = math.ceil(self.max_len / page_size)
        # Block tables have one width for every program (attention stops at a row's last
        # live page in the program itself), a multiple of the Pallas kernel's 8-page block.
        self.table_width = -(-self.max_pages // paged.CHUNK_PAGES) * paged.CHUNK_PAGES
        if num_pages is None:
            num_pages = num_slots * min(self.max_pages, math.ceil(2048 / page_size)) + 1
        self.pool = paged.PagePool(num_pages)
        self.cache = paged.PagedKV.zeros(self.cfg, num_pages, page_size)
        self.stats = EngineStats(num_slots)

    @property
    def compiled_programs(self) -> int:
        """Programs compiled so far by the engine's prefill and decode (all engines)."""
        return _prefill._cache_size() + _decode._cache_size()

    # -- host bookkeeping ----------------------------------------------------------------
    def _pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.page_size)

    def _allocate(self, n: int, waiting: collections.OrderedDict, shared: dict) -> list:
        """``n`` pages, dropping if needed the caches of waiting episodes (oldest first),
        then shared prompts (their samples still to come prefill the prompt themselves)."""
        while self.pool.free < n and waiting:
            _, victim = waiting.popitem(last=False)
            self.pool.release(victim.pages)
            self.stats.evictions += 1
        while self.pool.free < n and shared:
            _, victim = shared.popitem()
            self.pool.release(victim.pages)
            self.stats.evictions += 1
        return self.pool.allocate(n)

    def run(self, source: Iterable[list[Request]],
            on_finish: Callable[[Request, list, np.ndarray], list[Request]]) -> EngineStats:
        """Serve every request ``source`` yields (in lists, e.g. one prompt group each,
        pulled only when slots would otherwise idle) and every follow-up that
        ``on_finish(request, reply_ids, logps)`` returns. A follow-up for the same
        episode extends its cache; an episode without one is forgotten."""
        s_count, ps = self.num_slots, self.page_size
        source = iter(source)
        exhausted = False
        queue: collections.deque = collections.deque()
        slot_req: list = [None] * s_count
        slot_cache: list = [None] * s_count
        replies: list = [[] for _ in range(s_count)]
        logps: list = [[] for _ in range(s_count)]
        # Caches of episodes between turns (evictable, LRU order) and of shared prompts.
        waiting: collections.OrderedDict = collections.OrderedDict()
        shared: dict = {}
        block_tables_sm = np.zeros((s_count, self.table_width), np.int32)
        # Each slot's next token to feed (a new request's: its context's last one) and its log-prob.
        tok_s = np.zeros(s_count, np.int32)
        lp_s = np.zeros(s_count, np.float32)
        length_s = np.zeros(s_count, np.int32)
        step_s = np.zeros(s_count, np.int32)
        budget_s = np.zeros(s_count, np.int32)
        active_s = np.zeros(s_count, bool)
        keydata_s2 = np.zeros((s_count, 2), np.uint32)
        finished: list = []

        def admit():
            """Move queued requests into free slots and prefill what their caches lack."""
            nonlocal exhausted
            free = [s for s in range(s_count) if slot_req[s] is None]
            while not exhausted and len(queue) < len(free):
                try:
                    queue.extend(next(source))
                except StopIteration:
                    exhausted = True
            rows, prefix_rows, taken = [], [], []
            for s in free:
                if not queue:
                    break
                req = queue[0]
                need = len(req.tokens) + req.budget
                if need > self.max_len:
                    raise ValueError(f"episode {req.episode}: context of {len(req.tokens)} tokens + "
                                     f"{req.budget} new > max_len {self.max_len}")
                if len(req.tokens) == 0:
                    raise ValueError(f"episode {req.episode}: empty context")
                try:
                    cache = self._cache_for(req, waiting, shared, prefix_rows)
                except paged.PoolExhausted:
                    break
                keep = _common_prefix(cache.tokens, req.tokens, len(req.tokens) - 1)
                if keep % ps and self.pool.refs[cache.pages[keep // ps]] > 1:
                    keep -= keep % ps  # never write into a page another sequence reads
                kept = cache.pages[:self._pages_for(keep)]
                self.pool.release(cache.pages[len(kept):])
                try:
                    new = self._allocate(self._pages_for(need) - len(kept), waiting, shared)
                except paged.PoolExhausted:
                    # Keep the still-valid prefix for when running slots have freed pages.
                    waiting[req.episode] = _Cache(kept, list(req.tokens[:keep]))
                    if not any(r is not None for r in slot_req) and not rows and not finished:
                        raise RuntimeError(f"page pool of {self.pool.num_pages} pages is too small "
                                           f"for one request of {need} tokens") from None
                    break
                queue.popleft()
                slot_req[s], slot_cache[s] = req, _Cache(kept + new, list(req.tokens))
                rows.append((s, req, keep))
                taken.append(s)
            if prefix_rows:
                self._run_prefill(prefix_rows)
            if rows:
                keydata_s2[taken] = np.asarray(request_key_data(
                    self.seed, np.asarray([slot_req[s].key_ids for s in taken], np.int64), rows=s_count))
                # All but the last context token: that one is the slot's first decode step.
                to_fill = [(slot_cache[s].pages, req.tokens[:-1], keep) for s, req, keep in rows
                           if keep < len(req.tokens) - 1]
                if to_fill:
                    self._run_prefill(to_fill)
                for s, req, keep in rows:
                    turn = req.key_ids[0]
                    self.stats.requests += 1
                    self.stats.prompt_tokens += len(req.tokens)
                    self.stats.prompt_tokens_by_turn[turn] += len(req.tokens)
                    self._count_prefill(turn, len(req.tokens) - keep)
                    block_tables_sm[s] = 0
                    block_tables_sm[s, :len(slot_cache[s].pages)] = slot_cache[s].pages
                    tok_s[s], lp_s[s] = req.tokens[-1], 0.0
                    length_s[s], step_s[s], budget_s[s], active_s[s] = len(req.tokens) - 1, -1, req.budget, True
                    replies[s], logps[s] = [], []

        while True:
            admit()
            outputs = None
            if active_s.any():
                live = np.flatnonzero(active_s)
                n_rows = _row_bucket(len(live), s_count, self.row_buckets)
                idle = np.flatnonzero(~active_s)[:n_rows - len(live)]
                rows = np.concatenate([live, idle])  # idle rows are inactive: they change nothing
                # End the visit at the first stopped rows only when a request could take their slots.
                refill = bool(queue) or bool(finished) or not exhausted
                exit_after = np.int32(self.refill_after if refill else n_rows + 1)
                self.cache, *outputs = _decode(
                    self.graph, self.state, self.cache, tok_s[rows], lp_s[rows], keydata_s2[rows],
                    block_tables_sm[rows], length_s[rows], step_s[rows], budget_s[rows], active_s[rows],
                    exit_after, params=self.params, n_steps=self.steps_per_visit)
            # Host work on the last visit's finished turns while the device decodes.
            for s_req, s_cache, reply, lp in finished:
                follow = on_finish(s_req, reply, lp)
                queue.extend(follow)
                if any(f.episode == s_req.episode for f in follow):
                    waiting[s_req.episode] = s_cache
                else:
                    self.pool.release(s_cache.pages)
            finished = []
            if outputs is None:
                if exhausted and not queue:
                    break
                continue
            tok_rn, lp_rn, next_tok_r, next_lp_r, step_end_r, stopped_r, n_run = jax.device_get(outputs)
            self.stats.decode_steps += int(n_run)
            self.stats.slot_steps += len(rows) * int(n_run)
            for r, s in enumerate(live):
                n = int(step_end_r[r] - max(step_s[s], 0))  # reply tokens taken (not the context's last)
                self.stats.useful_tokens += n
                self.stats.context_steps += int(step_s[s] < 0 < step_end_r[r] - step_s[s])
                replies[s].extend(tok_rn[r, :n].tolist())
                logps[s].append(lp_rn[r, :n])
                length_s[s] += step_end_r[r] - step_s[s]
                step_s[s] = step_end_r[r]
                tok_s[s], lp_s[s] = next_tok_r[r], next_lp_r[r]
                if stopped_r[r]:
                    cache = slot_cache[s]
                    cache.tokens = cache.tokens + replies[s]
                    keep_pages = self._pages_for(len(cache.tokens))
                    self.pool.release(cache.pages[keep_pages:])
                    cache.pages = cache.pages[:keep_pages]
                    finished.append((slot_req[s], cache, replies[s], np.concatenate(logps[s])))
                    slot_req[s], slot_cache[s], active_s[s] = None, None, False
                    length_s[s] = 0  # an idle row's position: attention reads its first page only
        self._release_shared(shared)
        return self.stats

    def _cache_for(self, req: Request, waiting, shared, prefix_rows) -> _Cache:
        """The cache a request extends: its episode's, a shared prompt's (prefilled now
        if new), or an empty one."""
        if req.episode in waiting:
            return waiting.pop(req.episode)
        if req.share is None:
            return _Cache([], [])
        entry = shared.get(req.share)
        n_shared = (len(req.tokens) - 1) // self.page_size * self.page_size
        if entry is None and n_shared:
            pages = self._allocate(self._pages_for(n_shared), waiting, shared)
            entry = shared[req.share] = _Cache(pages, list(req.tokens[:n_shared]))
            entry.remaining = req.share_count
            prefix_rows.append((pages, req.tokens[:n_shared], 0))
            self._count_prefill(req.key_ids[0], n_shared)
        if entry is None:
            return _Cache([], [])
        self.pool.share(entry.pages)
        entry.remaining -= 1
        cache = _Cache(list(entry.pages), list(entry.tokens))
        if entry.remaining <= 0:  # every sample has its copy: the entry lets go
            self.pool.release(entry.pages)
            del shared[req.share]
        return cache

    def _release_shared(self, shared) -> None:
        for entry in shared.values():
            self.pool.release(entry.pages)
        shared.clear()

    def _count_prefill(self, turn: int, n_tokens: int) -> None:
        """Context tokens computed for a request of ``turn`` (by prefill, or its last one
        by the first decode step)."""
        self.stats.prefill_tokens += n_tokens
        self.stats.prefill_tokens_by_turn[turn] += n_tokens

    def _run_prefill(self, rows) -> None:
        """Prefill rows of (pages, tokens, keep): tokens[keep:] at positions keep.. into
        the pages. Calls have two widths only (``prefill_chunk`` and a quarter of it, for
        the short prefills of later turns): a longer prefill runs chunk by chunk, so
        prefill compiles one program per row bucket and width, whatever the lengths."""
        n = _row_bucket(len(rows), self.num_slots, self.row_buckets)
        longest = max(len(toks) - keep for _, toks, keep in rows)
        t = self.prefill_chunk // 4 if longest <= self.prefill_chunk // 4 else self.prefill_chunk
        tables_nm = np.zeros((n, self.table_width), np.int32)
        for i, (pages, _, _) in enumerate(rows):
            tables_nm[i, :len(pages)] = pages
        for c0 in range(0, longest, t):
            tokens_nt = np.zeros((n, t), np.int32)
            start_n = np.zeros(n, np.int32)
            len_n = np.zeros(n, np.int32)
            for i, (_, toks, keep) in enumerate(rows):
                piece = toks[keep + c0:keep + c0 + t]
                tokens_nt[i, :len(piece)] = piece
                start_n[i], len_n[i] = keep + c0, len(piece)
            self.stats.prefill_padded_tokens += n * t
            self.cache = _prefill(self.graph, self.state, self.cache, tokens_nt, start_n, len_n, tables_nm)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
