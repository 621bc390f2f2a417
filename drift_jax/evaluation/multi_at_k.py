"""Multi-turn evaluation metrics (host side, plain Python).

Each question is summarised by t_star: the 1-based turn of its first correct answer, or
None if it was never solved. A t_star beyond num_turns counts as unsolved within budget.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable


def _check(t_stars: Iterable[int | None], num_turns: int) -> list[int | None]:
    if isinstance(num_turns, bool) or not isinstance(num_turns, numbers.Integral) or num_turns < 1:
        raise ValueError(f"num_turns must be an int >= 1, got {num_turns!r}")
    t_stars = list(t_stars)
    if not t_stars:
        raise ValueError("t_stars is empty: no questions to evaluate")
    for i, t in enumerate(t_stars):
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1):
            raise ValueError(f"t_stars[{i}] = {t!r}: expected a turn number >= 1 or None")
    return t_stars


def multi_at_k(t_stars: Iterable[int | None], num_turns: int) -> dict[str, float]:
    """{"multi@k": fraction of questions solved within the first k turns}, k = 1..num_turns."""
    t_stars = _check(t_stars, num_turns)
    n = len(t_stars)
    return {
        f"multi@{k}": sum(t is not None and t <= k for t in t_stars) / n
        for k in range(1, num_turns + 1)
    }


def correction_rate(t_stars: Iterable[int | None], num_turns: int) -> list[float | None]:
    """Per turn t = 1..num_turns: (solved at t) / (still unsolved entering t).

    None for a turn that no question enters (everything was solved before it).
    Turn 1's rate equals multi@1.
    """
    t_stars = _check(t_stars, num_turns)
    rates: list[float | None] = []
    for t in range(1, num_turns + 1):
        entering = sum(s is None or s >= t for s in t_stars)
        solved = sum(s == t for s in t_stars)
        rates.append(solved / entering if entering else None)
    return rates


def summarize(t_stars: Iterable[int | None], num_turns: int) -> dict:
    """multi@1..multi@T plus "correction_rate" (list over turns) in one dict."""
    t_stars = list(t_stars)
    return {**multi_at_k(t_stars, num_turns), "correction_rate": correction_rate(t_stars, num_turns)}


def distinct_paths(answers: Iterable[list[str | None]], t_stars: Iterable[int | None],
                   num_turns: int) -> list[dict[str, int]]:
    """How well a set of trajectories covers "every attempt so far distinct, then one more".

    Per turn t = 1..num_turns: ``entered``, the trajectories that reach turn t having
    given t - 1 parsed answers, all different (so all wrong), and ``solved``, those of
    them solved at turn t. An offline method can only learn turn t's correction from the
    ``solved`` ones; ``entered - solved`` of them repeat or miss there.

    Args:
      answers: per trajectory, its parsed answer per turn (None for a reply without one).
      t_stars: per trajectory, the turn of its first correct answer or None.
    """
    t_stars = _check(t_stars, num_turns)
    out = [{"entered": 0, "solved": 0} for _ in range(num_turns)]
    for given, t_star in zip(answers, t_stars, strict=True):
        for t in range(1, num_turns + 1):
            before = given[: t - 1]
            if None in before or len(set(before)) < t - 1:
                break
            out[t - 1]["entered"] += 1
            out[t - 1]["solved"] += t_star == t
            if t_star == t:
                break
    return out
