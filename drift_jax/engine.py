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
  prompt share the prompt's full pages (prefilled once); each prefills the remainder;
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

from drift_jax import paged
from drift_jax.sampling import SamplingParams, sample_token


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
    decoded x decode steps); prefill_tokens counts the tokens run through prefill (padded_: with
    the padding of the compiled shapes), prompt_tokens the contexts of all requests
    (what a sampler without reuse prefills)."""

    num_slots: int
    decode_steps: int = 0
    slot_steps: int = 0  # rows decoded x steps (the rows of each visit's bucket)
    useful_tokens: int = 0
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


@functools.partial(jax.jit, static_argnames=("graphdef", "params"), donate_argnames=("cache", "next_s"))
def _prefill(graphdef, state, cache, next_s, tokens_nt, start_n, len_n, block_tables_nm, slot_n, keydata_n2, *,
             params: SamplingParams):
    """Prefill ``len_n`` new tokens per row at positions ``start_n..`` and sample each
    row's first reply token (its step-0 key) from the logits after its last one, into
    ``next_s = (tokens [S], log-probs [S])`` at ``slot_n`` (slot = num_slots: dropped).
    Returns (cache, next_s, those logits ``[N, V]``)."""
    model = nnx.merge(graphdef, state)
    t = tokens_nt.shape[1]
    offsets_t = jnp.arange(t)
    positions_nt = start_n[:, None] + offsets_t
    valid_nt = offsets_t[None, :] < len_n[:, None]
    hidden_ntd, cache = model.paged_hidden(tokens_nt, cache, block_tables_nm, positions_nt, valid_nt)
    last_nd = jnp.take_along_axis(hidden_ntd, jnp.maximum(len_n - 1, 0)[:, None, None], axis=1)[:, 0]
    logits_nv = model.logits(last_nd).astype(jnp.float32)
    keys_n = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keydata_n2), jnp.zeros_like(len_n))
    tok_n, lp_n = sample_token(logits_nv, keys_n, params)
    next_tok_s, next_lp_s = next_s
    next_s = (next_tok_s.at[slot_n].set(tok_n, mode="drop"), next_lp_s.at[slot_n].set(lp_n, mode="drop"))
    return cache, next_s, logits_nv


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "n_steps"), donate_argnames=("cache", "next_s"))
def _decode(graphdef, state, cache, next_s, rows_s, keydata_s2, block_tables_sm, length_s, step_s, budget_s,
            active_s, exit_after, *, params: SamplingParams, n_steps: int):
    """Up to ``n_steps`` decode steps of the slots ``rows_s`` (a bucket of the active
    ones, so a draining queue decodes fewer rows; the other arguments are those rows').
    A slot takes its already sampled token (``next_s``), writes its keys at position
    ``length``, and samples the next one from the new logits; it stops at a stop token
    or its budget. What crosses visits is one token per slot, never a [S, V] logits
    array. The visit ends early once ``exit_after`` rows have stopped (a traced scalar:
    the host asks for it when it has requests waiting for a slot), so a stopped row does
    not idle to the visit's end. Returns (cache, next_s, tokens ``[R, n]``, log-probs
    ``[R, n]``, tokens taken ``[R]``, stopped ``[R]``, steps run)."""
    model = nnx.merge(graphdef, state)
    all_tok_s, all_lp_s = next_s
    keys_s = jax.random.wrap_key_data(keydata_s2)
    stop_ids = jnp.asarray(params.stop_ids or (-1,), jnp.int32)
    r = rows_s.shape[0]

    def cond(carry):
        i, live_s = carry[0], carry[-3]
        return (i < n_steps) & jnp.any(live_s) & (jnp.sum(active_s & ~live_s) < exit_after)

    def body(carry):
        i, cache, tok_s, lp_s, length_s, step_s, live_s, tok_sn, lp_sn = carry
        hidden_s1d, cache = model.paged_hidden(tok_s[:, None], cache, block_tables_sm, length_s[:, None],
                                               live_s[:, None])
        tok_sn = jax.lax.dynamic_update_slice(tok_sn, tok_s[:, None], (0, i))
        lp_sn = jax.lax.dynamic_update_slice(lp_sn, lp_s[:, None], (0, i))
        step_s = step_s + live_s
        length_s = length_s + live_s
        live_s = live_s & ~jnp.isin(tok_s, stop_ids) & (step_s < budget_s)
        new_tok_s, new_lp_s = sample_token(model.logits(hidden_s1d[:, 0]).astype(jnp.float32),
                                           jax.vmap(jax.random.fold_in)(keys_s, step_s), params)
        tok_s, lp_s = jnp.where(live_s, new_tok_s, tok_s), jnp.where(live_s, new_lp_s, lp_s)
        return i + 1, cache, tok_s, lp_s, length_s, step_s, live_s, tok_sn, lp_sn

    live_s = active_s & (step_s < budget_s)
    init = (jnp.zeros((), jnp.int32), cache, all_tok_s[rows_s], all_lp_s[rows_s], length_s, step_s, live_s,
            jnp.zeros((r, n_steps), jnp.int32), jnp.zeros((r, n_steps), jnp.float32))
    n_run, cache, tok_s, lp_s, _, step_end_s, live_s, tok_sn, lp_sn = jax.lax.while_loop(cond, body, init)
    next_s = (all_tok_s.at[rows_s].set(tok_s), all_lp_s.at[rows_s].set(lp_s))
    return cache, next_s, tok_sn, lp_sn, step_end_s - step_s, active_s & ~live_s, n_run


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
        self.graphdef, self.state = nnx.split(model)
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
        # Each slot's next token, already sampled (by prefill, then by each decode step), and its log-prob.
        self.next_s = (jnp.zeros(num_slots, jnp.int32), jnp.zeros(num_slots, jnp.float32))
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
                self._run_prefill([(slot_cache[s].pages, req.tokens, keep, s) for s, req, keep in rows],
                                  keydata_s2[taken])
                for s, req, keep in rows:
                    turn = req.key_ids[0]
                    self.stats.requests += 1
                    self.stats.prompt_tokens += len(req.tokens)
                    self.stats.prompt_tokens_by_turn[turn] += len(req.tokens)
                    self.stats.prefill_tokens_by_turn[turn] += len(req.tokens) - keep
                    block_tables_sm[s] = 0
                    block_tables_sm[s, :len(slot_cache[s].pages)] = slot_cache[s].pages
                    length_s[s], step_s[s], budget_s[s], active_s[s] = len(req.tokens), 0, req.budget, True
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
                self.cache, self.next_s, *outputs = _decode(
                    self.graphdef, self.state, self.cache, self.next_s, rows, keydata_s2[rows],
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
            tok_rn, lp_rn, taken_r, stopped_r, n_run = jax.device_get(outputs)
            self.stats.decode_steps += int(n_run)
            self.stats.slot_steps += len(rows) * int(n_run)
            self.stats.useful_tokens += int(taken_r.sum())
            for r, s in enumerate(live):
                n = int(taken_r[r])
                replies[s].extend(tok_rn[r, :n].tolist())
                logps[s].append(lp_rn[r, :n])
                length_s[s] += n
                step_s[s] += n
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
            prefix_rows.append((pages, req.tokens[:n_shared], 0, self.num_slots))
            self.stats.prefill_tokens_by_turn[req.key_ids[0]] += n_shared
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

    def _run_prefill(self, rows, keydata_r2=None) -> jax.Array:
        """Prefill rows of (pages, tokens, keep, slot): tokens[keep:] at positions keep..
        into the pages; the first reply token, sampled with the row's key data
        (``keydata_r2``), to the slot (num_slots: none). Calls have two widths only
        (``prefill_chunk`` and a quarter of it, for the short prefills of later turns):
        a longer prefill runs chunk by chunk, so prefill compiles one program per row
        bucket and width, whatever the prompt lengths. Returns the logits after each
        row's last token ``[N, V]`` (N: the rows padded)."""
        n = _row_bucket(len(rows), self.num_slots, self.row_buckets)
        longest = max(len(toks) - keep for _, toks, keep, _ in rows)
        t = self.prefill_chunk // 4 if longest <= self.prefill_chunk // 4 else self.prefill_chunk
        tables_nm = np.zeros((n, self.table_width), np.int32)
        keydata_n2 = np.zeros((n, 2), np.uint32)
        if keydata_r2 is not None:
            keydata_n2[:len(rows)] = keydata_r2
        new_n = [toks[keep:] for _, toks, keep, _ in rows]
        for i, (pages, _, _, _) in enumerate(rows):
            tables_nm[i, :len(pages)] = pages
        self.stats.prefill_tokens += sum(map(len, new_n))
        logits_nv = None
        for c0 in range(0, longest, t):
            tokens_nt = np.zeros((n, t), np.int32)
            start_n = np.zeros(n, np.int32)
            len_n = np.zeros(n, np.int32)
            slot_n = np.full(n, self.num_slots, np.int32)  # rows that do not end in this chunk sample nothing
            ends_n = np.zeros(n, bool)
            for i, ((_, _, keep, slot), new) in enumerate(zip(rows, new_n)):
                piece = new[c0:c0 + t]
                tokens_nt[i, :len(piece)] = piece
                start_n[i], len_n[i] = keep + c0, len(piece)
                ends_n[i] = c0 < len(new) <= c0 + t
                if ends_n[i]:
                    slot_n[i] = slot
            self.stats.prefill_padded_tokens += n * t
            self.cache, self.next_s, chunk_nv = _prefill(self.graphdef, self.state, self.cache, self.next_s,
                                                         tokens_nt, start_n, len_n, tables_nm, slot_n, keydata_n2,
                                                         params=self.params)
            logits_nv = chunk_nv if logits_nv is None else jnp.where(ends_n[:, None], chunk_nv, logits_nv)
        return logits_nv


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
