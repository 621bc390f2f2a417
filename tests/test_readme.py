"""Every ``python experiments/run.py`` command in README.md's code blocks runs, on the
tiny configs, exactly as printed but for the substitutions in ``on_tiny`` (each says why);
README's copies of other files (the results summary, the CI's test command, the public
API names) match what they copy.

Two commands are what the session's shared runs already execute (``tiny_run`` is the
first command on the tiny config, ``comparison_run`` the comparison); the others run
here, each in its own workdir. A command that only changes some settings of the default
starts from a copy of the shared tiny run: the workdir ledger then re-runs exactly the
stages those settings reach (``tests/test_runner.py`` checks that it does), which keeps
this file's cost to the stages each command changes.
"""

import json
import os
import re
import shlex
import shutil

import pytest

from conftest import run_in_process
from helpers import tiny_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "experiments", "run.py")
AUTHORS = os.path.join(REPO, "tests", "fixtures", "rollouts", "authors_format.jsonl")

# README config -> the tiny config that stands in for it.
TINY_CONFIGS = {
    None: "experiments/configs/tiny.py",
    "experiments/configs/tiny.py": "experiments/configs/tiny.py",
    "experiments/configs/comparison.py": "experiments/configs/comparison_tiny.py",
    "experiments/configs/qwen2_5_3b_metamath.py": "tests/configs/tiny_math.py",
    "experiments/configs/qwen2_5_0_5b_metamath.py": "tests/configs/tiny_math.py",
    "experiments/configs/from_rollouts.py": "experiments/configs/from_rollouts.py",
    "experiments/configs/eval.py": "experiments/configs/eval.py",
}
FIXTURES = os.path.join(REPO, "tests", "fixtures", "datasets")
# The paper's benchmarks (hub datasets) -> the fixture files in their layouts.
BENCHMARK_FIXTURES = {"math500": "math500.jsonl", "math": "hendrycks_math.jsonl", "theoremqa": "theoremqa.json",
                      "gpqa_diamond": "gpqa_diamond.jsonl", "mmlu_redux": "mmlu_redux.jsonl",
                      "mmlu_pro": "mmlu_pro.jsonl"}
OFFLINE_BENCHMARKS = [arg for name, file in BENCHMARK_FIXTURES.items() for arg in (
    f"--config.eval.benchmarks.{name}.source={os.path.join(FIXTURES, file)}",
    f"--config.eval.benchmarks.{name}.split=None")]
# A real model's config on the tiny checkpoint and 8 rollout records: float32 on CPU,
# batches small enough for more than one update.
SMALL_REAL_MODEL = ["--config.model.dtype=float32", "--config.model.remat=none", "--config.train.batch_size=4",
                    "--config.train.num_micro_batches=1", "--config.train.max_len=128"]


