"""The result tables of docs/results.md, rendered from seed sweeps (``--config.seeds``) and
reproductions (``experiments/reproduce.py``), never typed.

    python experiments/reproduce.py --seeds=0,1,2,3,4 \\
        --settings=default,avx2,one_thread_fast_math:0-2,sse4_2:0-2 --workdir=runs/reproduce
    mkdir runs/seeds_released && cp -r runs/reproduce/default/seed* runs/seeds_released/
    python experiments/run.py --config.seeds=0,1,2,3,4 --config.drift.gamma=0.9 --config.drift.beta=0.1 \\
        --workdir=runs/seeds_released   # same rollouts: only weights, drift and eval rerun
    python experiments/reproduce.py --seeds=0,1,2 --settings=default,avx2 \\
        --config=experiments/configs/comparison.py --start_from=runs/reproduce \\
        --workdir=runs/reproduce_comparison -- --config.methods=sft,drift,online_rl
    python experiments/reproduce.py --seeds=0,1,2 --settings=default \\
        --config=experiments/configs/comparison.py --start_from=runs/reproduce_comparison \\
        --workdir=runs/reproduce_comparison_1x -- --config.methods=sft,drift,online_rl --config.online_rl.steps=128
    python experiments/readme_results.py runs/reproduce/default runs/seeds_released \\
        --reproduce=runs/reproduce --reproduce=runs/reproduce_comparison --reproduce=runs/reproduce_comparison_1x
    python experiments/readme_results.py ... --check   # exit 1 if docs/results.md or README.md is stale

Optional blocks, from a default sweep's seed folders (``runs/seeds``, e.g. a copy of
``runs/reproduce/default``):

    python experiments/beta_spectrum.py --workdir=runs/seeds/seed0 --gammas=0.9,1 --betas=0.01,0.1,1,10,100
    mkdir runs/comparison_seeds && cp -r runs/seeds/seed0 runs/seeds/seed1 runs/seeds/seed2 runs/comparison_seeds/
    rm -r runs/comparison_seeds/seed0/beta_spectrum*  # the same reference and rollouts: only new methods run
    python experiments/run.py --config=experiments/configs/comparison.py --config.seeds=0,1,2 \\
        --workdir=runs/comparison_seeds
    python experiments/readme_results.py ... --spectrum=runs/seeds/seed0 --comparison=runs/comparison_seeds

The block between ``<!-- results:start -->`` and ``<!-- results:end -->`` in docs/results.md
(or the file ``--results`` names) is replaced by the tables below, with the commands,
versions, machine and wall times that made them (from each ``sweep.json``); with
``--spectrum``, the block between ``<!-- spectrum:start -->`` and ``<!-- spectrum:end -->`` by
the beta spectrum's table, with ``--comparison`` the ``comparison`` block by every method
of a comparison sweep, and with ``--reproduce`` the ``reproduce`` block by each
reproduction's tables and README.md's ``reproducibility`` block by the first one's
summary. README.md's summary table copies rows of the first table; tests/test_readme.py
checks that they are still rows of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # experiments.beta_spectrum
from drift_jax.evaluation.report import greedy_dialogue  # noqa: E402
from drift_jax.methods import get as get_method  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS_MD = os.path.join(REPO, "docs", "results.md")
README_MD = os.path.join(REPO, "README.md")


def _read(sweep_dir: str) -> tuple[dict, dict]:
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        sweep = json.load(f)
    (bench, summary), = sweep["benchmarks"].items()  # the embedded task has one benchmark
    return sweep, summary


def _config(sweep_dir: str, seed: int) -> dict:
    """The config one seed of a sweep ran with (its results.json)."""
    with open(os.path.join(sweep_dir, f"seed{seed}", "results.json")) as f:
        return json.load(f)["config"]


def _at_commit(env: dict) -> str:
    """"at commit <c> " when the sweep recorded its commit (older sweeps did not)."""
    return f"at commit {env['commit']} " if env.get("commit") else ""


def _walls(sweep_dir: str, env: dict) -> dict[str, float]:
    """Each seed's wall time: the sweep's own or, where the sweep is one setting of a
    reproduction (``<reproduction>/<setting>``) that only summarised finished runs, those
    runs' as measured when they ran (its ``reproduce.json``)."""
    path = os.path.normpath(sweep_dir)
    report = os.path.join(os.path.dirname(path), "reproduce.json")
    if os.path.exists(report):
        with open(report) as f:
            wall = json.load(f)["wall_s"]
        prefix = os.path.basename(path) + "/seed"
        found = dict(sorted(((k[len(prefix):], v) for k, v in wall.items() if k.startswith(prefix)),
                            key=lambda kv: int(kv[0])))
        if found:
            return found
    return env["wall_s"]


