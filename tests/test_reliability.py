"""Kill -9 at awkward moments, rerun the same command, get the same result.

Each test runs a tiny workload in a subprocess (this file run as a script), kills it
with SIGKILL from inside at a chosen point (mid-write of a rollout group, after some
groups, before a training step, inside an Orbax checkpoint commit), reruns it, and
compares the outcome with an uninterrupted run: the rollout file byte for byte, the
trained params exactly. Only the killed runs need a process of their own: the
uninterrupted run and the last rerun are the same function called in the test's process,
which compiles the programs the workers then load from the run's compilation cache.
Also: an unknown ``--config.*`` key gets a clear message.

    python tests/test_reliability.py rollout PATH [KILL]   # the workers
    python tests/test_reliability.py train DIR [KILL]
KILL: torn:N (SIGKILL halfway through the N-th write of a group), lines:N (once N
lines are on disk), step:N (before training step N), save:N (while Orbax commits
step N: every file written, the directory not yet renamed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from drift_jax.data.chat import end_of_turn_id
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer
from drift_jax.models import ModelConfig, Transformer
from drift_jax.rollout.episodes import append_rollouts
from drift_jax.rollout.interface import EngineOptions
from drift_jax.rollout.sampling import SamplingParams
from drift_jax.training.checkpoint import Checkpointer, load_params, save_params
from drift_jax.training.loop import train_loop
from drift_jax.training.step import make_train_step
from drift_jax.training.train_state import create_train_state, make_optimizer

from helpers import die, install_kill

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
         "head_dim": 8}


@pytest.fixture(scope="module")
def worker_env(run_env):
    """The workers' environment (tests/conftest.py): the repo importable, and the
    compilation cache this process fills, so the workers load the programs the
    uninterrupted run in this process compiled (same executables, same numbers)."""
    return run_env


def _run_worker(env: dict, *args, expect_killed: bool) -> None:
    out = subprocess.run([sys.executable, HERE, *args], capture_output=True, text=True, timeout=300, env=env)
    if expect_killed:
        assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-2000:])
    else:
        assert out.returncode == 0, out.stderr[-2000:]


# -- rollouts: appended group by group -----------------------------------------------------

K, BATCH, PROMPTS = 4, 8, 5  # chunks of 2 prompts: 2, 2, 1


def rollout_worker(path: str) -> dict:
    tokenizer = build_tokenizer(num_values=10)
    env = SecretGuessEnv(num_values=10, id_length=1, max_turns=3, max_answers=3)
    model = Transformer(ModelConfig(vocab_size=len(tokenizer), **MODEL), rngs=nnx.Rngs(0))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=3, stop_ids=(end_of_turn_id(tokenizer),))
    # One row shape (every slot) for every engine call: one decode program and at most
    # two prefill programs to compile, not those of every row bucket; which rows compute
    # idle plays no part in what is written.
    engine = EngineOptions(row_buckets=1)
    return append_rollouts(path, model, tokenizer, env, env.make_questions(PROMPTS, seed=0, prefix="q"),
                           num_samples=K, sampling=sampling, seed=0, batch_size=BATCH, progress=False,
                           engine=engine)


def _groups_on_disk(data: bytes) -> int:
    return data.count(b"\n") // K


def test_rollouts_killed_twice_then_rerun_equal_an_uninterrupted_run(tmp_path, worker_env):
    straight = str(tmp_path / "straight.jsonl")
    rollout_worker(straight)
    path = str(tmp_path / "rollouts.jsonl")
    # Killed halfway through writing group 2: group 1 whole, then part of group 2.
    _run_worker(worker_env, "rollout", path, "torn:2", expect_killed=True)
    data = Path(path).read_bytes()
    assert not data.endswith(b"\n") and _groups_on_disk(data) == 1
    # Rerun: cut back to group 1, play on from group 2, killed right after group 3 is on
    # disk.
    _run_worker(worker_env, "rollout", path, f"lines:{3 * K}", expect_killed=True)
    data = Path(path).read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 3 * K
    assert rollout_worker(path)["resumed_groups"] == 3
    assert Path(path).read_bytes() == Path(straight).read_bytes()
    # A finished file: a rerun only reads it, and reports the totals of the straight run.
    stats = rollout_worker(path)
    assert stats == {**rollout_worker(straight), "resumed_groups": PROMPTS}
    assert stats["trajectories"] == K * PROMPTS and stats["generated_tokens"] > 0


# -- training: resume from the latest Orbax checkpoint -----------------------------------------

STEPS, SAVE_EVERY = 8, 2


def _batch(step: int) -> dict:
    rng = np.random.default_rng(step)
    b, t = 4, 12
    return {"tokens": rng.integers(0, 32, (b, t)).astype(np.int32), "valid": np.ones((b, t), bool),
            "loss_mask": np.broadcast_to(np.arange(t) >= 5, (b, t)),
            "weights": rng.uniform(0.2, 2.0, b).astype(np.float32)}


def _fresh_state():
    tx, _ = make_optimizer(1e-2, total_steps=STEPS, warmup_steps=2)
    graphdef, state = create_train_state(Transformer(ModelConfig(vocab_size=32, **MODEL), rngs=nnx.Rngs(0)), tx)
    return tx, graphdef, state


def train_worker(workdir: str, kill_at_step: int | None = None) -> None:
    tx, graphdef, state = _fresh_state()

    def batch_fn(step, state):
        if step == kill_at_step:
            die()
        return _batch(step)

    with Checkpointer(os.path.join(workdir, "ckpt"), save_every=SAVE_EVERY, keep=2) as ckpt:
        state = train_loop(state, make_train_step(graphdef, tx), batch_fn, STEPS, checkpointer=ckpt)
    save_params(os.path.join(workdir, "params"), state.params, force=True)


def test_training_killed_mid_run_and_mid_save_resumes_to_the_same_params(tmp_path, worker_env):
    train_worker(str(tmp_path / "straight"))
    work = str(tmp_path / "killed")
    ckpt_dir = os.path.join(work, "ckpt")
    _run_worker(worker_env, "train", work, "step:5", expect_killed=True)  # before update 6: steps 2, 4 saved
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [2, 4]
    # Resumes from 4, killed while committing step 6.
    _run_worker(worker_env, "train", work, "save:6", expect_killed=True)
    leftovers = [name for name in os.listdir(ckpt_dir) if name not in ("2", "4")]
    assert len(leftovers) == 1 and leftovers[0].startswith("6.") and "tmp" in leftovers[0], leftovers
    _, _, like = _fresh_state()
    with Checkpointer(ckpt_dir) as ckpt:  # the half-saved step is invisible and cleared
        assert ckpt.all_steps() == [2, 4]
        restored = ckpt.restore(like)
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
    assert int(restored.step) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))
    train_worker(work)
    resumed = load_params(os.path.join(work, "params"), like.params)
    straight = load_params(tmp_path / "straight" / "params", like.params)
    chex.assert_trees_all_equal(resumed, straight)
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [6, 8]


# -- config keys ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", [[], ["--config", os.path.join(REPO, "experiments", "configs", "tiny.py")]],
                         ids=["default config", "--config given"])
def test_unknown_config_key_gets_a_clear_message(tmp_path, config):
    # Without --config, ml_collections parses the default at import time: the check
    # has to come before that.
    cmd = [sys.executable, os.path.join(REPO, "experiments", "run.py"), *config,
           "--config.train.lerning_rate=1", f"--workdir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "unknown config key 'train.lerning_rate'" in out.stderr
    assert "Did you mean train.learning_rate" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


def test_none_overrides_reach_the_default_config_from_the_command_line(tmp_path):
    """``--config.<key>=None`` without --config: taken out of the command line before the
    flags are defined (the default config is parsed then), and set on the parsed config."""
    cmd = [sys.executable, os.path.join(REPO, "experiments", "run.py"), "--config.train.max_len=None",
           "--config.data.train_split=None", "--dry_run", f"--workdir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[0] == "reference: new" and not (tmp_path / "run").exists()


if __name__ == "__main__":
    role, target, *kill = sys.argv[1:]
    kind, _, n = kill[0].partition(":") if kill else ("", "", "0")
    if kind in ("torn", "lines"):
        install_kill(kind, int(n), os.path.basename(target))
    elif kind == "save":
        install_kill(kind, int(n), "ckpt")
    if role == "rollout":
        rollout_worker(target)
    else:
        train_worker(target, kill_at_step=int(n) if kind == "step" else None)
