"""Properties of drift_jax.training.checkpoint: exact round trips, resume == straight run,
keep-last-k, clear errors, standalone params."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from drift_jax.models import ModelConfig, Transformer
from drift_jax.training.checkpoint import Checkpointer, load_params, save_params
from drift_jax.training.step import make_train_step
from drift_jax.training.train_state import create_train_state, make_optimizer

CFG = ModelConfig(
    vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8,
)
B, T = 4, 10
TX, _ = make_optimizer(1e-3, total_steps=20, warmup_steps=3)


def batch_for(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    valid = np.ones((B, T), bool)
    loss_mask = np.arange(T)[None, :] >= 4
    weights = rng.uniform(0.1, 1.0, B).astype(np.float32)
    return {"tokens": tokens, "valid": valid, "loss_mask": np.broadcast_to(loss_mask, (B, T)), "weights": weights}


def fresh(seed: int = 0):
    return create_train_state(Transformer(CFG, rngs=nnx.Rngs(seed)), TX, seed)


@pytest.fixture(scope="module")
def step_fn():
    graphdef, _ = fresh()
    return make_train_step(graphdef, TX)


def run(step_fn, state, start, stop):
    for step in range(start, stop):
        state, _ = step_fn(state, batch_for(step))
    return state


def test_round_trip_restores_the_same_pytree(tmp_path, step_fn):
    _, state = fresh()
    state = run(step_fn, state, 0, 2)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.save(2, state)
        # An abstract target (shapes only) avoids allocating a throwaway state.
        like = jax.eval_shape(lambda: fresh(seed=7)[1])
        restored = ckpt.restore(like)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert restored.step.dtype == np.int32 and int(restored.step) == 2
    assert jax.random.key_data(restored.rng).tolist() == jax.random.key_data(state.rng).tolist()
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)


def test_restore_into_fresh_state_then_continue_equals_straight_run(tmp_path, step_fn):
    _, state = fresh()
    state = run(step_fn, state, 0, 10)
    with Checkpointer(tmp_path, save_every=10) as ckpt:
        assert ckpt.save(10, state)
    with Checkpointer(tmp_path, save_every=10) as ckpt:  # a new process, a new manager
        _, like = fresh(seed=3)
        resumed = run(step_fn, ckpt.restore(like), 10, 20)
    _, state = fresh()
    straight = run(step_fn, state, 0, 20)
    assert int(resumed.step) == int(straight.step) == 20
    chex.assert_trees_all_close(resumed.params, straight.params, rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_close(resumed.opt_state, straight.opt_state, rtol=1e-6, atol=1e-8)


def test_keeps_last_k_and_saves_only_when_due(tmp_path):
    _, state = fresh()
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        saved = [ckpt.save(step, state) for step in range(1, 9)]
        assert saved == [False, True] * 4
        assert ckpt.all_steps() == [6, 8]
        assert ckpt.save(9, state, force=True)
        assert not ckpt.save(9, state, force=True)  # already on disk: not rewritten
        assert ckpt.all_steps() == [8, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["8", "9"]  # no temp dirs left


def test_restore_without_checkpoint_raises_clearly(tmp_path):
    _, like = fresh()
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(like)
        ckpt.save(1000, like)
        with pytest.raises(FileNotFoundError, match="step 5 .*have \\[1000\\]"):
            ckpt.restore(like, step=5)


@pytest.mark.parametrize("change", [{"hidden_size": 64}, {"num_layers": 3}])
def test_restore_into_a_different_model_fails_clearly(tmp_path, change):
    _, state = fresh()
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state)
        cfg = CFG.replace(**change)
        like = jax.eval_shape(lambda: create_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), TX)[1])
        with pytest.raises(ValueError, match=f"checkpoint {tmp_path}/1 does not match"):
            ckpt.restore(like)


def test_save_and_load_params(tmp_path, step_fn):
    _, state = fresh()
    state = run(step_fn, state, 0, 1)
    save_params(tmp_path / "ref", state.params)
    with pytest.raises(ValueError, match="exists"):
        save_params(tmp_path / "ref", state.params)  # no silent overwrite
    save_params(tmp_path / "ref", state.params, force=True)
    _, like = fresh(seed=5)
    loaded = load_params(tmp_path / "ref", like.params)
    assert jax.tree.structure(loaded) == jax.tree.structure(state.params)
    chex.assert_trees_all_equal(loaded, state.params)
    with pytest.raises(FileNotFoundError, match="save_params"):
        load_params(tmp_path / "missing", like.params)
