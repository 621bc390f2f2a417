"""The results table (markdown / terminal) and the multi@k plot."""

from __future__ import annotations


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def results_table(results: dict, num_turns: int) -> str:
    """A markdown table: one row per method, multi@k columns, correction rates and cost."""
    ks = [f"multi@{k}" for k in range(1, num_turns + 1)]
    header = ["method", *ks, "correction rate t2..t%d" % num_turns,
              "generated tokens", "trained tokens", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, m in results["methods"].items():
        rates = " / ".join(_fmt(r) for r in m["correction_rate"][1:])
        cost = m["cost"]
        count = lambda n: "-" if n is None else f"{n:,}"  # None: rollouts made elsewhere
        row = [name, *(_fmt(m[k]) for k in ks), rates, count(cost["generated_tokens"]),
               count(cost["trained_tokens"]), f"{cost['wall_s']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(results: dict, num_turns: int, title: str) -> str:
    """report.md: the results table (mean over benchmarks), one table per benchmark when
    there are several, the weight diagnostics and the plots."""
    parts = [f"# {title}\n", "Greedy multi@k on held-out prompts; cost = everything after the reference "
             "(rollouts, weights, training; online RL's own episodes).\n", results_table(results, num_turns) + "\n"]
    if len(results.get("benchmarks", {})) > 1:
        for bench, methods in results["benchmarks"].items():
            parts.append(f"## {bench}\n")
            parts.append(results_table({"methods": {m: {**s, "cost": results["methods"][m]["cost"]}
                                                    for m, s in methods.items()}}, num_turns) + "\n")
    diag = results.get("weight_diagnostics", {})
    if diag:
        parts.append("## Importance weights\n")
        parts.append("| rollouts of | beta | mean ESS/K | min ESS/K | groups all failed | max weight | "
                     "weight share of top 10% |\n| --- | --- | --- | --- | --- | --- | --- |")
        for name, d in diag.items():
            parts.append(f"| {name} | {d['beta']:.3g} | {d['mean_ess_fraction']:.3f} | {d['min_ess_fraction']:.3f} | "
                         f"{d['all_fail_share']:.1%} | {d['max_weight']:.2f} | {d['top_decile_weight_share']:.1%} |")
        parts.append("")
    checks = {m: s["answer_check"] for per_method in results.get("benchmarks", {}).values()
              for m, s in per_method.items() if "answer_check" in s}
    if checks:
        turns = [c["turn"] for c in next(iter(checks.values()))["turns"]]
        parts.append("## Greedy answers after every history of distinct wrong letters\n")
        parts.append("Per turn t, over every order of t-1 rejected letters: after how many the most likely "
                     "token is an untried letter, and the smallest margin (log-probability of the best "
                     "untried letter minus the best other token). Last column: the greedy dialogue while "
                     "it names untried letters, with the margin of each answer. A margin near 0 is a "
                     "near-tie that float rounding can flip.\n")
        parts.append("| method | " + " | ".join(f"t{t}" for t in turns) + " | greedy dialogue (margins) |\n|"
                     + " --- |" * (len(turns) + 2))
        for name, check in checks.items():
            cells = [f"{c['greedy_untried']}/{c['histories']} ({c['min_margin']:+.2f})" for c in check["turns"]]
            dialogue = " ".join(f"{g['answer']} ({g['margin']:+.1f})" for g in check["greedy"])
            parts.append(f"| {name} | " + " | ".join(cells) + f" | {dialogue} |")
        parts.append("")
    parts.append("![multi@k](multi_at_k.png) ![cost](cost.png) ![correction rate](correction_rate.png)\n")
    return "\n".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: runs on headless VMs
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: str) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    _pyplot().close(fig)


def plot_multi_at_k(results: dict, num_turns: int, path: str) -> None:
    """Save multi@k curves, one line per method."""
    plt = _pyplot()
    ks = list(range(1, num_turns + 1))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, m in results["methods"].items():
        ax.plot(ks, [m[f"multi@{k}"] for k in ks], marker="o", label=name)
    ax.set_xlabel("turns k")
    ax.set_ylabel("multi@k (solved within k turns)")
    ax.set_xticks(ks)
    ax.set_ylim(0, 1)
    _save(fig, ax, path)


def plot_cost(results: dict, num_turns: int, path: str) -> None:
    """multi@T against tokens generated for training, one point per method (methods
    trained on rollouts made elsewhere have no generation cost and are left out)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, m in results["methods"].items():
        tokens = m["cost"]["generated_tokens"]
        if tokens is not None:
            ax.scatter([tokens], [m[f"multi@{num_turns}"]], label=name)
    # Token counts run to six digits or more: few ticks, in thousands, so labels never touch.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e3:,.0f}k" if x else "0"))
    ax.set_xlabel("tokens generated (rollouts)")
    ax.set_ylabel(f"multi@{num_turns}")
    ax.set_ylim(0, 1)
    _save(fig, ax, path)


def plot_correction_rate(results: dict, num_turns: int, path: str) -> None:
    """Correction rate per turn t (solved at t / unsolved entering t), one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = list(range(1, num_turns + 1))
    for name, m in results["methods"].items():
        rates = [float("nan") if r is None else r for r in m["correction_rate"]]
        ax.plot(ts, rates, marker="o", label=name)
    ax.set_xlabel("turn t")
    ax.set_ylabel("correction rate")
    ax.set_xticks(ts)
    ax.set_ylim(0, 1)
    _save(fig, ax, path)
