"""The continuous engine's work figures (``engine.Engine``'s ``stats``): what it computed,
device-independent, and the host's share; ``as_dict`` is the ``Sampler`` interface's
work dict (``interface.merge_work`` adds runs up)."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class EngineStats:
    """Work done, device-independent. slot_utilization = useful decoded tokens / (rows
    decoded x decode steps, a request's first step included: ``context_steps`` of them
    feed a request's last context token, not a reply token); prefill_tokens counts the
    context tokens computed (by prefill, and each request's last one by its first
    decode step), prefill_call_tokens those of them the prefill calls carry,
    prefill_padded_tokens the prefill calls' tokens with the padding of their compiled
    shapes (prefill_padding_ratio: padded / carried), prompt_tokens the contexts of
    all requests (what a sampler without reuse prefills), new_tokens_by_turn the
    follow-ups' context tokens past the prefix they share with their episode's context
    + sampled reply (the least any reuse prefills); visits: decode programs run, each a
    host round trip; host_wait_s: host seconds between a visit's end and the next
    launch (absorbing, admitting, preparing the calls), when the device has nothing
    queued, without the calls' dispatch (on a CPU it waits for the computation itself;
    ``dispatches`` counts the calls)."""

    num_slots: int
    decode_steps: int = 0
    slot_steps: int = 0  # rows decoded x steps (the rows of each visit's bucket)
    useful_tokens: int = 0
    context_steps: int = 0  # row steps feeding a request's last context token (one per request)
    prefill_tokens: int = 0
    prefill_call_tokens: int = 0
    prefill_padded_tokens: int = 0
    prompt_tokens: int = 0
    requests: int = 0
    visits: int = 0  # decode programs run (each a host round trip)
    evictions: int = 0
    prefill_tokens_by_turn: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens_by_turn: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # Follow-ups: context tokens past the longest prefix shared with the cached context +
    # reply (what no reuse can avoid; a rewritten reply diverges where it was rewritten).
    new_tokens_by_turn: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    host_wait_s: float = 0.0  # host seconds between a visit's end and the next launch
    dispatches: int = 0  # device calls (prefill and decode)

    @property
    def slot_utilization(self) -> float:
        return self.useful_tokens / max(1, self.slot_steps)

    @property
    def prefill_padding_ratio(self) -> float:
        return self.prefill_padded_tokens / max(1, self.prefill_call_tokens)

    def as_dict(self) -> dict:
        """The ``Sampler`` work figures: these, ``"kind"`` and ``slot_utilization``."""
        d = {"kind": "continuous", **dataclasses.asdict(self)}
        d.update(slot_utilization=self.slot_utilization, prefill_padding_ratio=self.prefill_padding_ratio,
                 prefill_tokens_by_turn=dict(sorted(self.prefill_tokens_by_turn.items())),
                 prompt_tokens_by_turn=dict(sorted(self.prompt_tokens_by_turn.items())),
                 new_tokens_by_turn=dict(sorted(self.new_tokens_by_turn.items())))
        return d
