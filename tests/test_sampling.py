"""Sampling properties: greedy decoding is the step-by-step argmax of the full forward,
a row's samples depend only on its own prompt and key (not on its batch partners, their
padding or the batch size), rows stop on their own, the returned log-probs are the full
forward's, and a run over many prompt lengths compiles at most once per bucket.

Compiles are the cost here (a few seconds each on CPU), so the tests share a handful of
shapes: greedy at (4, 16), temperature 1 at (4, 32), (4, 64) and (8, 64), the bucket
run at (4, 32..128), and one reference forward at (8, 64).
"""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.data.batching import bucket_length
from drift_jax.models import Transformer
from drift_jax.rollout import sampling
from drift_jax.rollout.sampling import SamplingParams, _filter_logits, generate_batched, sample_token

N_NEW = 8
REF_ROWS, REF_LEN = 8, 64
SAMPLE = SamplingParams(temperature=1.0, max_new_tokens=N_NEW)


@pytest.fixture
def model(tiny_cfg):
    return Transformer(tiny_cfg, rngs=nnx.Rngs(0))


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(vocab, size=n).tolist() for n in lengths]


@functools.partial(jax.jit, static_argnums=0)
def _forward_logp(graphdef, state, tokens_bt):
    logits_btv = nnx.merge(graphdef, state)(tokens_bt)
    return jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)


def full_logp(model, seqs):
    """log_softmax of ``model(tokens)`` for each sequence ``[T_i, V]``.

    One compiled shape: the rows are right-padded, which (causal attention) changes no
    logit of a real position."""
    assert len(seqs) <= REF_ROWS and max(map(len, seqs)) <= REF_LEN
    tokens_bt = np.zeros((REF_ROWS, REF_LEN), np.int32)
    for r, s in enumerate(seqs):
        tokens_bt[r, : len(s)] = s
    logp_btv = np.asarray(_forward_logp(*nnx.split(model), tokens_bt))
    return [logp_btv[r, : len(s)] for r, s in enumerate(seqs)]


