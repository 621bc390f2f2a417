"""Properties of drift_jax.evaluation.multi_at_k: multi@k and per-turn correction rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.evaluation.multi_at_k import correction_rate, distinct_paths, multi_at_k, summarize


@st.composite
def eval_runs(draw):
    """(t_stars, num_turns); some t_stars past the budget, which count as unsolved."""
    num_turns = draw(st.integers(1, 6))
    t_star = st.none() | st.integers(1, num_turns + 2)
    return draw(st.lists(t_star, min_size=1, max_size=40)), num_turns


def test_hand_case():
    t_stars = [1, 2, None, 3, 1]
    assert multi_at_k(t_stars, 3) == pytest.approx({"multi@1": 0.4, "multi@2": 0.6, "multi@3": 0.8})
    # turn 1: 2 of 5; turn 2: 1 of {2, None, 3}; turn 3: 1 of {None, 3}
    assert correction_rate(t_stars, 3) == pytest.approx([0.4, 1 / 3, 0.5])
    summary = summarize(iter(t_stars), 3)  # a one-shot iterator must work too
    assert summary["multi@3"] == pytest.approx(0.8)
    assert summary["correction_rate"] == pytest.approx([0.4, 1 / 3, 0.5])


def test_everything_solved_at_turn_one():
    assert multi_at_k([1, 1], 3) == {"multi@1": 1.0, "multi@2": 1.0, "multi@3": 1.0}
    assert correction_rate([1, 1], 3) == [1.0, None, None]


def test_nothing_solved_and_past_budget():
    assert multi_at_k([None, 4, np.int64(7)], 3) == {"multi@1": 0.0, "multi@2": 0.0, "multi@3": 0.0}
    assert correction_rate([None, 4], 3) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "t_stars, num_turns",
    [([], 3), ([1], 0), ([0], 3), ([1.5], 3), (["1"], 3), ([True], 3)],
)
def test_rejects_bad_input(t_stars, num_turns):
    with pytest.raises(ValueError):
        summarize(t_stars, num_turns)


@settings(max_examples=200, deadline=None)
@given(eval_runs())
def test_multi_at_k_monotone_and_counts_solved(run):
    t_stars, num_turns = run
    multi = multi_at_k(t_stars, num_turns)
    values = [multi[f"multi@{k}"] for k in range(1, num_turns + 1)]
    assert list(multi) == [f"multi@{k}" for k in range(1, num_turns + 1)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(sum(t is not None and t <= num_turns for t in t_stars) / len(t_stars))


@settings(max_examples=200, deadline=None)
@given(eval_runs())
def test_correction_rate_consistent_with_multi_at_k(run):
    """1 - multi@k == prod_{t <= k} (1 - rate_t): each turn fixes a fraction of what is left."""
    t_stars, num_turns = run
    multi = multi_at_k(t_stars, num_turns)
    rates = correction_rate(t_stars, num_turns)
    assert len(rates) == num_turns
    assert rates[0] == pytest.approx(multi["multi@1"])
    for k in range(1, num_turns + 1):
        # a turn nobody enters (None) only happens once everything is solved: rate 0 is harmless
        unsolved = math.prod(1.0 - (r or 0.0) for r in rates[:k])
        assert unsolved == pytest.approx(1.0 - multi[f"multi@{k}"], abs=1e-12)
        assert rates[k - 1] is None or 0.0 <= rates[k - 1] <= 1.0
        assert (rates[k - 1] is None) == (k > 1 and multi[f"multi@{k - 1}"] == 1.0)


def test_sweep_aggregate_means_sds_and_bootstrap_intervals():
    from drift_jax.evaluation.sweep import aggregate

    rng = np.random.default_rng(0)
    t_stars = {s: {"always": [1] * 50, "coin": [1 if rng.random() < 0.5 else None for _ in range(400)]}
               for s in (0, 1, 2)}
    out = aggregate(t_stars, num_turns=3)
    always = out["methods"]["always"]["multi@1"]
    assert always == {"mean": 1.0, "sd": 0.0, "low": 1.0, "high": 1.0, "per_seed": [1.0, 1.0, 1.0]}
    coin = out["methods"]["coin"]["multi@3"]
    per_seed = [np.mean([t is not None for t in t_stars[s]["coin"]]) for s in (0, 1, 2)]
    assert coin["per_seed"] == pytest.approx(per_seed)
    assert coin["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    # 1,200 fair coins: the 95% interval of the mean is about +- 1.96 x 0.5 / sqrt(1200) = 0.028.
    assert coin["low"] < coin["mean"] < coin["high"] and 0.04 < coin["high"] - coin["low"] < 0.08
    with pytest.raises(ValueError, match="has methods"):
        aggregate({0: {"a": [1]}, 1: {"b": [1]}}, num_turns=1)


def test_distinct_paths_hand_case():
    answers = [["A", "B", "C"],   # all distinct, solved at turn 3
               ["A", "A", "B"],   # a repeat at turn 2: leaves the distinct paths after turn 2
               ["A", None, "B"],  # no answer at turn 2: the same
               ["B"],             # solved at turn 1
               ["C", "D", "E"]]   # all distinct, never solved
    t_stars = [3, None, None, 1, None]
    assert distinct_paths(answers, t_stars, 3) == [{"entered": 5, "solved": 1}, {"entered": 4, "solved": 0},
                                                   {"entered": 2, "solved": 1}]


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_distinct_paths_solved_at_turn_one_is_multi_at_one_and_entries_never_grow(data):
    num_turns = data.draw(st.integers(1, 5))
    letters = st.none() | st.sampled_from("ABCDE")
    answers = data.draw(st.lists(st.lists(letters, min_size=num_turns, max_size=num_turns), min_size=1, max_size=30))
    t_stars = [data.draw(st.none() | st.integers(1, num_turns)) for _ in answers]
    paths = distinct_paths(answers, t_stars, num_turns)
    assert paths[0] == {"entered": len(answers), "solved": sum(t == 1 for t in t_stars)}
    for t in range(1, num_turns):
        assert paths[t]["entered"] <= paths[t - 1]["entered"] - paths[t - 1]["solved"]
    assert all(0 <= p["solved"] <= p["entered"] for p in paths)
