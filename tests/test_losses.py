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
    LOSS_DENOMINATORS,
    chunked_token_cross_entropy,
    mean_loss,
    reduce_masked,
    token_cross_entropy,
    weighted_sft_loss,
    weighted_token_loss,
)

SFT_DENOMINATORS = ["batch", "weight_sum"]
loss_fn = jax.jit(weighted_sft_loss, static_argnames="loss_denominator")


def make_batch(seed, b=4, t=5, v=11, p_mask=0.6):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = rng.random((b, t)) < p_mask
    weights = rng.uniform(0.0, 3.0, size=b).astype(np.float32)
    return logits, targets, mask, weights


def reference_reduce(per_token, mask, weights, loss_denominator):
    """NumPy float64 version of ``reduce_masked``, row by row (``docs/method.md``, stage 3)."""
    x = np.asarray(per_token, np.float64)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, np.float64)
    total, denom = 0.0, 0.0
    for b in range(x.shape[0]):
        if not mask[b].any():
            continue
        if loss_denominator == "token":
            total += w[b] * x[b][mask[b]].sum()
            denom += mask[b].sum()
        else:
            total += w[b] * x[b][mask[b]].mean()
            denom += w[b] if loss_denominator == "weight_sum" else 1.0
    return total, denom


def reference_loss(logits, targets, mask, weights, loss_denominator):
    """The weighted SFT loss in NumPy float64: per-token cross-entropy, then
    ``reference_reduce``."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    log_probs = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    return reference_reduce(ce, mask, weights, loss_denominator)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 3),
    st.integers(1, 4),
    st.sampled_from([2, 7, 16]),
    st.sampled_from(LOSS_DENOMINATORS),
)
def test_matches_numpy_reference(seed, b, t, v, loss_denominator):
    batch = make_batch(seed, b, t, v)
    loss_sum, denom = loss_fn(*batch, loss_denominator=loss_denominator)
    assert loss_sum.dtype == jnp.float32 and denom.dtype == jnp.float32
    assert loss_sum.shape == () and denom.shape == ()
    ref_sum, ref_denom = reference_loss(*batch, loss_denominator)
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(denom, ref_denom, rtol=1e-6)


def test_token_cross_entropy_matches_log_softmax_and_upcasts():
    logits, targets, _, _ = make_batch(0)
    ce = jax.jit(token_cross_entropy)(jnp.asarray(logits, jnp.bfloat16), targets)
    assert ce.dtype == jnp.float32 and ce.shape == targets.shape
    ref = -jnp.take_along_axis(jax.nn.log_softmax(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(ce, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_denominator", LOSS_DENOMINATORS)
def test_masked_positions_do_not_matter(loss_denominator):
    logits, targets, mask, weights = make_batch(1, b=4, t=6, v=9)
    rng = np.random.default_rng(2)
    garbage = np.where(rng.random(logits.shape) < 0.5, 1e30, -1e30).astype(np.float32)
    logits2 = np.where(mask[..., None], logits, garbage)
    targets2 = np.where(mask, targets, -100)  # typical "ignore" id, out of vocabulary range
    ref = loss_fn(logits, targets, mask, weights, loss_denominator=loss_denominator)
    got = loss_fn(logits2, targets2, mask, weights, loss_denominator=loss_denominator)
    chex.assert_trees_all_equal(got, ref)

    def loss_of(lg):
        return mean_loss(*weighted_sft_loss(lg, targets2, mask, weights, loss_denominator=loss_denominator))

    grads = jax.jit(jax.grad(loss_of))(logits2)
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[~mask], 0.0)


@pytest.mark.parametrize("loss_denominator", SFT_DENOMINATORS)
def test_sample_weight_scales_its_contribution_linearly(loss_denominator):
    logits, targets, mask, weights = make_batch(3)
    mask[1, 0] = True  # sample 1 has a supervised token

    def loss_sum_with(w1):
        w = weights.copy()
        w[1] = w1
        return float(loss_fn(logits, targets, mask, w, loss_denominator=loss_denominator)[0])

    per_sample_1 = reference_loss(logits[1:2], targets[1:2], mask[1:2], np.ones(1), "batch")[0]
    base = loss_sum_with(0.0)
    for c in [0.5, 1.0, 2.0, 7.0]:
        np.testing.assert_allclose(loss_sum_with(c), base + c * per_sample_1, rtol=1e-5)


@pytest.mark.parametrize("loss_denominator", LOSS_DENOMINATORS)
def test_micro_batches_accumulate_to_one_batch(loss_denominator):
    logits, targets, mask, weights = make_batch(4, b=8, t=5, v=13)
    mask[2:4] = False  # one micro-batch of only padding rows (denominator 0)
    mask[5] = False  # and a padding row inside another one
    full = mean_loss(*loss_fn(logits, targets, mask, weights, loss_denominator=loss_denominator))
    parts = [
        loss_fn(logits[k : k + 2], targets[k : k + 2], mask[k : k + 2], weights[k : k + 2],
                loss_denominator=loss_denominator)
        for k in range(0, 8, 2)
    ]
    acc_sum, acc_denom = (sum(p[i] for p in parts) for i in range(2))
    np.testing.assert_allclose(mean_loss(acc_sum, acc_denom), full, rtol=1e-6)


@pytest.mark.parametrize("loss_denominator", LOSS_DENOMINATORS)
def test_padding_rows_change_nothing(loss_denominator):
    logits, targets, mask, weights = make_batch(5, b=3)
    pad_logits, pad_targets, _, pad_weights = make_batch(6, b=2)
    padded = (
        np.concatenate([logits, pad_logits]),
        np.concatenate([targets, pad_targets]),
        np.concatenate([mask, np.zeros_like(mask[:2])]),
        np.concatenate([weights, pad_weights + 5.0]),
    )
    chex.assert_trees_all_close(loss_fn(*padded, loss_denominator=loss_denominator),
                                loss_fn(logits, targets, mask, weights, loss_denominator=loss_denominator), rtol=1e-6)


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


reduce_jit = jax.jit(reduce_masked, static_argnames="loss_denominator")


@settings(max_examples=40, deadline=None)
@given(masked_values(), st.sampled_from(LOSS_DENOMINATORS))
def test_reduce_masked_matches_numpy_reference(data, loss_denominator):
    x, mask, weights = data
    loss_sum, denom = reduce_jit(x, mask, weights, loss_denominator=loss_denominator)
    assert loss_sum.dtype == denom.dtype == jnp.float32 and loss_sum.shape == denom.shape == ()
    ref_sum, ref_denom = reference_reduce(x, mask, weights, loss_denominator)
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(denom, ref_denom, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(masked_values(), st.sampled_from(LOSS_DENOMINATORS))
def test_reduce_masked_without_weights_equals_weights_of_ones(data, loss_denominator):
    x, mask, _ = data
    ones = np.ones(x.shape[0], np.float32)
    chex.assert_trees_all_close(reduce_jit(x, mask, None, loss_denominator=loss_denominator),
                                reduce_jit(x, mask, ones, loss_denominator=loss_denominator), rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(masked_values())
def test_reduce_masked_sequence_is_batch(data):
    x, mask, weights = data
    chex.assert_trees_all_equal(reduce_jit(x, mask, weights, loss_denominator="sequence"),
                                reduce_jit(x, mask, weights, loss_denominator="batch"))


@settings(max_examples=30, deadline=None)
@given(masked_values(), st.sampled_from(LOSS_DENOMINATORS), st.integers(1, 3),
       st.sampled_from([np.inf, -np.inf, np.nan]))
def test_reduce_masked_padding_columns_change_nothing(data, loss_denominator, extra, garbage):
    """Columns with mask False, holding inf or nan, change neither the value nor the
    gradient of the real positions; their own gradient is 0."""
    x, mask, weights = data
    x_pad = np.concatenate([x, np.full((x.shape[0], extra), garbage, np.float32)], axis=1)
    mask_pad = np.concatenate([mask, np.zeros((x.shape[0], extra), bool)], axis=1)

    def value_and_grad(values, m):
        return jax.value_and_grad(lambda v: mean_loss(*reduce_masked(v, m, weights, loss_denominator)))(values)

    want, want_grad = value_and_grad(x, mask)
    got, got_grad = value_and_grad(x_pad, mask_pad)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_grad[:, : x.shape[1]], want_grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got_grad[:, x.shape[1]:], 0.0)
    chex.assert_trees_all_close(reduce_masked(x_pad, mask_pad, weights, loss_denominator)[1],
                                reduce_masked(x, mask, weights, loss_denominator)[1])


def test_reduce_masked_upcasts_and_rejects_an_unknown_loss_denominator():
    x, mask, weights = np.ones((2, 3), np.float32), np.ones((2, 3), bool), np.ones(2, np.float32)
    loss_sum, _ = reduce_masked(jnp.asarray(x, jnp.bfloat16), mask, weights, "token")
    assert loss_sum.dtype == jnp.float32 and float(loss_sum) == 6.0
    with pytest.raises(ValueError, match="loss_denominator"):
        reduce_masked(x, mask, weights, "mean")


@pytest.mark.parametrize("loss_denominator", LOSS_DENOMINATORS)
def test_weighted_losses_are_the_reduction_of_the_cross_entropy(loss_denominator):
    logits, targets, mask, weights = make_batch(12)
    ce = token_cross_entropy(logits, targets)
    want = reduce_masked(ce, mask, weights, loss_denominator)
    chex.assert_trees_all_equal(weighted_token_loss(ce, mask, weights, loss_denominator), want)
    chex.assert_trees_all_close(weighted_sft_loss(logits, targets, mask, weights, loss_denominator), want,
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


def test_rejects_an_unknown_loss_denominator():
    with pytest.raises(ValueError, match="loss_denominator"):
        weighted_sft_loss(*make_batch(0), loss_denominator="tokens")


def test_cross_entropy_makes_no_one_hot_at_a_large_vocabulary():
    """``token_cross_entropy`` reads the target logit with a gather. Compiled (never run:
    ``ShapeDtypeStruct`` inputs) at Qwen's vocabulary, neither its forward nor its backward
    pass needs scratch memory near one [B, T, V] float32 array, which a one-hot of the
    targets (or a materialised log-softmax) takes; a one-hot version does, so the check
    can fail. At that vocabulary a few rows still give the reference value."""
    b, t, v = 8, 512, 152_064
    logits = jax.ShapeDtypeStruct((b, t, v), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    full_bytes = b * t * v * 4

    def scratch_bytes(ce):
        return jax.jit(ce).lower(logits, targets).compile().memory_analysis().temp_size_in_bytes

    def one_hot_ce(lg, tg):
        return -jnp.sum(jax.nn.one_hot(tg, v) * jax.nn.log_softmax(lg), axis=-1)

    assert scratch_bytes(token_cross_entropy) < full_bytes / 100
    assert scratch_bytes(jax.grad(lambda lg, tg: jnp.sum(token_cross_entropy(lg, tg)))) < full_bytes / 100
    assert scratch_bytes(one_hot_ce) >= full_bytes

    logits, targets, mask, weights = make_batch(8, b=2, t=3, v=v)
    mask[:, 0] = True
    loss_sum, denom = loss_fn(logits, targets, mask, weights, loss_denominator="batch")
    assert np.isfinite(float(loss_sum)) and float(denom) == 2.0
    np.testing.assert_allclose(loss_sum, reference_loss(logits, targets, mask, weights, "batch")[0], rtol=1e-5)


class LossJitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_jit_equal_eager(self):
        logits, targets, mask, weights = make_batch(9)
        for loss_denominator in SFT_DENOMINATORS:

            def loss_of(lg, loss_denominator=loss_denominator):
                return mean_loss(*weighted_sft_loss(lg, targets, mask, weights, loss_denominator=loss_denominator))

            got = self.variant(jax.grad(loss_of))(logits)
            expected = jax.jit(jax.grad(loss_of))(logits)
            chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)
            assert np.all(np.isfinite(got))

    @chex.variants(with_jit=True, without_jit=True)
    def test_value_jit_equal_reference(self):
        batch = make_batch(10)
        fn = self.variant(functools.partial(weighted_sft_loss, loss_denominator="weight_sum"))
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
@pytest.mark.parametrize("chunk, loss_denominator",
                         [(1, "batch"), (4, "weight_sum"), (11, "batch"), (16, "weight_sum")])
def test_chunked_loss_and_gradient_equal_unchunked(chunk, loss_denominator):
    hidden, head, targets, mask, weights = _head_batch(11)

    def full(h, w):
        return mean_loss(*weighted_sft_loss(h @ w, targets, mask, weights, loss_denominator))

    def chunked(h, w):
        ce = chunked_token_cross_entropy(h, w, targets, chunk)
        return mean_loss(*weighted_token_loss(ce, mask, weights, loss_denominator))

    want = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(hidden, head)
    got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    ce = jax.jit(chunked_token_cross_entropy, static_argnums=3)(hidden, head, targets, chunk)
    chex.assert_trees_all_close(ce, token_cross_entropy(hidden @ head, targets), rtol=1e-5, atol=1e-6)


def test_chunked_loss_rejects_bad_chunk_size():
    hidden, head, targets, _, _ = _head_batch(0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_cross_entropy(hidden, head, targets, 0)


def _chunked_loss(targets, mask, chunk):
    def loss(h, w):
        ce = chunked_token_cross_entropy(h, w, targets, chunk, jnp.bfloat16)
        return mean_loss(*weighted_token_loss(ce, mask, jnp.ones(targets.shape[0])))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def test_chunked_loss_at_qwen_vocab_keeps_no_full_logits():
    """Sequence 4096 at vocabulary 152064, bf16 matmuls over a float32 head, forward and
    backward compiled (never run: ``ShapeDtypeStruct`` inputs): the program's scratch
    memory is far below one float32 [B, T, V] array, so the full logits exist neither
    forward nor backward; the unchunked loss needs more than that, so the check can fail."""
    b, t, d, v, chunk = 1, 4096, 8, 152_064, 512
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16)
    head = jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets = jnp.zeros((b, t), jnp.int32)
    mask = jnp.ones((b, t), bool)
    full_logits_bytes = b * t * v * 4
    compiled = _chunked_loss(targets, mask, chunk).lower(hidden, head).compile()
    # One chunk's float32 logits and their gradient: 2 * 512 / 4096 of the full array.
    assert compiled.memory_analysis().temp_size_in_bytes < full_logits_bytes / 3

    def unchunked(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return mean_loss(*weighted_sft_loss(logits, targets, mask, jnp.ones(b)))

    full = jax.jit(jax.value_and_grad(unchunked, argnums=(0, 1))).lower(hidden, head).compile()
    assert full.memory_analysis().temp_size_in_bytes > full_logits_bytes


def test_chunked_loss_at_qwen_vocab_is_finite_in_bf16():
    """Vocabulary 152064, bf16 matmuls over a float32 head (a short sequence: the values
    do not depend on its length): the loss and both gradients are finite and in range."""
    b, t, d, v, chunk = 1, 128, 8, 152_064, 64
    k_h, k_w, k_t = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k_h, (b, t, d), jnp.bfloat16)
    head = 0.5 * jax.random.normal(k_w, (d, v), jnp.float32)
    targets = jax.random.randint(k_t, (b, t), 0, v)
    value, (g_hidden, g_head) = _chunked_loss(targets, jnp.ones((b, t), bool), chunk)(hidden, head)
    assert np.isfinite(float(value))
    # Random logits: the cross-entropy is about log(V) plus the logit variance / 2.
    assert np.log(v) < float(value) < np.log(v) + 4
    assert g_hidden.dtype == jnp.bfloat16 and g_head.dtype == jnp.float32
    assert np.isfinite(np.asarray(g_hidden, np.float32)).all() and np.isfinite(g_head).all()
