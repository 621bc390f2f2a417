"""Model properties: cached decode == full forward, padding and causality."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from drift_jax.models import PRESETS, KVCache, Transformer, preset
from drift_jax.models.transformer import attention_implementation

# Jitted entry points: op-by-op eager execution costs a compile per primitive on CPU.
_forward = nnx.jit(lambda model, tokens, valid=None: model(tokens, valid))
_decode = nnx.jit(lambda model, tokens, cache, index, pos, valid=None: model.decode(tokens, cache, index, pos, valid))


def _tokens(cfg, b, t, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


@pytest.mark.parametrize("tie", [True, False])
def test_cached_decode_equals_full_forward(tiny_cfg, tie):
    cfg = tiny_cfg.replace(tie_word_embeddings=tie)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(cfg, 3, 20)  # longer than the rope-scaling threshold (8)
    full = _forward(model, tokens)
    cache = KVCache.zeros(cfg, 3, 24)
    pos = jnp.broadcast_to(jnp.arange(20), (3, 20))
    logits, cache = _decode(model, tokens[:, :7], cache, 0, pos[:, :7])
    pieces = [logits]
    for i in range(7, 20):
        logits, cache = _decode(model, tokens[:, i : i + 1], cache, i, pos[:, i : i + 1])
        pieces.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_left_and_right_padding_change_no_real_logit(tiny_cfg):
    model = Transformer(tiny_cfg, rngs=nnx.Rngs(1))
    tokens = _tokens(tiny_cfg, 1, 9)
    ref = _forward(model, tokens)
    pad = jnp.full((1, 5), 7)
    left = _forward(model, jnp.concatenate([pad, tokens], 1), jnp.arange(14)[None] >= 5)
    right = _forward(model, jnp.concatenate([tokens, pad], 1), jnp.arange(14)[None] < 9)
    chex.assert_trees_all_close(left[:, 5:], ref, atol=1e-5)
    chex.assert_trees_all_close(right[:, :9], ref, atol=1e-5)


def test_left_padded_prefill_then_decode_equals_unpadded(tiny_cfg):
    model = Transformer(tiny_cfg, rngs=nnx.Rngs(2))
    tokens = _tokens(tiny_cfg, 1, 10)
    ref = _forward(model, tokens)
    prompt = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), tokens[:, :6]], 1)
    valid = jnp.arange(10)[None] >= 4
    cache = KVCache.zeros(tiny_cfg, 1, 14)
    logits, cache = _decode(model, prompt, cache, 0, jnp.maximum(jnp.arange(10) - 4, 0)[None], valid)
    steps = [logits[:, 4:]]
    for i in range(6, 10):
        logits, cache = _decode(model, tokens[:, i : i + 1], cache, 4 + i, jnp.array([[i]]))
        steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, 1), ref, atol=1e-5)


def test_causal_changing_a_later_token_changes_no_earlier_logit(tiny_cfg):
    model = Transformer(tiny_cfg, rngs=nnx.Rngs(3))
    tokens = _tokens(tiny_cfg, 2, 12)
    changed = tokens.at[:, 8].set((tokens[:, 8] + 1) % tiny_cfg.vocab_size)
    a, b = _forward(model, tokens), _forward(model, changed)
    chex.assert_trees_all_close(a[:, :8], b[:, :8], atol=0)
    assert not np.allclose(a[:, 8:], b[:, 8:])


def test_grouped_query_attention_matches_repeated_kv_heads(tiny_cfg):
    """GQA with k kv-heads == multi-head attention whose kv heads are repeated n/k times."""
    gqa = Transformer(tiny_cfg, rngs=nnx.Rngs(4))
    mha = Transformer(tiny_cfg.replace(num_kv_heads=tiny_cfg.num_heads), rngs=nnx.Rngs(5))
    rep, h = tiny_cfg.num_heads // tiny_cfg.num_kv_heads, tiny_cfg.head_dim
    weights = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
    for layer in weights["layers"].values():
        for name in ("k_proj", "v_proj"):
            proj = layer["self_attn"][name]
            d = proj["kernel"].shape[0]
            proj["kernel"] = jnp.repeat(proj["kernel"].reshape(d, -1, h), rep, axis=1).reshape(d, -1)
            proj["bias"] = jnp.repeat(proj["bias"].reshape(-1, h), rep, axis=0).reshape(-1)
    state = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(state, weights)
    nnx.update(mha, state)
    tokens = _tokens(tiny_cfg, 2, 6)
    chex.assert_trees_all_close(_forward(gqa, tokens), _forward(mha, tokens), atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_abstractly_with_sharding_axes(name):
    cfg = preset(name)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert count == cfg.num_params
    specs = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert specs and all(len(s) >= 1 for s in specs)


def test_preset_sizes_match_published_counts():
    # Published parameter counts (billions), to one decimal.
    expected = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09,
                "qwen2.5-7b": 7.62, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.1-8b": 8.03}
    for name, billions in expected.items():
        assert abs(preset(name).num_params / 1e9 - billions) < 0.01, name


# -- speed switches: remat, attention implementation, LM-head access ----------------------

def _loss_and_grads(cfg, tokens):
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(6)), nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_change_no_loss_or_gradient(tiny_cfg):
    tiny_cfg = tiny_cfg.replace(num_layers=1)  # compile time; one layer shows the property
    tokens = _tokens(tiny_cfg, 2, 10, seed=7)
    want = _loss_and_grads(tiny_cfg, tokens)
    for remat in ("full", "dots"):
        got = _loss_and_grads(tiny_cfg.replace(remat=remat), tokens)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_remat_really_checkpoints_the_layers(tiny_cfg):
    """With remat the backward pass recomputes the layer: the gradient's jaxpr holds a
    remat (checkpoint) equation, and none without."""
    tokens = _tokens(tiny_cfg, 1, 6)

    def jaxpr_text(cfg):
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens)))
        return str(jax.make_jaxpr(grad)(params))

    def has_remat(text):  # the primitive is "remat2" in jax 0.10, "checkpoint" in others
        return "remat" in text or "checkpoint" in text

    assert not has_remat(jaxpr_text(tiny_cfg))
    assert has_remat(jaxpr_text(tiny_cfg.replace(remat="full")))


def test_attention_implementation_auto_picks_cudnn_on_gpu_and_splash_on_tpu(tiny_cfg, monkeypatch):
    bf16 = tiny_cfg.replace(dtype=jnp.bfloat16, head_dim=16)
    assert attention_implementation(bf16, 8) == "xla"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention_implementation(bf16, 8) == attention_implementation(tiny_cfg, 8) == "splash"
    assert attention_implementation(bf16, 1) == "xla"  # decode steps
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_implementation(bf16, 8) == "cudnn"
    assert attention_implementation(bf16, 1) == "xla"  # decode steps
    assert attention_implementation(bf16.replace(dtype=jnp.float32), 8) == "xla"  # cuDNN: half only
    assert attention_implementation(bf16.replace(head_dim=12), 8) == "xla"  # not a multiple of 8
    assert attention_implementation(bf16.replace(attention_impl="xla"), 8) == "xla"
    assert attention_implementation(bf16.replace(attention_impl="cudnn"), 8) == "cudnn"


def test_explicit_xla_attention_equals_default(tiny_cfg):
    tokens = _tokens(tiny_cfg, 2, 9)
    want = _forward(Transformer(tiny_cfg, rngs=nnx.Rngs(8)), tokens)
    got = _forward(Transformer(tiny_cfg.replace(attention_impl="xla"), rngs=nnx.Rngs(8)), tokens)
    chex.assert_trees_all_equal(got, want)


def test_config_rejects_unknown_switches(tiny_cfg):
    with pytest.raises(ValueError, match="remat"):
        tiny_cfg.replace(remat="some")
    with pytest.raises(ValueError, match="attention_impl"):
        tiny_cfg.replace(attention_impl="flash")


@pytest.mark.parametrize("tie", [True, False])
def test_lm_head_weight_gives_the_logits(tiny_cfg, tie):
    model = Transformer(tiny_cfg.replace(tie_word_embeddings=tie), rngs=nnx.Rngs(9))
    hidden = jax.random.normal(jax.random.key(1), (2, 3, tiny_cfg.hidden_size))
    head = model.lm_head_weight()
    assert head.shape == (tiny_cfg.hidden_size, tiny_cfg.vocab_size)
    chex.assert_trees_all_close(hidden @ head, model.logits(hidden), atol=1e-5)
