"""End to end: experiments/run.py on the tiny config writes every stage's output, well-formed;
a rerun on the same workdir redoes nothing; a run killed twice (mid rollout write, mid
checkpoint commit) and rerun ends with the same results. The run is the shared
``tiny_run`` (tests/conftest.py)."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from drift_jax.data.records import BadRecord
from drift_jax.envs.secret import SecretGuessEnv, scripted_episode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_KEYS = {"prompt_id", "gold", "messages", "turn_rewards", "verifier", "t_star",
                "answer_norms", "format_penalty", "reward_details"}


def _mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture
def run_dir(tiny_run, tmp_path):
    """A private copy of the shared tiny run (tests here rerun it)."""
    workdir, stdout = tiny_run
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run", stdout


def test_every_stage_output_is_present_and_well_formed(tiny_run):
    workdir, stdout = tiny_run
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["methods"]) == {"reference", "sft", "drift"}
    for name, m in results["methods"].items():
        values = [m[f"multi@{k}"] for k in range(1, 6)]
        assert all(0.0 <= v <= 1.0 for v in values), name
        assert values == sorted(values), f"{name}: multi@k must not decrease in k"
        assert len(m["correction_rate"]) == 5
        assert {"generated_tokens", "trained_tokens", "wall_s"} <= set(m["cost"])
    assert results["methods"]["drift"]["cost"]["generated_tokens"] > 0
    assert results["methods"]["drift"]["cost"]["trained_tokens"] > 0

    records = [json.loads(line) for line in (workdir / "rollouts.jsonl").read_text().splitlines()]
    assert records and all(RELEASE_KEYS <= set(r) for r in records)
    per_prompt = {}
    for r in records:
        per_prompt[r["prompt_id"]] = per_prompt.get(r["prompt_id"], 0) + 1
    assert set(per_prompt.values()) == {4}  # K trajectories per prompt (tiny config: K=4)

    weights = json.loads((workdir / "weights.json").read_text())
    assert len(weights["drift"]) == len(records)
    assert results["skipped_records"] == {"total": 0, "reasons": {}}
    stats = json.loads((workdir / "rollout_stats.json").read_text())
    assert stats["generated_tokens"] == results["methods"]["drift"]["cost"]["generated_tokens"]
    assert stats["trajectories"] == len(records) and stats["resumed_groups"] == 0

    for stage in ("reference", "sft", "drift"):
        assert (workdir / stage / "params").is_dir()
        lines = [json.loads(line) for line in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        assert lines and {"step", "loss", "grad_norm", "lr", "tokens_per_s"} <= set(lines[-1])
        assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
        # One train-state checkpoint is kept (the last), besides the final policy.
        assert os.listdir(workdir / stage / "checkpoints") == [str(lines[-1]["step"])]
    report = (workdir / "report.md").read_text()
    assert "| drift |" in report and "| sft |" in report
    for plot in ("multi_at_k.png", "cost.png", "correction_rate.png"):
        assert (workdir / plot).read_bytes()[:4] == b"\x89PNG"
    assert "| drift |" in stdout


def test_rerun_redoes_no_finished_stage(run_dir, run_tiny):
    workdir, _ = run_dir
    before = _mtimes(workdir)
    run_tiny(workdir)
    after = _mtimes(workdir)
    changed = {p for p in before if after.get(p) != before[p]}
    # Only the final report is rewritten; no stage output, checkpoint or metric changes.
    report_files = ("results.json", "report.md", "multi_at_k.png", "cost.png", "correction_rate.png")
    assert changed <= {str(workdir / f) for f in report_files}
    assert set(after) == set(before)


def _without_wall_clock(tree):
    """``results.json`` minus what differs between equal runs: times and workdir paths."""
    if isinstance(tree, dict):
        return {k: _without_wall_clock(v) for k, v in tree.items()
                if k not in ("wall_s", "stage_wall_s", "rollout_files")}
    return tree


def test_run_killed_twice_then_rerun_ends_with_the_same_results(tiny_run, run_tiny, tmp_path):
    straight, _ = tiny_run
    workdir = tmp_path / "killed"
    # 1: halfway through appending the third prompt group of the rollouts.
    run_tiny(workdir, kill=("torn", 3, "rollouts.jsonl"))
    data = (workdir / "rollouts.jsonl").read_bytes()
    assert 2 * 4 <= data.count(b"\n") < 3 * 4 and not data.endswith(b"\n")  # tiny: K = 4
    assert not (workdir / "rollout_stats.json").exists()
    # 2: while Orbax commits drift's last step (3; tiny: 3 steps, a checkpoint every 2).
    run_tiny(workdir, kill=("save", 3, "drift/checkpoints"))
    assert (workdir / "sft" / "train_stats.json").exists()
    assert not (workdir / "drift" / "train_stats.json").exists()
    assert "2" in os.listdir(workdir / "drift" / "checkpoints")
    run_tiny(workdir)
    assert (workdir / "rollouts.jsonl").read_bytes() == (straight / "rollouts.jsonl").read_bytes()
    rollout_stats = json.loads((workdir / "rollout_stats.json").read_text())
    assert rollout_stats["resumed_groups"] == 2
    got = json.loads((workdir / "results.json").read_text())
    want = json.loads((straight / "results.json").read_text())
    assert _without_wall_clock(got) == _without_wall_clock(want)


@pytest.mark.parametrize("path, value, message", [
    ("drift.beta", 0.0, "beta must be > 0"),
    ("drift.gamma", 1.5, "gamma must be in (0, 1]"),
    ("drift.gamma", 0.0, "gamma must be in (0, 1]"),
    ("rollout.num_samples", 0, "num_samples (K) must be >= 1"),
    ("task.max_turns", 0, "max_turns (T) must be >= 1"),
    ("rollout.num_samples", 1, "num_samples (K) must be >= 2 to train 'drift'"),
    ("data.on_bad_record", "ignore", "data.on_bad_record must be 'error' or 'skip'"),
    ("methods", ("sft", "dpo"), "unknown methods ['dpo']"),
    ("methods", ("drift_round2",), "unknown methods ['drift_round2']"),
    ("train.schedule", "linear", "train.schedule must be 'constant' or 'cosine'"),
    ("model.save_dtype", "int8", "model.save_dtype must be '' (the checkpoint's)"),
    ("train.num_micro_batches", 3, "train.batch_size (8) must be a positive multiple of train.num_micro_batches (3)"),
    ("train.learning_rate", 0.0, "train.learning_rate must be > 0, got 0.0"),
    ("reference.train.learning_rate", -1e-3, "reference.train.learning_rate must be > 0, got -0.001"),
    ("online_rl.learning_rate", 0.0, "online_rl.learning_rate must be > 0, got 0.0"),
    ("train.warmup_ratio", 1.0, "train.warmup_ratio must be in [0, 1), got 1.0"),
    ("rollout.temperature", -1.0, "rollout.temperature must be >= 0 (0: greedy), got -1.0"),
    ("rollout.top_p", 0.0, "rollout.top_p must be in (0, 1], got 0.0"),
    ("rollout.top_p", 1.5, "rollout.top_p must be in (0, 1], got 1.5"),
    ("rollout.max_new_tokens", 0, "rollout.max_new_tokens must be >= 1, got 0"),
    ("eval.max_new_tokens", 0, "eval.max_new_tokens must be >= 1, got 0"),
    ("eval.num_prompts", 0, "eval.num_prompts must be >= 1, got 0"),
    ("eval.batch_size", 0, "eval.batch_size must be >= 1, got 0"),
    ("online_rl.prompts_per_step", 0, "online_rl.prompts_per_step must be >= 1, got 0"),
])
def test_config_validation_rejects_bad_values(path, value, message):
    from experiments.configs import tiny
    from experiments.preflight import ConfigError, check_values

    cfg = tiny.get_config()
    *sections, field = path.split(".")
    node = cfg
    for section in sections:
        node = node[section]
    node[field] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_values(cfg)


def test_online_rl_micro_batches_are_checked_only_when_online_rl_runs():
    from experiments.configs import tiny
    from experiments.preflight import ConfigError, check_values

    cfg = tiny.get_config()
    cfg.online_rl.num_micro_batches = 3 * cfg.online_rl.prompts_per_step * cfg.rollout.num_samples
    cfg.methods = ("drift",)
    check_values(cfg)
    cfg.methods = ("drift", "online_rl")
    with pytest.raises(ConfigError, match="must be a multiple of online_rl.num_micro_batches"):
        check_values(cfg)


def test_skipped_records_and_their_reasons_land_in_weights_json(tmp_path):
    """--config.data.on_bad_record=skip: bad lines are dropped and counted by reason
    (stage_report copies the count into results.json)."""
    from experiments.configs import tiny
    from experiments.stages import stage_weights
    from experiments.workdir import Experiment

    env = SecretGuessEnv()
    rng = np.random.default_rng(0)
    good = [json.dumps(scripted_episode(env, q, rng, 0.5, 0.1).to_record())
            for q in env.make_questions(2, seed=0, prefix="p") for _ in range(3)]
    bad = ['{"prompt_id": "x", "messages": [', good[0].replace('"turn_rewards": {', '"turn_rewards": {"t9": NaN, ')]
    (tmp_path / "rollouts.jsonl").write_text("\n".join(good[:3] + bad + good[3:]) + "\n")
    cfg = tiny.get_config()
    cfg.data.on_bad_record = "skip"
    stage_weights(Experiment(cfg, str(tmp_path)))
    weights = json.loads((tmp_path / "weights.json").read_text())
    assert len(weights["drift"]) == 6
    assert weights["skipped_records"] == {"total": 2, "reasons": {
        "malformed JSON (Expecting value)": 1, "field 'turn_rewards.t9' is nan, not a finite number": 1}}
    strict = tmp_path / "strict"
    strict.mkdir()
    (strict / "rollouts.jsonl").write_bytes((tmp_path / "rollouts.jsonl").read_bytes())
    cfg.data.on_bad_record = "error"
    with pytest.raises(BadRecord, match=rf"^{strict}/rollouts.jsonl:4: malformed JSON"):
        stage_weights(Experiment(cfg, str(strict)))


def _keys(tree: dict, prefix: str = "") -> set:
    out = set()
    for name, value in tree.items():
        if isinstance(value, dict) and name != "benchmarks":
            out |= _keys(value, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(REPO, "experiments", "configs"))
    if f.endswith(".py") and f != "__init__.py"))
def test_every_config_has_exactly_the_base_configs_keys(name):
    """One config shape: every config overrides base.py and adds no key of its own, so
    any method runs from any config and no default hides in code."""
    import importlib

    base = importlib.import_module("experiments.configs.base").get_config()
    cfg = importlib.import_module(f"experiments.configs.{name}").get_config()
    assert _keys(cfg.to_dict()) == _keys(base.to_dict())
    for bench in cfg.eval.benchmarks.values():
        assert set(bench) == {"task", "source", "split", "layout"}
