"""Does a result survive another machine? Rerun seeds under several float settings and
compare: multi@T per method, the largest difference between settings, the smallest
greedy margin.

    python experiments/reproduce.py --seeds=0,1,2 --workdir=runs/reproduce
    python experiments/reproduce.py --seeds=0,1,2,3,4 \\
        --settings=default,avx2,sse4_2:0-2,one_thread_fast_math:0-2 --workdir=runs/reproduce
    python experiments/reproduce.py --seeds=0,1,2 --settings=default,avx2 \\
        --config=experiments/configs/comparison.py --start_from=runs/reproduce \\
        --workdir=runs/reproduce_comparison -- --config.methods=drift,online_rl
    python experiments/reproduce.py ... -- --config.drift.beta=0.5   # overrides for every run

A setting written ``name:first-last`` runs only the seeds of ``--seeds`` in that range.

Another CPU rounds differently: XLA vectorises for the instruction sets it finds, and the
order of a sum changes with the vector width and the threads. Each setting stands in
for such a machine (``SETTINGS``): XLA's own instruction-set cap
(``--xla_cpu_max_isa``), as a CPU without AVX-512 (``avx2``) or without AVX
(``sse4_2``) would compile; one thread with fast math. Temperature-1 sampling turns a
rounding difference into other rollouts, so a setting tests the whole pipeline, not
only the last digits.

Each (setting, seed) is one ``experiments/run.py`` run in its own workdir
(``<workdir>/<setting>/seed<N>``), resumable as any run: a killed reproduction resumes
with the same command, finished runs are not redone. ``--start_from`` begins each run
from a copy of the same (setting, seed) run of another reproduction, so that the stages
whose settings did not change (the reference, the rollouts, trained methods) are reused.
The report (``reproduce.json`` and
``reproduce.md`` in ``--workdir``) gives, per method and seed, multi@T under each
setting, the largest difference between settings, and the smallest margin along the
greedy dialogue (the eval's ``answer_check``, where the task records it: a negative
value is the margin by which greedy decoding fails to name an untried letter); and, per
method and setting, the mean and sd over the seeds it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# setting -> (XLA_FLAGS added, pinned to one CPU core)
SETTINGS = {
    "default": ("", False),
    "avx2": ("--xla_cpu_max_isa=AVX2", False),
    "sse4_2": ("--xla_cpu_max_isa=SSE4_2", False),
    "one_thread_fast_math": ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 "
                             "--xla_cpu_enable_fast_math=true", True),
}


def command(setting: str, seed: int, config: str, workdir: str, overrides: list[str]) -> tuple[list[str], dict]:
    """(argv, environment) of one run."""
    return _under(setting, [f"--config={config}", f"--config.seed={seed}",
                            f"--workdir={run_dir(workdir, setting, seed)}", *overrides])


def sweep_command(setting: str, seeds: list[int], config: str, workdir: str,
                  overrides: list[str]) -> tuple[list[str], dict]:
    """(argv, environment) of the seed sweep over one setting's runs: with every run
    finished it only writes the sweep's summary (``<workdir>/<setting>/sweep.json``)."""
    return _under(setting, [f"--config={config}", f"--config.seeds={','.join(map(str, seeds))}",
                            f"--workdir={os.path.join(workdir, setting)}", *overrides])


def _under(setting: str, args: list[str]) -> tuple[list[str], dict]:
    """``experiments/run.py args`` under ``setting``'s XLA flags (and core)."""
    flags, one_core = SETTINGS[setting]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), flags) if f)
    argv = [sys.executable, os.path.join(REPO, "experiments", "run.py"), *args]
    if one_core:
        if shutil.which("taskset") is None:
            raise SystemExit(f"setting {setting!r} pins the run to one core with taskset, which this machine lacks")
        argv = ["taskset", "-c", "0", *argv]
    return argv, env


def parse_settings(spec: str, seeds: list[int]) -> dict[str, list[int]]:
    """``"default,avx2:0-2"`` -> {setting: the seeds it runs}, in the order given."""
    out = {}
    for item in spec.split(","):
        name, _, span = item.partition(":")
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; known: {list(SETTINGS)}")
        if span:
            try:
                first, last = (int(x) for x in span.split("-"))
            except ValueError:
                raise ValueError(f"setting {item!r}: expected name:first-last, e.g. sse4_2:0-2") from None
            out[name] = [s for s in seeds if first <= s <= last]
        else:
            out[name] = list(seeds)
    return out


def run_dir(workdir: str, setting: str, seed: int) -> str:
    return os.path.join(workdir, setting, f"seed{seed}")


def worked_since(path: str, t0: float) -> bool:
    """Whether a run started any stage at or after ``t0`` (its ``stages.json``)."""
    try:
        with open(os.path.join(path, "stages.json")) as f:
            return any(v.get("started", 0.0) >= t0 for v in json.load(f).values())
    except FileNotFoundError:
        return False


def outcome(path: str) -> dict:
    """Per method of one finished run: multi@T and the smallest greedy margin (None where
    the task records none)."""
    with open(os.path.join(path, "results.json")) as f:
        results = json.load(f)
    turns = results["config"]["task"]["max_turns"]
    out = {}
    for method, m in results["methods"].items():
        margins = []
        for name in sorted(os.listdir(os.path.join(path, "eval"))):
            if name.endswith(f"_{method}.json"):
                with open(os.path.join(path, "eval", name)) as f:
                    greedy = json.load(f).get("answer_check", {}).get("greedy") or []
                margins += [g["margin"] for g in greedy]
        out[method] = {f"multi@{turns}": m[f"multi@{turns}"], "smallest_margin": min(margins) if margins else None}
    return out


