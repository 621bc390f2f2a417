"""The run's stages, in order, as one list: what ``run`` executes, what ``--dry_run``
prints, and what the ledger records each stage's settings from.

``stage_plan(exp)`` builds the list from the config alone (no model, no data): the
reference (embedded task), the rollouts and their weights (offline methods), one
training per method (an iterative DRIFT round as its round's rollout, weights and
training, in ``<workdir>/round<r>``), then every policy's evaluation on every benchmark.
A stage's settings are its own config keys plus everything upstream of it
(``settings``), so a change reaches exactly the stages that depend on it: changing
``eval.*`` re-runs evaluation only; changing ``drift.beta`` the weights and DRIFT's
training (and their evaluation) on the same rollouts; changing ``seed`` everything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

from drift_jax import methods
from experiments import ledger

# The config keys (or sections) each kind of stage's output depends on, besides its
# upstream stages'.
KEYS = {
    "reference": ("seed", "task", "model", "reference"),
    "checkpoint": ("model",),  # a real model's reference: the checkpoint itself
    "rollout": ("seed", "task", "rollout", "data", "rollouts"),
    "weights": ("drift", "train.max_len"),
    "train": ("train", "lora"),
    "online_rl": ("online_rl", "drift.gamma", "drift.lam", "lora"),
    "eval": ("seed", "task", "eval.num_prompts", "eval.batch_size", "eval.max_new_tokens",
             "rollout.max_new_tokens"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    """One stage of a run.

    Attributes:
      name: its key in its experiment's ``stages.json`` ("rollout", "train:drift",
        "eval:sft:secret").
      exp: the ``Experiment`` it belongs to (round r of iterative DRIFT: ``exp.round(r)``).
      keys: the config keys (or sections) its output depends on.
      fixed: settings that are no config key (the method, the benchmark, the round).
      upstream: the stages whose outputs it reads; their settings are part of its own.
      outputs: the files and folders it writes (a multi-process job's part files too:
        stale parts must move aside with the rest, not be resumed under new settings).
      run: the call that runs it; several stages may share one (a policy's evaluations
        on every benchmark: one call, the policy loaded once). None: an input the run is
        given, not a stage it runs (a checkpoint as the reference, rollout files), whose
        settings are part of those downstream.
    """

    name: str
    exp: Any
    keys: tuple[str, ...] = ()
    fixed: dict = dataclasses.field(default_factory=dict)
    upstream: tuple["Stage", ...] = ()
    outputs: tuple[str, ...] = ()
    run: Callable[[], None] | None = None

    @property
    def label(self) -> str:
        """The name the run prints: a round's stages are prefixed by ``round<r>/``."""
        return self.exp.ledger.label + self.name


def config_values(cfg) -> dict:
    """The config as flat keys, tuples as lists (as ``stages.json`` holds them)."""
    return ledger.flatten(json.loads(json.dumps(cfg.to_dict())))


def settings(stage: Stage, values: dict | None = None) -> dict:
    """What ``stage``'s output depends on: its upstream stages' settings, then its own
    config keys' values (``values``: ``config_values`` of the run's config) and its
    fixed settings."""
    values = config_values(stage.exp.cfg) if values is None else values
    out = {}
    for up in stage.upstream:
        out.update(settings(up, values))
    return {**out, **ledger.select(values, stage.keys), **stage.fixed}


def benchmark_names(cfg) -> list[str]:
    """The benchmarks a run evaluates on: the embedded task's held-out prompts, or
    ``eval.benchmarks``."""
    return ["secret"] if cfg.task.name == "secret" else list(cfg.eval.benchmarks)


def stage_plan(exp) -> list[Stage]:
    """Every stage of a run of ``exp`` (an ``experiments.workdir.Experiment``), in the
    order they run; inputs the run is given appear only as upstream stages."""
    # Imported here: the stage functions import the ``Experiment`` this module serves.
    from experiments import online_rl
    from experiments import stages as run_stage

    cfg, run_methods = exp.cfg, methods.parse(exp.cfg.methods)
    path, call = exp.path, functools.partial
    plan: list[Stage] = []

    def add(stage: Stage) -> Stage:
        if stage.run is not None:
            plan.append(stage)
        return stage

    if exp.checkpoint:
        reference = Stage("reference", exp, KEYS["checkpoint"])
    else:
        reference = add(Stage("reference", exp, KEYS["reference"], outputs=(path("reference"),),
                              run=call(run_stage.stage_reference, exp)))
    offline = exp.offline
    rollout = add(Stage("rollout", exp, KEYS["rollout"], upstream=(reference,), outputs=rollout_outputs(exp),
                        run=call(run_stage.stage_rollout, exp) if offline and not exp.given_rollouts else None))
    groups = {"min_group_size": exp.min_group_size}
    weights = add(Stage("weights", exp, KEYS["weights"], groups, (rollout,), (path("weights.json"),),
                        call(run_stage.stage_weights, exp))) if offline else None
    trained = {"reference": reference}
    for method in run_methods:
        if method.round > 1:
            trained[method.name] = drift_round(exp, method, trained[method.previous], groups, add, run_stage)
        elif method.trainer == "online_rl":
            trained[method.name] = add(Stage(
                "train:online_rl", exp, KEYS["online_rl"], {"method": method.name}, (rollout,),
                (exp.policy_dir(method.name),), call(online_rl.stage_online_rl, exp)))
        else:
            upstream, fixed = ((weights,), {}) if method.weighted else ((rollout,), groups)
            trained[method.name] = add(Stage(
                f"train:{method.name}", exp, KEYS["train"], {**fixed, "method": method.name}, upstream,
                (exp.policy_dir(method.name),), call(run_stage.stage_train, exp, method)))
    for name, policy in trained.items():
        evaluate = call(run_stage.stage_eval, exp, name)  # every benchmark in one call
        for bench in benchmark_names(cfg):
            keys = (*KEYS["eval"], f"eval.benchmarks.{bench}", "rollout.num_prompts")
            records = path("eval", f"{bench}_{name}.jsonl")
            outputs = (path("eval", f"{bench}_{name}.json"), records, f"{records}.parts")
            add(Stage(f"eval:{name}:{bench}", exp, keys, {"benchmark": bench}, (policy,), outputs, evaluate))
    return plan


def rollout_outputs(exp) -> tuple[str, ...]:
    """The rollout stage's files in ``exp``'s workdir, its part files included."""
    return (exp.path("rollouts.jsonl"), exp.path("rollout_stats.json"), exp.path("rollouts.jsonl.parts"))


def drift_round(exp, method: methods.Method, previous: Stage, groups: dict, add, run_stage) -> Stage:
    """Round r of iterative DRIFT in ``exp.round(r)``: rollouts of round r-1's DRIFT
    policy (``previous``, its reference), their weights and DRIFT trained on them
    (``run_stage``: ``experiments.stages``); returns its training stage."""
    child = exp.round(method.round)
    reference = Stage("reference", child, fixed={"round": method.round}, upstream=(previous,))
    rollout = add(Stage("rollout", child, KEYS["rollout"], upstream=(reference,), outputs=rollout_outputs(child),
                        run=functools.partial(run_stage.stage_rollout, child)))
    weights = add(Stage("weights", child, KEYS["weights"], groups, (rollout,), (child.path("weights.json"),),
                        functools.partial(run_stage.stage_weights, child)))
    drift = methods.get("drift")
    return add(Stage("train:drift", child, KEYS["train"], {"method": drift.name}, (weights,),
                     (child.policy_dir(drift.name),), functools.partial(run_stage.stage_train, child, drift)))
