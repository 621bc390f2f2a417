"""Properties of the trainer (``training.train_state``, ``step`` and ``loop``): it learns,
K micro-batches == 1 batch, one step is one optimizer update of the loss's gradient, the
default SFT loss is ``sft_loss_fn``, a custom loss's aux and stats go through, it compiles
once, the schedule and weight-decay mask are right, and the loop resumes (logging each
step once), logs and stops on NaN."""

from __future__ import annotations

import functools
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from drift_jax.models import ModelConfig, Transformer
from drift_jax.training import objective
from drift_jax.training.checkpoint import Checkpointer
from drift_jax.training.loop import train_loop
from drift_jax.training.losses import mean_loss, weighted_sft_loss
from drift_jax.training.step import make_eval_fn, make_train_step
from drift_jax.training.train_state import create_train_state, make_optimizer

CFG = ModelConfig(
    vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8,
)
B, T = 8, 12


def make_batch(seed: int = 0, batch: int = B) -> dict[str, np.ndarray]:
    """Prompt + answer rows with ragged left padding, unequal weights and two all-padding
    rows at the end (a partial final batch; with 4 micro-batches, one is all padding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (batch, T)).astype(np.int32)
    pad = rng.integers(0, 4, batch)  # left padding per row
    prompt = rng.integers(2, 5, batch)  # prompt length after padding
    pos = np.arange(T)[None, :]
    valid = pos >= pad[:, None]
    loss_mask = valid & (pos >= (pad + prompt)[:, None])
    valid[-2:], loss_mask[-2:] = False, False
    tokens = np.where(valid, tokens, 0).astype(np.int32)
    weights = rng.uniform(0.05, 2.0, batch).astype(np.float32)
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask, "weights": weights}


def fresh_state(tx, seed: int = 0):
    return create_train_state(Transformer(CFG, rngs=nnx.Rngs(seed)), tx, seed)


# XLA compiles (seconds each on CPU) dominate test time, so most tests share one step.
LR, WD, WARMUP = 1e-2, 0.1, 2
TX, SCHEDULE = make_optimizer(LR, total_steps=100, warmup_steps=WARMUP, weight_decay=WD)


@functools.cache
def shared_step_fn():
    graphdef, _ = fresh_state(TX)
    return make_train_step(graphdef, TX, schedule_fn=SCHEDULE)


def run_steps(step_fn, state, batches, aux=None):
    for batch in batches:
        state, metrics = step_fn(state, batch) if aux is None else step_fn(state, batch, aux)
    return state, metrics


def assert_close_on_tensor_scale(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max(initial=0.0) <= rtol * np.abs(want).max(initial=0.0)


def batch_fn(step, state):
    """``train_loop``'s batch function: the data depends on the step only."""
    del state
    return make_batch(step)


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_overfits_a_tiny_fixed_dataset():
    _, state = fresh_state(TX)
    step_fn, batch = shared_step_fn(), make_batch(1)
    losses, grad_norms = [], []
    for _ in range(60):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    assert losses[-1] <= 0.1 * losses[0], losses[::10]
    assert int(state.step) == 60
    assert max(grad_norms) > 1.0  # reported before clipping (the clip is at 1.0)


@pytest.mark.parametrize("loss_denominator", ["batch", "weight_sum"])
def test_four_micro_batches_equal_one_batch(loss_denominator):
    batches = [make_batch(2), make_batch(3)]  # ragged padding, unequal weights, a pad row
    results = []
    for m in (1, 4):
        graphdef, state = fresh_state(TX)
        if (m, loss_denominator) == (1, "batch"):
            step_fn = shared_step_fn()
        else:
            step_fn = make_train_step(graphdef, TX, num_micro_batches=m, loss_denominator=loss_denominator)
        results.append(run_steps(step_fn, state, batches))
    (one, m_one), (four, m_four) = results
    # Adam divides each gradient by its own RMS, so a coordinate whose gradient is ~0
    # turns float rounding into a step of up to ~lr: hence atol = 1e-4 * lr.
    chex.assert_trees_all_close(four.params, one.params, rtol=1e-5, atol=1e-4 * LR)
    chex.assert_trees_all_close(four.opt_state, one.opt_state, rtol=1e-5, atol=1e-8)
    for key in ("loss", "grad_norm", "num_tokens", "num_weighted_tokens", "denominator", "ess_fraction"):
        np.testing.assert_allclose(m_four[key], m_one[key], rtol=1e-5, err_msg=key)