def _command(sweep: dict) -> str:
    """The command that made a sweep (recorded as argv; older sweeps lack the "python")."""
    command = sweep["command"].replace(REPO + os.sep, "")
    return command if command.startswith("python") else f"python {command}"


def _cell(stats: dict) -> str:
    return f"{stats['mean']:.3f} +- {stats['sd']:.3f} [{stats['low']:.3f}, {stats['high']:.3f}]"


def render(default_dir: str, released_dir: str | None = None) -> str:
    """The README block (markdown) for a default sweep and, optionally, the same sweep
    at the paper's released gamma and beta."""
    sweep, summary = _read(default_dir)
    env, seeds = sweep["environment"], summary["seeds"]
    methods = list(summary["methods"])
    num_prompts = _config(default_dir, seeds[0])["eval"]["num_prompts"]
    last = max(int(k.split("@")[1]) for k in summary["methods"][methods[0]] if k.startswith("multi@"))
    lines = [
        f"Seeds {', '.join(map(str, seeds))} of `python experiments/run.py`, each on its own",
        f"rollouts, {num_prompts:,} held-out questions, greedy decoding. Made by `{_command(sweep)}` then",
        "`python experiments/readme_results.py " + " ".join(filter(None, [default_dir, released_dir])) + "`",
        f"{_at_commit(env)}on {env['machine']} ({', '.join(env['devices'])}), Python {env['python']}, jax {env['jax']}, "
        f"flax {env['flax']}; wall time per seed (s): "
        + ", ".join(f"{s}: {w:.0f}" for s, w in _walls(default_dir, env).items()) + ".",
        "",
        f"Mean +- sd over seeds [{round(100 * summary['level'])}% bootstrap interval over prompts]:",
        "",
        "| method | multi@1 | " + f"multi@{last} | correction rate t2..t{last} (mean) |",
        "| --- | --- | --- | --- |",
    ]
    for m in methods:
        s = summary["methods"][m]
        rates = " / ".join(f"{r:.3f}" for r in s["correction_rate"]["mean"][1:])
        lines.append(f"| {m} | {_cell(s['multi@1'])} | {_cell(s[f'multi@{last}'])} | {rates} |")
    key = f"multi@{last}"
    lines += ["", f"{key} per seed:", "",
              "| seed | " + " | ".join(methods) + (" | drift - sft |" if {"drift", "sft"} <= set(methods) else " |"),
              "| --- |" + " --- |" * (len(methods) + ({"drift", "sft"} <= set(methods)))]
    for i, seed in enumerate(seeds):
        values = [summary["methods"][m][key]["per_seed"][i] for m in methods]
        row = f"| {seed} | " + " | ".join(f"{v:.3f}" for v in values)
        if {"drift", "sft"} <= set(methods):
            row += f" | {values[methods.index('drift')] - values[methods.index('sft')]:+.3f}"
        lines.append(row + " |")
    lines += _dialogues(default_dir, next(iter(sweep["benchmarks"])), seeds, methods)
    if released_dir:
        rsweep, released = _read(released_dir)
        drift = _config(default_dir, seeds[0])["drift"]
        lines += ["", f"DRIFT's {key} at the paper's released values against the default's, on the same",
                  f"rollouts (`{_command(rsweep)}` in a copy of the default sweep):", "",
                  "| drift.gamma, drift.beta | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- sd |",
                  "| --- |" + " --- |" * (len(seeds) + 1)]
        for label, src, m in (("0.9, 0.1 (released)", released, "drift"),
                              (f"{drift['gamma']:g}, {drift['beta']:g} (default)", summary, "drift"),
                              ("sft (uniform weights)", summary, "sft")):
            st = src["methods"][m][key]
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in st["per_seed"])
                         + f" | {st['mean']:.3f} +- {st['sd']:.3f} |")
    return "\n".join(lines) + "\n"


