"""Returns and DRIFT importance weights (``docs/method.md``, stage 2).

Two layers:
- array functions (`discounted_returns`, `importance_weights`): pure jnp, jit-compatible,
  float32;
- host functions (`normalize_answer`, `repetition_penalty`, `record_return`,
  `trajectory_returns`, `trajectory_weights`): plain Python over rollout records, read
  through ``records.parse_record`` (the one place that decides what a record is), and
  `host_importance_weights`: the same weights in NumPy float64.

    R(tau) = sum_t gamma^(t-1) r_t + format_penalty - lam * (1 - n_unique / n_answers)
    w(tau) = exp(R/beta) / mean_{tau' of the same prompt} exp(R(tau')/beta)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drift_jax.data.records import Record, normalize_answer, parse_record

# What a group's weights are normalised to: mean 1 or sum 1.
WEIGHT_NORMS = ("mean", "sum")


@jax.jit
def discounted_returns(turn_rewards_nt: jax.Array, gamma: float) -> jax.Array:
    """Discounted success G = sum_t gamma^(t-1) * r_t, turns numbered from t = 1.

    Args:
      turn_rewards_nt: [N, T] per-turn rewards (turn t at column t-1; 0 for turns
        that were not played).
      gamma: discount in [0, 1].
    Returns:
      [N] float32.
    """
    rewards_nt = jnp.asarray(turn_rewards_nt, jnp.float32)
    discounts_t = jnp.power(jnp.asarray(gamma, jnp.float32), jnp.arange(rewards_nt.shape[-1], dtype=jnp.float32))
    return jnp.sum(rewards_nt * discounts_t, axis=-1)




def repetition_penalty(answers: Sequence[str], lam: float = 0.5) -> float:
    """P = lam * (1 - n_unique / n_answers) over one trajectory's normalised answers.

    0.0 when no answer was given (a reply without a parsable answer is charged by the
    format penalty instead).
    """
    if not answers:
        return 0.0
    return lam * (1.0 - len(set(answers)) / len(answers))


def _check_weight_args(beta: float, weight_norm: str) -> None:
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"weight_norm must be one of {WEIGHT_NORMS}, got {weight_norm!r}")
    if not float(beta) > 0.0:
        raise ValueError(f"beta must be > 0, got {beta!r}")


def _num_groups(group_ids_n) -> int:
    """G = max(id) + 1 of host group ids (0 for none); negative ids are an error."""
    ids = np.asarray(group_ids_n)
    if ids.size and ids.min() < 0:
        raise ValueError(f"group ids must be >= 0, got min {ids.min()}")
    return int(ids.max()) + 1 if ids.size else 0


def importance_weights(
    returns_n: jax.Array,
    group_ids_n: jax.Array,
    beta: float,
    weight_norm: str = "mean",
    num_groups: int | None = None,
) -> jax.Array:
    """Self-normalised weights exp(R/beta) / Z(prompt), one per trajectory.

    Args:
      returns_n: [N] returns R.
      group_ids_n: [N] int group (prompt) ids in 0..G-1; groups may have any size >= 1.
      beta: temperature > 0 (a Python number: it is validated on the host).
      weight_norm: "mean" -> Z = group mean of exp(R/beta) (weights average 1 per group);
        "sum" -> Z = group sum (weights sum to 1 per group).
      num_groups: G, static. None infers max(id) + 1 on the host, which needs concrete
        ids: pass it explicitly under jit.
    Returns:
      [N] float32, finite for any finite returns and beta > 0.
    """
    _check_weight_args(beta, weight_norm)
    if num_groups is None:
        num_groups = _num_groups(group_ids_n)

    return _importance_weights(
        jnp.asarray(returns_n, jnp.float32),
        jnp.asarray(group_ids_n, jnp.int32),
        jnp.float32(beta),
        weight_norm=weight_norm,
        num_groups=num_groups,
    )


def host_importance_weights(returns_n, group_ids_n, beta: float, weight_norm: str = "mean") -> np.ndarray:
    """``importance_weights`` on the host in NumPy float64: [N] returns and group ids ->
    [N] float64 weights, the same formula. Float64 keeps a bisection over beta
    (``diagnostics.choose_beta``) exact."""
    _check_weight_args(beta, weight_norm)
    group_ids_n = np.asarray(group_ids_n, np.int64)
    return _self_normalised(np.asarray(returns_n, np.float64), group_ids_n, beta, weight_norm,
                            _num_groups(group_ids_n), np, _np_segment_max, _np_segment_sum)


# One compiled program per (N, G, weight_norm) instead of one per eager op; inlined when the
# caller is itself jitted.
@functools.partial(jax.jit, static_argnames=("weight_norm", "num_groups"))
def _importance_weights(returns_n, group_ids_n, beta, *, weight_norm, num_groups):
    return _self_normalised(returns_n, group_ids_n, beta, weight_norm, num_groups, jnp, jax.ops.segment_max,
                            jax.ops.segment_sum)


def _np_segment_max(data_n, segment_ids_n, num_segments):
    out_g = np.full(num_segments, -np.inf)
    np.maximum.at(out_g, segment_ids_n, data_n)
    return out_g


def _np_segment_sum(data_n, segment_ids_n, num_segments):
    return np.bincount(segment_ids_n, weights=data_n, minlength=num_segments)


def _self_normalised(returns_n, group_ids_n, beta, weight_norm, num_groups, xp, segment_max, segment_sum):
    """exp(R/beta) / Z per group in array module ``xp`` (jax.numpy or numpy) with its
    ``segment_max`` / ``segment_sum(data, ids, num_segments=G)``."""
    # Subtract the group max from R *before* dividing by beta: the difference is <= 0, so
    # exp() lies in (0, 1] and the group's best trajectory contributes exactly 1 to Z ->
    # no overflow for tiny beta and no 0/0 when every exp would underflow.
    max_g = segment_max(returns_n, group_ids_n, num_segments=num_groups)
    scaled_n = xp.exp((returns_n - max_g[group_ids_n]) / beta)
    sum_g = segment_sum(scaled_n, group_ids_n, num_segments=num_groups)
    if weight_norm == "sum":
        return scaled_n / sum_g[group_ids_n]
    count_g = segment_sum(xp.ones_like(scaled_n), group_ids_n, num_segments=num_groups)
    return scaled_n * count_g[group_ids_n] / sum_g[group_ids_n]


def record_return(record: Record, gamma: float, lam: float = 0.5) -> float:
    """R = G + format_penalty - P of one parsed record (``records.parse_record``).

    The answers are re-normalised (the normalisation is idempotent), so a file written
    with another normalisation still counts repeats the same way.
    """
    g = sum(gamma**t * r for t, r in enumerate(record.turn_rewards))
    penalty = repetition_penalty([normalize_answer(a) for a in record.answer_norms], lam)
    return g + record.format_penalty - penalty


def trajectory_returns(record: Mapping[str, Any], gamma: float, lam: float = 0.5) -> float:
    """R = G + format_penalty - P for ONE rollout record (reference release format).

    Uses `turn_rewards` (missing turns are 0), `answer_norms` and `format_penalty`
    (<= 0, missing -> 0.0). Raises ``records.BadRecord`` (a ValueError) naming the field
    when the record is malformed.
    """
    return record_return(parse_record(record, messages=False), gamma, lam)


def parse_trajectories(trajectories: Sequence[Mapping[str, Any]]) -> list[Record]:
    """``records.parse_record`` of each trajectory (rewards only), errors naming its index."""
    return [parse_record(r, f"trajectory record {i}", messages=False) for i, r in enumerate(trajectories)]


def group_indices(prompt_ids: Sequence[str]) -> tuple[np.ndarray, int]:
    """Map prompt ids to 0..G-1 in order of first appearance: ([N] int64 group ids, G)."""
    group_of: dict[str, int] = {}
    ids = np.asarray([group_of.setdefault(p, len(group_of)) for p in prompt_ids], np.int64)
    return ids, len(group_of)


def returns_and_groups(records: Sequence[Record], gamma: float, lam: float = 0.5):
    """([N] float64 returns, [N] int64 group ids, G) of parsed records (``group_indices``)."""
    ids, num_groups = group_indices([r.prompt_id for r in records])
    return np.asarray([record_return(r, gamma, lam) for r in records], np.float64), ids, num_groups


def trajectory_weights(
    trajectories: Sequence[Mapping[str, Any]],
    gamma: float,
    beta: float,
    lam: float = 0.5,
    weight_norm: str = "mean",
) -> np.ndarray:
    """One importance weight per rollout record, in input order.

    Records are grouped by their string `prompt_id` (mapped to 0..G-1 in order of first
    appearance). A stored "weight" field is ignored: weights are always recomputed.
    ``weight_norm`` as ``importance_weights``'.

    Returns:
      [N] float32 NumPy array.
    """
    _check_weight_args(beta, weight_norm)  # fail before parsing thousands of records
    returns_n, group_ids_n, num_groups = returns_and_groups(parse_trajectories(trajectories), gamma, lam)
    if not num_groups:
        return np.zeros((0,), np.float32)
    weights_n = importance_weights(returns_n.astype(np.float32), group_ids_n.astype(np.int32), beta,
                                   weight_norm=weight_norm, num_groups=num_groups)
    return np.asarray(weights_n)
