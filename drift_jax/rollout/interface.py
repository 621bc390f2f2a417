"""What the episode player and a sampler exchange: requests in, replies and work figures out.

A sampler (``Sampler``) serves ``Request`` objects, each one turn of one episode, in
lists pulled from a source (one prompt group each), and hands every reply to
``on_finish``, whose follow-up requests it serves too. Two samplers implement it: the
continuous engine (``drift_jax.rollout.engine.Engine``) and the static reference
(``drift_jax.rollout.static.StaticSampler``); ``EngineOptions`` says which, and the
engine's knobs, once for every stage (``episodes.make_sampler`` builds it).

A request's sampling key depends only on (seed, turn, prompt hash, sample): whichever
sampler runs it and wherever it is placed, it samples the same tokens (up to float
rounding of the logits: attention over the same keys in another order).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Iterable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ENGINES = ("continuous", "static")


@dataclasses.dataclass
class Request:
    """One turn of one episode.

    episode: the run-wide id of the trajectory (whose cache the turn extends).
    tokens: the turn's whole context (dialogue + generation prompt + prefill).
    key_ids: (turn, prompt hash, sample index): with the sampler's seed, the sampling key.
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


# on_finish(request, reply ids, their log-probs ``[n]``) -> follow-up requests.
OnFinish = Callable[[Request, list, np.ndarray], list]


