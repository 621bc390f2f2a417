"""The training objective: next-token cross-entropy of a batch under the model, and the
weighted SFT loss as a ``LossFn`` (the shape every loss of ``step.make_train_step`` has).

A batch is a dict of host or device arrays:
  tokens    [B, T] int32  prompt + answer ids
  valid     [B, T] bool   real (non-padding) tokens
  loss_mask [B, T] bool   supervised tokens (the last assistant message)
  weights   [B]    float32 importance weights

or a packed batch (``batching.collate_packed``: several examples per row), which has
``segment_ids`` [B, T] int32 (0 = padding, 1..n = the example of the token) and
``token_weights`` [B, T] float32 (each token's example weight) in place of ``weights``.
The model then attends within segments only, no target is predicted across a segment
boundary, and the SFT loss reduces per segment: a packed batch has the loss, gradient
and metrics of the same examples one per row.

A micro-batch of a model with LoRA adapters also carries ``dropout_rng`` (a key, see
``step.make_train_step``); ``next_token_ce`` hands it to the model for the adapters'
dropout.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from drift_jax.training.losses import (
    chunked_token_cross_entropy,
    reduce_masked_segments,
    token_cross_entropy,
    weighted_token_loss,
)

Batch = dict[str, Any]

# loss_fn(graphdef, params, micro_batch, aux) -> (loss SUM, denominator, {stat: sum}); the
# step differentiates the sum wrt the trained params (all, or the LoRA adapters: params is
# always the whole model's) and adds up all three over micro-batches.
LossFn = Callable[[nnx.GraphDef, nnx.State, Batch, Any], tuple[jax.Array, jax.Array, dict]]

# Vocabularies at least this large chunk the LM head + loss by default ("auto").
AUTO_CHUNK_MIN_VOCAB = 32_768
AUTO_CHUNK_SIZE = 512


def resolve_loss_chunk_size(loss_chunk_size: int | str | None, vocab_size: int) -> int:
    """``"auto"`` -> ``AUTO_CHUNK_SIZE`` for vocabularies >= ``AUTO_CHUNK_MIN_VOCAB``,
    else 0; ``None`` or 0 -> 0 (full ``[B, T, V]`` logits); a positive int is kept."""
    if loss_chunk_size == "auto":
        return AUTO_CHUNK_SIZE if vocab_size >= AUTO_CHUNK_MIN_VOCAB else 0
    if loss_chunk_size is None:
        return 0
    if not isinstance(loss_chunk_size, int) or loss_chunk_size < 0:
        raise ValueError(f"loss_chunk_size must be 'auto', None or an int >= 0, got {loss_chunk_size!r}")
    return loss_chunk_size


def target_mask(batch: Batch) -> jax.Array:
    """[B, T-1] bool: target t + 1 counts where loss_mask marks it, it is real, and its
    input is real (a target predicted from padding is meaningless); in a packed batch
    also where its input is in the same segment (an example's first token is not
    predicted from the previous example's last)."""
    valid_bt = batch["valid"].astype(bool)
    mask_bt = batch["loss_mask"][:, 1:].astype(bool) & valid_bt[:, 1:] & valid_bt[:, :-1]
    if "segment_ids" in batch:
        segment_ids_bt = batch["segment_ids"]
        mask_bt = mask_bt & (segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1])
    return mask_bt


def model_input_length(t: int) -> int:
    """Positions of a ``[B, T]`` batch the model runs on: the T - 1 that have a next
    token, rounded up to an even count (T - 1 when that is even, else all T).

    cuDNN's fused attention with a mask takes only even lengths in training, and batches
    are padded to multiples of 16 or powers of two, so T - 1 is odd. The extra position
    is the row's last token: causal attention keeps it out of every earlier position,
    and its own logits predict nothing and are dropped, so no loss or gradient changes."""
    return t - 1 + (t - 1) % 2


def next_token_hidden(model, batch: Batch, dropout_rng=None) -> jax.Array:
    """``[B, T-1, D]`` final hidden states of positions 0..T-2 (position t predicts
    tokens[:, t + 1]), from one forward over ``model_input_length(T)`` positions.
    A packed batch's ``segment_ids`` go to the model (attention within segments,
    positions per segment); ``dropout_rng`` as in ``next_token_ce``."""
    tokens_bt, valid_bt = batch["tokens"], batch["valid"].astype(bool)
    t = tokens_bt.shape[1]
    n = model_input_length(t)
    segment_ids_bt = batch.get("segment_ids")
    if segment_ids_bt is not None:
        segment_ids_bt = segment_ids_bt[:, :n]
    hidden_btd = model.hidden_states(tokens_bt[:, :n], valid_bt[:, :n], dropout_rng=dropout_rng,
                                     segment_ids_bt=segment_ids_bt)
    return hidden_btd[:, : t - 1]


