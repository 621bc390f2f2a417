"""LoRA adapters (drift_jax.models.lora): logits parity with HF peft in both directions of
the PEFT files, merged export == adapter forward, a fresh adapter changes nothing, dropout
as torch's and only with a key; training moves the adapters alone (base bit for bit,
optimizer state over adapters only), micro-batches, remat + chunked loss and the
policy-gradient loss still work, and a resumed run ends with the uninterrupted run's
adapters.

torch and peft are test-only dependencies (requirements-test.txt): without them the
parity tests skip and the rest still runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors import safe_open

from drift_jax.models import (
    LoRAConfig,
    ModelConfig,
    Transformer,
    apply_lora,
    from_pretrained,
    has_lora,
    load_adapter,
    lora,
    merge_lora,
    save_pretrained,
)
from drift_jax.parallel import sharding
from drift_jax.training import policy_gradient
from drift_jax.training.checkpoint import Checkpointer
from drift_jax.training.loop import checkpoint_view, train_loop
from drift_jax.training.step import make_train_step
from drift_jax.training.train_state import (
    abstract_train_state,
    create_train_state,
    make_optimizer,
    split_trainable,
    state_summary,
)

TOL = 1e-4
ALL = tuple(lora.TARGETS)


def _torch_peft():
    return pytest.importorskip("torch"), pytest.importorskip("peft")


def randomize_adapters(model: Transformer, seed: int, std: float = 0.1) -> Transformer:
    """Random A and B (B != 0, so the adapters change the logits), in place."""
    state = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: std * jax.random.normal(next(keys), x.shape, x.dtype), state))
    return model


@nnx.jit
def _forward(model, tokens_bt):
    return model(tokens_bt)


def _logits(model, tokens):
    return np.asarray(_forward(model, jnp.asarray(tokens)), np.float32)


# -- parity with peft on a tiny random HF Qwen2 (GQA, q/k/v bias, tied head) -----------

HF_VOCAB, SEQ = 128, 24


def _tokens():
    return np.random.default_rng(0).integers(0, HF_VOCAB, (2, SEQ))


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """(folder of a tiny random HF Qwen2 checkpoint, a loader of it as a torch model)."""
    torch, _ = _torch_peft()
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # away from HF's init, so every tensor influences the logits
        for name, p in model.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    return path, load


def _torch_logits(model, tokens):
    torch, _ = _torch_peft()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("rank, alpha, targets, rslora", [(8, 16, lora.DEFAULT_TARGETS, False),
                                                          (4, 6, ALL, True)])
def test_peft_saved_adapter_loads_with_peft_logits(hf_base, tmp_path, rank, alpha, targets, rslora):
    torch, peft = _torch_peft()
    path, load = hf_base
    base_logits = _torch_logits(load(), _tokens())
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.1, target_modules=list(targets),
                             use_rslora=rslora, task_type="CAUSAL_LM")
    model = peft.get_peft_model(load(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    want = _torch_logits(model.eval(), _tokens())
    assert np.abs(want - base_logits).max() > 100 * TOL  # the adapter matters
    model.save_pretrained(tmp_path)

    ours = from_pretrained(path, dtype=jnp.float32, lora_adapter=tmp_path)
    np.testing.assert_allclose(_logits(ours, _tokens()), want, atol=TOL, rtol=0)
    assert lora.lora_config(ours) == LoRAConfig(rank=rank, alpha=alpha, dropout=0.1, targets=targets,
                                                use_rslora=rslora)


def test_our_adapter_loads_in_peft_under_peft_names(hf_base, tmp_path):
    torch, peft = _torch_peft()
    path, load = hf_base
    ours = randomize_adapters(apply_lora(from_pretrained(path, dtype=jnp.float32),
                                         LoRAConfig(rank=4, alpha=8, dropout=0.05), nnx.Rngs(0)), seed=2)
    want = _logits(ours, _tokens())
    assert np.abs(want - _torch_logits(load(), _tokens())).max() > 100 * TOL
    save_pretrained(ours, tmp_path, lora="adapter", base_model_name_or_path=str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    # The tensor names and shapes peft itself writes for this config.
    reference = peft.get_peft_model(load(), peft.LoraConfig(r=4, lora_alpha=8,
                                                            target_modules=list(lora.DEFAULT_TARGETS)))
    peft_shapes = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
    with safe_open(tmp_path / "adapter_model.safetensors", framework="numpy") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == peft_shapes

    loaded = peft.PeftModel.from_pretrained(load(), tmp_path).eval()
    cfg = loaded.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, set(cfg.target_modules)) == (4, 8, 0.05, set(lora.DEFAULT_TARGETS))
    assert cfg.base_model_name_or_path == str(path)
    np.testing.assert_allclose(_torch_logits(loaded, _tokens()), want, atol=TOL, rtol=0)


def test_merged_export_equals_adapter_forward(hf_base, tmp_path):
    torch, _ = _torch_peft()
    import transformers

    path, _ = hf_base
    ours = randomize_adapters(apply_lora(from_pretrained(path, dtype=jnp.float32),
                                         LoRAConfig(rank=4, alpha=8, targets=ALL), nnx.Rngs(0)), seed=3)
    want = _logits(ours, _tokens())
    save_pretrained(ours, tmp_path / "merged", hf_config_extra={"eos_token_id": 3}, lora="merged")
    assert has_lora(ours)  # merging for export leaves the model as it was
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert hf.config.eos_token_id == 3
    np.testing.assert_allclose(_torch_logits(hf, _tokens()), want, atol=TOL, rtol=0)
    reloaded = from_pretrained(tmp_path / "merged", dtype=jnp.float32)
    assert not has_lora(reloaded)
    np.testing.assert_allclose(_logits(reloaded, _tokens()), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(_logits(merge_lora(ours), _tokens()), want, atol=TOL, rtol=0)

    # No `lora=` on a model with adapters: the same merged checkpoint.
    save_pretrained(ours, tmp_path / "default")
    with safe_open(tmp_path / "merged" / "model.safetensors", "numpy") as a, \
            safe_open(tmp_path / "default" / "model.safetensors", "numpy") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)


def test_bad_adapter_is_refused_and_leaves_the_model_as_it_was(hf_base, tmp_path):
    path, _ = hf_base
    ours = apply_lora(from_pretrained(path, dtype=jnp.float32), LoRAConfig(rank=2), nnx.Rngs(0))
    save_pretrained(ours, tmp_path / "good", lora="adapter")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(ours, tmp_path / "good")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    for change, message in [({"use_dora": True}, "use_dora"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"bias": "all"}, "bias"), ({"rank_pattern": {"q_proj": 8}}, "rank_pattern")]:
        bad = tmp_path / next(iter(change))
        shutil.copytree(tmp_path / "good", bad)
        (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
        base = from_pretrained(path, dtype=jnp.float32)
        with pytest.raises(ValueError, match=message):
            load_adapter(base, bad)
        assert not has_lora(base)
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))  # the tensors have r = 2
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight .* has shape \(2, 64\); the model needs \(3, 64\)"):
        load_adapter(base, bad)
    assert not has_lora(base)
    with pytest.raises(ValueError, match="no config.json"):
        save_pretrained(ours, tmp_path / "x", hf_config_extra={"eos_token_id": 1}, lora="adapter")


# -- the adapter itself ------------------------------------------------------------------

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def test_fresh_adapter_leaves_logits_unchanged():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 10))
    before = _logits(model, tokens)
    apply_lora(model, LoRAConfig(rank=4, targets=ALL), nnx.Rngs(1))
    np.testing.assert_array_equal(_logits(model, tokens), before)
    trained = nnx.state(model, nnx.LoRAParam)
    assert len(jax.tree.leaves(trained)) == 2 * len(ALL) * CFG.num_layers
    for i, name, linear in lora._adapted(model):
        a, b = linear.lora.lora_a[...], linear.lora.lora_b[...]
        assert not b.any(), (i, name)
        bound = linear.kernel.shape[0] ** -0.5  # PEFT's kaiming-uniform bound, 1/sqrt(fan_in)
        assert 0.5 * bound < float(jnp.abs(a).max()) <= bound, (i, name)


def test_cached_decode_runs_the_adapters():
    """The sampler's path (prefill into a KV cache) applies the adapters like the full
    forward, so an unmerged LoRA policy samples what it trains."""
    from drift_jax.models.transformer import KVCache, default_positions

    model = randomize_adapters(apply_lora(Transformer(CFG, rngs=nnx.Rngs(0)),
                                          LoRAConfig(rank=4, targets="q_proj,v_proj,up_proj"), nnx.Rngs(1)), seed=4)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 6)))
    positions = default_positions(jnp.ones((2, 6), bool))
    decoded, _ = nnx.jit(lambda m, t: m.decode(t, KVCache.zeros(CFG, 2, 8), 0, positions))(model, tokens)
    want = _logits(model, tokens)
    # Merged weights agree too: the forward did use the (non-zero) adapters.
    np.testing.assert_allclose(_logits(merge_lora(model), tokens), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(decoded), want, atol=1e-5, rtol=0)


def test_dropout_is_torchs_and_needs_a_key():
    """With A = B = I and scale 1 the adapter returns dropout(x): entries zeroed at the
    rate, the rest scaled by 1 / (1 - rate); no key, no dropout; masks differ by key and
    by adapter index."""
    rate, d = 0.25, 64
    kernel = nnx.Param(jnp.zeros((d, d)), out_sharding=("embed", "heads"), eager_sharding=False)
    adapter = lora.Adapter(kernel, LoRAConfig(rank=d, alpha=d, dropout=rate), 0, jnp.float32, nnx.Rngs(0))
    adapter.lora_a[...] = jnp.eye(d)
    adapter.lora_b[...] = jnp.eye(d)
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (256, d)), jnp.float32)
    np.testing.assert_allclose(adapter(x), x, rtol=1e-6)
    y = np.asarray(adapter(x, jax.random.key(0)))
    kept = y != 0
    assert abs(1 - kept.mean() - rate) < 0.01
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(adapter(x, jax.random.key(0)), y)
    assert (np.asarray(adapter(x, jax.random.key(1))) != y).any()
    adapter.index = 1
    assert (np.asarray(adapter(x, jax.random.key(0))) != y).any()


def test_adapters_shard_like_their_base():
    model = apply_lora(Transformer(CFG, rngs=nnx.Rngs(0)), LoRAConfig(rank=4, targets=ALL), nnx.Rngs(1))
    for i, name, linear in lora._adapted(model):
        d_in, d_out = linear.kernel.get_metadata()["out_sharding"]
        assert linear.lora.lora_a.get_metadata()["out_sharding"] == (d_in, None), (i, name)
        assert linear.lora.lora_b.get_metadata()["out_sharding"] == (None, d_out), (i, name)
    mesh = sharding.make_mesh(fsdp=len(jax.devices()))
    params = nnx.state(model, nnx.Param)
    shardings = sharding.param_shardings(params, mesh)
    spec = shardings["layers"][0]["self_attn"]["q_proj"]["lora"]
    assert (spec["lora_a"].spec, spec["lora_b"].spec) == (jax.sharding.PartitionSpec("fsdp", None),
                                                          jax.sharding.PartitionSpec(None, "tensor"))
    jax.device_put(params, shardings)


def test_config_validation():
    assert LoRAConfig(targets="v_proj, q_proj").targets == ("q_proj", "v_proj")
    assert LoRAConfig(rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0
    for bad in ({"targets": ("lm_head",)}, {"targets": ()}, {"rank": 0}, {"dropout": 1.0}):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)
    model = apply_lora(Transformer(CFG, rngs=nnx.Rngs(0)), LoRAConfig(rank=2), nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2), nnx.Rngs(0))
    assert not has_lora(merge_lora(model)) and has_lora(model)


# -- training --------------------------------------------------------------------------

B, T = 8, 12
# A bf16 frozen base under float32 compute; float32 adapters.
BASE_CFG = CFG.replace(param_dtype=jnp.bfloat16)
LCFG = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))
LR = 1e-2
TX, SCHEDULE = make_optimizer(LR, total_steps=100, warmup_steps=2, weight_decay=0.1)


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows with ragged left padding, unequal weights and an all-padding last row."""
    rng = np.random.default_rng(seed)
    pad, prompt = rng.integers(0, 4, B), rng.integers(2, 5, B)
    pos = np.arange(T)[None, :]
    valid = pos >= pad[:, None]
    loss_mask = valid & (pos >= (pad + prompt)[:, None])
    valid[-1], loss_mask[-1] = False, False
    tokens = np.where(valid, rng.integers(1, CFG.vocab_size, (B, T)), 0).astype(np.int32)
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask,
            "weights": rng.uniform(0.1, 2.0, B).astype(np.float32)}


