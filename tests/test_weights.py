"""Properties of drift_jax.weights: returns, repetition penalty, importance weights, and
agreement with drift_jax.data.records on what a usable record is."""

from __future__ import annotations

import functools
import json
import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.data import records
from drift_jax.data.records import BadRecord, parse_record
from drift_jax.weights import (
    discounted_returns,
    host_importance_weights,
    importance_weights,
    normalize_answer,
    record_return,
    repetition_penalty,
    trajectory_returns,
    trajectory_weights,
)

from helpers import write_lines

# Few distinct shapes keep the number of XLA compilations (the real cost here) small.
SETTINGS = settings(max_examples=30, deadline=None)
RETURN = st.floats(-10.0, 10.0, width=32)


@st.composite
def groups(draw, returns=RETURN, max_groups=4, max_size=4):
    """(returns_n, group_ids_n, num_groups): random group sizes (>= 1), ids interleaved."""
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_groups))
    ids = np.repeat(np.arange(len(sizes)), sizes)
    ids = np.asarray(draw(st.permutations(ids.tolist())), np.int32)
    r = np.asarray(draw(st.lists(returns, min_size=len(ids), max_size=len(ids))), np.float32)
    return r, ids, len(sizes)


def reference_weights(returns_n, group_ids_n, beta, weight_norm="mean"):
    """Plain NumPy float64 w = exp(R/beta) / (group mean or sum of exp(R/beta))."""
    r = np.asarray(returns_n, np.float64)
    w = np.empty_like(r)
    for g in np.unique(group_ids_n):
        sel = group_ids_n == g
        e = np.exp((r[sel] - r[sel].max()) / beta)  # same value as exp(R/beta)/exp(max/beta)
        w[sel] = e / (e.sum() if weight_norm == "sum" else e.mean())
    return w


def group_reduce(w, ids, fn):
    return np.array([fn(w[ids == g]) for g in np.unique(ids)])


# ---------------------------------------------------------------- discounted returns


@SETTINGS
@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=4), elements=RETURN),
    st.floats(0.0, 1.0),
)
def test_discounted_returns_equals_loop(rewards_nt, gamma):
    expected = [sum(gamma**t * row[t] for t in range(len(row))) for row in rewards_nt.astype(np.float64)]
    np.testing.assert_allclose(discounted_returns(rewards_nt, gamma), expected, rtol=1e-5, atol=1e-4)


def test_discounted_returns_hand():
    out = discounted_returns(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), 0.9)
    np.testing.assert_allclose(out, [1.0, 0.81, 0.9 + 0.81], rtol=1e-6)
    assert out.dtype == np.float32


# ---------------------------------------------------------------- answers and penalty


def test_normalize_answer():
    assert normalize_answer("  X = \t2\n") == "x=2"
    assert normalize_answer("\\Frac{1}{ 2 }") == "\\frac{1}{2}"
    assert normalize_answer(normalize_answer(" A b ")) == normalize_answer(" A b ")


@pytest.mark.parametrize(
    "answers, lam, expected",
    [
        ([], 0.5, 0.0),
        (["a"], 0.5, 0.0),
        (["a", "b", "c"], 0.5, 0.0),
        (["a", "a", "a", "b"], 0.5, 0.5 * (1 - 2 / 4)),
        (["a", "a"], 0.5, 0.25),
        (["a", "a", "a", "b"], 1.0, 0.5),
    ],
)
def test_repetition_penalty(answers, lam, expected):
    assert repetition_penalty(answers, lam) == pytest.approx(expected)


# ---------------------------------------------------------------- importance weights


@SETTINGS
@given(groups(), st.floats(0.05, 20.0), st.sampled_from(["mean", "sum"]))
def test_weights_match_numpy_reference(data, beta, weight_norm):
    r, ids, _ = data
    w = importance_weights(r, ids, beta, weight_norm=weight_norm)
    assert w.dtype == np.float32 and w.shape == r.shape
    np.testing.assert_allclose(w, reference_weights(r, ids, beta, weight_norm), rtol=2e-4, atol=1e-6)


@SETTINGS
@given(groups(), st.floats(0.05, 20.0), st.sampled_from(["mean", "sum"]))
def test_host_weights_are_the_same_formula_in_float64(data, beta, weight_norm):
    r, ids, _ = data
    w = host_importance_weights(r, ids, beta, weight_norm)
    assert w.dtype == np.float64 and w.shape == r.shape
    np.testing.assert_allclose(w, reference_weights(r, ids, beta, weight_norm), rtol=1e-12)
    np.testing.assert_allclose(w, importance_weights(r, ids, beta, weight_norm), rtol=2e-4, atol=1e-6)
    with pytest.raises(ValueError, match="weight_norm"):
        host_importance_weights(r, ids, beta, "softmax")


