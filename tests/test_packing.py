"""Packed SFT batches: ``pack_examples`` fills rows without overflow, every example once;
``collate_packed`` lays rows out with segment ids and per-token weights; ``make_batch_fn(
pack=True)`` covers each example once per epoch, deterministically per step; the model
attends within a segment only, with positions restarting per segment; and a packed
batch has the per-example losses, batch loss, gradients and update of the same examples
one per row (both normalizations, full or chunked LM head, 2 micro-batches, remat)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.data.batching import (
    SFTExample,
    collate,
    collate_packed,
    epoch_plan,
    make_batch_fn,
    pack_examples,
    packed_epoch_rows,
    padding_fraction,
)
from drift_jax.models import LoRAConfig, ModelConfig, Transformer, apply_lora
from drift_jax.models.transformer import segment_positions
from drift_jax.training.losses import mean_loss, reduce_masked, reduce_masked_segments
from drift_jax.training.objective import next_token_ce, sft_loss_fn, target_mask
from drift_jax.training.step import make_eval_fn, make_train_step
from drift_jax.training.train_state import create_train_state, split_trainable

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)

_forward = nnx.jit(lambda model, tokens, valid=None, seg=None: model(tokens, valid, segment_ids_bt=seg))


def _examples(lengths, vocab=None, seed=0):
    """Example i's tokens all equal i + 1 (or random ids below ``vocab``), so a row's
    segment names its example; tokens from the middle on are supervised."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        tokens = np.full(n, i + 1, np.int32) if vocab is None else rng.integers(1, vocab, n).astype(np.int32)
        out.append(SFTExample(tokens, np.arange(n) >= n // 2, weight=1.0 + i))
    return out


def _segments_of(batch):
    """[(row, first column, length, example index)] of a packed batch made of ``_examples``."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        for s in range(1, int(batch["segment_ids"][r].max(initial=0)) + 1):
            cols = np.flatnonzero(batch["segment_ids"][r] == s)
            out.append((r, int(cols[0]), len(cols), int(batch["tokens"][r, cols[0]]) - 1))
    return out


# ---------------------------------------------------------------- pack_examples


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=60), extra=st.integers(0, 30),
       keep_order=st.booleans(), seed=st.integers(0, 2**16))
def test_pack_examples_fills_rows_without_overflow_each_example_once(lengths, extra, keep_order, seed):
    row_length = max(lengths) + extra
    rows = pack_examples(lengths, row_length, keep_order=keep_order)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(row and sum(lengths[i] for i in row) <= row_length for row in rows)
    assert pack_examples(lengths, row_length, keep_order) == rows  # deterministic
    assert pack_examples(_examples(lengths), row_length, keep_order) == rows  # examples or lengths
    if keep_order:  # next-fit: the rows in order are the input order, and a row closes only when full
        assert [i for row in rows for i in row] == list(range(len(lengths)))
        for row, nxt in zip(rows, rows[1:]):
            assert sum(lengths[i] for i in row) + lengths[nxt[0]] > row_length
    else:
        # Best-fit decreasing: the row lengths depend on the multiset of lengths only, so a
        # reshuffled epoch packs into as many rows (steps per epoch stay fixed)...
        perm = np.random.default_rng(seed).permutation(len(lengths))
        shuffled = pack_examples([lengths[i] for i in perm], row_length)
        assert sorted(sum(lengths[perm[i]] for i in row) for row in shuffled) == sorted(
            sum(lengths[i] for i in row) for row in rows)
        # ... and, as any any-fit packing, it leaves at most one row at most half full (a
        # later row's first example would have fit in an earlier half-empty row).
        assert sum(2 * sum(lengths[i] for i in row) <= row_length for row in rows) <= 1


def test_an_over_long_example_raises_naming_its_index_and_length():
    lengths = [3, 5, 20, 4]
    with pytest.raises(ValueError, match="example 2 has 20 tokens, more than the pack row length 16"):
        pack_examples(lengths, 16)
    with pytest.raises(ValueError, match="example 2 has 20 tokens"):
        pack_examples(lengths, 16, keep_order=True)
    # make_batch_fn names the index in the caller's list, not in a shuffled epoch.
    with pytest.raises(ValueError, match="example 2 has 20 tokens, more than the pack row length 16"):
        make_batch_fn(_examples(lengths), 2, seed=0, pad_id=0, pack=True, pack_length=16)
    with pytest.raises(ValueError, match="replaces bucket_window"):
        make_batch_fn(_examples(lengths), 2, seed=0, pad_id=0, pack=True, bucket_window=2)


# ---------------------------------------------------------------- collate_packed


def test_collate_packed_lays_out_segments_weights_and_filler_rows():
    examples = [SFTExample(np.array([5, 6, 7], np.int32), np.array([0, 1, 1], bool), 0.5),
                SFTExample(np.array([8, 9], np.int32), np.array([0, 1], bool), 2.0),
                SFTExample(np.array([3, 4, 4, 4], np.int32), np.array([0, 0, 1, 1], bool), 1.5)]
    batch = collate_packed(examples, [[0, 1], [2]], length=6, pad_id=0, batch_size=3)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 8, 9, 0], [3, 4, 4, 4, 0, 0], [0] * 6])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0], [0] * 6])
    np.testing.assert_array_equal(batch["valid"], batch["segment_ids"] > 0)
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0], [0] * 6])
    np.testing.assert_array_equal(batch["token_weights"],
                                  [[0.5, 0.5, 0.5, 2.0, 2.0, 0], [1.5] * 4 + [0, 0], [0] * 6])
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((3, 6), np.int32), "valid": ((3, 6), bool), "loss_mask": ((3, 6), bool),
        "segment_ids": ((3, 6), np.int32), "token_weights": ((3, 6), np.float32)}
    with pytest.raises(ValueError, match="row 0 holds 5 tokens, more than batch length 4"):
        collate_packed(examples, [[0, 1]], length=4, pad_id=0)
    with pytest.raises(ValueError, match="2 rows do not fit batch_size 1"):
        collate_packed(examples, [[0], [1]], length=6, pad_id=0, batch_size=1)


# ---------------------------------------------------------------- make_batch_fn(pack=True)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=40), batch_size=st.integers(1, 4),
       extra=st.integers(0, 40), shuffle=st.booleans(), seed=st.integers(0, 2**16))
def test_packed_epochs_cover_every_example_once_in_one_shape(lengths, batch_size, extra, shuffle, seed):
    examples = _examples(lengths)
    pack_length = max(lengths) + extra
    batch_fn, steps = make_batch_fn(examples, batch_size, seed, pad_id=0, shuffle=shuffle, pack=True,
                                    pack_length=pack_length)
    rows = packed_epoch_rows(lengths, pack_length, seed, 0, shuffle)
    assert steps == -(-len(rows) // batch_size)  # packed batches, not examples
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            batch = batch_fn(step)
            assert {v.shape for v in batch.values()} == {(batch_size, pack_length)}
            for r, start, n, i in _segments_of(batch):
                seen.append(i)
                assert n == lengths[i]
                np.testing.assert_array_equal(batch["loss_mask"][r, start:start + n], examples[i].loss_mask)
                assert np.all(batch["token_weights"][r, start:start + n] == np.float32(examples[i].weight))
            assert int(batch["valid"].sum()) == sum(lengths[i] for *_, i in _segments_of(batch))
        assert sorted(seen) == list(range(len(examples)))
        if not shuffle:  # file order: the epoch is the file, example by example
            assert seen == list(range(len(examples)))


def test_packed_batch_of_a_step_is_deterministic_and_epochs_reshuffle():
    examples = _examples(list(range(1, 41)))
    make = lambda seed: make_batch_fn(examples, 2, seed, pad_id=0, pack=True, pack_length=48)  # noqa: E731
    (batch_fn, steps), (rebuilt, steps_again), (reseeded, _) = make(0), make(0), make(1)
    assert steps == steps_again
    for step in (0, 3, steps + 1, 3 * steps - 1):  # out of order, as a resumed run asks
        chex.assert_trees_all_equal(batch_fn(step), rebuilt(step))
        chex.assert_trees_all_equal(batch_fn(step, object()), batch_fn(step))  # train_loop's call

    def order(fn, epoch):
        return [[i for *_, i in _segments_of(fn(s))] for s in range(epoch * steps, (epoch + 1) * steps)]

    assert order(batch_fn, 0) != order(batch_fn, 1)
    assert order(batch_fn, 0) != order(reseeded, 0)


def test_packing_cuts_the_padding_fraction():
    lengths = [5, 200] * 16 + list(range(1, 60))
    plain = epoch_plan(lengths, 4, seed=0, epoch=0)
    packed = epoch_plan(lengths, 4, seed=0, epoch=0, pack=True, pack_length=256)
    assert padding_fraction(lengths, packed, 4) < 0.1 < padding_fraction(lengths, plain, 4)
    slots = sum(4 * length for _, length in plain)
    assert padding_fraction(lengths, plain, 4) == pytest.approx(1 - sum(lengths) / slots)


# ---------------------------------------------------------------- the model on packed rows


def test_segment_positions_restart_at_each_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 2, 2], [1] * 8])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 0, 1, 2, 3, 0, 1],
                                                           list(range(8))])


def test_no_attention_across_segments_and_each_segment_sees_what_it_sees_alone(tiny_cfg):
    """Changing one segment's tokens changes no other segment's logits, and each
    segment's logits are those of its example alone in a row (positions from 0)."""
    model = Transformer(tiny_cfg, rngs=nnx.Rngs(3))
    lengths = [5, 9, 4]  # 18 tokens + 2 padding; 9 > the rope-scaling threshold (8)
    rng = np.random.default_rng(0)
    alone = [rng.integers(0, tiny_cfg.vocab_size, n).astype(np.int32) for n in lengths]
    seg = np.repeat([1, 2, 3, 0], lengths + [2])[None]
    tokens = np.concatenate(alone + [np.zeros(2, np.int32)])[None]
    logits = _forward(model, tokens, None, seg)
    changed = tokens.copy()
    changed[0, 5:14] = (changed[0, 5:14] + 7) % tiny_cfg.vocab_size  # segment 2
    logits_changed = _forward(model, changed, None, seg)
    others = np.flatnonzero(seg[0] != 2)
    chex.assert_trees_all_close(logits_changed[:, others], logits[:, others], atol=1e-6)
    assert not np.allclose(logits_changed[:, 5:14], logits[:, 5:14], atol=1e-3)
    start = 0
    for toks in alone:
        ref = _forward(model, toks[None])
        chex.assert_trees_all_close(logits[:, start:start + len(toks)], ref, atol=1e-5)
        start += len(toks)
    # One segment per full row is the unsegmented forward.
    chex.assert_trees_all_close(_forward(model, tokens, None, np.ones_like(seg)), _forward(model, tokens), atol=1e-6)


def test_the_cudnn_path_gets_the_segment_mask(tiny_cfg, monkeypatch):
    """cuDNN cannot run on this CPU, but the model hands it the block-diagonal causal mask
    (which cuDNN folds into a bias, as it does the padding mask): record the call and
    compute it with XLA."""
    calls = []
    real = jax.nn.dot_product_attention

    def recording(q, k, v, *, mask, is_causal, implementation):
        calls.append((np.asarray(mask), is_causal, implementation))
        return real(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    model = Transformer(tiny_cfg.replace(attention_impl="cudnn", num_layers=1), rngs=nnx.Rngs(0))
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    model(jnp.ones((1, 6), jnp.int32), segment_ids_bt=seg)  # eager: the mask is concrete
    (mask, is_causal, implementation), = calls
    assert implementation == "cudnn" and is_causal
    want = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], bool)  # the padding query sees itself only
    np.testing.assert_array_equal(mask[0, 0], want)


# ---------------------------------------------------------------- the loss: packed == unpacked


def _loss_batches(seed=0):
    """Unpacked (8 rows: 7 examples + a filler row) and packed (4 rows of 24, a filler
    row included) batches of the same examples: ragged lengths, unequal weights, one of
    weight 0, one without a supervised token, one of a single token."""
    rng = np.random.default_rng(seed)
    lengths = [7, 11, 3, 9, 12, 1, 6]
    examples = []
    for i, n in enumerate(lengths):
        mask = np.arange(n) >= rng.integers(1, max(n, 2))
        if i == 3:
            mask[:] = False  # no supervised token: in no denominator
        if i in (1, 4):
            # Supervised from its first token, which must not become a target predicted
            # from the previous segment's last token.
            mask[:] = True
        weight = 0.0 if i == 2 else float(rng.uniform(0.1, 2.0))
        examples.append(SFTExample(rng.integers(1, CFG.vocab_size, n).astype(np.int32), mask, weight))
    rows = pack_examples(examples, 24)
    assert len(rows) == 3 and max(len(r) for r in rows) > 1
    assert any(row.index(i) > 0 for row in rows for i in (1, 4) if i in row)
    return collate(examples, 16, 0, batch_size=8), collate_packed(examples, rows, 24, 0, batch_size=4), rows


def _assert_close_on_tensor_scale(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max(initial=0.0) <= rtol * np.abs(want).max(initial=0.0)


def _per_example_losses(graphdef, params, batch, chunk):
    """(per-example mean CE over supervised targets, their count) of each example: one per
    row unpacked, one per segment packed (in row-major segment order)."""
    ce = np.asarray(jax.jit(lambda p: next_token_ce(nnx.merge(graphdef, p), batch, chunk))(params))
    mask = np.asarray(target_mask(batch))
    out = []
    if "segment_ids" not in batch:
        return [(ce[r][mask[r]].mean() if mask[r].any() else 0.0, mask[r].sum()) for r in range(len(ce))]
    seg = batch["segment_ids"][:, 1:]
    for r in range(len(ce)):
        for s in range(1, int(batch["segment_ids"][r].max(initial=0)) + 1):
            m = mask[r] & (seg[r] == s)
            out.append((ce[r][m].mean() if m.any() else 0.0, m.sum()))
    return out


# Two cases cover both normalisations, both LM-head paths and remat on/off (each case
# compiles four programs: seconds apiece on CPU).
@pytest.mark.parametrize("loss_denominator, chunk, remat", [("batch", 4, "full"), ("weight_sum", 0, "none")])
def test_packed_batch_has_the_unpacked_losses_gradients_and_update(loss_denominator, chunk, remat):
    cfg = CFG.replace(remat=remat)
    plain, packed, rows = _loss_batches()
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    # Per-example losses: segment (r, s) of the packed batch is example rows[r][s - 1].
    per_plain = _per_example_losses(graphdef, params, plain, chunk)
    per_packed = _per_example_losses(graphdef, params, packed, chunk)
    order = [i for row in rows for i in row]
    assert len(per_packed) == len(order)
    for (loss, n), i in zip(per_packed, order):
        assert n == per_plain[i][1]
        np.testing.assert_allclose(loss, per_plain[i][0], rtol=2e-5, atol=1e-6, err_msg=f"example {i}")

    # The batch loss, its (sum, denominator, stats) and gradients.
    loss_fn = sft_loss_fn(loss_denominator, chunk)

    def mean_sft(params, batch):
        loss_sum, denom, stats = loss_fn(graphdef, params, batch, None)
        return mean_loss(loss_sum, denom), (denom, stats)

    value_and_grad = jax.jit(jax.value_and_grad(mean_sft, has_aux=True))
    (loss_a, (denom_a, stats_a)), grads_a = value_and_grad(params, plain)
    (loss_b, (denom_b, stats_b)), grads_b = value_and_grad(params, packed)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    np.testing.assert_allclose(denom_b, denom_a, rtol=1e-6)
    chex.assert_trees_all_close(stats_b, stats_a, rtol=1e-5)
    # Gradients summed in another order differ by rounding relative to each tensor's
    # scale, not to each (possibly ~0) element.
    jax.tree.map(_assert_close_on_tensor_scale, grads_b, grads_a)
    if loss_denominator == "batch":  # 7 examples, less the one without a supervised token and the 1-token one
        assert float(denom_a) == 5.0

    # One train step, packed over 2 micro-batches (2 rows each) vs unpacked in one batch.
    tx = optax.sgd(1.0)  # params move by the gradient itself
    results = []
    for batch, m in ((plain, 1), (packed, 2)):
        gd, state = create_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), tx, 0)
        step_fn = make_train_step(gd, tx, num_micro_batches=m, loss_denominator=loss_denominator, loss_chunk_size=chunk)
        results.append(step_fn(state, batch))
    (state_a, metrics_a), (state_b, metrics_b) = results
    for key in ("loss", "grad_norm", "denominator", "num_tokens", "num_weighted_tokens", "ess_fraction",
                "num_input_tokens"):
        np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=1e-5, err_msg=key)
    # Rows of 24 and of 16 reduce in different orders: float32 rounding on O(0.1) gradients.
    chex.assert_trees_all_close(state_b.params, state_a.params, rtol=1e-5, atol=1e-5)


