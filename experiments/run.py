"""DRIFT end to end: reference -> rollout -> weights -> train -> eval -> report.

This file reads the config and runs the stages (``experiments/stages.py``, online RL in
``experiments/online_rl.py``) of one ``Experiment`` (``experiments/workdir.py``) for
each method of ``cfg.methods`` (``drift_jax/methods.py``).

    python experiments/run.py                                   # the embedded default
    python experiments/run.py --config=experiments/configs/tiny.py --workdir=/tmp/run
    python experiments/run.py --config.seed=1 --config.drift.beta=0.3

Every stage writes its output into the workdir (default ``runs/<config name>``) and is
skipped when that output is already there, so a rerun only does unfinished work and a
killed training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs import each other as experiments.configs.*

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from drift_jax.parallel import distributed  # noqa: E402

from drift_jax import methods

from drift_jax.evaluation import report
from drift_jax.data.records import BadRecord  # noqa: E402
from experiments.preflight import ConfigError, preflight  # noqa: E402
from experiments.workdir import Experiment, read_json, write_json  # noqa: E402
from experiments.stages import (  # noqa: E402
    stage_eval, stage_method, stage_reference, stage_report, stage_rollout, stage_weights)


def check_overrides(argv: list[str], default_config: str) -> tuple[list[str], list[str]]:
    """Check every ``--config.<key>=<value>`` before flag parsing; returns (argv without
    the ``=None`` overrides, the keys to set to None after parsing).

    An unknown key or a section name exits with a did-you-mean message (ml_collections
    would die inside flag parsing, at import when ``--config`` is not given, with a
    bare AttributeError or a SyntaxError). ml_collections cannot parse ``None`` for a
    typed field (it arrives as the string 'None', or fails for an int), so those are
    taken out here and applied to the parsed config by ``apply_nones``.
    """
    import difflib
    import importlib.util

    spec, keys = default_config, []
    for i, arg in enumerate(argv[1:], start=1):
        m = re.match(r"--?config(?:=(?P<spec>.*)|\.(?P<key>[^=]+)(?:=(?P<value>.*))?)?$", arg)
        if m and m["key"]:
            keys.append((m["key"], m["value"], arg))
        elif m:
            spec = m["spec"] if m["spec"] is not None else (argv[i + 1] if i + 1 < len(argv) else spec)
    path, _, config_arg = spec.partition(":")
    if not keys or not os.path.isfile(path):
        return argv, []  # nothing to check, or a bad path ml_collections reports itself
    module_spec = importlib.util.spec_from_file_location("_config_for_key_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(config_arg) if config_arg else module.get_config()

    def names(tree: dict, prefix: str = ""):
        for name, value in tree.items():
            yield prefix + name, isinstance(value, dict)
            if isinstance(value, dict):
                yield from names(value, f"{prefix}{name}.")

    sections = dict(names(cfg.to_dict()))
    known = sorted(sections)
    nones = []
    for key, value, arg in keys:
        if key in known and not sections[key]:
            if value == "None":
                nones.append(key)
            continue
        close = difflib.get_close_matches(key, [k for k in known if not sections[k]], n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        if key in known:  # a section, e.g. --config.rollout=x.jsonl
            fields = [k for k in known if k.startswith(key + ".") and k.count(".") == key.count(".") + 1]
            sys.exit(f"{arg}: {key!r} is a config section, not a field; set one of its fields "
                     f"({', '.join(fields)}).{hint}")
        parts = key.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()  # the deepest section that exists
        depth = len(parts) + 1
        prefix = "".join(f"{p}." for p in parts)
        siblings = [k for k in known if k.count(".") + 1 == depth and k.startswith(prefix)]
        sys.exit(f"unknown config key {key!r} in {arg} (config {path}).{hint} "
                 f"Keys {'under ' + repr('.'.join(parts)) if parts else 'at the top'}: "
                 f"{', '.join(siblings)}")
    return [a for a in argv if not any(a == f"--config.{k}=None" for k in nones)], nones


def apply_nones(cfg, keys: list[str]) -> None:
    """Set each dotted key of ``cfg`` to None (``check_overrides`` took them out of argv)."""
    for key in keys:
        *sections, field = key.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[field] = None


_NONES: list[str] = []
if __name__ == "__main__":
    sys.argv[:], _NONES[:] = check_overrides(sys.argv, os.path.join(REPO, "experiments/configs/default.py"))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "experiments/configs/default.py"), "Experiment config file."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a config or data error.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the config, data and model, print what each "
                             "stage would do, and stop (nothing is written).")


def planned_stages(exp: Experiment, run_methods: list) -> list[tuple[Experiment, str]]:
    """Every (experiment, stage) a run of ``run_methods`` goes through, in order; a DRIFT
    round's stages belong to its round's experiment."""
    plan = [] if exp.checkpoint else [(exp, "reference")]
    if exp.offline:
        plan += ([] if exp.given_rollouts else [(exp, "rollout")]) + [(exp, "weights")]
    for method in run_methods:
        if method.round > 1:
            child = exp.round(method.round)
            plan += [(child, "rollout"), (child, "weights"), (child, "train:drift")]
        else:
            plan.append((exp, f"train:{method.name}"))
    for name in ["reference", *(m.name for m in run_methods)]:
        plan += [(exp, f"eval:{name}:{bench}") for bench in exp.cfg.eval.benchmarks or ["secret"]]
    return plan


def dry_run(exp: Experiment, run_methods: list) -> None:
    """Print what each stage would do (done, new, resume, or why it is stale); writes nothing."""
    for owner, stage in planned_stages(exp, run_methods):
        status = owner.ledger.status(stage, owner.settings(stage), owner.outputs(stage))
        print(f"{owner.ledger.label}{stage}: {status}")


def compilation_cache_dir(setting: str, real_model: bool, already: str | None) -> str:
    """The persistent compilation cache to turn on ("": none). "auto": ~/.cache/drift-jax/xla
    for real (checkpoint) models, whose programs take minutes to compile, unless one is
    already set (JAX_COMPILATION_CACHE_DIR); the embedded toy compiles in seconds."""
    if setting != "auto":
        return setting
    return os.path.expanduser("~/.cache/drift-jax/xla") if real_model and not already else ""


def run(cfg, workdir: str, dry: bool = False) -> dict | None:
    """Preflight, then every stage not already done in ``workdir``; returns results
    (``dry``: print the plan instead, and write nothing)."""
    exp = Experiment(cfg, workdir)
    cache = compilation_cache_dir(cfg.compilation_cache, bool(exp.checkpoint), jax.config.jax_compilation_cache_dir)
    if cache:  # later runs (and stages) load compiled programs instead of compiling again
        jax.config.update("jax_compilation_cache_dir", cache)
    for warning in preflight(exp):
        print(f"warning: {warning}", file=sys.stderr)
    if dry:
        dry_run(exp, methods.parse(cfg.methods))
        return None
    os.makedirs(workdir, exist_ok=True)
    # The latest config, for the record; which outputs are current is the ledger's call.
    config = json.loads(json.dumps(cfg.to_dict()))
    if not os.path.exists(exp.path("config.json")) or read_json(exp.path("config.json")) != config:
        write_json(exp.path("config.json"), config)
    t0 = time.time()
    run_methods = methods.parse(cfg.methods)
    stage_reference(exp)
    if exp.offline:  # online RL plays its own episodes; evaluation alone needs none
        if not exp.given_rollouts:
            stage_rollout(exp)
        stage_weights(exp)
    for method in run_methods:
        stage_method(exp, method)
    if exp.benchmarks:
        for name in ["reference", *(m.name for m in run_methods)]:
            stage_eval(exp, name)
    results = stage_report(exp, run_methods)
    if exp.benchmarks:
        print(report.results_table(results, exp.env.max_turns))
    for warning in results["warnings"]:
        print(f"\n*** WARNING: {warning}", file=sys.stderr)
    ran = exp.ledger.ran
    print(f"\nstages run: {', '.join(ran) if ran else 'none (every output was current)'}")
    trained = ", ".join(exp.policy_path(m.name) for m in run_methods)
    print(f"wrote {exp.path('results.json')} and the trained policies ({trained}) "
          f"in {time.time() - t0:.0f} s")
    return results


def parse_seeds(seeds: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; ConfigError on anything else."""
    try:
        out = [int(s) for s in str(seeds).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"invalid config: seeds must be comma-separated integers, got {seeds!r}") from None
    if len(set(out)) != len(out):
        raise ConfigError(f"invalid config: seeds {seeds!r} repeats a seed")
    return out