@SETTINGS
@given(groups(), st.floats(0.1, 10.0))
def test_weights_mean_one_per_group_and_sum_one(data, beta):
    r, ids, _ = data
    np.testing.assert_allclose(group_reduce(np.asarray(importance_weights(r, ids, beta)), ids, np.mean), 1.0, rtol=1e-5)
    w_sum = np.asarray(importance_weights(r, ids, beta, weight_norm="sum"))
    np.testing.assert_allclose(group_reduce(w_sum, ids, np.sum), 1.0, rtol=1e-5)


@SETTINGS
@given(groups(), st.floats(0.1, 10.0), st.floats(-5.0, 5.0), st.data())
def test_weights_invariant_to_constant_shift_of_one_group(data, beta, shift, draw):
    r, ids, num_groups = data
    g = draw.draw(st.integers(0, num_groups - 1))
    shifted = np.where(ids == g, r + np.float32(shift), r).astype(np.float32)
    np.testing.assert_allclose(
        importance_weights(shifted, ids, beta), importance_weights(r, ids, beta), rtol=1e-3, atol=1e-6
    )


@SETTINGS
@given(groups(), st.floats(1e-3, 1e3))
def test_weights_monotone_in_return_within_group(data, beta):
    r, ids, _ = data
    w = np.asarray(importance_weights(r, ids, beta))
    for g in np.unique(ids):
        order = np.argsort(r[ids == g], kind="stable")
        assert np.all(np.diff(w[ids == g][order]) >= 0.0)


def test_weights_large_beta_uniform():
    r = np.array([-10.0, 10.0, 0.0, 3.0, -2.0], np.float32)
    ids = np.array([0, 0, 0, 1, 1])
    np.testing.assert_allclose(importance_weights(r, ids, 1e8), 1.0, atol=1e-6)
    np.testing.assert_allclose(importance_weights(r, ids, 1e4), 1.0, atol=3e-3)
    np.testing.assert_allclose(importance_weights(r, ids, 1e8, weight_norm="sum"), [1 / 3] * 3 + [0.5] * 2, atol=1e-6)


