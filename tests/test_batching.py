"""Properties of drift_jax.data's length bucketing: every example once per epoch, each
batch padded to its own bucket, deterministic per step, and padding changes no loss.
(The unbucketed batch_fn is tested in test_rollout.py.)"""

from __future__ import annotations

import math

import chex
import numpy as np
import optax
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.chat import SFTExample, collate
from drift_jax.data import epoch_batches, make_batch_fn
from drift_jax.models import ModelConfig, Transformer
from drift_jax.sampling import bucket_length
from drift_jax.train import create_train_state, make_train_step


def _examples(lengths, vocab=None):
    """Example i's tokens all equal i + 1 (or random ids below ``vocab``), so a batch row
    names its example; the second half of each example is supervised."""
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(lengths):
        tokens = np.full(n, i + 1, np.int32) if vocab is None else rng.integers(1, vocab, n).astype(np.int32)
        out.append(SFTExample(tokens, np.arange(n) >= n // 2, weight=1.0 + i))
    return out


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=40), batch_size=st.integers(1, 8),
       window=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_bucketed_epochs_cover_every_example_once_at_their_own_bucket(lengths, batch_size, window, seed):
    examples = _examples(lengths)
    batch_fn, steps = make_batch_fn(examples, batch_size, seed, pad_id=0, bucket_window=window)
    assert steps == math.ceil(len(examples) / batch_size)
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            batch = batch_fn(step)
            real = batch["weights"] > 0
            rows = [int(batch["tokens"][r, 0]) - 1 for r in np.flatnonzero(real)]
            seen += rows
            assert batch["tokens"].shape == (batch_size, bucket_length(max(lengths[i] for i in rows)))
            assert not batch["valid"][~real].any()
            for r, i in zip(np.flatnonzero(real), rows):
                assert batch["valid"][r].sum() == lengths[i] and batch["weights"][r] == examples[i].weight
        assert sorted(seen) == list(range(len(examples)))


def test_bucketing_groups_lengths_and_cuts_padding():
    # Alternating short and long examples: random batches mix them, buckets do not.
    lengths = [5, 200] * 16
    examples = _examples(lengths)
    padded = {}
    for window in (0, 4):
        batch_fn, steps = make_batch_fn(examples, 4, seed=3, pad_id=0, bucket_window=window)
        padded[window] = sum(batch_fn(s)["tokens"].size for s in range(steps))
    assert padded[4] < padded[0]
    # A sorted window mixes the two lengths in at most one batch: 2 windows of 16 here.
    mixed = [rows for rows in epoch_batches(lengths, 4, seed=3, epoch=0, bucket_window=4)
             if len({lengths[i] for i in rows}) > 1]
    assert len(mixed) <= 2


def test_bucketed_batches_are_deterministic_per_step_and_reshuffle_per_epoch():
    examples = _examples(list(range(1, 41)))
    batch_fn, steps = make_batch_fn(examples, 4, seed=0, pad_id=0, bucket_window=2)
    rebuilt, _ = make_batch_fn(examples, 4, seed=0, pad_id=0, bucket_window=2)
    for step in (0, 5, steps + 1, 3 * steps - 1):  # out of order, as a resumed run asks
        chex.assert_trees_all_equal(batch_fn(step), rebuilt(step))
    first = [batch_fn(s)["tokens"][:, 0].tolist() for s in range(steps)]
    second = [batch_fn(s)["tokens"][:, 0].tolist() for s in range(steps, 2 * steps)]
    assert first != second
    # Plain batching keeps the permutation it always had (runs stay reproducible).
    plain = epoch_batches([1] * 10, 3, seed=5, epoch=1)
    np.testing.assert_array_equal(np.concatenate(plain), np.random.default_rng([5, 1]).permutation(10))


def test_padding_to_the_bucket_or_the_global_length_gives_the_same_step():
    """A batch padded to its bucket and the same rows padded to the longest example of
    the data set give the same loss, metrics and updated parameters."""
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8)
    examples = _examples([6, 9, 11, 14], vocab=cfg.vocab_size)
    tx = optax.sgd(1.0)  # params move by the gradient itself (Adam would amplify ~0 ones)
    results = []
    for length in (16, 48):
        graphdef, state = create_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), tx, 0)
        step_fn = make_train_step(graphdef, tx)
        state, metrics = step_fn(state, collate(examples, length, pad_id=0))
        results.append((state.params, metrics))
    (params_a, metrics_a), (params_b, metrics_b) = results
    chex.assert_trees_all_close(metrics_a, metrics_b, rtol=1e-5)
    # The two shapes reduce in different orders: float32 rounding on O(0.1) gradients.
    chex.assert_trees_all_close(params_a, params_b, rtol=1e-5, atol=1e-5)
