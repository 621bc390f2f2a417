"""Several seeds of one experiment, summarised: mean, sample sd across seeds, and a
bootstrap interval over prompts, per method and metric.

A claim about the embedded task is only worth its spread: a single seed's multi@5 moves by
0.1 or more with the seed (and with float rounding), so a comparison is read off the
mean over seeds and its intervals, never off one run.

The interval is a percentile bootstrap over evaluation prompts: each replicate resamples,
for every seed, that seed's prompts with replacement, recomputes the metric per seed and
averages over seeds; the interval holds the central 95% of the replicates. It measures
the prompt-sampling noise of the mean; the sd across seeds measures everything that
changes with the seed (rollouts, training order, evaluation prompts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from drift_jax.evaluation.multi_at_k import summarize


def _solved_at(t_stars: Sequence[int | None], num_turns: int) -> np.ndarray:
    """[N] the turn each prompt was solved at, num_turns + 1 when never."""
    return np.array([num_turns + 1 if t is None else int(t) for t in t_stars], np.int64)


def _multi_at_k(solved_n: np.ndarray, num_turns: int) -> np.ndarray:
    """[..., T] multi@1..T of solve turns [..., N]."""
    ks = np.arange(1, num_turns + 1)
    return (solved_n[..., None, :] <= ks[:, None]).mean(axis=-1)


def aggregate(t_stars: Mapping[int, Mapping[str, Sequence[int | None]]], num_turns: int,
              num_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Summary of a sweep.

    Args:
      t_stars: {seed: {method: per-prompt solve turns (None = never)}}; every seed must
        have the same methods (each method's prompts may differ between seeds).
      num_turns: T.
      num_bootstrap: bootstrap replicates.
      seed: the bootstrap's random seed.
      level: the interval's coverage.

    Returns:
      {"seeds": [...], "methods": {method: {"multi@k": {"mean", "sd", "low", "high",
      "per_seed"}, ..., "correction_rate": {"mean": [T], "sd": [T]}}}}; sd is the sample
      sd over seeds (ddof 1; 0 for one seed).
    """
    seeds = sorted(t_stars)
    if not seeds:
        raise ValueError("aggregate needs at least one seed")
    methods = list(t_stars[seeds[0]])
    for s in seeds:
        if list(t_stars[s]) != methods:
            raise ValueError(f"seed {s} has methods {list(t_stars[s])}, seed {seeds[0]} has {methods}")
    rng = np.random.default_rng(seed)
    ddof = 1 if len(seeds) > 1 else 0
    tail = (1 - level) / 2
    out = {}
    for method in methods:
        per_seed = [summarize(t_stars[s][method], num_turns) for s in seeds]
        boot = np.zeros((num_bootstrap, num_turns))
        for s in seeds:
            solved_n = _solved_at(t_stars[s][method], num_turns)
            idx_bn = rng.integers(0, len(solved_n), (num_bootstrap, len(solved_n)))
            boot += _multi_at_k(solved_n[idx_bn], num_turns) / len(seeds)
        stats = {}
        for k in range(1, num_turns + 1):
            values = np.array([r[f"multi@{k}"] for r in per_seed])
            low, high = np.quantile(boot[:, k - 1], [tail, 1 - tail])
            stats[f"multi@{k}"] = {"mean": float(values.mean()), "sd": float(values.std(ddof=ddof)),
                                   "low": float(low), "high": float(high), "per_seed": values.tolist()}
        rates = np.array([r["correction_rate"] for r in per_seed], float)
        stats["correction_rate"] = {"mean": rates.mean(axis=0).tolist(), "sd": rates.std(axis=0, ddof=ddof).tolist()}
        out[method] = stats
    return {"seeds": seeds, "methods": out, "level": level, "num_bootstrap": num_bootstrap}


def sweep_table(summary: dict, num_turns: int) -> str:
    """Markdown: one row per method, multi@k as mean +- sd [low, high]."""
    ks = [f"multi@{k}" for k in range(1, num_turns + 1)]
    level = int(round(100 * summary["level"]))
    lines = [f"Seeds {', '.join(map(str, summary['seeds']))}: mean +- sd over seeds "
             f"[{level}% bootstrap interval over prompts]\n",
             "| method | " + " | ".join(ks) + " |", "| --- |" + " --- |" * len(ks)]
    for method, stats in summary["methods"].items():
        cells = [f"{stats[k]['mean']:.3f} +- {stats[k]['sd']:.3f} [{stats[k]['low']:.3f}, {stats[k]['high']:.3f}]"
                 for k in ks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: dict, num_turns: int, path: str) -> None:
    """multi@k against k per method: the mean over seeds with +- sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.arange(1, num_turns + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (method, stats) in enumerate(summary["methods"].items()):
        mean = [stats[f"multi@{k}"]["mean"] for k in ks]
        sd = [stats[f"multi@{k}"]["sd"] for k in ks]
        ax.errorbar(ks + 0.04 * (i - len(summary["methods"]) / 2), mean, yerr=sd, marker="o", capsize=3,
                    label=method)
    ax.set_xticks(ks)
    ax.set_xlabel("turns allowed (k)")
    ax.set_ylabel("multi@k")
    ax.set_ylim(0, 1)
    ax.set_title(f"mean +- sd over seeds {', '.join(map(str, summary['seeds']))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
