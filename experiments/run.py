"""DRIFT end to end: reference -> rollout -> weights -> train -> eval -> report.

This file reads the config and runs the stages of one ``Experiment``
(``experiments/workdir.py``) in the order of its plan (``experiments/plan.py``: the
stages of each method of ``cfg.methods``, ``drift_jax/methods.py``).

    python experiments/run.py                                   # the embedded default
    python experiments/run.py --config=experiments/configs/tiny.py --workdir=/tmp/run
    python experiments/run.py --config.seed=1 --config.drift.beta=0.3

Every stage writes its output into the workdir (default ``runs/<config name>``) and is
skipped when that output is already there, so a rerun only does unfinished work and a
killed training resumes from its last checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs import each other as experiments.configs.*
# transformers' advice that PyTorch is missing: drift-jax uses its tokenizers only.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
if not sys.stderr.isatty():  # a log file gets a progress line a minute, not every redraw
    os.environ.setdefault("TQDM_MININTERVAL", "60")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from drift_jax import methods  # noqa: E402
from drift_jax.data.records import BadRecord  # noqa: E402
from drift_jax.evaluation import report  # noqa: E402
from drift_jax.parallel import distributed  # noqa: E402
from experiments.plan import Stage, settings  # noqa: E402
from experiments.preflight import ConfigError, preflight  # noqa: E402
from experiments.stages import stage_report  # noqa: E402
from experiments.workdir import Experiment, read_json, write_json  # noqa: E402

BENCHMARK_FIELDS = ("task", "source", "split", "layout")


def check_overrides(argv: list[str], default_config: str) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Check every ``--config.<key>=<value>`` before flag parsing; returns (argv without
    the overrides ml_collections cannot apply, those overrides as (key, value) pairs for
    ``apply_overrides``; value None for ``=None``).

    An unknown key or a section name exits with a did-you-mean message (ml_collections
    would die inside flag parsing, at import when ``--config`` is not given, with a
    bare AttributeError or a SyntaxError). Taken out and applied after parsing:
    ``=None`` (ml_collections cannot parse it for a typed field), a whole benchmark
    dropped (``--config.eval.benchmarks.<name>=None``) and a benchmark added
    (``--config.eval.benchmarks.<new name>.source=...``, likewise ``.task``, ``.split``,
    ``.layout``), and a choice of benchmarks (``--config.eval.benchmarks=math500,mine``).
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
    edits, taken = [], []
    for key, value, arg in keys:
        bench = re.fullmatch(r"eval\.benchmarks\.(\w+)(?:\.(\w+))?", key)
        if key in known and not sections[key]:
            if value == "None":
                edits.append((key, None))
                taken.append(arg)
            continue
        if key == "eval.benchmarks" and value not in (None, "None"):  # keep only these benchmarks
            edits.append((key, value))
            taken.append(arg)
            continue
        if bench and bench[2] is None and key in known and value == "None":  # drop a benchmark
            edits.append((key, None))
            taken.append(arg)
            continue
        if bench and bench[2] in BENCHMARK_FIELDS and key not in known:  # a new benchmark
            edits.append((key, value))
            taken.append(arg)
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
    return [a for a in argv if a not in taken], edits


def apply_overrides(cfg, edits: list[tuple[str, str | None]]) -> None:
    """Apply the overrides ``check_overrides`` took out of argv: set a field to None, drop
    a benchmark (its section set to None), set a field of a benchmark, adding the
    benchmark when it is new (task "math", the rest unset, as ``configs/base.benchmark``),
    and last, keep only the benchmarks named by ``eval.benchmarks=a,b``."""
    from experiments.configs.base import benchmark

    for key, value in sorted(edits, key=lambda edit: edit[0] == "eval.benchmarks"):
        if key == "eval.benchmarks":
            keep = [name.strip() for name in value.split(",") if name.strip()]
            unknown = [name for name in keep if name not in cfg.eval.benchmarks]
            if unknown:
                raise ConfigError(f"--config.eval.benchmarks={value}: no benchmark named {', '.join(unknown)} "
                                  f"(this config has {', '.join(cfg.eval.benchmarks) or 'none'}; add one with "
                                  "--config.eval.benchmarks.<name>.source=...)")
            for name in [n for n in cfg.eval.benchmarks if n not in keep]:
                del cfg.eval.benchmarks[name]
            continue
        *sections, field = key.split(".")
        if sections[:2] == ["eval", "benchmarks"] and len(sections) == 3:
            benchmarks = cfg.eval.benchmarks
            if sections[2] not in benchmarks:
                benchmarks[sections[2]] = benchmark("math", "")
            benchmarks[sections[2]][field] = value
            continue
        node = cfg
        for section in sections:
            node = node[section]
        if value is None and isinstance(node[field], ml_collections.ConfigDict):  # a benchmark
            del node[field]
        else:
            node[field] = value


DEFAULT_CONFIG = os.path.join(REPO, "experiments/configs/default.py")
# The overrides ``check_overrides`` took out of the command line, applied to the parsed
# config by ``main``.
_OVERRIDES: list[tuple[str, str | None]] = []


def define_flags() -> None:
    """The command line's flags (once). ``--config`` reads its overrides from sys.argv
    when it is defined, if no ``--config=`` is given: ``entry`` checks them first."""
    if "config" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file.")
    flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>).")
    flags.DEFINE_bool("debug", False, "Show the traceback of a config or data error.")
    flags.DEFINE_bool("dry_run", False, "Check the config, data and model, print what each "
                      "stage would do, and stop (nothing is written).")


_INTERRUPTS: list[int] = []  # the Ctrl-Cs of this process, once ``_catch_interrupts`` ran


def execute(stages: list[Stage]) -> None:
    """Run ``stages`` in order: each stage's call once (stages that share one, a policy's
    evaluations on every benchmark, run in that one call)."""
    for call, _ in itertools.groupby(stages, key=lambda stage: stage.run):
        if _INTERRUPTS:  # a Ctrl-C that Python dropped (``_catch_interrupts``): no new stage
            raise KeyboardInterrupt
        call()


def dry_run(stages: list[Stage]) -> None:
    """Print what each stage would do (done, new, resume, or why it is stale); writes nothing."""
    for stage in stages:
        status = stage.exp.ledger.status(stage.name, settings(stage), list(stage.outputs))
        print(f"{stage.label}: {status}")


def compilation_cache_dir(setting: str, real_model: bool, already: str | None) -> str:
    """The persistent compilation cache to turn on ("": none). "auto": ~/.cache/drift-jax/xla
    for real (checkpoint) models, whose programs take minutes to compile, unless one is
    already set (JAX_COMPILATION_CACHE_DIR); the embedded toy compiles in seconds."""
    if setting != "auto":
        return setting
    return os.path.expanduser("~/.cache/drift-jax/xla") if real_model and not already else ""


def run(cfg, workdir: str, dry: bool = False) -> dict | None:
    """Preflight, then every stage of the plan not already done in ``workdir``; returns
    results (``dry``: print the plan's stages instead, and write nothing)."""
    exp = Experiment(cfg, workdir)  # the config resolved once: ``exp.cfg``, frozen
    cfg = exp.cfg
    cache = compilation_cache_dir(cfg.compilation_cache, bool(exp.checkpoint), jax.config.jax_compilation_cache_dir)
    if cache:  # later runs (and stages) load compiled programs instead of compiling again
        jax.config.update("jax_compilation_cache_dir", cache)
    for warning in preflight(exp):
        print(f"warning: {warning}", file=sys.stderr)
    if dry:
        dry_run(exp.plan)
        return None
    os.makedirs(workdir, exist_ok=True)
    # The latest config, for the record; which outputs are current is the ledger's call.
    config = json.loads(json.dumps(cfg.to_dict()))
    if not os.path.exists(exp.path("config.json")) or read_json(exp.path("config.json")) != config:
        write_json(exp.path("config.json"), config)
    t0 = time.time()
    run_methods = methods.parse(cfg.methods)
    execute(exp.plan)
    results = stage_report(exp, run_methods)
    if results["benchmarks"]:
        print(report.results_table(results, exp.env.max_turns))
    for warning in results["warnings"]:
        print(f"\n*** WARNING: {warning}", file=sys.stderr)
    ran = exp.ledger.ran
    print(f"\nstages run: {', '.join(ran) if ran else 'none (every output was current)'}")
    trained = ", ".join(exp.policy_path(m.name) for m in run_methods)
    policies = f" and the trained policies ({trained})" if trained else ""
    print(f"wrote {exp.path('results.json')}{policies} in {time.time() - t0:.0f} s")
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
    from drift_jax.data.records import read_jsonl
    from drift_jax.evaluation import sweep

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
    """Run the parsed command line (``flags.FLAGS``, ``_OVERRIDES``)."""
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
    distributed.initialize_from_env()  # multi-host: join the other processes before touching devices
    FLAGS = flags.FLAGS
    cfg = FLAGS.config
    with cfg.unlocked():  # the flag's config is locked; a benchmark added or dropped needs it open
        apply_overrides(cfg, _OVERRIDES)
    name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
    interrupted = _catch_interrupts()
    try:
        workdir = FLAGS.workdir or os.path.join("runs", name)
        if cfg.seeds:
            run_sweep(cfg, workdir, dry=FLAGS.dry_run)
        else:
            run(cfg, workdir, dry=FLAGS.dry_run)
        if interrupted:  # a Ctrl-C that Python dropped (raised in a finalizer): still an interrupt
            raise KeyboardInterrupt
    except (ConfigError, BadRecord) as e:  # the user's config or data: the message says what to fix
        if FLAGS.debug:
            raise
        sys.exit(f"error: {e}\n(--debug shows the traceback)")
    except KeyboardInterrupt:
        if FLAGS.debug:
            raise
        # Finished stages, appended rollout groups and training checkpoints are on disk.
        print("\ninterrupted: the same command resumes where this run stopped", file=sys.stderr)
        sys.exit(130)


def _catch_interrupts() -> list[int]:
    """Record every Ctrl-C in ``_INTERRUPTS``; it still raises KeyboardInterrupt. One
    raised while Python runs a finalizer (JAX frees device buffers in them) is printed
    and dropped, and the run would go on to exit 0; the record keeps it."""
    def on_interrupt(signum, frame):
        _INTERRUPTS.append(signum)
        raise KeyboardInterrupt

    _INTERRUPTS.clear()  # a run started in-process again (tests, notebooks) starts clean
    signal.signal(signal.SIGINT, on_interrupt)
    return _INTERRUPTS


def entry(argv: list[str] | None = None) -> None:
    """The command line ``python experiments/run.py ...``: its overrides checked (and the
    ``=None`` ones taken out) before the flags are defined and parsed, then ``main``."""
    argv, _OVERRIDES[:] = check_overrides(sys.argv if argv is None else argv, DEFAULT_CONFIG)
    sys.argv[:] = argv  # the config flag reads its overrides from sys.argv
    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    entry()
else:  # imported (tests, experiments/beta_spectrum.py): flags to parse a command line with
    define_flags()