def lora_state(config: LoRAConfig | None = LCFG, cfg: ModelConfig = BASE_CFG, adapter_seed: int = 1,
               random_b: bool = False):
    """A fresh (graphdef, state): always the same base; adapters' A (and with ``random_b``
    B too) drawn from ``adapter_seed``; ``config=None``: no adapters."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    if config is not None:
        apply_lora(model, config, nnx.Rngs(adapter_seed))
        if random_b:
            randomize_adapters(model, adapter_seed)
    return create_train_state(model, TX, seed=0)


@functools.cache
def shared_step_fn():
    return make_train_step(lora_state()[0], TX, schedule_fn=SCHEDULE)


def run_steps(step_fn, state, batches, aux=None):
    for batch in batches:
        state, metrics = step_fn(state, batch, aux)
    return state, metrics


def host_copy(tree):
    return jax.tree.map(np.array, tree)


def lora_b_leaves(params) -> list:
    return [x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if jax.tree_util.DictKey("lora_b") in path]


def test_lora_trains_only_the_adapters():
    graphdef, state = lora_state()
    trained0, frozen0 = map(host_copy, split_trainable(state.params))
    losses = []
    for _ in range(40):
        state, metrics = shared_step_fn()(state, make_batch(1))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses[::8]
    trained, frozen = split_trainable(state.params)
    chex.assert_trees_all_equal(host_copy(frozen), frozen0)  # bit for bit, still bf16
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    b0s, bs = lora_b_leaves(trained0), lora_b_leaves(trained)
    assert len(bs) == len(LCFG.targets) * CFG.num_layers
    for b0, b in zip(b0s, bs):  # every B has left zero
        assert not b0.any() and np.abs(np.asarray(b)).mean() > 1e-4
    # AdamW's moments mirror the adapters, and nothing else.
    for moment in ("mu", "nu"):
        chex.assert_trees_all_equal_shapes_and_dtypes(optax.tree.get(state.opt_state, moment), trained)
    summary, line = state_summary(state)
    per_layer = sum(LCFG.rank * sum(lin.kernel.shape) for _, _, lin in lora._adapted(nnx.merge(graphdef, state.params)))
    assert summary["trainable_params"] == per_layer and summary["frozen_params"] == CFG.num_params
    assert summary["frozen_bytes"] == 2 * CFG.num_params and summary["trainable_bytes"] == 4 * per_layer
    assert 0 <= summary["opt_state_bytes"] - 2 * summary["trainable_bytes"] <= 16  # + Adam's step count
    assert f"{per_layer:,} trained params" in line


def test_state_summary_reads_shapes_only():
    def make():
        return apply_lora(Transformer(BASE_CFG, rngs=nnx.Rngs(0)), LCFG, nnx.Rngs(1))

    abstract = abstract_train_state(make, TX)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.params))
    assert state_summary(abstract) == state_summary(lora_state()[1])
    full, _ = state_summary(abstract_train_state(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), TX))
    assert (full["trainable_params"], full["frozen_params"], full["trainable_fraction"]) == (CFG.num_params, 0, 1.0)


def test_lora_micro_batches_equal_one_batch():
    batches = [make_batch(2), make_batch(3)]
    graphdef, state = lora_state()
    one, m_one = run_steps(shared_step_fn(), state, batches)
    _, state = lora_state()
    four, m_four = run_steps(make_train_step(graphdef, TX, num_micro_batches=4, schedule_fn=SCHEDULE),
                             state, batches)
    # As in test_train: Adam turns rounding of a ~0 gradient into up to ~lr, hence atol.
    chex.assert_trees_all_close(four.params, one.params, rtol=1e-5, atol=1e-4 * LR)
    for key in ("loss", "grad_norm", "denominator"):
        np.testing.assert_allclose(m_four[key], m_one[key], rtol=1e-5, err_msg=key)


def test_lora_with_remat_and_chunked_loss_gives_the_same_updates():
    batches = [make_batch(4), make_batch(5)]
    _, state = lora_state()
    want, m_want = run_steps(shared_step_fn(), state, batches)
    graphdef, state = lora_state(cfg=BASE_CFG.replace(remat="dots"))
    got, m_got = run_steps(make_train_step(graphdef, TX, schedule_fn=SCHEDULE, loss_chunk_size=4), state, batches)
    chex.assert_trees_all_close(got.params, want.params, rtol=1e-5, atol=1e-4 * LR)
    np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=1e-5)


@pytest.mark.parametrize("config", [LCFG, None], ids=["lora", "full"])
def test_pg_loss_with_remat_trains_the_trained_params(config):
    """policy_gradient.pg_loss_fn with remat: the reference params (aux) and the frozen base
    reach the rematerialised layers from outer traces, which nnx must accept."""
    graphdef, state = lora_state(config, cfg=BASE_CFG.replace(remat="full", param_dtype=jnp.float32))
    ref_params = jax.tree.map(jnp.copy, state.params)  # the policy at the start (adapters: B = 0)
    frozen0 = host_copy(split_trainable(state.params)[1])
    step_fn = make_train_step(graphdef, TX, schedule_fn=SCHEDULE, loss_fn=policy_gradient.pg_loss_fn(kl_coef=0.1))
    batch = {**make_batch(6), "advantages": np.linspace(-1, 1, B).astype(np.float32)}
    state, metrics = run_steps(step_fn, state, [batch] * 3, aux=ref_params)
    assert np.isfinite(metrics["loss"]) and metrics["kl_sum"] > 0  # the policy has moved off the reference
    chex.assert_trees_all_equal(host_copy(split_trainable(state.params)[1]), frozen0)
    if config is not None:
        assert all(np.asarray(b).any() for b in lora_b_leaves(state.params))


def batch_fn(step, state):
    del state
    return make_batch(10 + step)


def test_dropout_trains_differently_and_a_resumed_run_ends_with_the_same_adapters(tmp_path):
    """Dropout 0.1: the loss differs from no dropout's; a job killed after its step-6
    checkpoint and restarted from scratch (same base, fresh adapters) resumes from the
    checkpoint and ends where an uninterrupted run ends, bit for bit, dropout masks
    included. The checkpoint holds the adapters (and their optimizer state), not the base."""
    config = dataclasses.replace(LCFG, dropout=0.1)
    graphdef, state = lora_state(config)
    step_fn = make_train_step(graphdef, TX, schedule_fn=SCHEDULE)
    # The same non-zero adapters: dropout changes the training loss (B = 0 would hide it).
    _, with_dropout = step_fn(lora_state(config, random_b=True)[1], make_batch(1))
    _, without = shared_step_fn()(lora_state(random_b=True)[1], make_batch(1))
    assert abs(float(with_dropout["loss"]) - float(without["loss"])) > 1e-3

    ckpt = Checkpointer(tmp_path / "ckpt", save_every=3)
    train_loop(state, step_fn, batch_fn, 6, checkpointer=ckpt, progress=False)
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=3)
    saved = ckpt.restore(checkpoint_view(lora_state(config)[1]))  # adapters-only structure
    assert len(jax.tree.leaves(saved.params)) == 2 * len(config.targets) * CFG.num_layers
    restarted = lora_state(config, adapter_seed=7)[1]  # other adapters: the checkpoint's must win
    resumed = train_loop(restarted, step_fn, batch_fn, 8, checkpointer=ckpt, progress=False)
    ckpt.close()
    straight = train_loop(lora_state(config)[1], step_fn, batch_fn, 8, progress=False)
    assert int(resumed.step) == int(straight.step) == 8
    chex.assert_trees_all_equal(resumed.params, straight.params)
    chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)



# -- the runner: `--config.lora.rank=16` ----------------------------------------------------

def _from_rollouts_lora(run_tiny, workdir, checkpoint, kill=None):
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rollouts = os.path.join(repo, "tests", "fixtures", "rollouts", "authors_format.jsonl")
    return run_tiny(workdir, kill=kill, config=os.path.join(repo, "experiments", "configs", "from_rollouts.py"),
                    extra=[f"--config.model.checkpoint={checkpoint}", f"--config.rollouts={rollouts}",
                           "--config.lora.rank=16", "--config.model.dtype=float32", "--config.model.remat=none",
                           "--config.train.batch_size=4", "--config.train.num_micro_batches=1",
                           "--config.train.max_len=128", "--config.train.epochs=3", "--config.train.learning_rate=1e-2",
                           "--config.train.checkpoint_every=2"])


def _tensors(path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_from_rollouts_with_lora_trains_only_the_adapters_and_resumes_to_the_same_ones(run_tiny, tmp_path):
    """from_rollouts with --config.lora.rank=16 on a tiny checkpoint: the start of
    training prints the trained-parameter count and state bytes; the loss falls; the
    merged checkpoint is the base plus scale * B A on q/k/v/o and bitwise the base
    everywhere else; a run killed while saving a checkpoint, then rerun, ends with the
    same adapters as the uninterrupted run."""
    from helpers import tiny_hf_checkpoint

    tiny_hf_checkpoint(str(tmp_path / "init"))
    stdout = _from_rollouts_lora(run_tiny, tmp_path / "run", tmp_path / "init")
    assert re.search(r"train drift: train state: [\d,]+ trained params \([\d.]+% of [\d,]+\); ", stdout)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "drift" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2])

    base = _tensors(tmp_path / "init" / "model.safetensors")
    merged = _tensors(tmp_path / "run" / "drift" / "hf" / "model.safetensors")
    adapter = _tensors(tmp_path / "run" / "drift" / "adapter" / "adapter_model.safetensors")
    peft = json.loads((tmp_path / "run" / "drift" / "adapter" / "adapter_config.json").read_text())
    assert (peft["r"], peft["lora_alpha"]) == (16, 32.0)
    scale = peft["lora_alpha"] / peft["r"]
    adapted = set()
    for name, weight in base.items():
        a_name = "base_model.model." + name.replace(".weight", ".lora_A.weight")
        if a_name in adapter:
            delta = adapter[a_name.replace("lora_A", "lora_B")] @ adapter[a_name]  # torch layout [out, in]
            np.testing.assert_allclose(merged[name], weight + scale * delta, rtol=1e-5, atol=1e-6)
            assert np.abs(delta).max() > 0  # the adapter moved
            adapted.add(name.split(".")[-2])
        else:
            np.testing.assert_array_equal(merged[name], weight)  # frozen: bitwise
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}

    killed = tmp_path / "killed"
    _from_rollouts_lora(run_tiny, killed, tmp_path / "init", kill=("save", 4, "drift/checkpoints"))
    assert not (killed / "drift" / "train_stats.json").exists()
    _from_rollouts_lora(run_tiny, killed, tmp_path / "init")
    chex.assert_trees_all_equal(_tensors(killed / "drift" / "adapter" / "adapter_model.safetensors"), adapter)