def test_metrics_count_supervised_tokens_and_weights():
    _, state = fresh_state(TX)
    batch = make_batch(4)
    state, _ = shared_step_fn()(state, batch)
    _, metrics = shared_step_fn()(state, batch)
    valid, mask = batch["valid"], batch["loss_mask"]
    target_mask = mask[:, 1:] & valid[:, 1:] & valid[:, :-1]
    np.testing.assert_allclose(metrics["num_tokens"], target_mask.sum())
    np.testing.assert_allclose(
        metrics["num_weighted_tokens"], (batch["weights"] * target_mask.sum(1)).sum(), rtol=1e-6
    )
    np.testing.assert_allclose(metrics["num_input_tokens"], valid.sum())
    # The supervised tokens' effective sample size under their rows' weights, over their count.
    token_weights = np.repeat(batch["weights"], target_mask.sum(1))
    np.testing.assert_allclose(metrics["ess_fraction"],
                               token_weights.sum() ** 2 / (token_weights**2).sum() / token_weights.size, rtol=1e-6)
    np.testing.assert_allclose(metrics["denominator"], (target_mask.sum(1) > 0).sum())
    np.testing.assert_allclose(metrics["lr"], LR / WARMUP, rtol=1e-6)  # update 1 of the warm-up
    assert metrics["grad_norm"] > 0


def test_step_compiles_once_for_fixed_shapes():
    graphdef, state = fresh_state(TX)
    step_fn = make_train_step(graphdef, TX, num_micro_batches=2)
    state, _ = run_steps(step_fn, state, [make_batch(s) for s in range(5)])
    assert step_fn._cache_size() == 1
    assert int(state.step) == 5


