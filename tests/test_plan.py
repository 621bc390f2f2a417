"""One stage plan (experiments/plan.py): what ``run`` executes, what ``--dry_run`` prints
and what the ledger records are the same list, for every config in experiments/configs.

The stage functions are replaced by ones that only go through the ledger (begin, finish),
so the configs of real models run here in milliseconds, without their checkpoints or
data; tests/test_runner.py checks the real tiny and comparison runs against the plan."""

import importlib
import os

import pytest

from helpers import run_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "experiments", "configs"))
                 if f.endswith(".py") and f != "__init__.py")
EVERY_METHOD = "sft_single,sft,rft,drift,drift_all_turns,online_rl,drift_round2,drift_round3"


def config(name: str, methods: str | None = None):
    cfg = importlib.import_module(f"experiments.configs.{name}").get_config()
    if not cfg.model.checkpoint and cfg.task.name != "secret":
        cfg.model.checkpoint = "/no/checkpoint"  # never read: the stages are replaced
    if name == "from_rollouts":
        cfg.rollouts = "/no/rollouts.jsonl"
    if methods is not None:
        cfg.methods = tuple(methods.split(","))
    return cfg


@pytest.fixture
def ledger_only(monkeypatch):
    """Stage functions that begin and finish their stages in the ledger and only make
    their first output (a folder); no preflight (no model, no data) and an empty report."""
    from experiments import online_rl, stages

    run = run_module()

    def benchmarks(exp):
        # The embedded task's are made in memory; a real model's would load data sets.
        return list(exp.benchmarks) if exp.cfg.task.name == "secret" else list(exp.cfg.eval.benchmarks)

    def through_ledger(names):
        def stage(exp, *args):
            for name in names(exp, *args):
                if not exp.begin(name):
                    os.makedirs(exp.stage(name).outputs[0])  # what the ledger checks is there
                    exp.finish(name)
        return stage

    for function, names in {
        "stage_reference": lambda exp: ["reference"],
        "stage_rollout": lambda exp: ["rollout"],
        "stage_weights": lambda exp: ["weights"],
        "stage_train": lambda exp, method: [f"train:{method.name}"],
        "stage_eval": lambda exp, policy: [f"eval:{policy}:{bench}" for bench in benchmarks(exp)],
    }.items():
        monkeypatch.setattr(stages, function, through_ledger(names))
    monkeypatch.setattr(online_rl, "stage_online_rl", through_ledger(lambda exp: ["train:online_rl"]))
    monkeypatch.setattr(run, "preflight", lambda exp: [])
    monkeypatch.setattr(run, "stage_report", lambda exp, run_methods: {"benchmarks": {}, "warnings": []})
    return run


def stages_run(stdout: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith("stages run: "))
    rest = line[len("stages run: "):]
    return [] if rest.startswith("none") else rest.split(", ")


def dry_run(run, cfg, workdir, capsys) -> dict:
    capsys.readouterr()
    run.run(cfg, workdir, dry=True)
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())


@pytest.mark.parametrize("methods", [None, EVERY_METHOD])
@pytest.mark.parametrize("name", CONFIGS)
def test_run_and_dry_run_go_through_the_plan(ledger_only, tmp_path, capsys, name, methods):
    """For every config: the dry run lists the plan, the run goes through exactly the
    plan's stages in its order, then every one is done and a rerun runs none."""
    from experiments.workdir import Experiment

    run, cfg, workdir = ledger_only, config(name, methods), str(tmp_path / "run")
    plan = [stage.label for stage in Experiment(cfg, workdir).plan]
    assert plan and len(set(plan)) == len(plan)
    assert dry_run(run, cfg, workdir, capsys) == {label: "new" for label in plan}
    run.run(cfg, workdir)
    assert stages_run(capsys.readouterr().out) == plan
    assert dry_run(run, cfg, workdir, capsys) == {label: "done" for label in plan}
    run.run(cfg, workdir)
    assert stages_run(capsys.readouterr().out) == []


def test_the_plan_of_iterative_drift_chains_the_rounds(tmp_path):
    """Round r's stages run in <workdir>/round<r>, upstream of them round r-1's DRIFT
    training; a round's settings hold the round and everything the previous one's did."""
    from experiments.plan import settings
    from experiments.workdir import Experiment

    exp = Experiment(config("tiny", "drift,drift_round2,drift_round3"), str(tmp_path))
    stages = {stage.label: stage for stage in exp.plan}
    assert list(stages) == [
        "reference", "rollout", "weights", "train:drift",
        "round2/rollout", "round2/weights", "round2/train:drift",
        "round3/rollout", "round3/weights", "round3/train:drift",
        "eval:reference:secret", "eval:drift:secret", "eval:drift_round2:secret", "eval:drift_round3:secret"]
    assert stages["round3/rollout"].exp is exp.round(3) and exp.round(3).stage("rollout") is stages["round3/rollout"]
    assert stages["round3/rollout"].upstream[0].upstream[0] is stages["round2/train:drift"]
    round2, round3 = (settings(stages[f"round{r}/train:drift"]) for r in (2, 3))
    assert (round2["round"], round3["round"]) == (2, 3)
    assert {k: v for k, v in round3.items() if k != "round"} == {k: v for k, v in round2.items() if k != "round"}
    assert settings(stages["eval:drift_round3:secret"]).items() >= round3.items()
    # One call evaluates a policy on every benchmark: its stages share it.
    evals = [stage for stage in exp.plan if stage.name.startswith("eval:")]
    assert len({id(stage.run) for stage in evals}) == 4


def test_a_stage_outside_the_plan_is_refused(tmp_path):
    from experiments.workdir import Experiment

    exp = Experiment(config("tiny", "drift"), str(tmp_path))
    with pytest.raises(KeyError, match=r"stage train:sft is not one of this run's \(reference, rollout"):
        exp.begin("train:sft")
    assert not tmp_path.joinpath("stages.json").exists()


def test_settings_change_exactly_downstream(tmp_path):
    """drift.beta reaches the weights, the weighted trainings and their evaluation;
    eval.num_prompts only the evaluations; seed every stage."""
    from experiments.plan import settings
    from experiments.workdir import Experiment

    def changed(**overrides):
        cfg = config("tiny", "sft,drift,online_rl")
        base = {s.label: settings(s) for s in Experiment(cfg, str(tmp_path)).plan}
        for key, value in overrides.items():
            section, field = key.split(".") if "." in key else (None, key)
            (cfg[section] if section else cfg)[field] = value
        new = {s.label: settings(s) for s in Experiment(cfg, str(tmp_path)).plan}
        return [label for label in base if base[label] != new[label]]

    assert changed(**{"drift.beta": 0.3}) == ["weights", "train:drift", "eval:drift:secret"]
    assert changed(**{"eval.num_prompts": 6}) == [
        "eval:reference:secret", "eval:sft:secret", "eval:drift:secret", "eval:online_rl:secret"]
    assert changed(**{"online_rl.kl_coef": 0.1}) == ["train:online_rl", "eval:online_rl:secret"]
    assert len(changed(seed=1)) == 10  # every stage of the plan
