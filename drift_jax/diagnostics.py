"""Diagnostics of DRIFT's importance weights (host side, NumPy float64).

How concentrated are the weights? Per prompt group g of K_g trajectories,

    ESS_g = (sum_i w_i)^2 / sum_i w_i^2          in [1, K_g]  (Kish's effective sample size)

is K_g when the weights are equal and 1 when one trajectory carries all the weight.
ESS is invariant to scaling the weights, so "mean" and "sum" ``weight_norm`` give the same
value, and to shifting a group's returns by a constant (which only rescales its weights).
``mean_ess_fraction`` averages ESS_g / K_g over groups: 1 means DRIFT is plain SFT,
1/K means it keeps one trajectory per prompt.

``choose_beta`` picks the temperature beta that gives a target mean ESS / K: beta is hard to
transfer between tasks (it is in units of return), a target ESS fraction is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from drift_jax.data.records import Record
from drift_jax.weights import group_indices, host_importance_weights, parse_trajectories, returns_and_groups

BETA_RANGE = (1e-4, 1e4)


def effective_sample_size(weights_n, group_ids_n, num_groups: int | None = None) -> np.ndarray:
    """ESS_g = (sum w)^2 / sum w^2 of each group.

    Args:
      weights_n: [N] non-negative weights.
      group_ids_n: [N] int group ids in 0..G-1.
      num_groups: G (default max id + 1).
    Returns:
      [G] float64; 0 for a group that is empty or whose weights are all 0.
    """
    w = np.asarray(weights_n, np.float64)
    ids = np.asarray(group_ids_n, np.int64)
    if w.shape != ids.shape or w.ndim != 1:
        raise ValueError(f"weights {w.shape} and group ids {ids.shape} must be matching [N] arrays")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and >= 0")
    g = int(ids.max()) + 1 if num_groups is None and ids.size else (num_groups or 0)
    sum_g = np.bincount(ids, weights=w, minlength=g)
    sq_g = np.bincount(ids, weights=w * w, minlength=g)
    return np.divide(sum_g**2, sq_g, out=np.zeros(g), where=sq_g > 0)


def mean_ess_fraction(weights_n, group_ids_n, num_groups: int | None = None) -> float:
    """Mean over non-empty groups of ESS_g / K_g, in [1/K, 1]."""
    ids = np.asarray(group_ids_n, np.int64)
    ess_g = effective_sample_size(weights_n, ids, num_groups)
    size_g = np.bincount(ids, minlength=ess_g.size)
    present = size_g > 0
    if not present.any():
        raise ValueError("no trajectories: the ESS fraction is undefined")
    return float(np.mean(ess_g[present] / size_g[present]))


def ess_fraction_at_beta(returns_n, group_ids_n, beta: float) -> float:
    """Mean ESS / K of the DRIFT weights at temperature ``beta``.

    Non-decreasing in beta: with x = 1/beta and p_a(i) ∝ exp(a x R_i),
    d log ESS_g / dx = 2 (E_{p_1}[R] - E_{p_2}[R]) <= 0, because tilting a distribution
    further towards high returns cannot lower its mean return. The limits are
    n_max_g / K_g (the trajectories tied at the group's best return) as beta -> 0 and
    1 as beta -> inf.
    """
    return mean_ess_fraction(host_importance_weights(returns_n, group_ids_n, beta), group_ids_n)


def _parse(records: Sequence[Mapping[str, Any]]) -> list[Record]:
    if not records:
        raise ValueError("no trajectory records")
    return parse_trajectories(records)


def choose_beta(
    records: Sequence[Mapping[str, Any]],
    gamma: float,
    lam: float = 0.5,
    target_ess_fraction: float = 0.5,
    *,
    tol: float = 1e-3,
    max_iter: int = 200,
) -> float:
    """The beta in [1e-4, 1e4] whose weights have mean ESS / K = ``target_ess_fraction``.

    Bisection on log(beta), valid because the ESS fraction is non-decreasing in beta
    (``ess_fraction_at_beta``). Stops when the fraction is within ``tol`` of the target.
    A target below the fraction at beta = 1e-4 (ties at the best return keep it above
    1/K) returns 1e-4; one above the fraction at 1e4 returns 1e4.
    """
    if not 0.0 < target_ess_fraction <= 1.0:
        raise ValueError(f"target_ess_fraction must be in (0, 1], got {target_ess_fraction!r}")
    returns_n, ids, _ = returns_and_groups(_parse(records), gamma, lam)
    lo, hi = math.log(BETA_RANGE[0]), math.log(BETA_RANGE[1])
    if ess_fraction_at_beta(returns_n, ids, BETA_RANGE[0]) >= target_ess_fraction:
        return BETA_RANGE[0]
    if ess_fraction_at_beta(returns_n, ids, BETA_RANGE[1]) <= target_ess_fraction:
        return BETA_RANGE[1]
    mid = 0.5 * (lo + hi)
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        frac = ess_fraction_at_beta(returns_n, ids, math.exp(mid))
        if abs(frac - target_ess_fraction) <= tol:
            break
        lo, hi = (mid, hi) if frac < target_ess_fraction else (lo, mid)
    return math.exp(mid)


def all_fail_share(records: Sequence[Mapping[str, Any]]) -> float:
    """Share of prompt groups in which no trajectory was ever correct (``t_star`` null).

    Such a group carries no success signal: its weights only rank failures by their
    format and repetition penalties.
    """
    return _all_fail_share(_parse(records))


def _all_fail_share(parsed: Sequence[Record]) -> float:
    solved: dict[str, bool] = {}
    for r in parsed:
        solved[r.prompt_id] = solved.get(r.prompt_id, False) or r.t_star is not None
    return sum(not s for s in solved.values()) / len(solved)


def weight_histogram(weights_n, num_bins: int = 16, low: float = 1e-4,
                     high: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Counts of weights in log-spaced bins from ``low`` to ``high``.

    Weights span orders of magnitude (exp(R/beta)), so linear bins would put nearly all of
    them in the first bin. Values outside [low, high] (including exact zeros) are counted
    in the first or last bin. ``high`` defaults to max(max weight, 1) (group-mean weights
    are at most K).

    Returns:
      (counts [num_bins] int64, edges [num_bins + 1] float64).
    """
    w = np.asarray(weights_n, np.float64)
    if high is None:
        high = max(float(w.max()) if w.size else 1.0, 1.0)
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    edges = np.geomspace(low, high, num_bins + 1)
    counts, _ = np.histogram(np.clip(w, low, high), bins=edges)
    return counts.astype(np.int64), edges


def summary(records: Sequence[Mapping[str, Any]], weights_n, *, num_bins: int = 16) -> dict:
    """JSON-ready weight diagnostics of one rollout set (``weights_n`` in record order).

    Keys: num_trajectories, num_groups, mean_ess, mean_ess_fraction, min_ess_fraction,
    all_fail_share, success_share (trajectories ever correct), max_weight,
    top_decile_weight_share (share of total weight on the 10% heaviest trajectories),
    histogram {counts, edges}.
    """
    w = np.asarray(weights_n, np.float64)
    if len(records) != w.size:
        raise ValueError(f"{len(records)} records but {w.size} weights")
    parsed = _parse(records)
    ids, num_groups = group_indices([r.prompt_id for r in parsed])
    ess_g = effective_sample_size(w, ids, num_groups)
    frac_g = ess_g / np.bincount(ids, minlength=num_groups)
    counts, edges = weight_histogram(w, num_bins)
    top = np.sort(w)[::-1][: max(1, w.size // 10)]
    return {
        "num_trajectories": int(w.size),
        "num_groups": num_groups,
        "mean_ess": float(ess_g.mean()),
        "mean_ess_fraction": float(frac_g.mean()),
        "min_ess_fraction": float(frac_g.min()),
        "all_fail_share": _all_fail_share(parsed),
        "success_share": float(np.mean([r.t_star is not None for r in parsed])),
        "max_weight": float(w.max()),
        "top_decile_weight_share": float(top.sum() / w.sum()) if w.sum() > 0 else 0.0,
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    }