def test_step_is_one_optimizer_update_of_the_mean_loss_gradient():
    """The step against its definition: AdamW (after clipping) applied to jax.grad of the
    weighted SFT loss's mean, written out here from the model's logits."""
    graphdef, state = fresh_state(TX)
    state, _ = shared_step_fn()(state, make_batch(1))  # off update 0, whose lr is 0
    batch = make_batch(2)
    tokens, valid = batch["tokens"], batch["valid"]
    mask = batch["loss_mask"][:, 1:] & valid[:, 1:] & valid[:, :-1]

    def mean_sft(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1], valid[:, :-1])
        return mean_loss(*weighted_sft_loss(logits, tokens[:, 1:], mask, batch["weights"], "batch"))

    loss, grads = jax.jit(jax.value_and_grad(mean_sft))(state.params)  # jit: op by op is slow
    updates, opt_state = jax.jit(TX.update)(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new, metrics = shared_step_fn()(state, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    # Gradients summed in another order differ by rounding relative to each tensor's
    # scale, not to each (possibly ~0) element: compare Adam's moments on that scale.
    jax.tree.map(assert_close_on_tensor_scale, new.opt_state, opt_state)
    chex.assert_trees_all_close(new.params, params, rtol=1e-5, atol=1e-4 * LR)  # see above
    assert int(new.step) == 2


def test_default_loss_is_sft_loss_fn():
    """``make_train_step``'s default and an explicit ``loss_fn=sft_loss_fn(...)`` are the
    same program: bit-identical states and metrics."""
    batches = [make_batch(7), make_batch(8)]
    graphdef, state = fresh_state(TX)
    explicit = make_train_step(graphdef, TX, schedule_fn=SCHEDULE,
                               loss_fn=objective.sft_loss_fn("batch", "auto"))
    got = run_steps(explicit, state, batches)
    _, state = fresh_state(TX)
    want = run_steps(shared_step_fn(), state, batches)
    chex.assert_trees_all_equal(got, want)


def test_custom_loss_gets_aux_and_its_stats_are_summed_over_micro_batches():
    """``aux`` is a jit argument (new values, no new compile) handed to the loss; the
    loss's stats are summed over micro-batches into the metrics."""
    sft = objective.sft_loss_fn()

    def scaled_sft(graphdef, params, mb, aux):
        loss_sum, denom, stats = sft(graphdef, params, mb, None)
        rows = jnp.sum(jnp.any(mb["valid"], axis=1)).astype(jnp.float32)
        return aux["scale"] * loss_sum, denom, {**stats, "rows": rows}

    graphdef, state = fresh_state(TX)
    step_fn = make_train_step(graphdef, TX, num_micro_batches=4, loss_fn=scaled_sft)
    batch = make_batch(4)
    metrics = {}
    for scale in (1.0, 2.0):
        _, metrics[scale] = step_fn(jax.tree.map(jnp.copy, state), batch, {"scale": np.float32(scale)})
    assert step_fn._cache_size() == 1
    assert float(metrics[1.0]["rows"]) == B - 2  # the two all-padding rows have no token
    np.testing.assert_allclose(metrics[2.0]["loss"], 2 * metrics[1.0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics[2.0]["grad_norm"], 2 * metrics[1.0]["grad_norm"], rtol=1e-5)
    _, default = shared_step_fn()(state, batch)
    for key in ("loss", "grad_norm", "num_tokens", "num_weighted_tokens", "num_input_tokens", "denominator"):
        np.testing.assert_allclose(metrics[1.0][key], default[key], rtol=1e-5, err_msg=key)


def test_micro_batches_must_divide_batch():
    graphdef, state = fresh_state(TX)
    with pytest.raises(ValueError, match="not divisible"):
        make_train_step(graphdef, TX, num_micro_batches=3)(state, make_batch(0))


def test_schedule_warmup_then_constant_or_cosine():
    _, constant = make_optimizer(2.0, total_steps=100, warmup_ratio=0.1)
    lrs = np.array([constant(s) for s in range(100)])
    np.testing.assert_allclose(lrs[:11], 2.0 * np.arange(11) / 10, rtol=1e-6)  # linear ramp
    np.testing.assert_allclose(lrs[10:], 2.0)
    _, cosine = make_optimizer(2.0, total_steps=100, warmup_steps=10, schedule="cosine")
    lrs = np.array([cosine(s) for s in range(101)])
    np.testing.assert_allclose(lrs[:11], 2.0 * np.arange(11) / 10, rtol=1e-6)
    assert np.all(np.diff(lrs[10:]) < 0)
    np.testing.assert_allclose([lrs[55], lrs[100]], [1.0, 0.0], atol=1e-6)
    _, no_warmup = make_optimizer(2.0, total_steps=100, warmup_steps=0)
    assert float(no_warmup(0)) == 2.0


def test_weight_decay_skips_one_dimensional_params():
    _, state = fresh_state(TX)
    before = jax.tree.map(np.asarray, state.params)
    batch = dict(make_batch(0), loss_mask=np.zeros((B, T), bool))  # zero loss -> zero grads
    state, _ = run_steps(shared_step_fn(), state, [batch, batch])
    # Zero gradients make AdamW's step pure decay, p <- p * (1 - lr * wd), for 2-D params
    # only; update 0 has lr 0 (warm-up), update 1 has lr = LR / WARMUP.
    shrink = 1 - LR / WARMUP * WD
    expected = jax.tree.map(lambda p: p * shrink if p.ndim > 1 else p, before)
    chex.assert_trees_all_close(state.params, expected, rtol=1e-6)


def _loop_setup(tmp_path=None, save_every=3):
    _, state = fresh_state(TX)
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=save_every) if tmp_path else None
    return TX, state, shared_step_fn(), ckpt


def test_train_loop_resumes_from_latest_checkpoint(tmp_path):
    tx, state, step_fn, ckpt = _loop_setup(tmp_path)
    train_loop(state, step_fn, batch_fn, 6, checkpointer=ckpt, progress=False)
    assert ckpt.all_steps() == [3, 6]
    compiled = step_fn._cache_size()
    # A "restarted job": everything rebuilt from scratch; the loop picks up step 6.
    _, state = fresh_state(tx, seed=1)
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=3)
    resumed = train_loop(state, step_fn, batch_fn, 10, checkpointer=ckpt, progress=False)
    _, state = fresh_state(tx)
    straight = train_loop(state, step_fn, batch_fn, 10, progress=False)
    assert int(resumed.step) == int(straight.step) == 10
    chex.assert_trees_all_equal(resumed.params, straight.params)  # same program, same data
    chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)
    assert ckpt.latest_step() == 10  # the end-of-run save
    ckpt.close()
    assert step_fn._cache_size() == compiled  # a restored state runs the fresh state's program