def summarize(outcomes: dict, settings: list[str], seeds: list[int]) -> dict:
    """``outcomes[setting][seed][method]`` (a setting may lack seeds) -> per method: per
    seed the values under each setting that ran it, their largest difference, the smallest
    margin; per setting mean and sd over its seeds; over everything the largest difference
    and the smallest margin."""
    first = outcomes[settings[0]][next(iter(outcomes[settings[0]]))]
    methods = list(first)
    key = next(k for k in first[methods[0]] if k.startswith("multi@"))
    report = {"metric": key, "methods": {}}
    for m in methods:
        per_seed = {}
        for seed in seeds:
            ran = [s for s in settings if seed in outcomes[s]]
            values = {s: outcomes[s][seed][m][key] for s in ran}
            margins = [outcomes[s][seed][m]["smallest_margin"] for s in ran]
            margins = [x for x in margins if x is not None]
            per_seed[seed] = {"values": values, "largest_difference": max(values.values()) - min(values.values()),
                              "smallest_margin": min(margins) if margins else None}
        per_setting = {}
        for s in settings:
            values = [outcomes[s][seed][m][key] for seed in seeds if seed in outcomes[s]]
            per_setting[s] = {"mean": statistics.fmean(values),
                              "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
        margins = [p["smallest_margin"] for p in per_seed.values() if p["smallest_margin"] is not None]
        report["methods"][m] = {"per_seed": per_seed, "per_setting": per_setting,
                                "largest_difference": max(p["largest_difference"] for p in per_seed.values()),
                                "smallest_margin": min(margins) if margins else None}
    return report


def markdown(report: dict, settings: list[str], seeds: list[int], header: str) -> str:
    key = report["metric"]
    lines = [header, "", f"| method | seed | " + " | ".join(settings) + " | largest difference | smallest margin |",
             "| --- | --- |" + " --- |" * (len(settings) + 2)]
    margin = lambda x: "-" if x is None else f"{x:+.2f}"
    for m, r in report["methods"].items():
        for seed in seeds:
            p = r["per_seed"][seed]
            lines.append(f"| {m} | {seed} | " + " | ".join(f"{p['values'][s]:.3f}" if s in p["values"] else "-"
                                                            for s in settings)
                         + f" | {p['largest_difference']:.3f} | {margin(p['smallest_margin'])} |")
    lines += ["", f"{key}, mean +- sd over the seeds each setting ran:", "",
              "| method | " + " | ".join(settings) + " |", "| --- |" + " --- |" * len(settings)]
    for m, r in report["methods"].items():
        lines.append(f"| {m} | " + " | ".join(f"{r['per_setting'][s]['mean']:.3f} +- {r['per_setting'][s]['sd']:.3f}"
                                             for s in settings) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, of {list(SETTINGS)}; name:first-last runs only those seeds")
    parser.add_argument("--start_from", default="",
                        help="another reproduction's workdir: each run not yet begun starts from a copy of its run")
    parser.add_argument("--config", default=os.path.join(REPO, "experiments", "configs", "default.py"))
    parser.add_argument("--workdir", default="runs/reproduce")
    parser.add_argument("overrides", nargs="*", help="after --: config overrides for every run")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        plan = parse_settings(args.settings, seeds)
    except ValueError as e:
        parser.error(str(e))
    settings = list(plan)
    # Each run's wall time as measured when it did its work: a finished run found again
    # keeps the time the last report recorded.
    report_path = os.path.join(args.workdir, "reproduce.json")
    wall = {}
    if os.path.exists(report_path):
        with open(report_path) as f:
            wall = json.load(f).get("wall_s", {})
    outcomes = {}
    for s in settings:
        outcomes[s] = {}
        for seed in plan[s]:
            here = run_dir(args.workdir, s, seed)
            if args.start_from and not os.path.exists(here):
                source = run_dir(args.start_from, s, seed)
                if not os.path.exists(os.path.join(source, "results.json")):
                    raise SystemExit(f"--start_from: {source} holds no finished run")
                shutil.copytree(source, here)
            argv_, env = command(s, seed, args.config, args.workdir, args.overrides)
            print(f"[{s} seed {seed}] {' '.join(argv_)}", flush=True)
            t0 = time.time()
            done = subprocess.run(argv_, env=env, cwd=REPO)
            if done.returncode:
                return done.returncode  # an interrupted or failed run: rerun the same command to resume
            if worked_since(here, t0):
                wall[f"{s}/seed{seed}"] = round(time.time() - t0, 1)
            outcomes[s][seed] = outcome(here)
    for s in settings:  # each setting's seeds summarised as a sweep (means, intervals, plots)
        argv_, env = sweep_command(s, plan[s], args.config, args.workdir, args.overrides)
        done = subprocess.run(argv_, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout[-2000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
            return done.returncode
    ran = {f"{s}/seed{seed}" for s in settings for seed in plan[s]}
    wall = {k: v for k, v in wall.items() if k in ran}
    report = summarize(outcomes, settings, seeds)
    command_line = " ".join(["python experiments/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    report.update(command=command_line, settings={s: {"xla_flags": SETTINGS[s][0], "one_core": SETTINGS[s][1], "seeds": plan[s]}
                                             for s in settings}, wall_s=wall,
                  machine={"cpus": os.cpu_count(), "python": platform.python_version(),
                           "processor": platform.processor() or platform.machine()})
    os.makedirs(args.workdir, exist_ok=True)
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    header = (f"Made by `{command_line}` ({os.cpu_count()} CPUs; wall time of the {len(wall)} runs "
              f"{sum(wall.values()) / 60:.0f} min, as measured when each ran).")
    text = markdown(report, settings, seeds, header)
    with open(os.path.join(args.workdir, "reproduce.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
