"""The Pallas TPU splash attention (``models.splash``, ``attention_impl="splash"``), run
in interpret mode on CPU at tiny shapes, against XLA's masked attention: the model's
loss and gradients with grouped-query heads, padding and packed rows, and a prefill
at cache slot 0."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drift_jax.models import KVCache, Transformer
from drift_jax.models.splash import block_size, padded_length

# Row 0: left padding, two packed examples, right padding; row 1: one example, right padding.
SEGMENTS = np.array([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]], np.int32)


def test_tiles_cover_the_sequence_in_whole_lane_multiples():
    assert [block_size(t) for t in (12, 128, 200, 4096)] == [128, 128, 256, 512]
    assert [padded_length(t) for t in (12, 200, 4096, 4100)] == [128, 256, 4096, 4608]


def test_model_with_splash_equals_xla_loss_gradients_and_prefill(tiny_cfg):
    """One layer with 4 query heads over 2 kv heads: a loss over the real positions of
    packed rows (its value and gradients), and a left-padded prefill into a dense cache
    at slot 0 (real positions' logits and the cache it writes). Padding queries' outputs
    are meaningless under either kernel, and no real token ever sees them."""
    cfg = tiny_cfg.replace(num_layers=1)
    tokens = jax.random.randint(jax.random.key(1), SEGMENTS.shape, 1, cfg.vocab_size)
    real = jnp.asarray(SEGMENTS > 0)
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    weights_btv = jax.random.normal(jax.random.key(2), (*SEGMENTS.shape, cfg.vocab_size)) * real[:, :, None]

    def run(graphdef, params):
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, segment_ids_bt=SEGMENTS) * weights_btv)
        prefill = nnx.merge(graphdef, params).decode(tokens, KVCache.zeros(cfg, 2, 16), 0, positions, real)
        return jax.value_and_grad(loss)(params), prefill

    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(2)), nnx.Param)
    got = {impl: jax.jit(run, static_argnums=0)(nnx.graphdef(Transformer(cfg.replace(attention_impl=impl),
                                                                          rngs=nnx.Rngs(2))), params)
           for impl in ("xla", "splash_interpret")}
    ((want, want_grads), (want_logits, want_cache)) = got["xla"]
    ((loss, grads), (logits, cache)) = got["splash_interpret"]
    np.testing.assert_allclose(loss, want, atol=1e-5)  # a sum of +- terms: no relative bound
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-5)  # float32, another summation order
    mask = np.asarray(real)[:, :, None]
    np.testing.assert_allclose(np.where(mask, logits, 0), np.where(mask, want_logits, 0), atol=1e-5)
    chex.assert_trees_all_close(cache, want_cache, atol=1e-6)
