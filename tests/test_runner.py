"""The runner fails fast and never wastes a user's work (experiments/run.py, preflight.py,
ledger.py): each finding of the runner issue as a user would type it, and the behaviour
or message expected. Preflight runs before any stage writes anything; a stage re-runs
exactly when the settings it depends on changed."""

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
from flax import nnx

from conftest import run_in_process
from helpers import chatml_tokenizer, run_module, tiny_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "experiments", "run.py")
CONFIGS = os.path.join(REPO, "experiments", "configs")
TINY_MATH = os.path.join(REPO, "tests", "configs", "tiny_math.py")
AUTHORS = os.path.join(REPO, "tests", "fixtures", "rollouts", "authors_format.jsonl")
FIXTURES = os.path.join(REPO, "tests", "fixtures", "datasets")


@pytest.fixture
def cli():
    """``cli(*args, ok=True) -> CompletedProcess`` of ``python experiments/run.py *args``
    (run in this process: ``conftest.run_in_process``)."""
    def run(*args, ok=True):
        out = run_in_process(args)
        assert (out.returncode == 0) == ok, (out.returncode, out.stderr[-3000:])
        return out
    return run


def stages_run(stdout: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith("stages run: "))
    rest = line[len("stages run: "):]
    return [] if rest.startswith("none") else rest.split(", ")


def error_of(out) -> str:
    """A config error is one short message (no traceback) on stderr."""
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A bf16 random-init HF folder with a generation_config.json."""
    path = tmp_path_factory.mktemp("ckpt") / "init"
    tiny_hf_checkpoint(str(path), param_dtype="bfloat16", generation_config={"do_sample": False, "eos_token_id": 2})
    return path


@pytest.fixture
def run_dir(tiny_run, tmp_path):
    """A private copy of the shared finished tiny run."""
    shutil.copytree(tiny_run[0], tmp_path / "run")
    return tmp_path / "run"


# -- silent no-op training, honest costs, failed starts, the HF output ----------------------

def test_a_training_that_cannot_move_the_policy_is_refused_before_any_work(cli, checkpoint, tmp_path):
    """README's from_rollouts command on a file of 8 records (batch 128, 10% warm-up) is
    one update at learning rate 0: refused up front, naming what to change."""
    workdir = tmp_path / "run"
    out = cli(f"--config={CONFIGS}/from_rollouts.py", f"--config.model.checkpoint={checkpoint}",
              f"--config.rollouts={AUTHORS}", f"--workdir={workdir}", ok=False)
    message = error_of(out)
    assert "1 update(s), 0 of them at learning rate > 0" in message
    assert "train.batch_size" in message and "--config.allow_tiny=True" in message
    assert not workdir.exists()


def test_a_failed_start_leaves_nothing_and_the_corrected_command_runs(cli, checkpoint, tmp_path):
    """A wrong rollouts path: a one-line error and no workdir, so the corrected command is
    not refused. Forced through with allow_tiny, the no-op training says so loudly; costs
    count real tokens; the HF output keeps the input's bf16 and its generation config."""
    workdir = tmp_path / "run"
    common = [f"--config={CONFIGS}/from_rollouts.py", f"--config.model.checkpoint={checkpoint}",
              f"--workdir={workdir}", "--config.model.dtype=float32", "--config.model.remat=none",
              "--config.train.max_len=128"]
    message = error_of(cli(*common, "--config.rollouts=/no/such/rollouts.jsonl", ok=False))
    assert message == "error: --config.rollouts: no such file /no/such/rollouts.jsonl"
    assert not workdir.exists()

    out = cli(*common, f"--config.rollouts={AUTHORS}", "--config.allow_tiny=True")
    assert "policy 'drift' equals its initial weights" in out.stderr
    stats = json.loads((workdir / "drift" / "train_stats.json").read_text())
    assert stats["steps"] == 1 and stats["unchanged_policy"] is True
    results = json.loads((workdir / "results.json").read_text())
    assert any("drift: the trained policy equals its initial weights" in w for w in results["warnings"])

    # One update over the 7 records trained on (the release protocol holds out the last
    # ceil(5% x 8) = 1): each example's real tokens once, not 128/7 times.
    from drift_jax.data.chat import encode_dialogue
    from drift_jax.data.records import read_jsonl
    records, _ = read_jsonl(AUTHORS)
    tokenizer = chatml_tokenizer()
    examples = [encode_dialogue(tokenizer, r["messages"], supervise="last", max_len=128) for r in records[:-1]]
    assert stats["held_out_examples"] == 1 and stats["examples"] == 7
    assert stats["trained_tokens"] == sum(len(e.tokens) for e in examples)
    assert results["methods"]["drift"]["cost"]["trained_tokens"] == stats["trained_tokens"]

    hf = workdir / "drift" / "hf"
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (hf / "generation_config.json").read_text() == (checkpoint / "generation_config.json").read_text()
    from safetensors import safe_open
    with safe_open(str(hf / "model.safetensors"), framework="flax") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"bfloat16"}


