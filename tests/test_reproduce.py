"""experiments/reproduce.py: each (setting, seed) a resumable run under its XLA flags, and
the report's differences and margins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO, run_in_process
from experiments import reproduce

CONFIGS = os.path.join(REPO, "experiments", "configs")


def test_each_setting_runs_with_its_flags_added_to_the_users():
    argv, env = reproduce.command("avx2", 3, "c.py", "w", ["--config.drift.beta=2"])
    assert env["XLA_FLAGS"].endswith("--xla_cpu_max_isa=AVX2")
    assert argv[-3:] == ["--config.seed=3", f"--workdir={os.path.join('w', 'avx2', 'seed3')}", "--config.drift.beta=2"]
    os.environ["XLA_FLAGS"] = "--xla_user_flag=1"
    try:
        _, env = reproduce.command("sse4_2", 0, "c.py", "w", [])
    finally:
        del os.environ["XLA_FLAGS"]
    assert env["XLA_FLAGS"] == "--xla_user_flag=1 --xla_cpu_max_isa=SSE4_2"
    if shutil.which("taskset"):
        argv, env = reproduce.command("one_thread_fast_math", 0, "c.py", "w", [])
        assert argv[:3] == ["taskset", "-c", "0"] and "--xla_cpu_enable_fast_math=true" in env["XLA_FLAGS"]


def test_summary_takes_the_largest_difference_and_the_smallest_margin():
    def run(drift, margin):
        return {"drift": {"multi@5": drift, "smallest_margin": margin}}

    outcomes = {"default": {0: run(1.0, 1.6), 1: run(0.8, 0.9)},
                "avx2": {0: run(0.816, -0.27), 1: run(0.8, 1.2)}}
    report = reproduce.summarize(outcomes, ["default", "avx2"], [0, 1])
    drift = report["methods"]["drift"]
    assert drift["per_seed"][0]["largest_difference"] == pytest.approx(0.184)
    assert drift["per_seed"][1]["largest_difference"] == 0.0
    assert drift["largest_difference"] == pytest.approx(0.184) and drift["smallest_margin"] == -0.27
    assert drift["per_setting"]["default"]["mean"] == pytest.approx(0.9)
    assert drift["per_setting"]["avx2"]["sd"] == pytest.approx(0.011313708)
    text = reproduce.markdown(report, ["default", "avx2"], [0, 1], "header")
    assert "| drift | 0 | 1.000 | 0.816 | 0.184 | -0.27 |" in text


def test_a_setting_may_run_a_range_of_the_seeds():
    assert reproduce.parse_settings("default,sse4_2:0-2", [0, 1, 2, 3, 4]) == {
        "default": [0, 1, 2, 3, 4], "sse4_2": [0, 1, 2]}
    for bad in ("avx3", "avx2:0", "avx2:a-b"):
        with pytest.raises(ValueError, match="avx"):
            reproduce.parse_settings(bad, [0])


def test_a_seed_not_run_under_a_setting_is_left_out_of_its_comparisons():
    def run(sft):
        return {"sft": {"multi@5": sft, "smallest_margin": None}}

    outcomes = {"default": {0: run(0.8), 1: run(0.6)}, "sse4_2": {0: run(0.8)}}
    report = reproduce.summarize(outcomes, ["default", "sse4_2"], [0, 1])
    sft = report["methods"]["sft"]
    assert sft["per_seed"][1]["values"] == {"default": 0.6} and sft["per_seed"][1]["largest_difference"] == 0.0
    assert sft["per_setting"]["sse4_2"] == {"mean": 0.8, "sd": 0.0}
    assert sft["per_setting"]["default"]["mean"] == pytest.approx(0.7)
    assert "| sft | 1 | 0.600 | - | 0.000 | - |" in reproduce.markdown(report, ["default", "sse4_2"], [0, 1], "h")


def test_a_reproduction_reports_its_runs(comparison_run, tmp_path, monkeypatch):
    """The runs' results (here: copies of one finished tiny comparison run, each setting's run
    stubbed out) become the report: the same values under both settings, a difference
    of 0, every run started with its setting's flags."""
    for setting in ("default", "avx2"):  # the other reproduction, whose runs this one starts from
        shutil.copytree(comparison_run[0], tmp_path / "before" / setting / "seed0")
    started, real_run = [], subprocess.run

    def run(argv, *args, **kwargs):  # runs of experiments/run.py only; platform's own calls pass
        if not any(str(a).endswith(os.path.join("experiments", "run.py")) for a in argv):
            return real_run(argv, *args, **kwargs)
        started.append((argv, kwargs["env"]["XLA_FLAGS"]))
        if any(str(a).startswith("--config.seeds=") for a in argv):  # the sweep summaries, in this process
            return run_in_process(argv[2:])
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(reproduce.subprocess, "run", run)
    # an earlier report's wall times stay for runs found finished (these did no work)
    (tmp_path / "reproduce.json").write_text(json.dumps({"wall_s": {"default/seed0": 250.0, "default/seed9": 1.0}}))
    assert reproduce.main(["--seeds=0", "--settings=default,avx2", f"--config={CONFIGS}/comparison_tiny.py",
                           f"--start_from={tmp_path / 'before'}", f"--workdir={tmp_path}"]) == 0
    runs = [flags for argv, flags in started if "--config.seed=0" in argv]
    sweeps = [argv for argv, _ in started if "--config.seeds=0" in argv]
    assert [flags.endswith("--xla_cpu_max_isa=AVX2") for flags in runs] == [False, True]
    assert [a for argv in sweeps for a in argv if a.startswith("--workdir")] == [
        f"--workdir={tmp_path / s}" for s in ("default", "avx2")]
    with open(tmp_path / "reproduce.json") as f:
        report = json.load(f)
    with open(os.path.join(comparison_run[0], "results.json")) as f:
        results = json.load(f)
    assert report["wall_s"] == {"default/seed0": 250.0}
    key = report["metric"]
    assert set(report["methods"]) == set(results["methods"])
    for method, r in report["methods"].items():
        assert r["per_seed"]["0"]["values"] == {s: results["methods"][method][key] for s in ("default", "avx2")}
        assert r["largest_difference"] == 0.0
    assert (tmp_path / "reproduce.md").read_text().startswith("Made by `python experiments/reproduce.py")

    # docs/results.md's reproduce block and README's reproducibility line come from the report
    from experiments import readme_results

    block = readme_results.render_reproduce([str(tmp_path)])
    assert (tmp_path / "reproduce.md").read_text().split("\n", 1)[1] in block
    for setting in ("default", "avx2"):  # a comparison: DRIFT against online RL, with costs, per setting
        assert f"Under `{setting}`: Seeds 0. Run " in block
    assert block.count("DRIFT minus online RL") == 2
    line = readme_results.reproducibility_statement(str(tmp_path))
    assert "default seeds 0; avx2 seeds 0" in line and f"at most 0.000 ({next(iter(report['methods']))})" in line
    results_md, readme = tmp_path / "results.md", tmp_path / "README.md"
    blocks = {name: f"<!-- {name}:start -->\nstale\n<!-- {name}:end -->\n"
              for name in ("results", "reproduce", "reproducibility")}
    results_md.write_text(blocks["results"] + blocks["reproduce"])
    readme.write_text("intro\n" + blocks["reproducibility"])
    argv = [str(tmp_path / "default"), f"--results={results_md}", f"--readme_md={readme}", f"--reproduce={tmp_path}"]
    assert readme_results.main([*argv, "--check"]) == 1
    assert readme_results.main(argv) == 0 and readme_results.main([*argv, "--check"]) == 0
    assert line in readme.read_text() and "wall time per seed (s): 0: 250" in results_md.read_text()