def test_resumed_run_logs_each_step_once(tmp_path):
    """Killed after update 5 was logged but before it was saved: the rerun restores update
    3, drops the log lines of 4 and 5 and redoes them with the same numbers. A fresh run
    into the same file starts it over. Each step is in metrics.jsonl exactly once."""
    path = tmp_path / "metrics.jsonl"

    def run(num_steps, seed=0, ckpt_dir=tmp_path / "ckpt"):
        _, state = fresh_state(TX, seed)
        ckpt = Checkpointer(ckpt_dir, save_every=3) if ckpt_dir else None
        state = train_loop(state, shared_step_fn(), batch_fn, num_steps, checkpointer=ckpt,
                           metrics_path=str(path), progress=False)
        if ckpt:
            ckpt.close()
        return state

    run(5)  # checkpoints 3 and 5 (the end-of-run save), lines 1..5
    first = read_metrics(path)
    shutil.rmtree(tmp_path / "ckpt" / "5")
    resumed = run(8, seed=1)
    lines = read_metrics(path)
    assert [r["step"] for r in lines] == list(range(1, 9))
    for old, new in zip(first, lines[:5]):  # kept (1..3) and redone (4, 5): the same updates
        assert (old["loss"], old["grad_norm"]) == (new["loss"], new["grad_norm"]), old["step"]
    assert lines[:3] == first[:3]  # kept as they were

    straight = run(8, ckpt_dir=None)
    again = read_metrics(path)
    assert [r["step"] for r in again] == list(range(1, 9))
    assert [(r["loss"], r["grad_norm"]) for r in again] == [(r["loss"], r["grad_norm"]) for r in lines]
    chex.assert_trees_all_equal(resumed.params, straight.params)


def test_nan_loss_raises_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    tx, state, step_fn, ckpt = _loop_setup(tmp_path, save_every=2)

    def nan_batch_fn(step, state):
        batch = make_batch(step)
        if step == 4:  # the 5th update
            batch["weights"] = np.full_like(batch["weights"], np.nan)
        return batch

    with pytest.raises(FloatingPointError, match="at step 5 .*last checkpoint: step 4"):
        train_loop(state, step_fn, nan_batch_fn, 10, checkpointer=ckpt, progress=False)
    assert ckpt.all_steps() == [2, 4]  # the bad step 5 was not saved
    _, like = fresh_state(tx)
    restored = ckpt.restore(like)
    assert int(restored.step) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))
    ckpt.close()