# -- errors before the expensive work -------------------------------------------------------

def test_a_benchmark_in_an_unknown_layout_fails_before_any_stage(cli, checkpoint, tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"query": "1+1?", "expected": "2"}) + "\n")
    workdir = tmp_path / "run"
    message = error_of(cli(f"--config={TINY_MATH}", f"--config.model.checkpoint={checkpoint}",
                           f"--config.eval.benchmarks.math500.source={odd}", f"--workdir={workdir}", ok=False))
    assert "benchmark 'math500'" in message and "cannot tell the layout" in message
    assert "eval.benchmarks.math500.layout" in message
    assert not workdir.exists()
    # ... and the key it names can be set.
    cli(f"--config={TINY_MATH}", f"--config.model.checkpoint={checkpoint}", "--dry_run",
        "--config.eval.benchmarks.math500.layout=math500", f"--workdir={workdir}")
    assert not workdir.exists()


def test_iterative_drift_on_given_rollouts_needs_questions_and_says_so(cli, checkpoint, tmp_path):
    message = error_of(cli(f"--config={CONFIGS}/from_rollouts.py", f"--config.model.checkpoint={checkpoint}",
                           f"--config.rollouts={AUTHORS}", "--config.methods=drift,drift_round2",
                           f"--workdir={tmp_path / 'run'}", ok=False))
    assert "'drift_round2'" in message and "--config.data.train" in message


@pytest.mark.parametrize("config", ["default.py", "tiny.py"])
def test_online_rl_is_planned_from_the_embedded_configs(cli, tmp_path, config):
    out = cli(f"--config={CONFIGS}/{config}", "--config.methods=sft,drift,online_rl", "--dry_run",
              f"--workdir={tmp_path / 'run'}")
    assert "train:online_rl: new" in out.stdout and "eval:online_rl:secret: new" in out.stdout
    assert not (tmp_path / "run").exists()


def test_fewer_questions_than_asked_is_a_warning_with_the_numbers(cli, checkpoint, tmp_path):
    out = cli(f"--config={TINY_MATH}", f"--config.model.checkpoint={checkpoint}", "--dry_run",
              "--config.rollout.num_prompts=4", "--config.task.protocol=drift-jax", f"--workdir={tmp_path / 'run'}")
    assert out.stderr.count("gave 2 questions; rollout.num_prompts asks for 4: using 2") == 1


def test_debug_keeps_the_traceback(cli, tmp_path):
    out = cli(f"--config={CONFIGS}/tiny.py", "--config.drift.beta=0", "--debug", f"--workdir={tmp_path}/r", ok=False)
    assert "Traceback" in out.stderr and "drift.beta must be > 0" in out.stderr


# -- the model and its tokenizer ------------------------------------------------------------

def test_a_model_folder_without_tokenizer_files_is_named_as_such(cli, checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / f, bare / f)
    message = error_of(cli(f"--config={CONFIGS}/from_rollouts.py", f"--config.model.checkpoint={bare}",
                           f"--config.rollouts={AUTHORS}", f"--workdir={tmp_path / 'run'}", ok=False))
    assert "no tokenizer files" in message and "copy them from the base model" in message