def readme_commands() -> list[str]:
    """The ``python experiments/run.py`` commands of README's bash blocks, continuation
    lines joined and comments dropped."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#")[0].split("&&"):
                if part.strip().startswith("python experiments/run.py"):
                    commands.append(" ".join(part.split()))
    return commands


COMMANDS = readme_commands()


def on_tiny(command: str, checkpoint: str) -> tuple[list[str], str]:
    """(arguments for run.py, workdir relative to the cwd) of a README command."""
    args = shlex.split(command)[2:]
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    tiny = TINY_CONFIGS[config]  # a KeyError: a README config with no stand-in here
    args = [a for a in args if not a.startswith("--config=")]
    out = [f"--config={os.path.join(REPO, tiny)}"]
    for a in args:
        key, _, value = a.partition("=")
        if key == "--config.model.checkpoint":  # a hub id: no internet here
            a = f"{key}={checkpoint}"
        elif key == "--workdir" and os.path.isabs(value):  # e.g. /tmp/tiny: kept inside the test's folder
            a = f"{key}={value.lstrip(os.sep)}"
        out.append(a)
    if tiny == "tests/configs/tiny_math.py":
        out.append(f"--config.model.checkpoint={checkpoint}")
    if config == "experiments/configs/from_rollouts.py":
        out += SMALL_REAL_MODEL
    if config == "experiments/configs/eval.py":  # the hub benchmarks: offline fixtures instead
        # Rows per sampler call as tiny_math's: the paper's 256 pads each call of a few
        # fixture questions to 256 rows (5x the test's time).
        out += OFFLINE_BENCHMARKS + ["--config.model.dtype=float32", "--config.rollout.max_new_tokens=6",
                                     "--config.eval.max_new_tokens=6", "--config.task.max_turns=2",
                                     "--config.eval.batch_size=8"]
    workdir = next((a.split("=", 1)[1] for a in out if a.startswith("--workdir=")), None)
    return out, workdir or os.path.join("runs", os.path.splitext(os.path.basename(tiny))[0])


def test_readme_has_the_commands_this_file_runs():
    assert COMMANDS[0] == "python experiments/run.py"  # the first screen's main job
    assert any("--config.drift.gamma=0.9 --config.drift.beta=0.1" in c for c in COMMANDS)
    # Every example that writes uses its own workdir (a dry run writes nothing).
    workdirs = [on_tiny(c, "ckpt")[1] for c in COMMANDS if "--dry_run" not in c]
    assert len(set(workdirs)) == len(workdirs), "every README example uses its own workdir"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_on_the_tiny_configs(command, tmp_path, run_env, tiny_run, comparison_run):
    checkpoint = tmp_path / "checkpoint"
    args, workdir = on_tiny(command, str(checkpoint))
    settings = [a for a in args if not a.startswith("--workdir=")]
    if settings == [f"--config={os.path.join(REPO, TINY_CONFIGS[None])}"]:
        results = tiny_run[0] / "results.json"  # this very command, run once per session
    elif settings == [f"--config={os.path.join(REPO, TINY_CONFIGS['experiments/configs/comparison.py'])}"]:
        results = comparison_run[0] / "results.json"
    else:
        tiny_hf_checkpoint(str(checkpoint))
        for files in re.findall(r"--config\.rollouts=(\S+)", command):  # the authors' file, split by prompt
            lines = open(AUTHORS).read().splitlines()
            prompts = sorted({json.loads(line)["prompt_id"] for line in lines})
            names = files.split(",")
            for i, name in enumerate(names):
                mine = set(prompts[i::len(names)])
                (tmp_path / name).write_text("".join(
                    line + "\n" for line in lines if json.loads(line)["prompt_id"] in mine))
        if "--config.seeds=" in command:  # a sweep: its seed 0 is the shared tiny run
            shutil.copytree(tiny_run[0], tmp_path / workdir / "seed0")
        elif settings[0].endswith("experiments/configs/tiny.py") and "--config.seed=" not in command:
            shutil.copytree(tiny_run[0], tmp_path / workdir)  # see the module docstring
        out = run_in_process(args, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        results = tmp_path / workdir / ("sweep.json" if "--config.seeds=" in command else "results.json")
    assert results.exists()


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def test_readme_summary_rows_are_rows_of_docs_results():
    """README's results summary copies rows of the table experiments/readme_results.py
    writes into docs/results.md: a regenerated docs/results.md makes a stale copy fail here."""
    from experiments import readme_results

    summary = re.search(r"<!-- summary:start -->\n(.*?)<!-- summary:end -->", _read("README.md"), flags=re.S)
    rows = summary.group(1).splitlines()
    assert rows and all(row.startswith("| ") for row in rows)
    results = _read("docs", "results.md")
    assert readme_results.RESULTS_MD == os.path.join(REPO, "docs", "results.md")
    for name in ("results", "reproduce", "spectrum", "comparison"):
        assert f"<!-- {name}:start -->" in results and f"<!-- {name}:end -->" in results
    assert re.search(r"<!-- reproducibility:start -->\n\S.*\n<!-- reproducibility:end -->", _read("README.md"))
    block = results.split(readme_results.START)[1].split(readme_results.END)[0]
    lines = block.splitlines()
    for row in rows:
        assert row in lines, f"README's summary row is not in docs/results.md: {row}"


def test_ci_runs_the_readme_test_command_after_the_runtime_install_alone():
    """.ci/run's last line is README's test command; before it, in the same fresh virtual
    environment, only requirements.txt and the package are installed and the tiny config
    runs through experiments/run.py (the main job's code path), so a runtime dependency
    that only requirements-test.txt pulls in cannot hide."""
    blocks = re.findall(r"```bash\n(.*?)```", _read("README.md"), flags=re.S)
    main_job, test_command = blocks[0].strip(), blocks[1].strip()
    assert main_job == "pip install -r requirements.txt && pip install -e . && python experiments/run.py"
    ci = [line for line in _read(".ci", "run").splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == test_command
    before = "\n".join(ci[:-1])
    assert "python -m venv" in before and "requirements-test" not in before
    assert "pip install -q -r requirements.txt && pip install -q -e ." in before
    assert "python experiments/run.py --config=experiments/configs/tiny.py" in before
    # The compile test (tests/test_aot.py) runs against the CUDA plugin and libtpu, and
    # fails rather than skips without them.
    assert "pip install -q -r requirements-aot.txt" in before and "export DRIFT_REQUIRE_AOT=1" in before


def test_runtime_requirements_name_what_transformers_does_not_install():
    """transformers renders chat templates with jinja2 but does not depend on it; torch (a
    test requirement) does, which hid its absence from the tests."""
    names = {re.split(r"[<>=\[ ]", line.strip())[0].lower() for line in _read("requirements.txt").splitlines()
             if line.strip() and not line.startswith("#")}
    assert {"jinja2", "transformers", "absl-py", "huggingface_hub"} <= names


def test_readme_names_only_public_api_that_exists():
    import drift_jax as dj

    names = set(re.findall(r"`dj\.([A-Za-z_]+)", _read("README.md"))) - {"__all__"}
    assert {"importance_weights", "trajectory_weights", "weighted_sft_loss", "read_rollouts", "from_pretrained",
            "save_pretrained", "load_questions", "MathEnv", "Episode", "Question"} <= names
    for name in names:
        assert name in dj.__all__, name
        assert callable(getattr(dj, name)), name


def test_docs_state_no_bit_for_bit_agreement_across_machines():
    texts = [_read("README.md")] + [_read("docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs")))
                                    if f.endswith(".md")]
    assert not [t for t in texts if "last digit" in t]


def _resolves(dotted: str) -> bool:
    """Whether ``drift_jax.a.b.c`` is a module or an attribute of one."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_every_module_path_the_docs_name_exists():
    """README, docs/*.md and the install files' comments name code as
    ``drift_jax.<package>[.<module>[.<name>]]`` or as a file path: each must exist, so a
    moved module or test cannot leave a stale pointer behind."""
    pages = ["README.md", "requirements.txt", "requirements-test.txt", "setup.py"] + [
        os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs"))) if f.endswith(".md")]
    missing = []
    for page in pages:
        text = _read(page)
        for dotted in set(re.findall(r"\bdrift_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text)):
            if not _resolves(dotted):
                missing.append(f"{page}: {dotted}")
        for path in set(re.findall(r"\b((?:drift_jax|experiments|benchmarks|tests)/[A-Za-z0-9_./-]*[A-Za-z0-9_])",
                                   text)):
            if not os.path.exists(os.path.join(REPO, path)) and "<" not in path:
                missing.append(f"{page}: {path}")
    assert not missing, "\n".join(sorted(missing))
