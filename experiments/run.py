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

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from drift_jax import distributed, methods, report  # noqa: E402
from experiments.workdir import Experiment, read_json, write_json  # noqa: E402
from experiments.stages import (  # noqa: E402
    stage_eval, stage_method, stage_reference, stage_report, stage_rollout, stage_weights)


def check_config_keys(argv: list[str], default_config: str) -> None:
    """Exit with a clear message when a ``--config.<key>`` override names no config field.

    ml_collections would die inside flag parsing (at import when ``--config`` is not
    given) with a bare AttributeError, so this runs before the config flag is defined.
    """
    import difflib
    import importlib.util

    spec, keys = default_config, []
    for i, arg in enumerate(argv[1:], start=1):
        m = re.match(r"--?config(?:=(?P<spec>.*)|\.(?P<key>[^=]+)(?:=.*)?)?$", arg)
        if m and m["key"]:
            keys.append((m["key"], arg))
        elif m:
            spec = m["spec"] if m["spec"] is not None else (argv[i + 1] if i + 1 < len(argv) else spec)
    path, _, config_arg = spec.partition(":")
    if not keys or not os.path.isfile(path):
        return  # nothing to check, or a bad path ml_collections reports itself
    module_spec = importlib.util.spec_from_file_location("_config_for_key_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(config_arg) if config_arg else module.get_config()

    def names(tree: dict, prefix: str = ""):
        for name, value in tree.items():
            yield prefix + name
            if isinstance(value, dict):
                yield from names(value, f"{prefix}{name}.")

    known = sorted(names(cfg.to_dict()))
    for key, arg in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            parts = key.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()  # the deepest section that exists
            depth = len(parts) + 1
            prefix = "".join(f"{p}." for p in parts)
            section = [k for k in known if k.count(".") + 1 == depth and k.startswith(prefix)]
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            sys.exit(f"unknown config key {key!r} in {arg} (config {path}).{hint} "
                     f"Keys {'under ' + repr('.'.join(parts)) if parts else 'at the top'}: "
                     f"{', '.join(section)}")


if __name__ == "__main__":
    check_config_keys(sys.argv, os.path.join(REPO, "experiments/configs/default.py"))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "experiments/configs/default.py"), "Experiment config file."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>).")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_config(cfg, workdir: str) -> None:
    """Reject impossible values, and a workdir that holds a run of another config."""
    try:
        names = [m.name for m in methods.parse(cfg.methods)]
    except ValueError as e:
        raise ValueError(f"invalid config: {e}") from None
    checks = [
        (cfg.drift.beta > 0, f"drift.beta must be > 0, got {cfg.drift.beta}"),
        (0 < cfg.drift.gamma <= 1, f"drift.gamma must be in (0, 1], got {cfg.drift.gamma}"),
        (cfg.rollout.num_samples >= 1, f"rollout.num_samples (K) must be >= 1, got {cfg.rollout.num_samples}"),
        (cfg.task.max_turns >= 1, f"task.max_turns (T) must be >= 1, got {cfg.task.max_turns}"),
        (cfg.rollout.num_prompts >= 1, f"rollout.num_prompts must be >= 1, got {cfg.rollout.num_prompts}"),
        # A prompt with one trajectory has DRIFT weight 1 whatever its return.
        ("drift" not in names or cfg.rollouts or cfg.rollout.num_samples >= 2,
         f"rollout.num_samples (K) must be >= 2 to train 'drift', got {cfg.rollout.num_samples}"),
        (cfg.data.on_bad_record in ("error", "skip"),
         f"data.on_bad_record must be 'error' or 'skip', got {cfg.data.on_bad_record!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid config: {message}")
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as stored
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        saved = _flatten(read_json(path))
        diff = sorted(k for k in set(saved) | set(_flatten(current))
                      if saved.get(k) != _flatten(current).get(k))
        if diff:
            raise ValueError(
                f"{workdir} holds a run of a different config (differs in {', '.join(diff)}); "
                "use another --workdir or delete that one")
    else:
        os.makedirs(workdir, exist_ok=True)
        write_json(path, current)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
    distributed.initialize_from_env()  # multi-host: join the other processes before touching devices
    cfg = _CONFIG.value
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    check_config(cfg, workdir)
    exp = Experiment(cfg, workdir)
    t0 = time.time()
    run_methods = methods.parse(cfg.methods)
    stage_reference(exp)
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
    trained = ", ".join(exp.policy_path(m.name) for m in run_methods)
    print(f"\nwrote {exp.path('results.json')} and the trained policies ({trained}) "
          f"in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
