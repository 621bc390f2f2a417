"""Importance-weighted SFT loss (``docs/method.md``, stage 3) and the masked reduction
every loss here shares.

The loss returns (sum, denominator) rather than a mean so that gradient accumulation
over micro-batches is exact: sum both over K micro-batches and divide once at the end
(`mean_loss`), and the result equals the loss of the one big batch.

Packed rows (several examples per row, ``segment_ids``): ``reduce_masked_segments`` is
the same reduction with each (row, segment) standing for one example, so a packed batch
has the loss and the gradient of the same examples one per row.

With Qwen's ~152k vocabulary the float32 logits ``[B, T, V]`` of one 8 x 2048 batch take
10 GB; ``chunked_token_cross_entropy`` goes from the final hidden states straight to the
per-token cross-entropy a sequence chunk at a time, so they never exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# What the summed loss is divided by (``reduce_masked``).
LOSS_DENOMINATORS = ("batch", "sequence", "weight_sum", "token")


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


def chunked_token_cross_entropy(
    hidden_btd: jax.Array,
    head_dv: jax.Array,
    targets_bt: jax.Array,
    chunk_size: int,
    dtype=None,
) -> jax.Array:
    """Per-token cross-entropy of the LM head ``hidden @ head`` without ``[B, T, V]`` logits.

    Equal to ``token_cross_entropy(hidden_btd @ head_dv, targets_bt)`` (the target
    log-prob is its negative). The sequence is cut into chunks of ``chunk_size``
    positions and scanned; each chunk's ``[B, C, V]`` logits are computed with float32
    accumulation, reduced to a float32 log-sum-exp and target logit, and dropped. The
    chunk body is rematerialised, so the backward pass recomputes a chunk's logits
    instead of storing them: peak memory is one chunk's logits (plus their gradient),
    forward and backward.

    Args:
      hidden_btd: [B, T, D] final (normed) hidden states.
      head_dv: [D, V] LM-head matrix (``Transformer.lm_head_weight()``), any float dtype;
        the gradient accumulates across chunks in this dtype, so pass the float32 master
        weights, not a bf16 copy.
      targets_bt: [B, T] int target ids (out-of-range ids are clipped; mask them).
      chunk_size: positions per chunk (static); T need not be a multiple (padded).
      dtype: matmul input dtype (e.g. bf16); default ``hidden_btd.dtype``.
    Returns:
      [B, T] float32.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, t, d = hidden_btd.shape
    dtype = hidden_btd.dtype if dtype is None else dtype
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
    targets_bt = jnp.pad(targets_bt.astype(jnp.int32), ((0, 0), (0, pad)))
    # Scan over the chunk axis: [n, B, C, ...].
    hidden_nbcd = hidden_btd.reshape(b, n, chunk_size, d).swapaxes(0, 1)
    targets_nbc = targets_bt.reshape(b, n, chunk_size).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_ce(head_dv, hidden_bcd, targets_bc):
        logits_bcv = jnp.einsum(
            "bcd,dv->bcv", hidden_bcd.astype(dtype), head_dv.astype(dtype),
            preferred_element_type=jnp.float32,
        )
        return token_cross_entropy(logits_bcv, targets_bc)

    def body(_, chunk):
        return None, chunk_ce(head_dv, *chunk)

    _, ce_nbc = jax.lax.scan(body, None, (hidden_nbcd, targets_nbc))
    return ce_nbc.swapaxes(0, 1).reshape(b, n * chunk_size)[:, :t]


def _check_loss_denominator(loss_denominator: str) -> None:
    if loss_denominator not in LOSS_DENOMINATORS:
        raise ValueError(f"loss_denominator must be one of {LOSS_DENOMINATORS}, got {loss_denominator!r}")


def reduce_masked(
    per_token_bt: jax.Array,
    mask_bt: jax.Array,
    weights_b: jax.Array | None = None,
    loss_denominator: str = "batch",
) -> tuple[jax.Array, jax.Array]:
    """The one masked reduction of per-token losses to (loss_sum, denominator), float32.

    loss_denominator (what the sum is divided by):
      "batch" (alias "sequence"): each row's masked mean, times its weight, summed;
        denominator = rows with at least one masked token (GRPO's per-sequence mean).
      "weight_sum": the same sum; denominator = the weights of those rows.
      "token": the masked per-token values, times their row's weight, summed;
        denominator = the number of masked tokens (verl's "token-mean").
    Rows without a masked token add 0 to both. ``weights_b`` None means all ones.

    Args:
      per_token_bt: [B, T] per-token losses (any float dtype; masked positions may hold
        anything, even inf).
      mask_bt: [B, T] bool/0-1, true where the token counts.
      weights_b: [B] row weights, or None.
    """
    _check_loss_denominator(loss_denominator)
    mask_bt = jnp.asarray(mask_bt).astype(bool)
    # where, not multiply: masked positions may hold garbage, and inf * 0 = nan.
    per_token_bt = jnp.where(mask_bt, per_token_bt.astype(jnp.float32), 0.0)
    num_tokens_b = jnp.sum(mask_bt, axis=-1).astype(jnp.float32)
    if loss_denominator == "token":
        if weights_b is not None:
            per_token_bt = per_token_bt * jnp.asarray(weights_b, jnp.float32)[:, None]
        return jnp.sum(per_token_bt), jnp.sum(num_tokens_b)
    return _reduce_samples(jnp.sum(per_token_bt, axis=-1), num_tokens_b, weights_b, loss_denominator)