def test_metrics_jsonl_has_expected_keys_and_the_batch_info(tmp_path):
    _, state, step_fn, _ = _loop_setup()
    path = tmp_path / "metrics.jsonl"

    def batch_with_info(step, state):
        return make_batch(step), {"data_step": step, "state_step": int(state.step)}

    train_loop(state, step_fn, batch_with_info, 5, metrics_path=str(path), log_every=2, progress=False)
    records = read_metrics(path)
    assert [r["step"] for r in records] == [2, 4, 5]  # every 2nd step and the last
    for r in records:
        assert {"step", "loss", "grad_norm", "lr", "tokens_per_s", "wall_time", "num_tokens",
                "num_weighted_tokens", "ess_fraction", "num_input_tokens", "denominator", "batch_s",
                "step_time_s"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert r["batch_s"] >= 0 and r["step_time_s"] > 0
        np.testing.assert_allclose(r["tokens_per_s"], r["num_input_tokens"] / r["step_time_s"], rtol=1e-9)
        # The info of the step's own batch, made from the state before the update.
        assert r["data_step"] == r["state_step"] == r["step"] - 1
        assert r["num_input_tokens"] == make_batch(r["step"] - 1)["valid"].sum()
    assert records[0]["lr"] == pytest.approx(LR / WARMUP)  # update index 1 of the warm-up


def test_create_train_state_rejects_non_param_state():
    class WithStats(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((2, 2)))
            self.stats = nnx.BatchStat(jnp.zeros(2))

    with pytest.raises(ValueError, match="only state is nnx.Param"):
        create_train_state(WithStats(), TX)


def test_shard_model_is_shard_train_state_and_keeps_no_first_copy():
    """``shard_model`` gives the state ``shard_train_state`` gives (values and
    shardings), and of the model's arrays none survives unless the state holds its
    buffer (one device here: a sharded mesh frees them, see the module's docstring)."""
    from drift_jax.parallel.sharding import make_mesh
    from drift_jax.training.sharded_state import shard_model, shard_train_state

    mesh = make_mesh()
    want = shard_train_state(fresh_state(TX)[1], TX, mesh)
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    first = jax.tree.leaves(nnx.state(model, nnx.Param))
    _, got = shard_model(model, TX, mesh, seed=0)
    chex.assert_trees_all_equal(jax.device_get(got), jax.device_get(want))
    assert [x.sharding for x in jax.tree.leaves(got)] == [x.sharding for x in jax.tree.leaves(want)]
    held = {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(got) for s in x.addressable_shards}
    assert all(x.is_deleted() or x.addressable_shards[0].data.unsafe_buffer_pointer() in held for x in first)


@pytest.mark.parametrize("loss_chunk_size, remat", [(0, "none"), (4, "dots")])
def test_bf16_compute_keeps_float32_params_and_optimizer_state(loss_chunk_size, remat):
    """Mixed precision is a model-config switch: bf16 matmuls, float32 master weights;
    also with the chunked LM-head loss (its head gradient accumulates in float32) and
    remat."""
    cfg = CFG.replace(dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat)
    graphdef, state = create_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), TX, 0)
    step_fn = make_train_step(graphdef, TX, schedule_fn=SCHEDULE, loss_chunk_size=loss_chunk_size)
    batch = make_batch(1)
    losses = []
    for _ in range(20):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    dtypes = {x.dtype for x in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses[::5]


def test_even_model_input_changes_no_loss_or_gradient():
    """The loss runs the model on ``model_input_length(T)`` positions, an even count
    (cuDNN's fused attention takes no odd length in training): at even T the whole row,
    whose loss and gradients are those of the plain ``tokens[:, :-1]`` input; one more
    column of padding (odd T, the plain input's length), with the LM head chunked,
    changes neither."""
    assert [objective.model_input_length(n) for n in (2, 3, 12, 13, 1024, 1025)] == [2, 2, 12, 12, 1024, 1024]
    model = Transformer(CFG.replace(num_layers=1, attention_impl="xla"), rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = make_batch(3)  # T = 12
    padded = {k: (np.pad(v, ((0, 0), (0, 1))) if v.ndim == 2 else v) for k, v in batch.items()}

    @jax.jit
    def plain_rule(params, batch):
        tokens, valid = batch["tokens"], batch["valid"]
        logits = nnx.merge(graphdef, params)(tokens[:, :-1], valid[:, :-1])
        return mean_loss(*weighted_sft_loss(logits, tokens[:, 1:], objective.target_mask(batch), batch["weights"]))

    @functools.partial(jax.jit, static_argnums=2)
    def even_rule(params, batch, chunk):
        return mean_loss(*objective.sft_loss_fn("batch", chunk)(graphdef, params, batch, None)[:2])

    want, want_grads = jax.value_and_grad(plain_rule)(params, batch)
    for got_batch, chunk in ((batch, 0), (padded, 4)):
        got, grads = jax.value_and_grad(even_rule)(params, got_batch, chunk)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6)  # float32 rounding of sums


def test_chunked_lm_head_loss_gives_the_same_updates():
    """``loss_chunk_size`` (the LM head + loss over sequence chunks) is a memory switch:
    the same metrics and parameters as full logits, with T - 1 = 11 not a multiple of 4."""
    batches = [make_batch(5), make_batch(6)]
    results = []
    for chunk in (0, 4):
        graphdef, state = fresh_state(TX)
        step_fn = shared_step_fn() if chunk == 0 else make_train_step(graphdef, TX, schedule_fn=SCHEDULE,
                                                                      loss_chunk_size=chunk)
        results.append(run_steps(step_fn, state, batches))
    (full, m_full), (chunked, m_chunked) = results
    chex.assert_trees_all_close(chunked.params, full.params, rtol=1e-5, atol=1e-4 * LR)  # see above
    for key in ("loss", "grad_norm", "num_tokens", "denominator"):
        np.testing.assert_allclose(m_chunked[key], m_full[key], rtol=1e-5, err_msg=key)


def test_loss_chunk_size_auto_chunks_only_large_vocabularies():
    assert objective.resolve_loss_chunk_size("auto", 151_936) == objective.AUTO_CHUNK_SIZE
    assert objective.resolve_loss_chunk_size("auto", CFG.vocab_size) == 0
    assert objective.resolve_loss_chunk_size(None, 151_936) == 0
    assert objective.resolve_loss_chunk_size(64, 10) == 64
    graphdef, _ = fresh_state(TX)
    with pytest.raises(ValueError, match="loss_chunk_size"):
        make_train_step(graphdef, TX, loss_chunk_size=-1)


def test_eval_fn_sums_over_batches_like_one_batch_and_equals_the_steps_loss():
    """A held-out loss over several padded batches, or one batch in micro-batches, is the
    one-batch loss (sums and denominators added before the division), and it is the loss
    the train step reports for that batch before its update."""
    _, state = fresh_state(TX)
    graphdef, _ = fresh_state(TX)
    batch = make_batch(7)  # 8 rows, the last 2 all padding
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    whole = make_eval_fn(graphdef, [batch])(state)
    split = make_eval_fn(graphdef, halves)(state)
    micro = make_eval_fn(graphdef, [batch], num_micro_batches=4)(state)  # the last micro-batch all padding
    for got in (split, micro):
        np.testing.assert_allclose(got["loss"], whole["loss"], rtol=1e-6)
        assert got["num_tokens"] == whole["num_tokens"] == objective.target_mask(batch).sum()
    with pytest.raises(ValueError, match="not divisible"):
        make_eval_fn(graphdef, [batch], num_micro_batches=3)
    _, metrics = shared_step_fn()(jax.tree.map(jnp.copy, state), batch)
    np.testing.assert_allclose(whole["loss"], float(metrics["loss"]), rtol=1e-5)


def test_train_loop_logs_the_held_out_loss_every_eval_every_and_at_the_end(tmp_path):
    _, state, step_fn, _ = _loop_setup()
    graphdef, _ = fresh_state(TX)
    eval_fn = make_eval_fn(graphdef, [make_batch(99)])
    path = tmp_path / "metrics.jsonl"
    final = train_loop(state, step_fn, batch_fn, 5, metrics_path=str(path), progress=False,
                       eval_fn=eval_fn, eval_every=2)
    records = read_metrics(path)
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 5]
    assert records[-1]["eval_loss"] == pytest.approx(eval_fn(final)["loss"])
    assert records[1]["eval_loss"] != records[-1]["eval_loss"]  # measured on the state of its step


def _tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every event file under ``logdir`` (TFRecord framing:
    length, its CRC, the Event proto, its CRC), later files overriding earlier ones."""
    import os
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict = {}
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_train_loop_writes_every_logged_metric_to_tensorboard(tmp_path):
    _, state, step_fn, _ = _loop_setup()
    path, board = tmp_path / "metrics.jsonl", tmp_path / "tb"
    train_loop(state, step_fn, batch_fn, 4, metrics_path=str(path), progress=False, tensorboard_dir=str(board))
    scalars = _tensorboard_scalars(board)
    for record in read_metrics(path):
        for key in ("loss", "grad_norm", "lr", "tokens_per_s"):
            assert scalars[key][record["step"]] == pytest.approx(record[key], rel=1e-6)  # float32 in the event
