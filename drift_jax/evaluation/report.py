"""report.md (the results table, weight diagnostics, greedy dialogues) and the run's plots."""

from __future__ import annotations


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def greedy_dialogue(greedy: list[dict]) -> str:
    """Where a greedy dialogue fails, from ``answer_check``'s ``"greedy"`` list
    (``drift_jax.evaluation.probes``).

    That list holds one ``{"answer", "margin"}`` per turn while greedy decoding names an
    untried letter (margin > 0) and, when it stops doing so, one last entry whose margin
    is <= 0: its ``answer`` is the best untried letter, which greedy decoding does *not*
    name there, so it is left out of the moves.

    >>> greedy_dialogue([{"answer": "A", "margin": 5.6}, {"answer": "B", "margin": 2.5},
    ...                  {"answer": "D", "margin": -1.4}])
    'A B (smallest margin +2.50), then no untried letter (-1.40)'
    """
    moves = [g for g in greedy if g["margin"] > 0]
    parts = []
    if moves:
        parts.append(" ".join(g["answer"] for g in moves)
                     + f" (smallest margin {min(g['margin'] for g in moves):+.2f})")
    if len(moves) < len(greedy):
        parts.append(("then " if moves else "") + f"no untried letter ({greedy[-1]['margin']:+.2f})")
    return ", ".join(parts)


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
                     "untried letter minus the best other token). Last column: the untried letters the "
                     "greedy dialogue names in turn, the smallest margin of those moves, and the margin "
                     "by which it then fails to name an untried letter. A margin near 0 is a near-tie "
                     "that float rounding can flip.\n")
        parts.append("| method | " + " | ".join(f"t{t}" for t in turns) + " | greedy dialogue |\n|"
                     + " --- |" * (len(turns) + 2))
        for name, check in checks.items():
            cells = [f"{c['greedy_untried']}/{c['histories']} ({c['min_margin']:+.2f})" for c in check["turns"]]
            parts.append(f"| {name} | " + " | ".join(cells) + f" | {greedy_dialogue(check['greedy'])} |")
        parts.append("")
    parts.append("![multi@k](multi_at_k.png) ![cost](cost.png) ![correction rate](correction_rate.png)\n")
    return "\n".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: runs on headless VMs
    import matplotlib.pyplot as plt

    return plt


# Methods often share values (every method's multi@1 is the same on the embedded task;
# rft, drift and drift_all_turns share the rollouts, so their cost points coincide): each
# method gets its own hollow marker, line style and a small horizontal offset in points,
# drawn half-transparent, so one method never hides another. The offset is horizontal
# only, so every value still reads true on the y axis.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", ":", "-.")
OFFSET_PT = 5.0  # points between neighbouring methods (lines: all methods; cost: touching points)
# Above 1.0: a point at 1.0 would otherwise be cut in half by the axes.
YLIM = (-0.04, 1.06)


def _styles(names: list[str]) -> dict[str, dict]:
    """Per method: its marker, line style, colour and horizontal offset in points."""
    centre = (len(names) - 1) / 2
    return {name: {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
                   "color": f"C{i % 10}", "offset": (i - centre) * OFFSET_PT}
            for i, name in enumerate(names)}


def _draw(fig, ax, name: str, style: dict, xs, ys, line: bool) -> None:
    import numpy as np
    from matplotlib import transforms

    shifted = transforms.offset_copy(ax.transData, fig=fig, x=style["offset"], y=0.0, units="points")
    ax.plot(xs, ys, marker=style["marker"], linestyle=style["linestyle"] if line else "none",
            color=style["color"], markerfacecolor="none", markeredgewidth=1.5, markersize=7,
            alpha=0.8, label=name, transform=shifted)
    # An offset transform hides the points from autoscaling: register them as they are.
    points = np.column_stack([np.asarray(xs, float), np.asarray(ys, float)])
    ax.update_datalim(points[np.isfinite(points).all(axis=1)])