def _reduce_samples(sums_s: jax.Array, num_tokens_s: jax.Array, weights_s: jax.Array | None,
                    loss_denominator: str) -> tuple[jax.Array, jax.Array]:
    """(loss_sum, denominator) of "batch" / "weight_sum" from per-sample masked sums
    ``[S]``, token counts ``[S]`` (float32) and weights ``[S]`` (or None): a sample is a
    row of ``reduce_masked`` or a segment of ``reduce_masked_segments``."""
    has_tokens_s = num_tokens_s > 0
    per_sample_s = sums_s / jnp.maximum(num_tokens_s, 1.0)
    if weights_s is None:  # samples without tokens already hold 0
        return jnp.sum(per_sample_s), jnp.sum(has_tokens_s, dtype=jnp.float32)
    weights_s = jnp.asarray(weights_s, jnp.float32)
    loss_sum = jnp.sum(jnp.where(has_tokens_s, weights_s * per_sample_s, 0.0))
    if loss_denominator == "weight_sum":
        return loss_sum, jnp.sum(jnp.where(has_tokens_s, weights_s, 0.0))
    return loss_sum, jnp.sum(has_tokens_s, dtype=jnp.float32)


def reduce_masked_segments(
    per_token_bt: jax.Array,
    mask_bt: jax.Array,
    segment_ids_bt: jax.Array,
    token_weights_bt: jax.Array | None = None,
    loss_denominator: str = "batch",
    num_segments: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``reduce_masked`` for packed rows: each (row, segment) is one sample, so the
    result is that of the same samples one per row.

    "batch" / "weight_sum": per segment, the masked mean times the segment's weight,
    summed; denominator = segments with at least one masked token (or their weights).
    "token": the masked values times their token's weight, summed; denominator = masked
    tokens. The reduction is a segment sum over ``B * num_segments`` bins (a scatter of
    ``[B, T]`` values: no one-hot).

    Args:
      per_token_bt: [B, T] per-token losses (any float dtype; masked-out positions may
        hold anything, even inf).
      mask_bt: [B, T] bool/0-1, true where the token counts.
      segment_ids_bt: [B, T] int, the sample of each token within its row (0 = padding;
        ids must lie in ``[0, num_segments)``; out-of-range ids are dropped).
      token_weights_bt: [B, T] weight of each token's sample (every masked token of a
        segment carries the same one), or None for all ones.
      num_segments: ids per row (static); default ``T + 1`` (a row of T tokens holds at
        most T segments).
    """
    _check_loss_denominator(loss_denominator)
    b, t = per_token_bt.shape
    k = t + 1 if num_segments is None else num_segments
    mask_bt = jnp.asarray(mask_bt).astype(bool)
    # where, not multiply: masked positions may hold garbage, and inf * 0 = nan.
    per_token_bt = jnp.where(mask_bt, per_token_bt.astype(jnp.float32), 0.0)
    if loss_denominator == "token":
        if token_weights_bt is not None:
            per_token_bt = per_token_bt * jnp.asarray(token_weights_bt, jnp.float32)
        return jnp.sum(per_token_bt), jnp.sum(mask_bt, dtype=jnp.float32)
    # Row-major bins: row r's segment j is bin r * k + j; ids out of [0, k) dropped.
    ids_bt = jnp.asarray(segment_ids_bt, jnp.int32)
    ids_bt = jnp.where((ids_bt >= 0) & (ids_bt < k), ids_bt + k * jnp.arange(b, dtype=jnp.int32)[:, None], b * k)
    ids_n = ids_bt.reshape(-1)
    sums_s = jax.ops.segment_sum(per_token_bt.reshape(-1), ids_n, num_segments=b * k)
    num_tokens_s = jax.ops.segment_sum(mask_bt.reshape(-1).astype(jnp.float32), ids_n, num_segments=b * k)
    weights_s = None
    if token_weights_bt is not None:
        # A max over equal values is exact (a mean would round). Segments without a
        # masked token get -inf: zero it, or 0 * -inf = nan in the backward pass.
        token_weights_bt = jnp.where(mask_bt, jnp.asarray(token_weights_bt, jnp.float32), -jnp.inf)
        weights_s = jax.ops.segment_max(token_weights_bt.reshape(-1), ids_n, num_segments=b * k)
        weights_s = jnp.where(num_tokens_s > 0, weights_s, 0.0)
    return _reduce_samples(sums_s, num_tokens_s, weights_s, loss_denominator)


def weighted_token_loss(
    ce_bt: jax.Array,
    loss_mask_bt: jax.Array,
    weights_b: jax.Array,
    loss_denominator: str = "batch",
) -> tuple[jax.Array, jax.Array]:
    """``weighted_sft_loss`` from per-token cross-entropies ``ce_bt`` [B, T] (e.g. from
    ``chunked_token_cross_entropy``) instead of logits. Same (loss_sum, denominator)."""
    return reduce_masked(ce_bt, loss_mask_bt, weights_b, loss_denominator)


def weighted_sft_loss(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    loss_mask_bt: jax.Array,
    weights_b: jax.Array,
    loss_denominator: str = "batch",
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
      loss_denominator: "batch" or "weight_sum" (static; see ``reduce_masked`` for "token").
    """
    return reduce_masked(token_cross_entropy(logits_btv, targets_bt), loss_mask_bt, weights_b, loss_denominator)


def mean_loss(loss_sum: jax.Array, denominator: jax.Array) -> jax.Array:
    """loss_sum / denominator, and 0 (with zero gradient) when the denominator is 0."""
    safe_denominator = jnp.where(denominator == 0, 1.0, denominator)
    return jnp.where(denominator == 0, 0.0, loss_sum / safe_denominator)