@SETTINGS
@given(groups(returns=st.integers(-20, 20).map(lambda k: k / 10)), st.sampled_from(["mean", "sum"]))
def test_weights_small_beta_puts_mass_on_best_ties_share(data, weight_norm):
    r, ids, _ = data  # returns on a 0.1 grid: exact ties, gaps >= 0.1 >> beta
    w = np.asarray(importance_weights(r, ids, 1e-4, weight_norm=weight_norm))
    for g in np.unique(ids):
        rg = r[ids == g]
        best = rg == rg.max()
        total = len(rg) if weight_norm == "mean" else 1.0
        np.testing.assert_allclose(w[ids == g], np.where(best, total / best.sum(), 0.0), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("weight_norm", ["mean", "sum"])
def test_group_of_one_gets_weight_one(weight_norm):
    r = np.array([5.0, -3.0, 0.5, 0.7], np.float32)
    ids = np.array([0, 1, 2, 2])
    w = np.asarray(importance_weights(r, ids, 0.1, weight_norm=weight_norm))
    np.testing.assert_allclose(w[:2], 1.0)


@SETTINGS
@given(groups(returns=st.floats(-1.0, 2.0, width=32)))
def test_weights_finite_tiny_beta(data):
    r, ids, _ = data
    assert np.all(np.isfinite(importance_weights(r, ids, 1e-4)))


@SETTINGS
@given(groups(), st.floats(-4.0, 4.0).map(lambda e: 10.0**e), st.sampled_from(["mean", "sum"]))
def test_weights_finite_over_beta_range(data, beta, weight_norm):
    r, ids, _ = data
    w = np.asarray(importance_weights(r, ids, beta, weight_norm=weight_norm))
    assert np.all(np.isfinite(w)) and np.all(w >= 0.0)


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_weights_reject_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        importance_weights(np.zeros(2), np.zeros(2, np.int32), beta)


def test_weights_reject_a_bad_weight_norm():
    with pytest.raises(ValueError, match="weight_norm"):
        importance_weights(np.zeros(2), np.zeros(2, np.int32), 0.1, weight_norm="softmax")


class ImportanceWeightsJitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_matches_reference(self):
        rng = np.random.default_rng(0)
        ids = rng.permutation(np.repeat(np.arange(4), [1, 3, 5, 2])).astype(np.int32)
        r = rng.uniform(-2, 2, ids.shape).astype(np.float32)
        for weight_norm in ("mean", "sum"):
            fn = self.variant(functools.partial(importance_weights, beta=0.3, weight_norm=weight_norm, num_groups=4))
            np.testing.assert_allclose(fn(r, ids), reference_weights(r, ids, 0.3, weight_norm), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_discounted_returns_jit(self):
        rewards = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
        np.testing.assert_allclose(self.variant(discounted_returns)(rewards, 0.5), [0.5, 1.0])


def test_weights_jit_traces_once():
    traces = []

    @jax.jit
    def fn(r, ids):
        traces.append(None)  # runs only while tracing
        return importance_weights(r, ids, 0.1, num_groups=3)

    ids = np.array([0, 1, 1, 2, 2, 2], np.int32)
    for seed in range(3):
        fn(np.random.default_rng(seed).normal(size=6).astype(np.float32), ids)
    assert len(traces) == 1


# ---------------------------------------------------------------- rollout records


def _records():
    return [
        # prompt a; turn keys out of order -> G = 0.9
        {"prompt_id": "a", "turn_rewards": {"t2": 1.0, "t1": 0.0}, "answer_norms": ["1", "2"], "format_penalty": 0.0},
        # prompt b; stale weight is ignored -> R = 1
        {"prompt_id": "b", "turn_rewards": {"t1": 1.0}, "answer_norms": ["5"], "format_penalty": 0.0, "weight": 99.0},
        # prompt a; t2 missing (= 0); "1" repeated; format penalty -> 0.81 - 0.1 - 0.5 * (1 - 2/3)
        {"prompt_id": "a", "turn_rewards": {"t1": 0.0, "t3": 1.0}, "answer_norms": ["1", "1", "3"], "format_penalty": -0.1},
        # prompt b; "x" and "X " are one answer after re-normalising; no format_penalty key -> -0.25
        {"prompt_id": "b", "turn_rewards": {"t1": 0.0, "t2": 0.0}, "answer_norms": ["x", "X "], "weight": 1.0},
        # prompt a; never parsed an answer -> R = format penalty
        {"prompt_id": "a", "turn_rewards": {"t1": 0.0, "t2": 0.0}, "answer_norms": [], "format_penalty": -0.2},
    ]


def test_trajectory_returns_hand():
    expected = [0.9, 1.0, 0.81 - 0.1 - 0.5 / 3, -0.25, -0.2]
    got = [trajectory_returns(rec, gamma=0.9) for rec in _records()]
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("weight_norm", ["mean", "sum"])
def test_trajectory_weights_hand(weight_norm):
    beta = 0.5
    ra = [0.9, 0.81 - 0.1 - 0.5 / 3, -0.2]
    rb = [1.0, -0.25]

    def group(rs):
        e = [math.exp(x / beta) for x in rs]
        z = sum(e) if weight_norm == "sum" else sum(e) / len(e)
        return [x / z for x in e]

    wa, wb = group(ra), group(rb)
    expected = [wa[0], wb[0], wa[1], wb[1], wa[2]]
    got = trajectory_weights(_records(), gamma=0.9, beta=beta, weight_norm=weight_norm)
    assert isinstance(got, np.ndarray) and got.shape == (5,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_trajectory_weights_empty():
    assert trajectory_weights([], gamma=0.9, beta=0.1).shape == (0,)


def test_record_return_of_the_parsed_record_is_trajectory_returns():
    for raw in _records():
        parsed = parse_record(raw, messages=False)
        assert record_return(parsed, 0.9, 0.3) == trajectory_returns(raw, 0.9, 0.3)
    # Answers are re-normalised: "X " and "x" are one answer whatever the file holds.
    parsed = parse_record(_records()[3], messages=False)
    assert parsed.answer_norms == ("x", "X ") and record_return(parsed, 0.9) == pytest.approx(-0.25)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("turn_rewards"), r"missing required field 'turn_rewards'"),
        (lambda r: r.pop("answer_norms"), r"missing required field 'answer_norms'"),
        (lambda r: r.pop("prompt_id"), r"missing required field 'prompt_id'"),
        (lambda r: r.update(prompt_id=""), r"field 'prompt_id' is '', not a non-empty string"),
        (lambda r: r["turn_rewards"].update(t2=float("nan")), r"field 'turn_rewards.t2' is nan, not a finite number"),
        (lambda r: r["turn_rewards"].update(t2=float("inf")), r"field 'turn_rewards.t2' is inf"),
        (lambda r: r["turn_rewards"].update(t2="1.0"), r"field 'turn_rewards.t2' is '1.0'"),
        (lambda r: r["turn_rewards"].update(t2=True), r"field 'turn_rewards.t2' is True"),
        # Accepted before weights parsed through records: float32 overflow, a zero-padded key.
        (lambda r: r["turn_rewards"].update(t2=1e39), r"field 'turn_rewards.t2' is 1e\+39"),
        (lambda r: r["turn_rewards"].update(t02=1.0), r"field 'turn_rewards' has key 't02', expected 't1'"),
        (lambda r: r["turn_rewards"].update(turn2=1.0), r"field 'turn_rewards' has key 'turn2'"),
        (lambda r: r.update(turn_rewards=[1.0]), r"field 'turn_rewards' must be an object"),
        (lambda r: r.update(answer_norms=[3]), r"field 'answer_norms' must be a list of strings"),
        (lambda r: r.update(format_penalty=None), r"field 'format_penalty' is None, not a finite number <= 0"),
        (lambda r: r.update(format_penalty=0.1), r"field 'format_penalty' is 0.1"),
        (lambda r: r.update(t_star=0), r"field 't_star' is 0, not null or a turn number >= 1"),
    ],
)
def test_trajectory_weights_errors_name_record_and_field(mutate, message):
    records_ = _records()
    mutate(records_[2])
    with pytest.raises(BadRecord, match=rf"^trajectory record 2: {message}"):
        trajectory_weights(records_, gamma=0.9, beta=0.1)
    with pytest.raises(BadRecord, match=rf"^record: {message}"):
        trajectory_returns(records_[2], gamma=0.9)
    assert issubclass(BadRecord, ValueError)  # callers catching ValueError still do


