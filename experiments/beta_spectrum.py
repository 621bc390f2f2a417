"""What DRIFT's weights add: DRIFT against its temperature beta on the same rollouts, with
uniform-weight SFT (beta -> infinity) and RFT (successes only, beta -> 0) as the endpoints.

    python experiments/run.py --workdir=runs/default        # a finished run: its rollouts
    python experiments/beta_spectrum.py --workdir=runs/default --gammas=0.9,1.0 \\
        --betas=0.01,0.03,0.1,0.3,1,3,10,100

Each (gamma, beta) point uses the run's own settings (its config.json) but for
``drift.gamma`` and ``drift.beta``, and trains DRIFT from the run's reference on its rollouts, in
``<workdir>/beta_spectrum/g<gamma>_b<beta>`` (a copy of the run without its trained
methods: the ledger then reruns only the weights, DRIFT's training and its evaluation,
and a killed spectrum resumes point by point). RFT is trained once, in ``.../rft``.
Writes ``<workdir>/beta_spectrum.{json,md,png}``: multi@T, the turn-T correction rate and
the weights' mean ESS/K per point, the endpoints as horizontal lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METHOD_DIRS = ("sft", "sft_single", "rft", "drift", "drift_all_turns", "online_rl", "round2", "stale")


def _point(base: str, out: str, cfg, methods: tuple[str, ...], **drift) -> dict:
    """Train ``methods`` on ``base``'s rollouts in ``out`` (a copy of ``base`` without its
    trained methods); returns results.json."""
    from experiments import run as runner

    if not os.path.exists(out):
        shutil.copytree(base, out, ignore=lambda d, names: [n for n in names if d == base and (
            n in METHOD_DIRS or n == "beta_spectrum" or n.startswith("beta_spectrum."))])
    point = cfg.copy_and_resolve_references()
    point.methods = methods
    for key, value in drift.items():
        point.drift[key] = value
    return runner.run(point, out)


def spectrum(workdir: str, betas: list[float], gammas: list[float]) -> dict:
    import ml_collections

    with open(os.path.join(workdir, "config.json")) as f:  # the run's own settings, so the
        cfg = ml_collections.ConfigDict(json.load(f))  # ledger finds its rollouts current
    num_turns = cfg.task.max_turns
    key = f"multi@{num_turns}"
    root = os.path.join(workdir, "beta_spectrum")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(workdir, "results.json")) as f:
        base_results = json.load(f)
    ends = {"rft": _point(workdir, os.path.join(root, "rft"), cfg, ("rft",))["methods"]["rft"]}
    if "sft" in base_results["methods"]:
        ends["sft"] = base_results["methods"]["sft"]
    else:
        ends["sft"] = _point(workdir, os.path.join(root, "sft"), cfg, ("sft",))["methods"]["sft"]
    points = []
    for gamma in gammas:
        for beta in betas:
            results = _point(workdir, os.path.join(root, f"g{gamma:g}_b{beta:g}"), cfg, ("drift",),
                             gamma=float(gamma), beta=float(beta))
            m = results["methods"]["drift"]
            points.append({"gamma": gamma, "beta": beta, key: m[key],
                           f"correction_rate_t{num_turns}": m["correction_rate"][-1],
                           "mean_ess_fraction": results["weight_diagnostics"]["drift"]["mean_ess_fraction"]})
    summary = {"workdir": workdir, "seed": cfg.seed, "metric": key, "points": points,
               "endpoints": {name: {key: m[key], f"correction_rate_t{num_turns}": m["correction_rate"][-1]}
                             for name, m in ends.items()}}
    with open(os.path.join(workdir, "beta_spectrum.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, "beta_spectrum.md"), "w") as f:
        f.write(table(summary, num_turns))
    plot(summary, num_turns, os.path.join(workdir, "beta_spectrum.png"))
    return summary


def table(summary: dict, num_turns: int) -> str:
    key, rate = summary["metric"], f"correction_rate_t{num_turns}"
    lines = [f"DRIFT against beta on the rollouts of {summary['workdir']} (seed {summary['seed']}); "
             "SFT is beta -> infinity, RFT beta -> 0.\n",
             f"| gamma | beta | {key} | correction rate t{num_turns} | mean ESS/K |", "| --- | --- | --- | --- | --- |"]
    for p in summary["points"]:
        lines.append(f"| {p['gamma']:g} | {p['beta']:g} | {p[key]:.3f} | {p[rate]:.3f} | {p['mean_ess_fraction']:.3f} |")
    for name, m in summary["endpoints"].items():
        lines.append(f"| {name} | - | {m[key]:.3f} | {m[rate]:.3f} | - |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, num_turns: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = summary["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for gamma in sorted({p["gamma"] for p in summary["points"]}):
        pts = sorted((p["beta"], p[key]) for p in summary["points"] if p["gamma"] == gamma)
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=f"drift, gamma={gamma:g}")
    for (name, m), style in zip(summary["endpoints"].items(), ("--", ":")):
        ax.axhline(m[key], linestyle=style, color="gray", label=f"{name} (beta -> {'inf' if name == 'sft' else '0'})")
    ax.set_xscale("log")
    ax.set_xlabel("beta (log scale)")
    ax.set_ylabel(key)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a finished run of the config (its rollouts are reused)")
    parser.add_argument("--betas", default="0.01,0.03,0.1,0.3,1,3,10,100")
    parser.add_argument("--gammas", default="0.9,1.0")
    args = parser.parse_args(argv)
    for name in ("results.json", "config.json"):
        if not os.path.exists(os.path.join(args.workdir, name)):
            raise SystemExit(f"--workdir {args.workdir} has no {name}: run experiments/run.py there first")
    summary = spectrum(args.workdir, [float(b) for b in args.betas.split(",")],
                       [float(g) for g in args.gammas.split(",")])
    print(table(summary, int(summary["metric"].split("@")[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
