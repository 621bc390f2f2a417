"""The methods DRIFT is compared with, as data: one place says what each one trains on.

An offline method is weighted SFT on the reference's rollouts and differs from the others
only in which trajectories it keeps, which assistant turns it supervises and how each
is weighted (``docs/method.md``):

    sft_single       first-turn successes only, last turn, weight 1 (single-turn SFT)
    sft              every trajectory, last turn, weight 1
    rft              successful trajectories only, last turn, weight 1
    drift            every trajectory, last turn, DRIFT importance weight
    drift_all_turns  every trajectory, EVERY assistant turn, DRIFT weight (the ablation)

``online_rl`` plays its own episodes with the current policy at every update, and
``drift_round<r>`` (r >= 2) is iterative DRIFT: ``drift`` again, with rollouts from
round r-1's DRIFT policy as the new reference.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from drift_jax.data.records import Record

_ROUND = re.compile(r"drift_round([1-9][0-9]*)")


@dataclasses.dataclass(frozen=True)
class Method:
    """How one method is trained.

    Attributes:
      name: the method's name in configs, the workdir and results.
      trainer: "sft" (weighted SFT on rollouts) or "online_rl".
      supervise: "last" or "all" assistant turns (``chat.encode_dialogue``).
      weighted: DRIFT importance weights (True) or weight 1.
      keep: which rollout records it trains on.
      round: 1, or r for ``drift_round<r>``: trained on its own round's rollouts.
    """

    name: str
    trainer: str = "sft"
    supervise: str = "last"
    weighted: bool = False
    keep: Callable[[Record], bool] = lambda r: True
    round: int = 1

    @property
    def previous(self) -> str:
        """The policy this round's rollouts come from: round r-1's DRIFT policy."""
        if self.round < 2:
            raise ValueError(f"{self.name} is not an iterative DRIFT round")
        return "drift" if self.round == 2 else f"drift_round{self.round - 1}"


METHODS = {
    m.name: m
    for m in (
        Method("sft_single", keep=lambda r: r.t_star == 1),
        Method("sft"),
        Method("rft", keep=lambda r: r.t_star is not None),
        Method("drift", weighted=True),
        Method("drift_all_turns", supervise="all", weighted=True),
        Method("online_rl", trainer="online_rl"),
    )
}


def get(name: str) -> Method:
    """The method called ``name``: one of ``METHODS`` or ``drift_round<r>`` (r >= 2)."""
    if name in METHODS:
        return METHODS[name]
    match = _ROUND.fullmatch(name)
    if match and int(match.group(1)) >= 2:
        return dataclasses.replace(METHODS["drift"], name=name, round=int(match.group(1)))
    raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)} or "
                     "drift_round<r> (iterative DRIFT round r >= 2)")


def parse(names: str | Sequence[str]) -> list[Method]:
    """The methods of a run, in order; ``drift_round<r>`` needs drift and every earlier
    round before it. An entry may hold several comma-separated names (what
    ``--config.methods=sft,drift`` gives). Raises ValueError naming every bad entry."""
    names = [names] if isinstance(names, str) else names
    bad, out, seen = [], [], set()
    for name in (n for entry in names for n in entry.split(",")):
        try:
            method = get(name)
        except ValueError:
            bad.append(name)
            continue
        if method.round > 1 and not all(m in seen for m in ["drift"] + [f"drift_round{q}" for q in range(2, method.round)]):
            bad.append(name)
        seen.add(name)
        out.append(method)
    if bad:
        raise ValueError(f"unknown methods {bad}: expected some of {', '.join(METHODS)} or "
                         "drift_round<r> (iterative DRIFT, after drift and rounds < r)")
    return out