def git_commit() -> str | None:
    """The checkout's commit (``git describe --always --dirty``: "-dirty" when files
    differ from it), or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment(walls: dict) -> dict:
    """What a sweep ran on: the commit, versions, machine, and each seed's wall time (this
    call's: a seed found finished costs ~0 s)."""
    import platform

    import flax

    return {"commit": git_commit(), "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "devices": sorted({d.device_kind for d in jax.devices()}),
            "wall_s": {str(s): round(w, 1) for s, w in walls.items()}}


def run_sweep(cfg, workdir: str, dry: bool = False) -> dict | None:
    """``cfg.seeds``: ``run`` once per seed in ``<workdir>/seed<N>`` (each resumable on
    its own), then the sweep's summary per benchmark (``drift_jax.evaluation.sweep``) in
    ``<workdir>/sweep.json``, ``sweep.md`` and ``sweep_<benchmark>.png``."""
    from drift_jax.evaluation import sweep
    from drift_jax.data.records import read_jsonl

    dirs, walls = {}, {}
    for s in parse_seeds(cfg.seeds):
        one = cfg.copy_and_resolve_references()
        one.seed, one.seeds = s, ""
        print(f"\n=== seed {s} ===")
        dirs[s] = os.path.join(workdir, f"seed{s}")
        t0 = time.time()
        results = run(one, dirs[s], dry)
        walls[s] = time.time() - t0
    if dry:
        return None
    num_turns = cfg.task.max_turns
    names = ["reference", *(m.name for m in methods.parse(cfg.methods))]
    summary = {}
    for bench in results["benchmarks"]:  # per-prompt solve turns from each seed's eval records
        t_stars = {s: {m: [r["t_star"] for r in read_jsonl(os.path.join(d, "eval", f"{bench}_{m}.jsonl"))[0]]
                       for m in names} for s, d in dirs.items()}
        summary[bench] = sweep.aggregate(t_stars, num_turns, seed=0)
        if distributed.is_main():
            sweep.plot_sweep(summary[bench], num_turns, os.path.join(workdir, f"sweep_{bench}.png"))
    write_json(os.path.join(workdir, "sweep.json"), {"benchmarks": summary, "environment": environment(walls),
                                                      "command": " ".join(["python", *sys.argv])})
    if distributed.is_main():
        with open(os.path.join(workdir, "sweep.md"), "w") as f:
            for bench, s in summary.items():
                f.write(f"## {bench}\n\n{sweep.sweep_table(s, num_turns)}\n")
    for bench, s in summary.items():
        print(f"\n{bench}\n{sweep.sweep_table(s, num_turns)}")
    print(f"wrote {os.path.join(workdir, 'sweep.json')}, sweep.md and the sweep plots")
    return summary


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
    distributed.initialize_from_env()  # multi-host: join the other processes before touching devices
    cfg = _CONFIG.value
    apply_nones(cfg, _NONES)
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    try:
        workdir = _WORKDIR.value or os.path.join("runs", name)
        if cfg.seeds:
            run_sweep(cfg, workdir, dry=_DRY_RUN.value)
        else:
            run(cfg, workdir, dry=_DRY_RUN.value)
    except (ConfigError, BadRecord) as e:  # the user's config or data: the message says what to fix
        if _DEBUG.value:
            raise
        sys.exit(f"error: {e}\n(--debug shows the traceback)")


if __name__ == "__main__":
    app.run(main)