def test_a_tokenizer_larger_than_the_embedding_is_refused(cli, checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 100  # the tokenizer has more tokens than that
    # The weights must match config.json, so write a model of that vocabulary.
    from flax import nnx

    from drift_jax.models import Transformer, config_from_hf, save_pretrained
    save_pretrained(Transformer(config_from_hf(config), rngs=nnx.Rngs(0)), other)
    message = error_of(cli(f"--config={CONFIGS}/from_rollouts.py", f"--config.model.checkpoint={other}",
                           f"--config.rollouts={AUTHORS}", f"--workdir={tmp_path / 'run'}", ok=False))
    assert re.search(r"tokenizer has \d+ tokens .* embedding has 100 rows", message)


# -- the workdir: what each stage depends on ------------------------------------------------

def test_changing_eval_settings_reruns_eval_only(cli, run_dir):
    out = cli(f"--config={CONFIGS}/tiny.py", f"--workdir={run_dir}", "--config.eval.num_prompts=6")
    assert stages_run(out.stdout) == ["eval:reference:secret", "eval:sft:secret", "eval:drift:secret"]
    assert json.loads((run_dir / "eval" / "secret_drift.json").read_text())["questions"] == 6
    assert (run_dir / "stale").is_dir()  # the old evaluations are moved aside, not deleted


def test_changing_beta_reruns_weights_and_drift_on_the_same_rollouts(cli, run_dir):
    before = (run_dir / "rollouts.jsonl").read_bytes()
    sft = (run_dir / "sft" / "train_stats.json").read_text()
    out = cli(f"--config={CONFIGS}/tiny.py", f"--workdir={run_dir}", "--config.drift.beta=0.3")
    assert stages_run(out.stdout) == ["weights", "train:drift", "eval:drift:secret"]
    assert (run_dir / "rollouts.jsonl").read_bytes() == before
    assert (run_dir / "sft" / "train_stats.json").read_text() == sft
    assert json.loads((run_dir / "weights.json").read_text())["beta"] == 0.3
    # The old DRIFT training sits under what made it stale (TensorBoard lists it so).
    assert list((run_dir / "stale").glob("*/drift.beta=0.3/drift/metrics.jsonl"))
    # Back to the first beta: DRIFT is retrained (its output was replaced), sft is not.
    out = cli(f"--config={CONFIGS}/tiny.py", f"--workdir={run_dir}")
    assert stages_run(out.stdout) == ["weights", "train:drift", "eval:drift:secret"]


def dry_run_lines(stdout: str) -> dict:
    """{stage: status} of a dry run's output."""
    return dict(line.split(": ", 1) for line in stdout.strip().splitlines())


def test_settings_that_change_how_not_what_leave_a_finished_run_alone(cli, run_dir, tiny_run):
    out = cli(f"--config={CONFIGS}/tiny.py", f"--workdir={run_dir}", "--dry_run",
              "--config.model.remat=full", "--config.model.attention_impl=xla", "--config.train.loss_chunk_size=8",
              "--config.train.checkpoint_every=1")
    # Every stage the run went through is listed, and each is done.
    assert dry_run_lines(out.stdout) == {stage: "done" for stage in stages_run(tiny_run[1])}
    assert len(stages_run(tiny_run[1])) == 8


def test_a_dry_run_lists_the_stages_the_run_goes_through(cli, tiny_run, comparison_run, tmp_path):
    """One plan: a fresh workdir's dry run names, in order, the stages the real run ran
    (the shared tiny and comparison runs: every method, iterative DRIFT included)."""
    for config, (_, stdout) in (("tiny.py", tiny_run), ("comparison_tiny.py", comparison_run)):
        out = cli(f"--config={CONFIGS}/{config}", f"--workdir={tmp_path / config}", "--dry_run")
        planned = dry_run_lines(out.stdout)
        assert list(planned) == stages_run(stdout) and set(planned.values()) == {"new"}
    assert "round2/train:drift" in planned and "eval:drift_round2:secret" in planned


def test_a_dry_run_on_given_rollouts_lists_no_evaluation_without_benchmarks(cli, checkpoint, tmp_path):
    """from_rollouts.py names no benchmark: no evaluation is planned, none runs."""
    out = cli(f"--config={CONFIGS}/from_rollouts.py", f"--config.model.checkpoint={checkpoint}",
              f"--config.rollouts={AUTHORS}", "--config.allow_tiny=True", "--dry_run", f"--workdir={tmp_path / 'run'}")
    assert list(dry_run_lines(out.stdout)) == ["weights", "train:drift"]


@pytest.mark.parametrize("arg, message", [
    # Issue 34: the learning rate is named, not the number of updates.
    ("--config.train.learning_rate=0", "error: invalid config: train.learning_rate must be > 0, got 0.0"),
    ("--config.rollout.temperature=-1", "error: invalid config: rollout.temperature must be >= 0 (0: greedy), got -1.0"),
    ("--config.eval.num_prompts=0", "error: invalid config: eval.num_prompts must be >= 1, got 0"),
    ("--config.rollout.top_p=0", "error: invalid config: rollout.top_p must be in (0, 1], got 0.0"),
])
def test_sampling_and_learning_rate_errors_name_the_key(cli, tmp_path, arg, message):
    out = cli(f"--config={CONFIGS}/tiny.py", arg, f"--workdir={tmp_path / 'run'}", ok=False)
    assert error_of(out) == message
    assert not (tmp_path / "run").exists()


def test_embedded_config_trains_on_given_rollouts(cli, run_dir, tiny_run):
    """--config.rollouts works in the embedded configs: the same rollouts, given as a file,
    give the same trained policies."""
    given = run_dir.parent / "given.jsonl"
    shutil.copy(run_dir / "rollouts.jsonl", given)
    out = cli(f"--config={CONFIGS}/tiny.py", f"--workdir={run_dir}", f"--config.rollouts={given}")
    ran = stages_run(out.stdout)
    assert "rollout" not in ran and "reference" not in ran and "train:drift" in ran
    got = json.loads((run_dir / "results.json").read_text())["methods"]
    want = json.loads((tiny_run[0] / "results.json").read_text())["methods"]
    for method in ("sft", "drift"):
        assert [got[method][f"multi@{k}"] for k in range(1, 6)] == [want[method][f"multi@{k}"] for k in range(1, 6)]
        assert got[method]["cost"]["generated_tokens"] is None  # made elsewhere


# -- options and syntax ---------------------------------------------------------------------

def _overrides(*args, config="from_rollouts.py"):
    return run_module().check_overrides(["run.py", f"--config={CONFIGS}/{config}", *args],
                                         os.path.join(CONFIGS, "default.py"))


def test_none_reaches_none_able_fields():
    argv, edits = _overrides("--config.data.train_split=None", "--config.train.max_len=None",
                             "--config.model.attention_impl=None", "--config.seed=3")
    assert edits == [("data.train_split", None), ("train.max_len", None), ("model.attention_impl", None)]
    assert argv[1:] == [f"--config={CONFIGS}/from_rollouts.py", "--config.seed=3"]
    from experiments.configs import from_rollouts
    cfg = from_rollouts.get_config()
    cfg.train.max_len = 4096
    run_module().apply_overrides(cfg, edits)
    assert cfg.data.train_split is None and cfg.train.max_len is None and cfg.model.attention_impl is None


def test_benchmarks_are_chosen_dropped_and_added_from_the_command_line():
    from experiments.configs import eval as eval_config

    run = run_module()
    argv, edits = _overrides("--config.eval.benchmarks.gpqa_diamond=None",
                             "--config.eval.benchmarks.mine.source=/data/mine.jsonl",
                             "--config.eval.benchmarks.mine.task=choice", config="eval.py")
    assert argv[1:] == [f"--config={CONFIGS}/eval.py"]  # ml_collections could not apply these
    cfg = eval_config.get_config()
    run.apply_overrides(cfg, edits)
    assert "gpqa_diamond" not in cfg.eval.benchmarks
    assert (cfg.eval.benchmarks.mine.source, cfg.eval.benchmarks.mine.task) == ("/data/mine.jsonl", "choice")
    assert cfg.eval.benchmarks.mine.split is None and "math500" in cfg.eval.benchmarks

    _, edits = _overrides("--config.eval.benchmarks=mine,math500", "--config.eval.benchmarks.mine.source=m.jsonl",
                          config="eval.py")
    cfg = eval_config.get_config()
    run.apply_overrides(cfg, edits)  # the choice applies after the additions, whatever the order
    assert sorted(cfg.eval.benchmarks) == ["math500", "mine"]
    with pytest.raises(run.ConfigError, match="no benchmark named math_500"):
        run.apply_overrides(eval_config.get_config(), _overrides("--config.eval.benchmarks=math_500",
                                                                 config="eval.py")[1])
    with pytest.raises(SystemExit, match="unknown config key 'eval.benchmarks.mine.sorce'"):
        _overrides("--config.eval.benchmarks.mine.sorce=x", config="eval.py")


def test_ctrl_c_stops_with_one_line(run_env, tmp_path):
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "experiments", "run.py"), f"--config={CONFIGS}/tiny.py",
                             f"--workdir={tmp_path / 'run'}"], env=run_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "stages.json").exists() and time.time() < deadline:
        time.sleep(0.2)  # the first stage has begun
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: the same command resumes")


