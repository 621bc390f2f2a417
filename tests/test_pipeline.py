"""End to end: experiments/run.py on the tiny config writes every stage's output, well-formed,
and a rerun on the same workdir redoes nothing."""

import functools
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_KEYS = {"prompt_id", "gold", "messages", "turn_rewards", "verifier", "t_star",
                "answer_norms", "format_penalty", "reward_details"}


def _run(workdir):
    cmd = [sys.executable, os.path.join(REPO, "experiments", "run.py"),
           "--config=" + os.path.join(REPO, "experiments", "configs", "tiny.py"),
           f"--workdir={workdir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_run")
    stdout = _run(workdir)
    return workdir, stdout


def test_every_stage_output_is_present_and_well_formed(run_dir):
    workdir, stdout = run_dir
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

    for stage in ("reference", "sft", "drift"):
        assert (workdir / stage / "params").is_dir()
        lines = (workdir / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and {"step", "loss", "grad_norm", "lr", "tokens_per_s"} <= set(json.loads(lines[-1]))
        assert os.listdir(workdir / stage / "checkpoints")
    report = (workdir / "report.md").read_text()
    assert "| drift |" in report and "| sft |" in report
    assert (workdir / "multi_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert "| drift |" in stdout


def test_rerun_redoes_no_finished_stage(run_dir):
    workdir, _ = run_dir
    before = _mtimes(workdir)
    _run(workdir)
    after = _mtimes(workdir)
    changed = {p for p in before if after.get(p) != before[p]}
    # Only the final report is rewritten; no stage output, checkpoint or metric changes.
    assert changed <= {str(workdir / f) for f in ("results.json", "report.md", "multi_at_k.png")}
    assert set(after) == set(before)


@functools.lru_cache(maxsize=None)  # run.py defines absl flags: load it once
def _load_run_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("drift_run", os.path.join(REPO, "experiments", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path, value, message", [
    ("drift.beta", 0.0, "beta must be > 0"),
    ("drift.gamma", 1.5, "gamma must be in (0, 1]"),
    ("drift.gamma", 0.0, "gamma must be in (0, 1]"),
    ("rollout.num_samples", 0, "num_samples (K) must be >= 1"),
    ("task.max_turns", 0, "max_turns (T) must be >= 1"),
])
def test_config_validation_rejects_bad_values(tmp_path, path, value, message):
    run = _load_run_module()
    from experiments.configs import tiny

    cfg = tiny.get_config()
    section, field = path.split(".")
    cfg[section][field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run.check_config(cfg, str(tmp_path))


def test_workdir_of_another_config_is_rejected(tmp_path):
    run = _load_run_module()
    from experiments.configs import tiny

    run.check_config(tiny.get_config(), str(tmp_path))
    run.check_config(tiny.get_config(), str(tmp_path))  # same config: fine
    other = tiny.get_config()
    other.drift.beta = 0.7
    with pytest.raises(ValueError, match="different config.*drift.beta"):
        run.check_config(other, str(tmp_path))
