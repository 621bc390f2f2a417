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
the static sampler (``interface.request_key_data``): the key is derived in the program from
those integers and folded with the reply position, so samples do not depend on slot
placement. Logits match the static sampler's to float rounding (attention over the same
keys in another order), so greedy tokens agree except at near-ties.

Compiled programs: one decode program per row bucket (``_row_bucket``: rows rounded up
to a multiple of ``num_slots // row_buckets``) and three prefill programs (calls of
``prefill_chunk`` tokens, an eighth and a sixty-fourth of that, packed from pieces of
the admitted requests' new tokens: ``Engine._run_prefill``); block tables have one width and
attention stops at each call's last live page inside the program, so context length
adds no program. A run of any size compiles a bounded set (``Engine.compiled_programs``).

Host bookkeeping lives beside it: the slots and the request queue (``slots``), the pages
and the caches episodes keep between turns (``page_pool``), the pool's size from the
device's memory (``pool_size``), the work figures (``engine_stats``). A run is a loop of
three steps: admit (fill free slots from the queue, prefill what their caches lack),
launch (one decode visit, dispatched asynchronously) and absorb (take the visit's
tokens, free the slots whose replies ended); between launch and absorb, the host hands
the previous visit's finished turns to ``on_finish``.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drift_jax.models import paged
from drift_jax.rollout import pool_size
from drift_jax.rollout.engine_stats import EngineStats
from drift_jax.rollout.interface import EngineOptions, OnFinish, request_key_data
from drift_jax.rollout.page_pool import EpisodeCaches, PoolExhausted, common_prefix
from drift_jax.rollout.sampling import SamplingParams, sample_token
from drift_jax.rollout.slots import RequestQueue, Slots


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


def _prefill_calls(n: int, big: int) -> list[int]:
    """Rows of each prefill call that carry ``n`` pieces, from three sizes: ``big``, an
    eighth of it and a sixty-fourth (at least one): full big calls, then the rest in
    middle-sized calls and the last few pieces in small ones, or one more middle-sized
    call where the small ones would take more than half of it. Padding is at most half
    a middle-sized call plus a small one (under 8% of a big call)."""
    mid, small = max(1, big // 8), max(1, big // 64)
    calls = [big] * (n // big)
    rest = n % big
    n_mid, rest = divmod(rest, mid)
    n_small = -(-rest // small)
    if n_small * small * 2 > mid:
        n_mid, n_small = n_mid + 1, 0
    return calls + [mid] * n_mid + [small] * n_small


def _row_bucket(n: int, num_slots: int, row_buckets: int) -> int:
    """Rows a decode visit computes for ``n`` active slots: the next multiple of
    ``num_slots // row_buckets``. Each row shape is a compile (on CPU about as long as a
    hundred decode steps of a small model; on an accelerator tens of seconds at 3B); at
    most that many rows compute idle, which happens while the queue drains."""
    unit = max(1, num_slots // row_buckets)
    return min(num_slots, -(-max(1, n) // unit) * unit)


class Engine:
    """Continuous batching over a paged cache for one model and one ``SamplingParams``:
    the continuous ``interface.Sampler``.

    Args:
      model: the policy (in its sampling dtype).
      params: sampling parameters (temperature 0 = greedy).
      seed: with each request's ``key_ids``, the sampling keys.
      options: the engine's settings (``num_slots`` set: ``interface.engine_options``).
      max_len: context limit (None: the model's): a request whose context + budget
        exceeds it is an error.
    """

    kind = "continuous"

    def __init__(self, model, params: SamplingParams, *, seed: int, options: EngineOptions,
                 max_len: int | None = None):
        if options.num_slots is None:
            raise ValueError("EngineOptions.num_slots is None: fill it in (engine_options(options, batch_size))")
        options = options.for_platform(jax.default_backend())
        self.options = options
        graphdef, self.state = nnx.split(model)
        self.graph = _Graph(graphdef)
        self.cfg = model.cfg
        self.params = params
        self.seed = seed
        self.num_slots = options.num_slots
        self.page_size = options.page_size
        self.max_len = max_len or self.cfg.max_position_embeddings
        # A visit cannot run past a reply's end, so a short budget shortens the visit.
        self.steps_per_visit = min(options.steps_per_visit, max(1, params.max_new_tokens))
        max_pages = math.ceil(self.max_len / self.page_size)
        # Block tables have one width for every program (attention stops at a row's last
        # live page in the program itself), a multiple of the Pallas kernel's 8-page block.
        self.table_width = -(-max_pages // paged.CHUNK_PAGES) * paged.CHUNK_PAGES
        num_pages = options.num_pages
        if num_pages is None:  # from the device's memory (``pool_size``)
            num_pages = pool_size.engine_pages(self.cfg, self.state, options, self.max_len)
        self.caches = EpisodeCaches(num_pages, self.page_size)
        decode_path = paged.attention_backend(1, self.cfg.paged_attention_impl, self.cfg.head_dim)
        heads_major = decode_path.startswith("pallas")
        self.cache = paged.PagedKV.zeros(self.cfg, num_pages, self.page_size, heads_major=heads_major)
        self.stats = EngineStats(self.num_slots)
        # A list: a tuple per device call, ("prefill", rows, width, tokens, keys read) or
        # ("decode", rows, steps, live row steps, keys read) (``aot.rollout_estimate``).
        self.trace: list | None = None

    @property
    def compiled_programs(self) -> int:
        """Programs compiled so far by the engine's prefill and decode (all engines)."""
        return _prefill._cache_size() + _decode._cache_size()

    def run(self, source: Iterable[list], on_finish: OnFinish) -> dict:
        """Serve every request ``source`` yields (in lists, e.g. one prompt group each,
        pulled only when slots would otherwise idle) and every follow-up that
        ``on_finish(request, reply_ids, logps)`` returns. A follow-up for the same
        episode extends its cache; an episode without one is forgotten. Returns the work
        done by this engine so far (``EngineStats.as_dict``)."""
        queue = RequestQueue(source)
        slots = Slots(self.num_slots, self.table_width)
        finished: list = []
        while True:
            t0 = time.perf_counter()
            self._admit(queue, slots, finished)
            # End the visit at the first stopped rows only when a request could take their slots.
            visit = self._launch(slots, refill=queue.more_may_come() or bool(finished))
            self.stats.host_wait_s += time.perf_counter() - t0
            # Host work on the last visit's finished turns while the device decodes.
            for turn in finished:
                self._finish(turn, queue, on_finish)
            finished = []
            if visit is not None:
                finished = self._absorb(slots, *visit)
            elif not queue.more_may_come():
                break
        self.caches.release_shared()
        self.stats.evictions = self.caches.evictions
        return self.stats.as_dict()

    # -- the three steps of a run --------------------------------------------------------
    def _admit(self, queue: RequestQueue, slots: Slots, finished: list) -> None:
        """Move waiting requests into free slots (in queue order, while pages last) and
        prefill what their caches lack."""
        free = slots.free()
        queue.pull(len(free))
        admitted = []
        for s in free:
            if not queue.waiting:
                break
            req = queue.waiting[0]
            need = len(req.tokens) + req.budget
            if need > self.max_len:
                raise ValueError(f"episode {req.episode}: context of {len(req.tokens)} tokens + "
                                 f"{req.budget} new > max_len {self.max_len}")
            if len(req.tokens) == 0:
                raise ValueError(f"episode {req.episode}: empty context")
            try:
                cache, keep = self.caches.claim(req)
            except PoolExhausted:
                # Running slots free pages as they stop; with none running, none ever will.
                if not (slots.busy() or admitted or finished):
                    raise RuntimeError(f"page pool of {self.caches.pool.num_pages} pages is too small "
                                       f"for one request of {need} tokens") from None
                break
            queue.waiting.popleft()
            admitted.append((s, req, cache, keep))
        # New shared prompts first: their pieces come before (or in the same call as) the
        # pieces of the samples that read them. All but each request's last context
        # token: that one is the slot's first decode step.
        prompts = self.caches.new_prompts()
        for turn, _, tokens in prompts:
            self._count_prefill(turn, len(tokens))
        to_fill = [(pages, tokens, 0) for _, pages, tokens in prompts]
        to_fill += [(cache.pages, req.tokens[:-1], keep) for _, req, cache, keep in admitted
                    if keep < len(req.tokens) - 1]
        if to_fill:
            self._run_prefill(to_fill)
        if not admitted:
            return
        keydata_n2 = request_key_data(self.seed, np.asarray([req.key_ids for _, req, _, _ in admitted], np.int64),
                                      rows=self.num_slots)
        for (s, req, cache, keep), keydata_2 in zip(admitted, keydata_n2):
            turn = req.key_ids[0]
            self.stats.requests += 1
            self.stats.prompt_tokens += len(req.tokens)
            self.stats.prompt_tokens_by_turn[turn] += len(req.tokens)
            self._count_prefill(turn, len(req.tokens) - keep)
            slots.start(s, req, cache, keydata_2)

    def _launch(self, slots: Slots, refill: bool):
        """Dispatch one decode visit of the active slots (padded with idle ones to a row
        bucket; idle rows are inactive: they change nothing). Returns (live slots, rows,
        the program's outputs, still on the device), or None when no slot is active."""
        if not slots.active_s.any():
            return None
        live = np.flatnonzero(slots.active_s)
        n_rows = _row_bucket(len(live), self.num_slots, self.options.row_buckets)
        idle = np.flatnonzero(~slots.active_s)[:n_rows - len(live)]
        rows = np.concatenate([live, idle])
        exit_after = np.int32(self.options.refill_after if refill else n_rows + 1)
        inputs = slots.decode_inputs(rows)
        t0 = time.perf_counter()
        self.cache, *outputs = _decode(self.graph, self.state, self.cache, *inputs, exit_after,
                                       params=self.params, n_steps=self.steps_per_visit)
        self._dispatched(t0)
        return live, rows, outputs

    def _absorb(self, slots: Slots, live, rows, outputs) -> list:
        """Wait for a visit and take its tokens into the live slots; returns the turns it
        finished, as (request, cache, reply ids, log-probs), their slots freed."""
        tok_rn, lp_rn, next_tok_r, next_lp_r, step_end_r, stopped_r, n_run = jax.device_get(outputs)
        t0 = time.perf_counter()
        self.stats.decode_steps += int(n_run)
        self.stats.slot_steps += len(rows) * int(n_run)
        self.stats.visits += 1
        if self.trace is not None:
            # A row fed k tokens from position L attends to L + 1, ..., L + k keys.
            fed_r = step_end_r[:len(live)] - slots.step_s[live]
            start_r = slots.length_s[live].astype(np.int64)
            keys = int(np.sum(fed_r * start_r + fed_r * (fed_r + 1) // 2))
            self.trace.append(("decode", len(rows), int(n_run), int(fed_r.sum()), keys))
        finished = []
        for r, s in enumerate(live):
            n, fed_context = slots.advance(s, tok_rn[r], lp_rn[r], next_tok_r[r], next_lp_r[r], step_end_r[r])
            self.stats.useful_tokens += n
            self.stats.context_steps += fed_context
            if stopped_r[r]:
                req, cache, reply, logps = slots.stop(s)
                self.caches.close_turn(cache, reply)
                finished.append((req, cache, reply, logps))
        self.stats.host_wait_s += time.perf_counter() - t0
        return finished

    def _finish(self, turn: tuple, queue: RequestQueue, on_finish: OnFinish) -> None:
        """Hand a finished turn to ``on_finish``; its episode's cache waits for the
        follow-up, if any, else goes back to the pool."""
        req, cache, reply, logps = turn
        follow = on_finish(req, reply, logps)
        queue.waiting.extend(follow)
        next_turn = [f for f in follow if f.episode == req.episode]
        for f in next_turn:
            self.stats.new_tokens_by_turn[f.key_ids[0]] += len(f.tokens) - common_prefix(cache.tokens, f.tokens,
                                                                                         len(f.tokens))
        if next_turn:
            self.caches.park(req.episode, cache)
        else:
            self.caches.release(cache)

    def _dispatched(self, t0: float) -> None:  # a call dispatched since t0: not the host's own work
        self.stats.dispatches += 1
        self.stats.host_wait_s -= time.perf_counter() - t0

    # -- prefill -------------------------------------------------------------------------
    def _count_prefill(self, turn: int, n_tokens: int) -> None:
        """Context tokens computed for a request of ``turn`` (by prefill, or its last one
        by the first decode step)."""
        self.stats.prefill_tokens += n_tokens
        self.stats.prefill_tokens_by_turn[turn] += n_tokens

    def _run_prefill(self, rows) -> None:
        """Prefill rows of (pages, tokens, keep): tokens[keep:] at positions keep.. into
        the pages, packed: each request's new tokens are cut into pieces of
        ``prefill_piece`` tokens, one piece a row, and the pieces of all requests fill
        calls of ``prefill_chunk`` tokens or of an eighth or a sixty-fourth of that
        (``_prefill_calls``), so padding is a few pieces per admission plus each
        request's last piece. A piece attends to its request's earlier pieces in the same call:
        every layer writes all rows' keys before any row attends. Three compiled
        shapes, whatever the lengths and counts."""
        w = self.options.prefill_piece
        pieces = [(pages, start, toks[start:start + w]) for pages, toks, keep in rows
                  for start in range(keep, len(toks), w)]
        i = 0
        for n in _prefill_calls(len(pieces), max(1, self.options.prefill_chunk // w)):
            call, i = pieces[i:i + n], i + n
            tokens_nt = np.zeros((n, w), np.int32)
            start_n = np.zeros(n, np.int32)
            len_n = np.zeros(n, np.int32)
            tables_nm = np.zeros((n, self.table_width), np.int32)
            for j, (pages, start, piece) in enumerate(call):
                tokens_nt[j, :len(piece)] = piece
                start_n[j], len_n[j] = start, len(piece)
                tables_nm[j, :len(pages)] = pages
            self.stats.prefill_padded_tokens += n * w
            self.stats.prefill_call_tokens += int(len_n.sum())
            if self.trace is not None:
                self.trace.append(("prefill", n, w, int(len_n.sum()), int((start_n + len_n).sum())))
            t0 = time.perf_counter()
            self.cache = _prefill(self.graph, self.state, self.cache, tokens_nt, start_n, len_n, tables_nm)
            self._dispatched(t0)
