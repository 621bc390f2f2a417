"""Properties of drift_jax.training.losses: the masked reduction every loss shares and the
weighted SFT loss, both as (sum, denominator)."""

from __future__ import annotations

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.training.losses import (
    NORMALIZE_MODES,
    chunked_token_cross_entropy,
    mean_loss,
    reduce_masked,
    token_cross_entropy,
    weighted_sft_loss,
    weighted_token_loss,
)

NORMALIZE = ["batch", "weight_sum"]
loss_fn = jax.jit(weighted_sft_loss, static_argnames="normalize")


def make_batch(seed, b=4, t=5, v=11, p_mask=0.6):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = rng.random((b, t)) < p_mask
    weights = rng.uniform(0.0, 3.0, size=b).astype(np.float32)
    return logits, targets, mask, weights


def reference_reduce(per_token, mask, weights, normalize):
    """NumPy float64 version of ``reduce_masked``, row by row (``docs/method.md``, stage 3)."""
    x = np.asarray(per_token, np.float64)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, np.float64)
    total, denom = 0.0, 0.0
    for b in range(x.shape[0]):
        if not mask[b].any():
            continue
        if normalize == "token":
            total += w[b] * x[b][mask[b]].sum()
            denom += mask[b].sum()
        else:
            total += w[b] * x[b][mask[b]].mean()
            denom += w[b] if normalize == "weight_sum" else 1.0
    return total, denom


