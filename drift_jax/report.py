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
        row = [name, *(_fmt(m[k]) for k in ks), rates, f"{cost['generated_tokens']:,}",
               f"{cost['trained_tokens']:,}", f"{cost['wall_s']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_multi_at_k(results: dict, num_turns: int, path: str) -> None:
    """Save multi@k curves, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, num_turns + 1))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, m in results["methods"].items():
        ax.plot(ks, [m[f"multi@{k}"] for k in ks], marker="o", label=name)
    ax.set_xlabel("turns k")
    ax.set_ylabel("multi@k (solved within k turns)")
    ax.set_xticks(ks)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