def test_an_eval_only_run_names_no_trained_policies(cli, tiny_run, tmp_path):
    import shutil

    shutil.copytree(tiny_run[0], tmp_path / "run")
    out = cli(f"--config={CONFIGS}/tiny.py", f"--workdir={tmp_path / 'run'}", "--config.methods=()")
    assert "trained policies" not in out.stdout and "wrote " in out.stdout


@pytest.mark.parametrize("arg, expected", [
    ("--config.attention_impl=xla", "Did you mean model.attention_impl?"),
    ("--config.rollout=x.jsonl", "'rollout' is a config section, not a field; set one of its fields"),
])
def test_misplaced_keys_get_a_did_you_mean(arg, expected):
    with pytest.raises(SystemExit, match=re.escape(expected)):
        _overrides(arg, config="tiny.py")


@pytest.mark.parametrize("key", ["drift.target_ess_fraction", "train.loss_chunk_size", "train.bucket_window",
                                 "model.remat", "model.attention_impl", "allow_tiny", "model.save_dtype"])
@pytest.mark.parametrize("config", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py") and f != "__init__.py"))
def test_documented_options_are_settable_from_every_config(config, key):
    _overrides(f"--config.{key}=1", config=config)  # exits on an unknown key


def test_methods_take_a_comma_list():
    from drift_jax import methods
    assert [m.name for m in methods.parse("sft,drift,online_rl")] == ["sft", "drift", "online_rl"]


# -- packaging and benchmarks ---------------------------------------------------------------

def test_the_data_extra_installs_what_the_loader_asks_for():
    from drift_jax.data.sources import TFDS_PACKAGES
    setup = open(os.path.join(REPO, "setup.py")).read()
    extra = re.search(r'"data": \[([^\]]*)\]', setup).group(1)
    assert sorted(re.findall(r'"([^"]+)"', extra)) == sorted(TFDS_PACKAGES)


def test_throughput_peaks_follow_the_device_kind():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import throughput
    assert throughput.device_peaks("cpu") == (None, None)
    assert throughput.device_peaks("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert throughput.device_peaks("TPU v5 lite")[0] == 197e12
    assert throughput.device_peaks("TPU v5p")[0] == 459e12
    assert np.isfinite(throughput.device_peaks("NVIDIA H200")[1])


def _config(path):
    import runpy
    return runpy.run_path(path)["get_config"]()


def test_protocol_fills_the_settings_left_at_none_and_keeps_explicit_ones():
    """``resolve`` returns a frozen, filled-in copy; the config given is left as it is."""
    from experiments.preflight import ConfigError, check_values, resolve

    given = _config(os.path.join(CONFIGS, "tiny.py"))
    ours = check_values(given)
    assert (ours.data.selection, ours.train.shuffle, ours.train.eval_fraction, ours.eval.max_new_tokens) == (
        "first", True, 0.0, ours.rollout.max_new_tokens)
    assert given.train.shuffle is None and given.eval.max_new_tokens is None  # untouched
    with pytest.raises(AttributeError, match="immutable"):
        ours.train.shuffle = False
    assert resolve(ours) == ours and resolve(given) == ours
    paper = _config(os.path.join(CONFIGS, "qwen2_5_3b_metamath.py"))
    paper.train.shuffle = True  # a deviation on one point
    paper = resolve(paper)
    assert paper.task.protocol == "release"
    assert (paper.data.selection, paper.train.shuffle, paper.train.eval_fraction, paper.eval.max_new_tokens) == (
        "release", True, 0.05, 1024)
    secret = _config(os.path.join(CONFIGS, "tiny.py"))
    secret.task.protocol = "release"
    with pytest.raises(ConfigError, match="secret task has only 'drift-jax'"):
        check_values(secret)
    secret.task.protocol = "authors"
    with pytest.raises(ConfigError, match="task.protocol must be one of"):
        resolve(secret)


def test_release_selection_keeps_repeats_and_takes_the_seed_42_shuffle(tmp_path):
    """data.selection="release": every row of the source, repeats kept, shuffled with seed
    42, the first rollout.num_prompts; "first": the first rows, repeats dropped."""
    from drift_jax.data.questions import load_questions, select_prompts
    from experiments.preflight import check_values

    src = tmp_path / "metamathqa.jsonl"
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "metamathqa.jsonl"))]
    math_rows = [r for r in rows if r["type"].startswith("MATH_")]
    src.write_text("".join(json.dumps(r) + "\n" for r in math_rows * 3))  # each question 3 times
    run = run_module()
    cfg = _config(TINY_MATH)
    cfg.data.train, cfg.rollout.num_prompts = str(src), 4
    check_values(cfg)
    got = [q.prompt_id for q in run.Experiment(cfg, str(tmp_path / "w")).train_questions]
    every = load_questions(str(src), repeats="keep")
    assert len(every) == 3 * len(math_rows)
    assert got == [q.prompt_id for q in select_prompts(every, 4, "release", seed=42)]
    cfg = _config(TINY_MATH)
    cfg.task.protocol, cfg.data.train, cfg.rollout.num_prompts = "drift-jax", str(src), 4
    check_values(cfg)
    first = run.Experiment(cfg, str(tmp_path / "w2")).train_questions
    assert len({q.prompt_id for q in first}) == len(first) < 4  # repeats dropped: fewer than asked
    assert [q.prompt_id for q in first] == [q.prompt_id for q in load_questions(str(src))]