class Sampler(Protocol):
    """Plays turns of episodes for one model, ``SamplingParams`` and seed.

    ``run`` serves every request ``source`` yields (lists, pulled as the sampler has
    room) and every follow-up ``on_finish`` returns, and returns the work done: a dict
    with ``"kind"`` (``ENGINES``), useful_tokens, slot_steps, slot_utilization (useful
    tokens / (rows x decode steps)), requests, prompt_tokens (the contexts of all
    requests), prefill_tokens (context tokens computed), prefill_padded_tokens (with the
    padding of compiled shapes), and per-turn ``prefill_tokens_by_turn`` and
    ``prompt_tokens_by_turn``; the engine adds its own (decode_steps, evictions, ...).
    """

    kind: str

    def run(self, source: Iterable[list[Request]], on_finish: OnFinish) -> dict: ...


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Which sampler plays episodes, and the continuous engine's settings.

    kind: "continuous" (``engine.Engine``) or "static" (``static.StaticSampler``:
      ``sampling.generate_batched`` once per turn, the reference).
    num_slots: rows decoded together (None: the caller's batch size, ``engine_options``).
    page_size: tokens per page of the KV cache.
    num_pages: size of the page pool (None: sized by ``pool_size``: on an accelerator
      what ``memory_fraction`` of the device's memory leaves after the weights and the
      programs' workspace, at most every slot's ``slot_tokens``; on a CPU 2,048 tokens a
      slot); caches of episodes between turns are dropped when it runs short.
    memory_fraction: the share of the memory XLA's allocator holds on the device for the
      weights, the engine's workspace and the page pool (``num_pages`` None).
    slot_tokens: the tokens one request may hold, context + budget (the protocol's
      longest: ``episodes.context_bound``); None: the engine's ``max_len``. Caps the
      pool at ``num_slots`` such requests.
    steps_per_visit: decode steps per compiled call at most (the host looks in between).
      None: 8 on a CPU, 32 on an accelerator (``for_platform``).
    refill_after: a visit ends early once this many of its rows have stopped while
      requests wait for a slot (1: a slot is refilled at the next step; larger: fewer
      host round trips and larger prefill calls, a few idle row steps more). None: 1 on
      a CPU, where host and device share the cores; ``num_slots // 16`` on an
      accelerator, chosen with the paper-scale estimate (docs/scaling.md).
    row_buckets: row shapes of the decode program: it computes a multiple of
      ``num_slots // row_buckets`` rows (fewer shapes: fewer compiles, more idle rows
      while the queue drains).
    prefill_chunk: tokens per prefill call: the new tokens of the requests admitted at
      once are cut into rows of ``prefill_piece`` tokens (a row holds one request's
      tokens) and packed into calls of this many tokens, or of an eighth or a
      sixty-fourth of it for the tail: the only three prefill shapes compiled.
    prefill_piece: tokens per row of a prefill call (a request's prefill is padded to a
      multiple of it; each row reads its context's pages once).
    """

    kind: str = "continuous"
    num_slots: int | None = None
    page_size: int = 16
    num_pages: int | None = None
    memory_fraction: float = 0.9
    slot_tokens: int | None = None
    steps_per_visit: int | None = None
    refill_after: int | None = None
    row_buckets: int = 8
    prefill_chunk: int = 2048
    prefill_piece: int = 16

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise ValueError(f"engine {self.kind!r}: expected one of {ENGINES}")
        optional = (self.num_slots, self.steps_per_visit, self.refill_after)
        if (any(x is not None and x < 1 for x in optional) or self.prefill_piece < 1
                or self.prefill_chunk < self.prefill_piece or min(self.page_size, self.row_buckets) < 1):
            raise ValueError("num_slots, page_size, steps_per_visit, refill_after, row_buckets and prefill_piece "
                             "must be >= 1, prefill_chunk >= prefill_piece")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction={self.memory_fraction}: expected a share in (0, 1]")
        if self.slot_tokens is not None and self.slot_tokens < 1:
            raise ValueError(f"slot_tokens={self.slot_tokens}: expected >= 1 or None")

    def for_platform(self, platform: str) -> "EngineOptions":
        """These options with the visit settings left None filled in for ``platform``
        ("cpu", "gpu", "tpu"; an accelerator's ``refill_after`` only once ``num_slots``
        is set)."""
        cpu = platform == "cpu"
        refill = 1 if cpu else (max(1, self.num_slots // 16) if self.num_slots else None)
        return dataclasses.replace(self, steps_per_visit=self.steps_per_visit or (8 if cpu else 32),
                                   refill_after=self.refill_after or refill)


def engine_options(engine: "str | EngineOptions", batch_size: int) -> EngineOptions:
    """``EngineOptions`` from a kind name or options, with ``num_slots`` filled in."""
    opts = EngineOptions(kind=engine) if isinstance(engine, str) else engine
    return opts if opts.num_slots else dataclasses.replace(opts, num_slots=batch_size)


def request_key_data(seed: int, key_ids_n3: np.ndarray, rows: int | None = None) -> np.ndarray:
    """``[N, 2]`` uint32 key data for (turn, prompt hash, sample) rows: the bits of
    ``episodes.episode_keys`` (fold_in of turn, then hash, then sample). Rows are padded
    to ``rows`` (None: a power of two), so that any number of requests compiles one
    program (or few)."""
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


def _pow2(n: int, floor: int = 4) -> int:
    """The power-of-two bucket of ``n``, at least ``floor``: few distinct shapes, so few
    compiles (each costs seconds), for little padding."""
    return max(floor, 1 << max(0, n - 1).bit_length())


# Figures that describe the sampler, not work done: kept when runs merge, never added.
_SETTINGS = ("kind", "num_slots")


def merge_work(a: dict | None, b: dict | None) -> dict:
    """The work figures of two runs (chunks of a stage, or its processes) as one: counts
    and per-turn counts added (turn keys as ints: a JSON round trip makes them strings),
    slot_utilization recomputed; settings ("kind", "num_slots") kept. Runs of different
    kinds do not merge."""
    if not a or not b:
        return _int_turns(dict(a or b or {}))
    if a.get("kind") != b.get("kind"):
        raise ValueError(f"work of a {a.get('kind')!r} and a {b.get('kind')!r} sampler do not merge")
    a, b = _int_turns(a), _int_turns(b)
    merged = {}
    for key in list(a) + [k for k in b if k not in a]:
        x, y = a.get(key), b.get(key)
        if key in _SETTINGS:
            merged[key] = x if x is not None else y
        elif isinstance(x, dict) or isinstance(y, dict):
            turns = (x or {}).keys() | (y or {}).keys()
            merged[key] = {t: (x or {}).get(t, 0) + (y or {}).get(t, 0) for t in sorted(turns)}
        else:
            merged[key] = (x or 0) + (y or 0)
    if "slot_utilization" in merged:
        merged["slot_utilization"] = merged.get("useful_tokens", 0) / max(1, merged.get("slot_steps", 0))
    if "prefill_padding_ratio" in merged:
        merged["prefill_padding_ratio"] = (merged.get("prefill_padded_tokens", 0)
                                           / max(1, merged.get("prefill_call_tokens", 0)))
    return merged


def split_invariant(work: dict) -> dict:
    """The figures of ``work`` that do not depend on how its requests were split over
    runs (processes, chunks): the kind, requests, reply tokens and context tokens. Slot
    utilisation, prefill and evictions depend on which requests shared a sampler."""
    return {k: work[k] for k in ("kind", "requests", "useful_tokens", "prompt_tokens", "prompt_tokens_by_turn")
            if k in work}


def _int_turns(work: dict) -> dict:
    return {k: {int(t): n for t, n in v.items()} if isinstance(v, dict) else v for k, v in work.items()}