def _figure(title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.set_title(title, fontsize=10)
    ax.set_ylim(*YLIM)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    return fig, ax


def _save(fig, ax, path: str):
    ax.grid(alpha=0.3)
    # Outside the axes: with eight methods a legend inside would cover the lines.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.annotate("methods offset a few points sideways so equal values stay visible", (0, 0),
                xytext=(2, 2), xycoords="figure fraction", textcoords="offset points", fontsize=6,
                color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return fig


def plot_multi_at_k(results: dict, num_turns: int, path: str):
    """Save multi@k curves, one line per method; returns the (closed) figure."""
    ks = list(range(1, num_turns + 1))
    fig, ax = _figure("multi@k: solved within k turns (greedy)")
    ax.set_xlim(0.5, num_turns + 0.5)
    for name, style in _styles(list(results["methods"])).items():
        _draw(fig, ax, name, style, ks, [results["methods"][name][f"multi@{k}"] for k in ks], line=True)
    ax.set_xlabel("turns k")
    ax.set_ylabel("multi@k")
    ax.set_xticks(ks)
    return _save(fig, ax, path)


def _spread(ax, points: dict[str, tuple[float, float]], step_pt: float) -> dict[str, float]:
    """Sideways offsets (points) for markers that would touch on the canvas: each group of
    points closer than ``step_pt`` to one another is spread ``step_pt`` apart, in order of
    x; every other point keeps offset 0 and sits exactly on its value."""
    import numpy as np

    names = list(points)
    xy = ax.transData.transform(np.asarray([points[n] for n in names], float)) * 72 / ax.figure.dpi  # in points
    group = list(range(len(names)))  # union-find over pairs that touch

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in range(len(names)):
        for j in range(i):
            if np.hypot(*(xy[i] - xy[j])) < step_pt:
                group[root(i)] = root(j)
    offsets = {}
    for r in {root(i) for i in range(len(names))}:
        members = sorted((i for i in range(len(names)) if root(i) == r), key=lambda i: (xy[i][0], i))
        for k, i in enumerate(members):
            offsets[names[i]] = (k - (len(members) - 1) / 2) * step_pt
    return offsets


def plot_cost(results: dict, num_turns: int, path: str):
    """Save multi@T against tokens generated for training, one point per method; returns
    the (closed) figure. Methods trained on rollouts made elsewhere have no generation
    cost: they are named in the legend but not drawn."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = _figure(f"multi@{num_turns} against tokens generated for training")
    styles = _styles(list(results["methods"]))
    points = {name: (m["cost"]["generated_tokens"], m[f"multi@{num_turns}"])
              for name, m in results["methods"].items() if m["cost"]["generated_tokens"] is not None}
    # The axes' final limits first: which markers touch depends on them.
    if points:
        ax.update_datalim(np.asarray(list(points.values()), float))
    ax.margins(x=0.1)
    ax.autoscale_view(scaley=False)
    offsets = _spread(ax, points, 1.5 * OFFSET_PT)
    for name, style in styles.items():
        if name not in points:
            ax.plot([], [], marker=style["marker"], linestyle="none", color=style["color"],
                    markerfacecolor="none", label=f"{name} (rollouts made elsewhere: no cost)")
        else:
            _draw(fig, ax, name, {**style, "offset": offsets[name]}, [points[name][0]], [points[name][1]],
                  line=False)
    # Token counts run to six digits or more: few ticks, in thousands, so labels never touch.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _: f"{x / 1e3:,.0f}k" if abs(x) >= 1e4 else f"{x:,.0f}"))
    ax.set_xlabel("tokens generated (rollouts)")
    ax.set_ylabel(f"multi@{num_turns}")
    return _save(fig, ax, path)


def plot_correction_rate(results: dict, num_turns: int, path: str):
    """Save the correction rate per turn t (solved at t / unsolved entering t), one line
    per method; returns the (closed) figure."""
    ts = list(range(1, num_turns + 1))
    fig, ax = _figure("correction rate: solved at turn t / unsolved entering t")
    ax.set_xlim(0.5, num_turns + 0.5)
    for name, style in _styles(list(results["methods"])).items():
        rates = [float("nan") if r is None else r for r in results["methods"][name]["correction_rate"]]
        _draw(fig, ax, name, style, ts, rates, line=True)
    ax.set_xlabel("turn t")
    ax.set_ylabel("correction rate")
    ax.set_xticks(ts)
    return _save(fig, ax, path)