def test_packed_training_reruns_training_only_and_records_the_padding(tiny_run, tmp_path, capsys):
    """--config.train.pack=True on a finished run: the same rollouts and weights, training
    (and its evaluation) again on packed rows; train_stats.json records the padding of
    both layouts."""
    run = run_module()
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    cfg = _config(os.path.join(CONFIGS, "tiny.py"))
    cfg.train.pack, cfg.train.pack_length = True, 256  # several of the toy's short dialogues per row
    run.run(cfg, str(workdir))
    assert stages_run(capsys.readouterr().out) == ["train:sft", "train:drift", "eval:sft:secret", "eval:drift:secret"]
    before = json.loads((tiny_run[0] / "drift" / "train_stats.json").read_text())
    after = json.loads((workdir / "drift" / "train_stats.json").read_text())
    assert after["examples"] == before["examples"]
    # The toy's 24 dialogues fill one batch either way, so only the bookkeeping is checked
    # here (tests/test_packing.py checks the numbers, benchmarks/padding.py the savings).
    assert after["padding_fraction_unpacked"] == pytest.approx(before["padding_fraction"])
    assert 0 <= after["padding_fraction"] < 1


def test_seeds_run_each_seed_and_summarise_them(cli, tiny_run, tmp_path):
    """--config.seeds=0,1: the run per seed in <workdir>/seed<N> (seed 0 here is a copy of
    the session's tiny run, so only seed 1 runs), then sweep.json whose per-seed values are
    the seeds' own results, with mean, sd and an interval around the mean."""
    workdir = tmp_path / "sweep"
    shutil.copytree(tiny_run[0], workdir / "seed0")
    out = cli(f"--config={CONFIGS}/tiny.py", "--config.seeds=0,1", f"--workdir={workdir}")
    assert "=== seed 1 ===" in out.stdout
    written = json.loads((workdir / "sweep.json").read_text())
    assert set(written["environment"]["wall_s"]) == {"0", "1"} and written["environment"]["jax"]
    summary = written["benchmarks"]["secret"]
    assert summary["seeds"] == [0, 1]
    for method in ("reference", "sft", "drift"):
        stats = summary["methods"][method]["multi@5"]
        want = [json.loads((workdir / f"seed{s}" / "results.json").read_text())["methods"][method]["multi@5"]
                for s in (0, 1)]
        assert stats["per_seed"] == pytest.approx(want)
        assert stats["mean"] == pytest.approx(np.mean(want)) and stats["sd"] == pytest.approx(np.std(want, ddof=1))
        assert stats["low"] <= stats["mean"] <= stats["high"]
    assert (workdir / "sweep.md").read_text().count("+-") >= 3 * 5
    assert (workdir / "sweep_secret.png").stat().st_size > 0
    message = error_of(cli(f"--config={CONFIGS}/tiny.py", "--config.seeds=0,x", f"--workdir={workdir}", ok=False))
    assert "seeds must be comma-separated integers" in message
    # README's results block is rendered from such a sweep (experiments/readme_results.py).
    from experiments import readme_results

    block = readme_results.render(str(workdir))
    per_seed = summary["methods"]["drift"]["multi@5"]["per_seed"]
    assert all(f"{v:.3f}" in block for v in per_seed) and "wall time per seed" in block
    # Each seed's greedy dialogue and margins, from the eval's answer_check.
    dialogue = json.loads((workdir / "seed1" / "eval" / "secret_drift.json").read_text())["answer_check"]["greedy"]
    row = next(line for line in block.splitlines() if line.startswith("| 1 | ") and "margin" in line)
    assert f"{dialogue[-1]['margin']:+.2f}" in row
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_results.START}\nstale\n{readme_results.END}\nrest\n")
    assert readme_results.main([str(workdir), "--readme", str(readme), "--check"]) == 1
    assert readme_results.main([str(workdir), "--readme", str(readme)]) == 0
    assert readme_results.main([str(workdir), "--readme", str(readme), "--check"]) == 0
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("rest\n")
    comparison = readme_results.render_comparison(str(workdir))
    cost = json.loads((workdir / "seed1" / "results.json").read_text())["methods"]["drift"]["cost"]
    mean_tokens = (cost["generated_tokens"] + json.loads((workdir / "seed0" / "results.json").read_text())[
        "methods"]["drift"]["cost"]["generated_tokens"]) / 2
    assert f"| {mean_tokens:,.0f} |" in comparison.split("| drift |")[1].splitlines()[0] + " |"


