"""The static sampler: the reference ``interface.Sampler``, turn by turn over fixed chunks.

Prompt groups are played in chunks of as many whole groups as fit in ``batch_size``
rows (at least one: ``G = max(1, batch_size // K)`` groups of K, chunk c holding groups
c*G..(c+1)*G-1 of the source); each turn of a chunk is one ``generate_batched`` call on
the whole contexts of its live episodes. Simple and easy to trust, and the yardstick of
the continuous engine (``engine.Engine``), which samples the same tokens (a row's
tokens depend only on its context and key, not on its batch partners).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import jax
import numpy as np

from drift_jax.rollout.interface import OnFinish, Request, request_key_data
from drift_jax.rollout.sampling import SamplingParams, add_work, generate_batched


class StaticSampler:
    """``generate_batched`` once per turn of each chunk of prompt groups.

    Args:
      model: the policy (in its sampling dtype).
      params: sampling parameters (temperature 0 = greedy).
      seed: with each request's ``key_ids``, the sampling keys.
      batch_size: rows per ``generate_batched`` call, and the chunk's rows.
      max_len: context limit: a request whose context + budget exceeds it is an error.
    """

    kind = "static"

    def __init__(self, model, params: SamplingParams, *, seed: int, batch_size: int, max_len: int | None = None):
        self.model = model
        self.params = params
        self.seed = seed
        self.batch_size = batch_size
        self.max_len = max_len

    def run(self, source: Iterable[list[Request]], on_finish: OnFinish) -> dict:
        """Serve ``source``'s requests chunk by chunk, turn by turn: each turn's
        follow-ups (``on_finish``) make the chunk's next call. Returns the work done."""
        work = {"kind": self.kind, "requests": 0, "prompt_tokens": 0,
                "prefill_tokens_by_turn": {}, "prompt_tokens_by_turn": {}}
        for chunk in _chunks(source, self.batch_size):
            self._play_chunk(chunk, on_finish, work)
        return work

    def _play_chunk(self, requests: list[Request], on_finish: OnFinish, work: dict) -> None:
        while requests:
            key_ids_n3 = np.asarray([r.key_ids for r in requests], np.int64)
            keys = jax.random.wrap_key_data(request_key_data(self.seed, key_ids_n3))
            call: dict = {}
            outputs = generate_batched(self.model, [r.tokens for r in requests], keys, self.params,
                                       batch_size=self.batch_size, max_new=[r.budget for r in requests],
                                       max_len=self.max_len, stats=call)
            add_work(work, **{k: v for k, v in call.items() if k != "slot_utilization"})
            follow_ups = []
            for req, (reply, logps) in zip(requests, outputs):
                turn, n = req.key_ids[0], len(req.tokens)
                work["requests"] += 1
                work["prompt_tokens"] += n
                for by_turn in (work["prefill_tokens_by_turn"], work["prompt_tokens_by_turn"]):
                    by_turn[turn] = by_turn.get(turn, 0) + n  # every call prefills whole contexts
                follow_ups += on_finish(req, reply, logps)
            requests = follow_ups


def _chunks(source: Iterable[list[Request]], rows: int) -> Iterator[list[Request]]:
    """The source's request lists joined into chunks of as many whole lists as fit in
    ``rows`` (at least one)."""
    chunk: list = []
    for group in source:
        if chunk and len(chunk) + len(group) > rows:
            yield chunk
            chunk = []
        chunk += group
    if chunk:
        yield chunk