def test_held_out_loss_of_packed_batches_equals_unpacked():
    plain, packed, _ = _loss_batches(1)
    graphdef, state = create_train_state(Transformer(CFG, rngs=nnx.Rngs(0)), optax.sgd(1.0), 0)
    halves = [{k: v[:2] for k, v in packed.items()}, {k: v[2:] for k, v in packed.items()}]
    want = make_eval_fn(graphdef, [plain], "weight_sum", 0)(state)
    got = make_eval_fn(graphdef, halves, "weight_sum", 0)(state)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert got["num_tokens"] == want["num_tokens"]


def test_target_mask_drops_targets_across_segments():
    batch = {"valid": np.array([[1, 1, 1, 1, 1, 0]], bool), "loss_mask": np.ones((1, 6), bool),
             "segment_ids": np.array([[1, 1, 2, 2, 2, 0]], np.int32)}
    # Target 2 (segment 2's first token) would be predicted from segment 1's last: dropped.
    np.testing.assert_array_equal(target_mask(batch), [[True, False, True, True, False]])
    unpacked = {k: v for k, v in batch.items() if k != "segment_ids"}
    np.testing.assert_array_equal(target_mask(unpacked), [[True, True, True, True, False]])


_reduce_jit = jax.jit(reduce_masked, static_argnames="loss_denominator")
_reduce_segments_jit = jax.jit(reduce_masked_segments, static_argnames=("loss_denominator", "num_segments"))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), loss_denominator=st.sampled_from(["batch", "weight_sum", "token"]))
def test_reduce_masked_segments_is_reduce_masked_of_the_segments_as_rows(data, loss_denominator):
    """Segments of a row reduce as if each were its own row (with its weight); garbage
    (inf) under the mask changes nothing."""
    lengths = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    t = 38  # one shape, one compile: 6 x 6 tokens at most, then >= 2 padding
    values = rng.normal(size=(1, t)).astype(np.float32)
    mask = rng.random((1, t)) < 0.6
    values[0, -1] = np.inf
    pad = t - sum(lengths)
    mask[0, -pad:] = False
    seg = np.concatenate([np.repeat(np.arange(1, len(lengths) + 1), lengths), np.zeros(pad)])[None].astype(np.int32)
    weights = rng.uniform(0.1, 2.0, len(lengths)).astype(np.float32)
    token_weights = np.concatenate([np.repeat(weights, lengths), np.zeros(pad)])[None].astype(np.float32)
    got = _reduce_segments_jit(values, mask, seg, token_weights, loss_denominator)
    rows_v = np.zeros((6, t), np.float32)  # segment s as row s; rows past the last are empty
    rows_m = np.zeros((6, t), bool)
    for s in range(len(lengths)):
        cols = seg[0] == s + 1
        rows_v[s, cols], rows_m[s, cols] = values[0, cols], mask[0, cols]
    want = _reduce_jit(rows_v, rows_m, np.pad(weights, (0, 6 - len(lengths))), loss_denominator)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_lora_dropout_and_remat_train_on_packed_batches():
    """A LoRA model (adapter dropout on: a key per micro-batch) with remat trains on a
    packed batch over 2 micro-batches: finite loss, the adapters move, the base does not."""
    model = apply_lora(Transformer(CFG.replace(remat="full"), rngs=nnx.Rngs(0)),
                       LoRAConfig(rank=2, alpha=4, dropout=0.2), nnx.Rngs(1))
    tx = optax.adam(1e-2)
    graphdef, state = create_train_state(model, tx, 0)
    step_fn = make_train_step(graphdef, tx, num_micro_batches=2)
    _, packed, _ = _loss_batches(2)
    before = split_trainable(state.params)
    before = jax.tree.map(np.asarray, before)
    losses = []
    for _ in range(3):
        state, metrics = step_fn(state, packed)
        losses.append(float(metrics["loss"]))
    adapters, base = split_trainable(state.params)
    assert np.isfinite(losses).all()
    chex.assert_trees_all_equal(base, before[1])
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(before[0])))