def test_the_comparison_block_compares_drift_with_online_rl_and_counts_coverage_per_round(
        cli, comparison_run, tmp_path):
    """readme_results.render_comparison on a one-seed comparison sweep (a copy of the
    session's comparison run: only the summary is computed): DRIFT minus online RL with
    the generated-token ratio, and the distinct-path coverage of the reference's and
    round 2's rollouts, read from their rollout_stats.json."""
    from experiments import readme_results

    workdir = tmp_path / "comparison"
    shutil.copytree(comparison_run[0], workdir / "seed0")
    cli(f"--config={CONFIGS}/comparison_tiny.py", "--config.seeds=0", f"--workdir={workdir}")
    block = readme_results.render_comparison(str(workdir))
    results = json.loads((workdir / "seed0" / "results.json").read_text())["methods"]
    gap = results["drift"]["multi@5"] - results["online_rl"]["multi@5"]
    ratio = results["drift"]["cost"]["generated_tokens"] / results["online_rl"]["cost"]["generated_tokens"]
    assert f"DRIFT minus online RL, multi@5: {gap:+.3f} +- 0.000" in block and f"online RL's: {ratio:.2f}." in block
    rows = {line.split(" | ")[0][2:]: line for line in block.splitlines() if line.startswith("| ") and " / " in line}
    for name, stats in (("reference", workdir / "seed0" / "rollout_stats.json"),
                        ("drift", workdir / "seed0" / "round2" / "rollout_stats.json")):
        paths = json.loads(stats.read_text())["sampled_reference"]["distinct_paths"]
        assert rows[name].endswith(f"| {paths[-1]['entered']:,} / {paths[-1]['solved']:,} |")