def reference_loss(logits, targets, mask, weights, normalize):
    """The weighted SFT loss in NumPy float64: per-token cross-entropy, then
    ``reference_reduce``."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    log_probs = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    return reference_reduce(ce, mask, weights, normalize)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 3),
    st.integers(1, 4),
    st.sampled_from([2, 7, 16]),
    st.sampled_from(NORMALIZE_MODES),
)
def test_matches_numpy_reference(seed, b, t, v, normalize):
    batch = make_batch(seed, b, t, v)
    loss_sum, denom = loss_fn(*batch, normalize=normalize)
    assert loss_sum.dtype == jnp.float32 and denom.dtype == jnp.float32
    assert loss_sum.shape == () and denom.shape == ()
    ref_sum, ref_denom = reference_loss(*batch, normalize)
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(denom, ref_denom, rtol=1e-6)


def test_token_cross_entropy_matches_log_softmax_and_upcasts():
    logits, targets, _, _ = make_batch(0)
    ce = jax.jit(token_cross_entropy)(jnp.asarray(logits, jnp.bfloat16), targets)
    assert ce.dtype == jnp.float32 and ce.shape == targets.shape
    ref = -jnp.take_along_axis(jax.nn.log_softmax(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(ce, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", NORMALIZE_MODES)
def test_masked_positions_do_not_matter(normalize):
    logits, targets, mask, weights = make_batch(1, b=4, t=6, v=9)
    rng = np.random.default_rng(2)
    garbage = np.where(rng.random(logits.shape) < 0.5, 1e30, -1e30).astype(np.float32)
    logits2 = np.where(mask[..., None], logits, garbage)
    targets2 = np.where(mask, targets, -100)  # typical "ignore" id, out of vocabulary range
    ref = loss_fn(logits, targets, mask, weights, normalize=normalize)
    got = loss_fn(logits2, targets2, mask, weights, normalize=normalize)
    chex.assert_trees_all_equal(got, ref)

    def loss_of(lg):
        return mean_loss(*weighted_sft_loss(lg, targets2, mask, weights, normalize=normalize))

    grads = jax.jit(jax.grad(loss_of))(logits2)
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[~mask], 0.0)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_sample_weight_scales_its_contribution_linearly(normalize):
    logits, targets, mask, weights = make_batch(3)
    mask[1, 0] = True  # sample 1 has a supervised token

    def loss_sum_with(w1):
        w = weights.copy()
        w[1] = w1
        return float(loss_fn(logits, targets, mask, w, normalize=normalize)[0])

    per_sample_1 = reference_loss(logits[1:2], targets[1:2], mask[1:2], np.ones(1), "batch")[0]
    base = loss_sum_with(0.0)
    for c in [0.5, 1.0, 2.0, 7.0]:
        np.testing.assert_allclose(loss_sum_with(c), base + c * per_sample_1, rtol=1e-5)


@pytest.mark.parametrize("normalize", NORMALIZE_MODES)
def test_micro_batches_accumulate_to_one_batch(normalize):
    logits, targets, mask, weights = make_batch(4, b=8, t=5, v=13)
    mask[2:4] = False  # one micro-batch of only padding rows (denominator 0)
    mask[5] = False  # and a padding row inside another one
    full = mean_loss(*loss_fn(logits, targets, mask, weights, normalize=normalize))
    parts = [
        loss_fn(logits[k : k + 2], targets[k : k + 2], mask[k : k + 2], weights[k : k + 2], normalize=normalize)
        for k in range(0, 8, 2)
    ]
    acc_sum, acc_denom = (sum(p[i] for p in parts) for i in range(2))
    np.testing.assert_allclose(mean_loss(acc_sum, acc_denom), full, rtol=1e-6)


@pytest.mark.parametrize("normalize", NORMALIZE_MODES)
def test_padding_rows_change_nothing(normalize):
    logits, targets, mask, weights = make_batch(5, b=3)
    pad_logits, pad_targets, _, pad_weights = make_batch(6, b=2)
    padded = (
        np.concatenate([logits, pad_logits]),
        np.concatenate([targets, pad_targets]),
        np.concatenate([mask, np.zeros_like(mask[:2])]),
        np.concatenate([weights, pad_weights + 5.0]),
    )
    chex.assert_trees_all_close(loss_fn(*padded, normalize=normalize), loss_fn(logits, targets, mask, weights, normalize=normalize), rtol=1e-6)


# -- reduce_masked, on per-token values --------------------------------------------------

SMALL_SHAPES = [(1, 1), (3, 4), (4, 7)]  # few shapes: each is one compile per mode


@st.composite
def masked_values(draw):
    """(per_token [B, T] float32, mask [B, T], weights [B] or None); rows without masked
    tokens are common (the mask is sparse half the time)."""
    b, t = draw(st.sampled_from(SMALL_SHAPES))
    x = draw(hnp.arrays(np.float32, (b, t), elements=st.floats(-10, 10, width=32)))
    p = draw(st.sampled_from([0.2, 0.7]))
    seed = draw(st.integers(0, 2**31 - 1))
    mask = np.random.default_rng(seed).random((b, t)) < p
    weights = draw(st.none() | hnp.arrays(np.float32, (b,), elements=st.floats(0, 3, width=32)))
    return x, mask, weights


reduce_jit = jax.jit(reduce_masked, static_argnames="normalize")


@settings(max_examples=40, deadline=None)
@given(masked_values(), st.sampled_from(NORMALIZE_MODES))
def test_reduce_masked_matches_numpy_reference(data, normalize):
    x, mask, weights = data
    loss_sum, denom = reduce_jit(x, mask, weights, normalize=normalize)
    assert loss_sum.dtype == denom.dtype == jnp.float32 and loss_sum.shape == denom.shape == ()
    ref_sum, ref_denom = reference_reduce(x, mask, weights, normalize)
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(denom, ref_denom, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(masked_values(), st.sampled_from(NORMALIZE_MODES))
def test_reduce_masked_without_weights_equals_weights_of_ones(data, normalize):
    x, mask, _ = data
    ones = np.ones(x.shape[0], np.float32)
    chex.assert_trees_all_close(reduce_jit(x, mask, None, normalize=normalize),
                                reduce_jit(x, mask, ones, normalize=normalize), rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(masked_values())
def test_reduce_masked_sequence_is_batch(data):
    x, mask, weights = data
    chex.assert_trees_all_equal(reduce_jit(x, mask, weights, normalize="sequence"),
                                reduce_jit(x, mask, weights, normalize="batch"))


@settings(max_examples=30, deadline=None)
@given(masked_values(), st.sampled_from(NORMALIZE_MODES), st.integers(1, 3),
       st.sampled_from([np.inf, -np.inf, np.nan]))
def test_reduce_masked_padding_columns_change_nothing(data, normalize, extra, garbage):
    """Columns with mask False, holding inf or nan, change neither the value nor the
    gradient of the real positions; their own gradient is 0."""
    x, mask, weights = data
    x_pad = np.concatenate([x, np.full((x.shape[0], extra), garbage, np.float32)], axis=1)
    mask_pad = np.concatenate([mask, np.zeros((x.shape[0], extra), bool)], axis=1)

    def value_and_grad(values, m):
        return jax.value_and_grad(lambda v: mean_loss(*reduce_masked(v, m, weights, normalize)))(values)

    want, want_grad = value_and_grad(x, mask)
    got, got_grad = value_and_grad(x_pad, mask_pad)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_grad[:, : x.shape[1]], want_grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got_grad[:, x.shape[1]:], 0.0)
    chex.assert_trees_all_close(reduce_masked(x_pad, mask_pad, weights, normalize)[1],
                                reduce_masked(x, mask, weights, normalize)[1])


def test_reduce_masked_upcasts_and_rejects_unknown_normalize():
    x, mask, weights = np.ones((2, 3), np.float32), np.ones((2, 3), bool), np.ones(2, np.float32)
    loss_sum, _ = reduce_masked(jnp.asarray(x, jnp.bfloat16), mask, weights, "token")
    assert loss_sum.dtype == jnp.float32 and float(loss_sum) == 6.0
    with pytest.raises(ValueError, match="normalize"):
        reduce_masked(x, mask, weights, "mean")


@pytest.mark.parametrize("normalize", NORMALIZE_MODES)
def test_weighted_losses_are_the_reduction_of_the_cross_entropy(normalize):
    logits, targets, mask, weights = make_batch(12)
    ce = token_cross_entropy(logits, targets)
    want = reduce_masked(ce, mask, weights, normalize)
    chex.assert_trees_all_equal(weighted_token_loss(ce, mask, weights, normalize), want)
    chex.assert_trees_all_close(weighted_sft_loss(logits, targets, mask, weights, normalize), want,
                                rtol=1e-6)


def test_mean_loss_safe_division():
    assert float(mean_loss(jnp.float32(0.0), jnp.float32(0.0))) == 0.0
    assert float(mean_loss(jnp.float32(3.0), jnp.float32(2.0))) == 1.5
    assert float(jax.grad(mean_loss)(jnp.float32(1.0), jnp.float32(0.0))) == 0.0


def test_all_padding_batch_is_zero_with_finite_gradient():
    logits, targets, mask, weights = make_batch(7)
    mask[:] = False
    loss_sum, denom = loss_fn(logits, targets, mask, weights)
    assert float(loss_sum) == 0.0 and float(denom) == 0.0
    grads = jax.jit(jax.grad(lambda lg: mean_loss(*weighted_sft_loss(lg, targets, mask, weights))))(logits)
    np.testing.assert_array_equal(grads, 0.0)


def test_rejects_unknown_normalize():
    with pytest.raises(ValueError, match="normalize"):
        weighted_sft_loss(*make_batch(0), normalize="tokens")


def test_large_vocabulary_without_one_hot():
    logits, targets, mask, weights = make_batch(8, b=2, t=3, v=152_000)
    mask[:, 0] = True
    loss_sum, denom = loss_fn(logits, targets, mask, weights, normalize="batch")
    assert np.isfinite(float(loss_sum)) and float(denom) == 2.0
    np.testing.assert_allclose(loss_sum, reference_loss(logits, targets, mask, weights, "batch")[0], rtol=1e-5)


class LossJitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_jit_equal_eager(self):
        logits, targets, mask, weights = make_batch(9)
        for normalize in NORMALIZE:

            def loss_of(lg, normalize=normalize):
                return mean_loss(*weighted_sft_loss(lg, targets, mask, weights, normalize=normalize))

            got = self.variant(jax.grad(loss_of))(logits)
            expected = jax.jit(jax.grad(loss_of))(logits)
            chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)
            assert np.all(np.isfinite(got))

    @chex.variants(with_jit=True, without_jit=True)
    def test_value_jit_equal_reference(self):
        batch = make_batch(10)
        fn = self.variant(functools.partial(weighted_sft_loss, normalize="weight_sum"))
        np.testing.assert_allclose(fn(*batch), reference_loss(*batch, "weight_sum"), rtol=1e-5)


# -- chunked LM head + loss ---------------------------------------------------------------

def _head_batch(seed, b=3, t=11, d=6, v=37):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    head = rng.normal(scale=2.0, size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.7
    weights = rng.uniform(0.1, 3.0, b).astype(np.float32)
    return hidden, head, targets, mask, weights


# chunk: 1, divides T=11 or not, == T, > T; each normalisation twice.
@pytest.mark.parametrize("chunk, normalize", [(1, "batch"), (4, "weight_sum"), (11, "batch"), (16, "weight_sum")])
def test_chunked_loss_and_gradient_equal_unchunked(chunk, normalize):
    hidden, head, targets, mask, weights = _head_batch(11)

    def full(h, w):
        return mean_loss(*weighted_sft_loss(h @ w, targets, mask, weights, normalize))

    def chunked(h, w):
        ce = chunked_token_cross_entropy(h, w, targets, chunk)
        return mean_loss(*weighted_token_loss(ce, mask, weights, normalize))

    want = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(hidden, head)
    got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    ce = jax.jit(chunked_token_cross_entropy, static_argnums=3)(hidden, head, targets, chunk)
    chex.assert_trees_all_close(ce, token_cross_entropy(hidden @ head, targets), rtol=1e-5, atol=1e-6)


def test_chunked_loss_rejects_bad_chunk_size():
    hidden, head, targets, _, _ = _head_batch(0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_cross_entropy(hidden, head, targets, 0)


def test_chunked_loss_at_qwen_vocab_is_finite_in_bf16_without_full_logits():
    """vocab 152064, sequence 4096, bf16 matmuls over a float32 head: the loss and both
    gradients are finite, and the compiled program's scratch memory is far below one
    float32 [B, T, V] array, so the full logits exist neither forward nor backward."""
    b, t, d, v, chunk = 1, 4096, 8, 152_064, 512
    k_h, k_w, k_t = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k_h, (b, t, d), jnp.bfloat16)
    head = 0.5 * jax.random.normal(k_w, (d, v), jnp.float32)
    targets = jax.random.randint(k_t, (b, t), 0, v)
    mask = jnp.ones((b, t), bool)

    def loss(h, w):
        ce = chunked_token_cross_entropy(h, w, targets, chunk, jnp.bfloat16)
        return mean_loss(*weighted_token_loss(ce, mask, jnp.ones(b)))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, head).compile()
    full_logits_bytes = b * t * v * 4
    # One chunk's float32 logits and their gradient: 2 * 512 / 4096 of the full array.
    assert compiled.memory_analysis().temp_size_in_bytes < full_logits_bytes / 3
    value, (g_hidden, g_head) = compiled(hidden, head)
    assert np.isfinite(float(value))
    # Random logits: the cross-entropy is about log(V) plus the logit variance / 2.
    assert np.log(v) < float(value) < np.log(v) + 4
    assert g_hidden.dtype == jnp.bfloat16 and g_head.dtype == jnp.float32
    assert np.isfinite(np.asarray(g_hidden, np.float32)).all() and np.isfinite(g_head).all()