def _dialogues(sweep_dir: str, bench: str, seeds: list[int], methods: list[str]) -> list[str]:
    """Per seed and method, the greedy dialogue while it names untried letters and the
    smallest margin along it (the eval's ``answer_check`` on ``bench``), or nothing if
    not recorded."""
    cells = {}
    for seed in seeds:
        for m in methods:
            path = os.path.join(sweep_dir, f"seed{seed}", "eval", f"{bench}_{m}.json")
            with open(path) as f:
                greedy = json.load(f).get("answer_check", {}).get("greedy")
            if greedy is None:
                return []
            cells[seed, m] = greedy_dialogue(greedy)
    return ["", "Greedy dialogues: the untried letters each policy names in turn, the smallest log-probability "
            "margin of those moves over any other token, and the margin by which it then fails to name an "
            "untried letter (the eval's `answer_check`):", "",
            "| seed | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)] + [
        f"| {seed} | " + " | ".join(cells[seed, m] for m in methods) + " |" for seed in seeds]


def render_comparison(sweep_dir: str, in_reproduction: bool = False) -> str:
    """Every method of a comparison sweep: multi@1 and multi@T over seeds, the turn-T
    correction rate, and each method's cost (means over seeds, from each results.json).
    ``in_reproduction``: the sweep is one setting of ``experiments/reproduce.py``'s runs,
    whose command the caller states."""
    sweep, summary = _read(sweep_dir)
    env, seeds = sweep["environment"], summary["seeds"]
    methods = list(summary["methods"])
    last = max(int(k.split("@")[1]) for k in summary["methods"][methods[0]] if k.startswith("multi@"))
    costs = {m: [] for m in methods}
    for seed in seeds:
        with open(os.path.join(sweep_dir, f"seed{seed}", "results.json")) as f:
            results = json.load(f)
        for m in methods:
            costs[m].append(results["methods"][m]["cost"])

    def mean_cost(m: str, key: str) -> str:
        values = [c[key] for c in costs[m] if c.get(key) is not None]
        return f"{sum(values) / len(values):,.0f}" if values else "-"

    made_by = ("Run " if in_reproduction else f"Made by `{_command(sweep)}` then "
               f"`python experiments/readme_results.py ... --comparison={sweep_dir}` ")
    lines = [f"Seeds {', '.join(map(str, seeds))}. {made_by}{_at_commit(env)}on {env['machine']}, "
             f"Python {env['python']}, jax {env['jax']}; wall time per seed (s): "
             + ", ".join(f"{s}: {w:.0f}" for s, w in _walls(sweep_dir, env).items()) + ".", "",
             f"| method | multi@1 | multi@{last} | correction rate t{last} | generated tokens | trained tokens | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        st = summary["methods"][m]
        lines.append(f"| {m} | {_cell(st['multi@1'])} | {_cell(st[f'multi@{last}'])} | "
                     f"{st['correction_rate']['mean'][-1]:.3f} | {mean_cost(m, 'generated_tokens')} | "
                     f"{mean_cost(m, 'trained_tokens')} | {mean_cost(m, 'wall_s')} |")
    if {"drift", "online_rl"} <= set(methods):
        key = f"multi@{last}"
        gap = [d - o for d, o in zip(summary["methods"]["drift"][key]["per_seed"],
                                     summary["methods"]["online_rl"][key]["per_seed"])]
        ratio = [d["generated_tokens"] / o["generated_tokens"] for d, o in zip(costs["drift"], costs["online_rl"])]
        mean, sd = statistics.mean(gap), statistics.stdev(gap) if len(gap) > 1 else 0.0
        where = ("within 0.05 of" if abs(mean) <= 0.05 else f"{abs(mean):.3f} {'above' if mean > 0 else 'below'}")
        lines += ["", f"DRIFT minus online RL, {key}: {mean:+.3f} +- {sd:.3f} over seeds (per seed: "
                  + ", ".join(f"{g:+.3f}" for g in gap) + "); DRIFT's generated tokens / online RL's: "
                  + ", ".join(f"{r:.2f}" for r in ratio) + f". On the mean, DRIFT is {where} online RL, at "
                  + f"{statistics.mean(ratio):.2f} of its generated tokens."]
    coverage = _coverage(sweep_dir, seeds)
    if coverage:
        lines += ["", "Coverage of distinct wrong answers in each round's rollouts, mean over seeds (entered: "
                  "trajectories reaching turn t with t-1 distinct wrong answers; solved: of them, solved at t; "
                  "`distinct_paths` in `rollout_stats.json`):", "",
                  "| rollouts of | " + " | ".join(f"t{t} entered / solved" for t in range(2, last + 1)) + " |",
                  "| --- |" + " --- |" * (last - 1)]
        for name, paths in coverage.items():
            lines.append(f"| {name} | " + " | ".join(f"{e:,.0f} / {s:,.0f}" for e, s in paths[1:]) + " |")
    return "\n".join(lines) + "\n"


def _coverage(sweep_dir: str, seeds: list[int]) -> dict[str, list[tuple[float, float]]]:
    """{policy the rollouts came from: per turn (mean entered, mean solved)}, from the
    rollout_stats.json of the run (the reference's) and of each iterative-DRIFT round."""
    out = {}
    rounds = sorted(int(d[5:]) for d in os.listdir(os.path.join(sweep_dir, f"seed{seeds[0]}"))
                    if re.fullmatch(r"round[0-9]+", d))
    for name, sub in [("reference", "")] + [(get_method(f"drift_round{r}").previous, f"round{r}") for r in rounds]:
        paths = []
        for seed in seeds:
            path = os.path.join(sweep_dir, f"seed{seed}", sub, "rollout_stats.json")
            if not os.path.exists(path):
                return out
            with open(path) as f:
                paths.append(json.load(f)["sampled_reference"]["distinct_paths"])
        out[name] = [(statistics.mean(p[t]["entered"] for p in paths), statistics.mean(p[t]["solved"] for p in paths))
                     for t in range(len(paths[0]))]
    return out


def _reproduction(workdir: str) -> tuple[dict, list[str], list[int]]:
    """A reproduction's report (``experiments/reproduce.py``), its settings and seeds."""
    with open(os.path.join(workdir, "reproduce.json")) as f:
        report = json.load(f)
    for m in report["methods"].values():  # JSON's string keys back to seeds
        m["per_seed"] = {int(seed): v for seed, v in m["per_seed"].items()}
    settings = list(report["settings"])
    seeds = sorted({seed for s in report["settings"].values() for seed in s["seeds"]})
    return report, settings, seeds


def render_reproduce(workdirs: list[str]) -> str:
    """Per reproduction: its command, machine and wall time, then ``reproduce.md``'s tables."""
    from experiments import reproduce

    blocks = []
    for workdir in workdirs:
        report, settings, seeds = _reproduction(workdir)
        machine = report["machine"]
        header = (f"Made by `{report['command']}` on {machine['cpus']} CPUs ({machine['processor']}), Python "
                  f"{machine['python']}; {len(report['wall_s'])} runs, {sum(report['wall_s'].values()) / 60:.0f} "
                  "min of wall time in all.")
        blocks.append(reproduce.markdown(report, settings, seeds, header))
        if {"drift", "online_rl"} <= set(report["methods"]):  # a comparison: its costs per setting
            for setting in settings:
                blocks.append(f"Under `{setting}`: " + render_comparison(os.path.join(workdir, setting), True))
    return "\n".join(blocks)


def reproducibility_statement(workdir: str) -> str:
    """README's reproducibility line: one reproduction's largest differences, sds and margins."""
    report, settings, seeds = _reproduction(workdir)
    methods = report["methods"]
    key = report["metric"]
    runs = "; ".join(f"{s} seeds {', '.join(map(str, v['seeds']))}" for s, v in report["settings"].items())
    sd = max(p["sd"] for m in methods.values() for p in m["per_setting"].values())
    line = (f"Rerun under other float settings ({len(report['wall_s'])} runs: {runs}; `avx2` and `sse4_2` cap XLA's "
            f"CPU instruction set, as a CPU without AVX-512 or without AVX would; made by `{report['command']}`), "
            f"each method's {key} differs between settings by at most "
            + ", ".join(f"{m['largest_difference']:.3f} ({name})" for name, m in methods.items())
            + f" for the same seed, and its sd over seeds is at most {sd:.3f} under any setting")
    if methods.get("drift", {}).get("smallest_margin") is not None:
        line += (f"; DRIFT's smallest log-probability margin along any greedy dialogue is "
                 f"{methods['drift']['smallest_margin']:+.2f} nats")
    return line + ".\n"


def render_spectrum(workdir: str) -> str:
    """The beta spectrum's table (``experiments/beta_spectrum.py``) of a run."""
    from experiments import beta_spectrum

    with open(os.path.join(workdir, "beta_spectrum.json")) as f:
        summary = json.load(f)
    gammas = ",".join(f"{g:g}" for g in sorted({p["gamma"] for p in summary["points"]}))
    betas = ",".join(f"{b:g}" for b in sorted({p["beta"] for p in summary["points"]}))
    return (f"Made by `python experiments/beta_spectrum.py --workdir={workdir} --gammas={gammas} "
            f"--betas={betas}` on the finished run in `{workdir}`.\n\n"
            + beta_spectrum.table(summary, int(summary["metric"].split("@")[1])))


def rewrite(text: str, block: str, start: str = START, end: str = END, name: str = "docs/results.md") -> str:
    """``text`` (the file ``name``) with the text between the markers replaced by ``block``."""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.S)
    if not pattern.search(text):
        raise SystemExit(f"{name} has no {start} ... {end} block")
    return pattern.sub(lambda _: f"{start}\n{block}{end}", text, count=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("default", help="workdir of the default config's seed sweep")
    parser.add_argument("released", nargs="?", help="workdir of the same sweep at gamma 0.9, beta 0.1")
    parser.add_argument("--spectrum", help="a run with a beta_spectrum.json (experiments/beta_spectrum.py)")
    parser.add_argument("--comparison", help="workdir of a comparison.py seed sweep")
    parser.add_argument("--reproduce", action="append", default=[],
                        help="workdir of an experiments/reproduce.py run (repeatable); the first one's "
                             "statement goes to README.md's reproducibility block")
    parser.add_argument("--readme_md", default=README_MD, help="README holding the reproducibility block")
    # --readme: an alias, for callers (tests/test_runner.py) that pass a README-like file.
    parser.add_argument("--results", "--readme", dest="results", default=RESULTS_MD,
                        help="the markdown file holding the blocks (default: docs/results.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not what the sweeps give")
    args = parser.parse_args(argv)
    name = os.path.relpath(args.results)
    with open(args.results) as f:
        before = f.read()
    after = rewrite(before, render(args.default, args.released), name=name)
    if args.spectrum:
        after = rewrite(after, render_spectrum(args.spectrum), "<!-- spectrum:start -->", "<!-- spectrum:end -->",
                        name)
    if args.comparison:
        after = rewrite(after, render_comparison(args.comparison), "<!-- comparison:start -->",
                        "<!-- comparison:end -->", name)
    if args.reproduce:
        after = rewrite(after, render_reproduce(args.reproduce), "<!-- reproduce:start -->",
                        "<!-- reproduce:end -->", name)
    files = {args.results: (before, after)}
    if args.reproduce:
        readme_name = os.path.relpath(args.readme_md)
        with open(args.readme_md) as f:
            readme = f.read()
        files[args.readme_md] = (readme, rewrite(readme, reproducibility_statement(args.reproduce[0]),
                                                 "<!-- reproducibility:start -->", "<!-- reproducibility:end -->",
                                                 readme_name))
    if args.check:
        stale = [os.path.relpath(p) for p, (old, new) in files.items() if old != new]
        print(f"{', '.join(stale)} differ(s) from the sweeps" if stale else f"{name} is current")
        return int(bool(stale))
    for path, (_, new) in files.items():
        with open(path, "w") as f:
            f.write(new)
    print(f"rewrote the result blocks of {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
