"""Properties of drift_jax.diagnostics: ESS limits and invariances, monotonicity in beta,
choose_beta hitting its target, the all-fail share and the histogram."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax import diagnostics as dg
from drift_jax.data.records import BadRecord
from drift_jax.weights import host_importance_weights, trajectory_returns, trajectory_weights

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def grouped_returns(draw, max_groups=4, max_size=6):
    """(returns_n, group_ids_n): random group sizes (>= 1), ids interleaved."""
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_groups))
    ids = np.repeat(np.arange(len(sizes)), sizes)
    ids = np.asarray(draw(st.permutations(ids.tolist())), np.int64)
    r = draw(st.lists(st.floats(-3.0, 3.0), min_size=len(ids), max_size=len(ids)))
    return np.asarray(r, np.float64), ids


def record(prompt_id, t_star=None, answers=("a",), fmt=0.0):
    """A release-format record whose return is 1{t_star} * gamma^(t_star-1) + fmt - P."""
    rewards = {f"t{t}": float(t == t_star) for t in range(1, (t_star or len(answers)) + 1)}
    return {"prompt_id": prompt_id, "t_star": t_star, "turn_rewards": rewards,
            "answer_norms": list(answers), "format_penalty": fmt}


def mixed_records():
    """Three prompts: one solved at turn 1 by one sample, one solved late, one never."""
    return [
        record("p0", t_star=1), record("p0", answers=("a", "a")), record("p0", answers=("b", "c")),
        record("p0", answers=("a",), fmt=-0.1),
        record("p1", t_star=3, answers=("a", "b", "c")), record("p1", answers=("a", "a", "a")),
        record("p1", t_star=2, answers=("a", "b")), record("p1", answers=("a", "b", "a")),
        record("p2", answers=("a", "a")), record("p2", answers=("a", "b")),
        record("p2", answers=("c",), fmt=-0.2), record("p2", answers=("c", "c", "d")),
    ]


# ---------------------------------------------------------------- ESS


@SETTINGS
@given(st.integers(1, 20), st.floats(1e-3, 1e3))
def test_ess_of_equal_weights_is_group_size(k, value):
    ess = dg.effective_sample_size(np.full(k, value), np.zeros(k, np.int64))
    np.testing.assert_allclose(ess, [k], rtol=1e-12)
    assert dg.mean_ess_fraction(np.full(k, value), np.zeros(k, np.int64)) == pytest.approx(1.0)


@SETTINGS
@given(st.integers(2, 20), st.floats(1e-300, 1e-12))
def test_ess_is_one_when_one_weight_dominates(k, tiny):
    w = np.full(k, tiny)
    w[k // 2] = 1.0
    ess = dg.effective_sample_size(w, np.zeros(k, np.int64))
    np.testing.assert_allclose(ess, [1.0], rtol=1e-9)


@SETTINGS
@given(grouped_returns(), st.floats(1e-2, 1e2))
def test_ess_lies_in_one_to_k_and_is_scale_invariant(data, scale):
    w = np.random.default_rng(0).uniform(0.01, 5.0, data[0].size)
    ess = dg.effective_sample_size(w, data[1])
    sizes = np.bincount(data[1])
    assert np.all(ess >= 1 - 1e-9) and np.all(ess <= sizes + 1e-9)
    np.testing.assert_allclose(dg.effective_sample_size(scale * w, data[1]), ess, rtol=1e-9)


@SETTINGS
@given(grouped_returns(), st.floats(0.05, 20.0), st.lists(st.floats(-5.0, 5.0), min_size=4, max_size=4))
def test_weights_and_ess_are_invariant_to_a_shift_of_a_groups_returns(data, beta, shifts):
    returns, ids = data
    shifted = returns + np.asarray(shifts)[ids]
    np.testing.assert_allclose(host_importance_weights(shifted, ids, beta),
                               host_importance_weights(returns, ids, beta), rtol=1e-9, atol=1e-300)
    assert dg.ess_fraction_at_beta(shifted, ids, beta) == pytest.approx(
        dg.ess_fraction_at_beta(returns, ids, beta), rel=1e-9)


def test_host_weights_of_returns_match_the_library_weights():
    records = mixed_records()
    ids, _ = dg.group_indices([r["prompt_id"] for r in records])
    returns = [trajectory_returns(r, 0.9, 0.5) for r in records]
    np.testing.assert_allclose(host_importance_weights(returns, ids, 0.3),
                               trajectory_weights(records, 0.9, 0.3, 0.5), rtol=1e-5)


# ---------------------------------------------------------------- monotonicity and choose_beta


@SETTINGS
@given(grouped_returns(), st.floats(-9.0, 9.0), st.floats(1e-3, 5.0))
def test_ess_fraction_is_non_decreasing_in_beta(data, log_beta, log_step):
    returns, ids = data
    lower = dg.ess_fraction_at_beta(returns, ids, float(np.exp(log_beta)))
    upper = dg.ess_fraction_at_beta(returns, ids, float(np.exp(log_beta + log_step)))
    assert upper >= lower - 1e-12


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8, 0.95])
def test_choose_beta_hits_the_target(target):
    records = mixed_records()
    beta = dg.choose_beta(records, gamma=0.9, lam=0.5, target_ess_fraction=target, tol=1e-4)
    assert dg.BETA_RANGE[0] < beta < dg.BETA_RANGE[1]
    ids, _ = dg.group_indices([r["prompt_id"] for r in records])
    w = trajectory_weights(records, 0.9, beta, 0.5)
    assert dg.mean_ess_fraction(w, ids) == pytest.approx(target, abs=2e-4)  # float32 weights


def test_choose_beta_clips_unreachable_targets_to_the_range():
    records = mixed_records()
    # As beta -> 0 only the best trajectory of each group keeps weight: ESS -> 1 per group.
    assert dg.choose_beta(records, 0.9, 0.5, target_ess_fraction=0.1) == dg.BETA_RANGE[0]
    # Equal returns everywhere: ESS / K = 1 for every beta.
    same = [record("p0"), record("p0"), record("p1"), record("p1")]
    assert dg.choose_beta(same, 0.9, 0.5, target_ess_fraction=1.0) == dg.BETA_RANGE[0]
    with pytest.raises(ValueError, match="target_ess_fraction"):
        dg.choose_beta(records, 0.9, 0.5, target_ess_fraction=0.0)


def test_choose_beta_names_a_bad_record():
    records = mixed_records()
    del records[5]["answer_norms"]
    with pytest.raises(BadRecord, match=r"^trajectory record 5: missing required field 'answer_norms'"):
        dg.choose_beta(records, 0.9, 0.5, 0.5)


_ENTRY_POINTS = {
    "choose_beta": lambda records: dg.choose_beta(records, 0.9, 0.5, 0.5),
    "all_fail_share": dg.all_fail_share,
    "summary": lambda records: dg.summary(records, np.ones(len(records))),
}


@pytest.mark.parametrize("entry", list(_ENTRY_POINTS))
@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r.update(t_star=0), r"field 't_star' is 0, not null or a turn number >= 1"),
    (lambda r: r.update(turn_rewards={"t01": 1.0}), r"field 'turn_rewards' has key 't01'"),
    (lambda r: r.update(turn_rewards={"t1": 1e39}), r"field 'turn_rewards.t1' is 1e\+39"),
    (lambda r: r.update(format_penalty=0.5), r"field 'format_penalty' is 0.5"),
    (lambda r: r.update(prompt_id=3), r"field 'prompt_id' is 3"),
])
def test_diagnostics_parse_records_as_the_weights_do(entry, corrupt, message):
    """Every entry point reads records through ``records.parse_record``: the same checks
    and the same ``trajectory record {i}: field ...`` messages as ``trajectory_weights``."""
    records = mixed_records()
    corrupt(records[7])
    with pytest.raises(BadRecord, match=rf"^trajectory record 7: {message}"):
        _ENTRY_POINTS[entry](records)
    with pytest.raises(BadRecord, match=rf"^trajectory record 7: {message}"):
        trajectory_weights(records, 0.9, 0.3, 0.5)
    # The dialogue is not read: a record without messages is fine.
    assert all("messages" not in r for r in mixed_records())


def test_diagnostics_of_no_records_raise():
    for entry in ("choose_beta", "all_fail_share"):
        with pytest.raises(ValueError, match="no trajectory records"):
            _ENTRY_POINTS[entry]([])


# ---------------------------------------------------------------- all-fail share, histogram, summary


def test_all_fail_share_on_hand_built_records():
    assert dg.all_fail_share(mixed_records()) == pytest.approx(1 / 3)  # p2 never solved
    assert dg.all_fail_share([record("a"), record("b", t_star=2, answers=("x", "y"))]) == 0.5
    assert dg.all_fail_share([record("a", t_star=1)]) == 0.0


@SETTINGS
@given(st.lists(st.floats(0.0, 50.0), min_size=1, max_size=40), st.integers(1, 20))
def test_histogram_counts_every_weight_once_on_log_spaced_edges(weights, num_bins):
    counts, edges = dg.weight_histogram(weights, num_bins)
    assert counts.sum() == len(weights) and counts.shape == (num_bins,)
    ratios = edges[1:] / edges[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    assert edges[-1] >= max(weights)


def test_summary_is_json_ready_and_consistent():
    records = mixed_records()
    w = trajectory_weights(records, 0.9, 0.3, 0.5)
    s = dg.summary(records, w)
    json.dumps(s)  # plain Python types only
    assert s["num_trajectories"] == 12 and s["num_groups"] == 3
    assert s["all_fail_share"] == pytest.approx(1 / 3)
    assert s["success_share"] == pytest.approx(3 / 12)
    assert 1 / 4 <= s["min_ess_fraction"] <= s["mean_ess_fraction"] <= 1.0
    assert s["mean_ess"] == pytest.approx(4 * s["mean_ess_fraction"])  # every group has K = 4
    assert sum(s["histogram"]["counts"]) == 12