def test_beta_spectrum_trains_drift_per_beta_on_the_same_rollouts(tiny_run, tmp_path, capsys):
    """experiments/beta_spectrum.py on a finished run: per (gamma, beta) point the run's
    rollouts are reused (only weights, drift and its eval rerun), the point's beta is the
    one its weights used, and the endpoints are the run's SFT and a once-trained RFT."""
    from experiments import beta_spectrum

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    assert beta_spectrum.main([f"--workdir={workdir}", "--betas=0.1,10", "--gammas=1.0"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((workdir / "beta_spectrum.json").read_text())
    assert [(p["gamma"], p["beta"]) for p in summary["points"]] == [(1.0, 0.1), (1.0, 10.0)]
    for p in summary["points"]:
        point = workdir / "beta_spectrum" / f"g1_b{p['beta']:g}"
        assert json.loads((point / "weights.json").read_text())["beta"] == p["beta"]
        assert (point / "rollouts.jsonl").read_bytes() == (tiny_run[0] / "rollouts.jsonl").read_bytes()
    # Flatter weights at a larger beta: ESS/K grows towards 1 (SFT's uniform weights).
    assert summary["points"][0]["mean_ess_fraction"] < summary["points"][1]["mean_ess_fraction"] <= 1.0
    sft = json.loads((tiny_run[0] / "results.json").read_text())["methods"]["sft"]["multi@5"]
    assert summary["endpoints"]["sft"]["multi@5"] == sft and "rft" in summary["endpoints"]
    assert "stages run: weights, train:drift, eval:drift:secret" in out
    assert (workdir / "beta_spectrum.png").stat().st_size > 0
    from experiments import readme_results
    block = readme_results.render_spectrum(str(workdir))
    assert block.count("\n| 1 | ") == 2 and "| rft | - |" in block and "| sft | - |" in block


def test_the_ledger_records_the_settings_the_protocol_filled_in(tiny_run):
    """stages.json holds the values the stages used (train.shuffle True, eval's token
    budget), not the None the config left for the protocol to fill."""
    stages = json.loads((tiny_run[0] / "stages.json").read_text())
    train = stages["train:drift"]["settings"]
    assert train["train.shuffle"] is True and train["reference.train.shuffle"] is True
    assert train["train.eval_fraction"] == 0.0 and train["data.selection"] == "first"
    assert stages["eval:drift:secret"]["settings"]["eval.max_new_tokens"] == 4  # rollout.max_new_tokens


def test_the_compilation_cache_is_on_for_real_models_and_a_set_one_is_kept():
    cache_dir = run_module().compilation_cache_dir
    assert cache_dir("auto", True, None) == os.path.expanduser("~/.cache/drift-jax/xla")
    assert cache_dir("auto", True, "/set/by/env") == ""  # JAX keeps using the one already set
    assert cache_dir("auto", False, None) == ""  # the embedded toy compiles in seconds
    assert cache_dir("/my/cache", False, None) == "/my/cache"
    assert cache_dir("", True, None) == ""


def test_samplers_get_a_compute_dtype_copy_with_the_master_weights_logits(checkpoint, tmp_path):
    """load_policy(for_sampling=True) stores the weights in model.dtype (bf16), once; its
    logits are exactly those of the float32 master weights cast at every use."""
    import jax
    import jax.numpy as jnp

    cfg = _config(TINY_MATH)
    cfg.model.checkpoint, cfg.model.dtype, cfg.model.param_dtype = str(checkpoint), "bfloat16", "float32"
    exp = run_module().Experiment(cfg, str(tmp_path / "w"))
    master, copy = exp.load_policy("reference"), exp.load_policy("reference", for_sampling=True)
    dtypes = lambda m: {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))}  # noqa: E731
    assert dtypes(master) == {jnp.dtype("float32")} and dtypes(copy) == {jnp.dtype("bfloat16")}
    tokens_bt = jnp.arange(1, 13, dtype=jnp.int32).reshape(2, 6)
    np.testing.assert_array_equal(np.asarray(master(tokens_bt), np.float32), np.asarray(copy(tokens_bt), np.float32))


def test_progress_bars_redraw_once_a_minute_into_a_log_and_transformers_stays_quiet(run_env):
    import subprocess

    # As on a machine without PyTorch (transformers then advises installing it).
    code = ("import os, runpy, sys; sys.modules['torch'] = None; sys.argv = ['run.py', '--helpshort']; "
            f"runpy.run_path({os.path.join(REPO, 'experiments', 'run.py')!r}, run_name='not_main'); "
            "import tqdm.auto, transformers; "
            "print(tqdm.auto.tqdm(total=1, disable=False).mininterval, file=sys.stdout)")
    env = {k: v for k, v in run_env.items() if k not in ("TQDM_MININTERVAL", "TRANSFORMERS_VERBOSITY",
                                                           "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "60.0"  # stderr is a pipe here, as a redirected log is
    assert "PyTorch was not found" not in out.stderr