def next_token_ce(model, batch: Batch, loss_chunk_size: int | str | None = 0, dropout_rng=None) -> jax.Array:
    """[B, T-1] float32 cross-entropy of each next token under ``model`` (position t
    predicts tokens[:, t + 1]), the model run on ``model_input_length(T)`` positions
    (``next_token_hidden``). With a chunk size > 0 (``resolve_loss_chunk_size``) the LM
    head and the cross-entropy run over sequence chunks (``chunked_token_cross_entropy``):
    no ``[B, T, V]`` logits, same values. ``dropout_rng``: a key for the dropout of LoRA
    adapters (a micro-batch's ``dropout_rng`` in training); None runs them deterministically."""
    hidden_btd = next_token_hidden(model, batch, dropout_rng)
    targets_bt = batch["tokens"][:, 1:]
    chunk = resolve_loss_chunk_size(loss_chunk_size, model.cfg.vocab_size)
    if chunk:
        return chunked_token_cross_entropy(hidden_btd, model.lm_head_weight(), targets_bt, chunk, model.cfg.dtype)
    return token_cross_entropy(model.logits(hidden_btd), targets_bt)


def sft_loss_fn(loss_denominator: str = "batch", loss_chunk_size: int | str | None = "auto") -> LossFn:
    """The weighted SFT loss (``losses.weighted_token_loss``, divided by
    ``loss_denominator``) as a ``make_train_step`` loss; stats: num_tokens (supervised),
    num_weighted_tokens (sum of weight x tokens) and num_squared_weighted_tokens (sum of
    weight^2 x tokens), from which the step reports ``ess_fraction``: the effective sample
    size of the batch's supervised tokens under their weights, over their count.

    A packed batch (``segment_ids`` in it) reduces per segment
    (``losses.reduce_masked_segments``): the same sums, denominator and stats as its
    examples one per row."""
    resolve_loss_chunk_size(loss_chunk_size, 0)  # reject a bad value now, not at trace time

    def loss_fn(graphdef, params, mb, aux):
        del aux
        mask_bt = target_mask(mb)
        ce_bt = next_token_ce(nnx.merge(graphdef, params), mb, loss_chunk_size, mb.get("dropout_rng"))
        if "segment_ids" in mb:
            return packed_sft_sums(ce_bt, mask_bt, mb, loss_denominator)
        weights_b = mb["weights"].astype(jnp.float32)
        loss_sum, denom = weighted_token_loss(ce_bt, mask_bt, weights_b, loss_denominator)
        tokens_b = jnp.sum(mask_bt, axis=1).astype(jnp.float32)
        return loss_sum, denom, {"num_tokens": jnp.sum(tokens_b),
                                 "num_weighted_tokens": jnp.sum(weights_b * tokens_b),
                                 "num_squared_weighted_tokens": jnp.sum(weights_b**2 * tokens_b)}

    return loss_fn


def effective_fraction(count: jax.Array, weight_sum: jax.Array, squared_weight_sum: jax.Array) -> jax.Array:
    """The effective sample size of ``count`` weighted items over ``count``:
    (sum w)^2 / (count * sum w^2), 1 for equal weights, 1/count for one nonzero weight;
    1 when every weight is 0 (nothing is preferred)."""
    denom = count * squared_weight_sum
    return jnp.where(denom > 0, weight_sum**2 / jnp.where(denom > 0, denom, 1.0), 1.0)


def packed_sft_sums(ce_bt: jax.Array, mask_bt: jax.Array, batch: Batch,
                    loss_denominator: str = "batch") -> tuple[jax.Array, jax.Array, dict]:
    """``sft_loss_fn``'s (loss_sum, denominator, stats) for a packed batch from the
    per-target cross-entropies ``ce_bt`` and ``target_mask`` ``mask_bt`` [B, T-1]: each
    target belongs to its token's segment (``target_mask`` already dropped targets
    whose input is in another one) and carries its ``token_weights``."""
    segment_ids_bt = batch["segment_ids"][:, 1:]
    token_weights_bt = batch["token_weights"][:, 1:].astype(jnp.float32)
    # Ids run 0..n with n <= T segments in a row of T tokens.
    loss_sum, denom = reduce_masked_segments(ce_bt, mask_bt, segment_ids_bt, token_weights_bt, loss_denominator,
                                             num_segments=batch["tokens"].shape[1] + 1)
    return loss_sum, denom, {"num_tokens": jnp.sum(mask_bt, dtype=jnp.float32),
                             "num_weighted_tokens": jnp.sum(jnp.where(mask_bt, token_weights_bt, 0.0)),
                             "num_squared_weighted_tokens": jnp.sum(jnp.where(mask_bt, token_weights_bt**2, 0.0))}
