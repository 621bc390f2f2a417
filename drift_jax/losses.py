"""Importance-weighted SFT loss (drift-method.md, Stage 3).

The loss returns (sum, denominator) rather than a mean so that gradient accumulation
over micro-batches is exact: sum both over K micro-batches and divide once at the end
(`mean_loss`), and the result equals the loss of the one big batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NORMALIZE_MODES = ("batch", "weight_sum")


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Per-token cross-entropy -log softmax(logits)[target], in float32.

    Uses logsumexp(logits) - logits[target] so no [B, T, V] one-hot or full log-softmax
    is materialised (V is ~152k for Qwen).

    Args:
      logits_btv: [B, T, V] logits (any float dtype; upcast to float32).
      targets_bt: [B, T] int target ids. Out-of-range ids (e.g. -100 padding) are
        clipped, so they give a finite, meaningless value: mask them out.
    Returns:
      [B, T] float32.
    """
    logits_btv = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(
        logits_btv, targets_bt[..., None].astype(jnp.int32), axis=-1, mode="clip"
    )[..., 0]
    return lse_bt - target_logit_bt


def weighted_sft_loss(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    loss_mask_bt: jax.Array,
    weights_b: jax.Array,
    normalize: str = "batch",
) -> tuple[jax.Array, jax.Array]:
    """Weighted SFT loss as (loss_sum, denominator), both float32 scalars.

    per_sample_b = mean token cross-entropy over the supervised tokens of sample b;
    loss_sum = sum_b weights_b * per_sample_b. Denominator: the number of samples with
    at least one supervised token ("batch") or the sum of their weights ("weight_sum").
    Rows with no supervised token (padding rows) add 0 to both.

    Args:
      logits_btv: [B, T, V] logits predicting targets_bt.
      targets_bt: [B, T] int target ids.
      loss_mask_bt: [B, T] bool/0-1, true where the token is supervised.
      weights_b: [B] importance weights.
      normalize: "batch" or "weight_sum" (static).
    """
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    mask_bt = jnp.asarray(loss_mask_bt).astype(bool)
    weights_b = jnp.asarray(weights_b, jnp.float32)
    # where, not multiply: masked positions may hold garbage, and inf * 0 = nan.
    ce_bt = jnp.where(mask_bt, token_cross_entropy(logits_btv, targets_bt), 0.0)
    num_tokens_b = jnp.sum(mask_bt, axis=-1).astype(jnp.float32)
    has_tokens_b = num_tokens_b > 0
    per_sample_b = jnp.sum(ce_bt, axis=-1) / jnp.maximum(num_tokens_b, 1.0)
    loss_sum = jnp.sum(jnp.where(has_tokens_b, weights_b * per_sample_b, 0.0))
    if normalize == "batch":
        denominator = jnp.sum(has_tokens_b, dtype=jnp.float32)
    else:
        denominator = jnp.sum(jnp.where(has_tokens_b, weights_b, 0.0))
    return loss_sum, denominator


def mean_loss(loss_sum: jax.Array, denominator: jax.Array) -> jax.Array:
    """loss_sum / denominator, and 0 (with zero gradient) when the denominator is 0."""
    safe_denominator = jnp.where(denominator == 0, 1.0, denominator)
    return jnp.where(denominator == 0, 0.0, loss_sum / safe_denominator)