def test_weights_do_not_need_messages_nor_check_them():
    record = {**_records()[0], "messages": "not a dialogue"}
    assert trajectory_returns(record, gamma=0.9) == pytest.approx(0.9)


# ---------------------------------------------------------------- weights and the reader agree

_KEYS = st.sampled_from(["t1", "t2", "t3", "t10", "t01", "t0", "t00", "x1", "T1", "t", "1", "t1 ", " t1",
                         "t-1", "t+1", "t1.0", "t1e0", "t\u0661", "tt1"]) | st.text(max_size=4)
_VALUES = (st.floats(-2.0, 2.0) | st.integers(-2, 2) | st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), 1e39, -3.5e38, 3.4e38, 10**40, True, False, None, "1", [1.0]]))


@settings(max_examples=200, deadline=None)
@given(rewards=st.dictionaries(_KEYS, _VALUES, max_size=3),
       # ...: no format_penalty key
       penalty=st.sampled_from([0.0, -0.1, 0.1, -1e39, float("nan"), None, True, "x", ...]),
       answers=st.sampled_from([["a"], [], ["a", 1], "a", None]))
def test_a_record_the_reader_accepts_is_one_the_weights_accept(tmp_path_factory, rewards, penalty, answers):
    """``records.read_jsonl`` and ``trajectory_returns`` accept exactly the same records
    (weights need no messages; here the dialogue is always valid)."""
    record = {"prompt_id": "p", "turn_rewards": rewards, "answer_norms": answers,
              "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    if penalty is not ...:
        record["format_penalty"] = penalty
    path = write_lines(tmp_path_factory.mktemp("agree") / "r.jsonl", [json.dumps(record)])
    try:
        read, _ = records.read_jsonl(path)
    except BadRecord as e:
        reader_error = str(e).removeprefix(f"{path}:1: ")
    else:
        reader_error = None
        assert read == [json.loads(json.dumps(record))]
    try:
        value = trajectory_returns(record, gamma=0.9)
    except BadRecord as e:
        weights_error = str(e).removeprefix("record: ")
    else:
        weights_error = None
        assert math.isfinite(value)
        assert np.isfinite(trajectory_weights([record, record], gamma=0.9, beta=0.1)).all()
    assert reader_error == weights_error  # the same verdict, for the same reason
