"""Properties of drift_jax.data.batching: ``collate`` right-pads; ``make_batch_fn`` sees every
example once per epoch, in one shape (plain) or each batch padded to its own bucket
(length bucketing), deterministic per step; and padding changes no loss."""

from __future__ import annotations

import math

import chex
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.data.batching import SFTExample, bucket_length, collate, epoch_batches, make_batch_fn
from drift_jax.models import ModelConfig, Transformer
from drift_jax.training.step import make_train_step
from drift_jax.training.train_state import create_train_state


def _examples(lengths, vocab=None):
    """Example i's tokens all equal i + 1 (or random ids below ``vocab``), so a batch row
    names its example; the second half of each example is supervised."""
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(lengths):
        tokens = np.full(n, i + 1, np.int32) if vocab is None else rng.integers(1, vocab, n).astype(np.int32)
        out.append(SFTExample(tokens, np.arange(n) >= n // 2, weight=1.0 + i))
    return out


# ---------------------------------------------------------------- collate


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), extra=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_collate_right_pads_and_zero_weights_filler_rows(lengths, extra, seed):
    rng = np.random.default_rng(seed)
    examples = [SFTExample(rng.integers(1, 50, n).astype(np.int32), rng.random(n) < 0.5, float(rng.random()) + 0.1)
                for n in lengths]
    length, pad_id, b = 12, 0, len(lengths) + extra
    batch = collate(examples, length, pad_id, batch_size=b)
    assert {k: v.shape for k, v in batch.items()} == {
        "tokens": (b, length), "valid": (b, length), "loss_mask": (b, length), "weights": (b,)}
    for r, ex in enumerate(examples):
        n = len(ex.tokens)
        np.testing.assert_array_equal(batch["tokens"][r, :n], ex.tokens)
        assert np.all(batch["tokens"][r, n:] == pad_id)
        np.testing.assert_array_equal(batch["valid"][r], np.arange(length) < n)
        np.testing.assert_array_equal(batch["loss_mask"][r, :n], ex.loss_mask)
        assert not batch["loss_mask"][r, n:].any()
        assert batch["weights"][r] == np.float32(ex.weight)
    filler = slice(len(examples), None)
    assert np.all(batch["weights"][filler] == 0)
    assert not batch["valid"][filler].any() and not batch["loss_mask"][filler].any()
    assert np.all(batch["tokens"][filler] == pad_id)


def test_collate_names_the_per_row_scalar_it_is_given():
    """Online RL's rows carry an advantage, not a weight: ``row_scalars`` replaces
    ``weights``; filler rows get 0, and each example needs its value."""
    examples = [SFTExample(np.array([1, 2, 3], np.int32), np.array([0, 1, 1], bool)),
                SFTExample(np.array([4, 5], np.int32), np.array([0, 1], bool))]
    batch = collate(examples, 4, 0, batch_size=3, row_scalars={"advantages": np.array([-0.5, 1.25], np.float32)})
    assert set(batch) == {"tokens", "valid", "loss_mask", "advantages"}
    assert batch["advantages"].dtype == np.float32 and batch["advantages"].tolist() == [-0.5, 1.25, 0.0]
    with pytest.raises(ValueError, match="1 values of 'advantages' for 2 examples"):
        collate(examples, 4, 0, row_scalars={"advantages": [1.0]})


def test_collate_rejects_an_example_longer_than_the_batch():
    ex = SFTExample(np.arange(5, dtype=np.int32), np.ones(5, bool))
    with pytest.raises(ValueError, match="5 tokens does not fit batch length 4"):
        collate([ex], 4, 0)


# ---------------------------------------------------------------- make_batch_fn, plain


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=25), batch_size=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_each_epoch_covers_every_example_once_in_one_shape(lengths, batch_size, seed):
    examples = _examples(lengths)
    batch_fn, steps = make_batch_fn(examples, batch_size, seed, pad_id=0)
    assert steps == math.ceil(len(examples) / batch_size)
    shape = (batch_size, bucket_length(max(lengths)))
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            batch = batch_fn(step)
            assert batch["tokens"].shape == batch["valid"].shape == batch["loss_mask"].shape == shape
            real = batch["weights"] > 0
            assert not batch["valid"][~real].any()  # filler rows are empty
            for row in np.flatnonzero(real):
                i = int(batch["tokens"][row, 0]) - 1
                seen.append(i)
                assert batch["weights"][row] == examples[i].weight
                assert batch["valid"][row].sum() == lengths[i]
        assert sorted(seen) == list(range(len(examples)))


def test_batch_of_a_step_is_deterministic_and_epochs_reshuffle():
    examples = _examples(range(1, 21))
    batch_fn, steps = make_batch_fn(examples, 4, seed=0, pad_id=0)
    rebuilt, _ = make_batch_fn(examples, 4, seed=0, pad_id=0)
    reseeded, _ = make_batch_fn(examples, 4, seed=1, pad_id=0)
    for step in (0, 3, steps, 2 * steps + 1):
        for k, v in batch_fn(step).items():
            np.testing.assert_array_equal(v, batch_fn(step)[k])
            np.testing.assert_array_equal(v, rebuilt(step)[k])
    order = lambda fn, epoch: [fn(s)["tokens"][:, 0].tolist() for s in range(epoch * steps, (epoch + 1) * steps)]  # noqa: E731
    assert order(batch_fn, 0) != order(batch_fn, 1)
    assert order(batch_fn, 0) != order(reseeded, 0)


def test_batch_fn_takes_the_train_state_and_ignores_it():
    """``loop.train_loop`` calls ``batch_fn(step, state)``; SFT data do not depend on it."""
    batch_fn, _ = make_batch_fn(_examples([3, 5, 7]), 2, seed=0, pad_id=0, bucket_window=1)
    for step in range(4):
        chex.assert_trees_all_equal(batch_fn(step, object()), batch_fn(step), batch_fn(step, state=None))


def test_make_batch_fn_without_examples_raises():
    with pytest.raises(ValueError, match="no training examples"):
        make_batch_fn([], 4, seed=0, pad_id=0)


# ---------------------------------------------------------------- make_batch_fn, bucketed


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


def test_unshuffled_batches_are_file_order_and_hold_whole_groups():
    """shuffle=False (the release's --disable_shuffle): every epoch is the file in order,
    so with records written group by group a batch of 2K holds two whole groups."""
    k, groups = 4, 5
    batches = epoch_batches([3] * (k * groups), 2 * k, seed=0, epoch=1, shuffle=False)
    assert [b.tolist() for b in batches] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    assert all(len({i // k for i in b}) * k == len(b) for b in batches)  # whole groups only
    with pytest.raises(ValueError, match="needs shuffle=True"):
        epoch_batches([3] * 8, 4, seed=0, epoch=0, bucket_window=2, shuffle=False)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 5000), fraction=st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.5]))
def test_held_out_rows_are_the_last_ceil_fraction_in_order(n, fraction):
    """datasets' train_test_split(test_size=f, shuffle=False) holds out the last ceil(f x n)
    rows (its n_test = ceil(test_size * n_samples)); the rest train, order kept."""
    from drift_jax.data.batching import split_held_out

    rows = list(range(n))
    train_rows, held = split_held_out(rows, fraction)
    assert train_rows + held == rows
    assert len(held) == (math.ceil(fraction * n) if fraction else 0)


def test_the_release_holds_out_its_last_90_prompt_groups():
    from drift_jax.data.batching import held_out_count

    assert held_out_count(1800 * 16, 0.05) == 90 * 16  # 5% of the 28,800 file-order rows
    with pytest.raises(ValueError, match="fraction"):
        held_out_count(10, 1.0)