def stepwise_greedy(model, prompts, n):
    """The definition of greedy decoding: append argmax of the full forward, n times."""
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        for s, logp_tv in zip(seqs, full_logp(model, seqs)):
            s.append(int(np.argmax(logp_tv[-1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def _greedy_case(model):
    """Greedy generation of 4 prompts of lengths 1..16 with stop ids and per-row budgets.

    Stop ids are picked from the reference continuations so that row 0 and row 2 hit a
    stop early while row 1 (which never produces one) runs to its full budget.
    Returns (prompts, reference continuations, stop ids, budgets, outputs).
    """
    prompts = _prompts(model.cfg.vocab_size, (1, 6, 16, 11))
    ref = stepwise_greedy(model, prompts, N_NEW)
    free = lambda tok: tok not in ref[1]  # noqa: E731
    stop_a = next(t for t in ref[0][1:] if free(t))
    stop_b = next(t for t in ref[2][2:] if free(t))
    budgets = [N_NEW, N_NEW, N_NEW, 5]
    params = SamplingParams(temperature=0.0, max_new_tokens=N_NEW, stop_ids=(stop_a, stop_b))
    keys = jax.random.split(jax.random.key(0), len(prompts))
    outputs = generate_batched(model, prompts, keys, params, batch_size=4, max_new=budgets)
    return prompts, ref, {stop_a, stop_b}, budgets, outputs


def _expected_length(ref_row, stops, budget):
    hits = [i for i, t in enumerate(ref_row) if t in stops]
    return min(budget, hits[0] + 1) if hits else budget


def test_greedy_equals_stepwise_argmax_of_full_forward(model):
    prompts, ref, stops, budgets, outputs = _greedy_case(model)
    for r, (tokens, _) in enumerate(outputs):
        n = _expected_length(ref[r], stops, budgets[r])
        assert tokens == ref[r][:n], f"row {r} (prompt length {len(prompts[r])})"
    # Row 1 is compared over the full budget, past every other row's stop.
    assert len(outputs[1][0]) == N_NEW


def test_rows_stop_independently_and_respect_their_budgets(model):
    _, ref, stops, budgets, outputs = _greedy_case(model)
    lengths = [len(tokens) for tokens, _ in outputs]
    for r, (tokens, logp) in enumerate(outputs):
        assert len(logp) == len(tokens) <= budgets[r]
        # No stop id before the last token: generation ends AT the first stop.
        assert not stops & set(tokens[:-1])
        stopped = tokens[-1] in stops
        assert stopped or len(tokens) == budgets[r], f"row {r} ended without a stop or its budget"
    # The case is not trivial: rows 0 and 2 stopped early on a stop id, row 1 went on to
    # its full budget, row 3 was cut by its own smaller budget.
    assert outputs[0][0][-1] in stops and lengths[0] < N_NEW
    assert outputs[2][0][-1] in stops and lengths[2] < N_NEW
    assert lengths[1] == N_NEW and lengths[1] > max(lengths[0], lengths[2])
    assert lengths[3] == budgets[3] < N_NEW and not stops & set(ref[3][: budgets[3]])


def _sampling_prompts(vocab):
    # Lengths 17..40: alone, each prompt is padded to 32 or 64; together to 64.
    return _prompts(vocab, (20, 25, 40, 31, 17), seed=1)


def test_samples_do_not_depend_on_batch_partners_padding_or_batch_size(model):
    prompts = _sampling_prompts(model.cfg.vocab_size)
    keys = jax.random.split(jax.random.key(7), len(prompts))
    together = generate_batched(model, prompts, keys, SAMPLE, batch_size=4)
    wide = generate_batched(model, prompts, keys, SAMPLE, batch_size=8)
    for i, prompt in enumerate(prompts):
        (alone,) = generate_batched(model, [prompt], keys[i : i + 1], SAMPLE, batch_size=4)
        for other in (together[i], wide[i]):
            assert other[0] == alone[0], f"prompt {i}"
            np.testing.assert_allclose(other[1], alone[1], atol=1e-5)
        assert len(alone[0]) == N_NEW
    # Different keys give different samples (the key is actually used).
    other_keys = jax.random.split(jax.random.key(8), len(prompts))
    resampled = generate_batched(model, prompts, other_keys, SAMPLE, batch_size=4)
    assert [t for t, _ in resampled] != [t for t, _ in together]


def test_log_probs_equal_full_forward_log_softmax(model):
    _, _, _, _, greedy = _greedy_case(model)
    greedy_prompts = _prompts(model.cfg.vocab_size, (1, 6, 16, 11))
    prompts = _sampling_prompts(model.cfg.vocab_size)[:3]
    keys = jax.random.split(jax.random.key(7), len(prompts))
    sampled = generate_batched(model, prompts, keys, SAMPLE, batch_size=4)
    for ps, outs in ((greedy_prompts, greedy), (prompts, sampled)):
        ref = full_logp(model, [p + tokens for p, (tokens, _) in zip(ps, outs)])
        for p, (tokens, logp), ref_tv in zip(ps, outs, ref):
            # Token j of the continuation is predicted at position len(p) - 1 + j.
            positions = len(p) - 1 + np.arange(len(tokens))
            np.testing.assert_allclose(logp, ref_tv[positions, tokens], atol=1e-4)


def test_compiles_once_per_bucket(model):
    """Compiles are counted on the jitted ``generate`` itself (its cache size). A stop id
    outside the vocabulary is never sampled, so these are SAMPLE's draws, but it makes
    the static params new: every bucket is a fresh compile and the count is exact."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 101, size=50)
    prompts = [rng.integers(model.cfg.vocab_size, size=n).tolist() for n in lengths]
    keys = jax.random.split(jax.random.key(0), len(prompts))
    buckets = {bucket_length(int(n), 32) for n in lengths}
    assert len(buckets) > 1
    params = SamplingParams(temperature=1.0, max_new_tokens=N_NEW, stop_ids=(model.cfg.vocab_size,))

    before = sampling.generate._cache_size()
    first = generate_batched(model, prompts, keys, params, batch_size=4, min_bucket=32)
    # 13 chunks of 4 rows, one compile per bucket.
    assert sampling.generate._cache_size() - before == len(buckets)

    # Same lengths in another order: nothing new to compile, same samples per prompt.
    before = sampling.generate._cache_size()
    perm = rng.permutation(len(prompts))
    second = generate_batched(
        model, [prompts[i] for i in perm], keys[perm], params, batch_size=4, min_bucket=32
    )
    assert sampling.generate._cache_size() == before
    assert [second[j][0] for j in np.argsort(perm)] == [tokens for tokens, _ in first]


@given(n=st.integers(1, 5000), min_bucket=st.sampled_from([1, 8, 16, 32]))
def test_bucket_length_covers_n_with_few_shapes(n, min_bucket):
    b = bucket_length(n, min_bucket)
    assert b >= max(n, min_bucket)
    if n <= 8 * min_bucket:
        assert b % min_bucket == 0 and b - n < min_bucket
    else:
        assert b & (b - 1) == 0 and b < 2 * n  # power of two, under 2x waste
    assert bucket_length(n + 1, min_bucket) >= b  # monotone


# -- sample_token and the filters, on hand-made logits -----------------------------------

# No subnormals: XLA on CPU flushes them to zero, so 1e-45 and 0 tie on device.
_logits = hnp.arrays(np.float32, (4, 9), elements=st.floats(-6, 6, width=32, allow_subnormal=False))


@settings(max_examples=25, deadline=None)
@given(logits=_logits, seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([0.3, 1.0, 2.5]))
def test_top_k_one_and_tiny_top_p_equal_greedy(logits, seed, temperature):
    keys = jax.random.split(jax.random.key(seed), logits.shape[0])
    greedy, greedy_logp = sample_token(logits, keys, SamplingParams(temperature=0.0))
    assert np.array_equal(greedy, np.argmax(logits, axis=-1))
    ties = np.sum(logits == logits.max(-1, keepdims=True), axis=-1) > 1
    for params in (SamplingParams(temperature=temperature, top_k=1),
                   SamplingParams(temperature=temperature, top_p=1e-6)):
        tokens, logp = sample_token(logits, keys, params)
        # Where the maximum is tied, any of the tied tokens is a correct greedy pick.
        np.testing.assert_array_equal(np.asarray(tokens)[~ties], np.asarray(greedy)[~ties])
        assert np.all(logits[np.arange(4), np.asarray(tokens)] == logits.max(-1))
        np.testing.assert_allclose(logp[~ties], np.asarray(greedy_logp)[~ties], atol=1e-6)


def test_top_p_keeps_the_smallest_set_with_enough_mass_hand_example():
    probs = np.array([0.15, 0.5, 0.1, 0.25])  # sorted: 0.5, 0.25, 0.15, 0.1
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    for top_p, kept in ((0.3, {1}), (0.6, {1, 3}), (0.8, {0, 1, 3}), (0.95, {0, 1, 2, 3})):
        out = np.asarray(_filter_logits(logits, top_p, 0))[0]
        assert set(np.flatnonzero(np.isfinite(out))) == kept, top_p
        # Kept logits are unchanged (the sampler renormalises them).
        np.testing.assert_array_equal(out[np.isfinite(out)], np.asarray(logits)[0][np.isfinite(out)])


@settings(max_examples=40, deadline=None)
@given(logits=_logits, top_p=st.floats(0.01, 0.99))
def test_top_p_filter_is_the_smallest_top_set_with_mass_at_least_p(logits, top_p):
    out = np.asarray(_filter_logits(jnp.asarray(logits), top_p, 0))
    probs = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float64)
    probs /= probs.sum(-1, keepdims=True)
    for row, kept in zip(range(len(logits)), np.isfinite(out)):
        x, p = logits[row], probs[row]
        assert kept.any()
        if not kept.all():
            assert x[kept].min() > x[~kept].max()  # a top set
        assert p[kept].sum() >= top_p - 1e-5  # enough mass
        assert p[x > x[kept].min()].sum() < top_p + 1e-5  # dropping its lowest value falls short


@settings(max_examples=25, deadline=None)
@given(logits=_logits, k=st.integers(1, 9))
def test_top_k_filter_keeps_the_k_largest(logits, k):
    out = np.asarray(_filter_logits(jnp.asarray(logits), 1.0, k))
    kth = np.sort(logits, axis=-1)[:, -k][:, None]
    np.testing.assert_array_equal(np.isfinite(out), logits >= kth)  # ties at the k-th all stay


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5),
     SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_p=0.7)],
    ids=["t1", "t0.5", "top_k3", "top_p0.7"],
)
def test_sampling_frequencies_follow_the_filtered_softmax(params):
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0], np.float32)
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)
    tokens, logp = sample_token(jnp.broadcast_to(logits, (n, 5)), keys, params)
    scaled = logits / params.temperature
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    if params.top_k:
        p[np.argsort(-logits)[params.top_k:]] = 0.0
    if params.top_p < 1.0:  # softmax 0.56, 0.21, 0.13, 0.03, 0.08: nucleus of 0.7 = top 2
        p[np.argsort(-logits)[2:]] = 0.0
    p /= p.sum()
    freq = np.bincount(np.asarray(tokens), minlength=5) / n
    np.testing.assert_allclose(freq, p, atol=0.015)  # ~4 standard errors at n = 20k
    # Log-probs are under the unscaled, unfiltered model distribution.
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits)[np.asarray(tokens)], atol=1e-6)


# -- errors a caller can make ------------------------------------------------------------

def test_prompt_too_long_for_context_raises_naming_the_prompt(model):
    prompts = [[1, 2, 3], [4] * 10, [5] * 30]
    keys = jax.random.split(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"prompt 2 has 30 tokens \+ 8 new > context 32"):
        generate_batched(model, prompts, keys, SAMPLE, max_len=32)
    with pytest.raises(ValueError, match="prompt 1 has 10 tokens"):
        generate_batched(model, prompts[:2], keys[:2], SAMPLE, max_len=17, max_new=[8, 8])


def test_empty_prompt_raises(model):
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batched(model, [[1, 2], []], keys, SAMPLE)


@settings(max_examples=30, deadline=None)
@given(v=st.sampled_from([7, 300, 1187 * 2, 1030, 5000]), seed=st.integers(0, 2**31 - 1))
def test_two_level_draws_are_the_one_level_definitions(v, seed):
    """Blocked argmax == argmax (first of ties), and the blocked inverse CDF == the first
    index whose prefix sum reaches u x total, on sizes with and without padding. Weights
    are small integers (many zeros), so every sum is exact and the two must agree."""
    rng = np.random.default_rng(seed)
    logits = rng.integers(-3, 3, size=(4, v)).astype(np.float32)  # ties everywhere
    np.testing.assert_array_equal(sampling._blocked_argmax(jnp.asarray(logits)), np.argmax(logits, axis=-1))
    weights = np.maximum(rng.integers(-4, 4, size=(4, v)), 0).astype(np.float32)
    weights[:, 0] = 1.0  # every row has mass
    u = rng.uniform(1e-6, 1.0, size=4).astype(np.float32)
    index, total = sampling._inverse_cdf(sampling._blocks(jnp.asarray(weights), 0.0), lambda x: x, jnp.asarray(u))
    cdf = np.cumsum(weights, axis=-1)
    want = [int(np.flatnonzero((cdf[b] >= np.float32(u[b] * cdf[b, -1])) & (weights[b] > 0))[0]) for b in range(4)]
    np.testing.assert_array_equal(index, want)
    np.testing.assert_array_equal(total, cdf[:, -1])
