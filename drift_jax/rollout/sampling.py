"""Batched generation with a KV cache, compiled as one program per prompt-length bucket.

Device side (``generate``): prefill the left-padded prompts, then a ``lax.while_loop``
that samples one token per row per iteration and stops when every row has hit a stop
token or its own token budget. No host round-trip per token.

Host side (``generate_batched``): tokenised prompts of any lengths -> fixed-size chunks of
rows, left-padded to a bucketed length, so a whole run compiles once per bucket.

On a mesh (``mesh=``), the rows of the batch and of the KV cache are split over the
``data`` and ``fsdp`` axes and the cache's kv heads over ``tensor``, like the training
batch; the weights keep whatever sharding they already have (``drift_jax.parallel.sharding``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from drift_jax.data.batching import bucket_length
from drift_jax.models.transformer import KVCache, Transformer, default_positions


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    stop_ids: tuple[int, ...] = ()


def _filter_logits(logits_bv, top_p: float, top_k: int):
    """Mask logits outside the top-k and the top-p nucleus with -inf."""
    if top_k > 0:
        kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        # Keep a token if the mass strictly before it is < top_p (the top token always stays).
        mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        kept_bv = mass_before_bv < top_p
        cutoff_b1 = jnp.min(jnp.where(kept_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
    return logits_bv


def _block_size(v: int) -> int:
    """Entries per vocabulary block: a divisor of ``v`` in [256, 4096] where there is one
    (151,936 = 128 x 1,187: blocks of 1,187), so that blocking is a free reshape; else 1,024
    with padding."""
    return next((c for c in range(min(v, 4096), 255, -1) if v % c == 0), min(v, 1024))


def _blocks(x_bv, fill):
    """``[B, V]`` -> ``[B, V / c, c]`` (padded with ``fill`` when c does not divide V)."""
    b, v = x_bv.shape
    c = _block_size(v)
    if v % c:
        x_bv = jnp.pad(x_bv, ((0, 0), (0, -v % c)), constant_values=fill)
    return x_bv.reshape(b, -1, c)


def _take_block(x_bnc, block_b):
    return jnp.take_along_axis(x_bnc, block_b[:, None, None], axis=1)[:, 0]


def _blocked_argmax(logits_bv):
    """``argmax`` (first of ties) as the best block, then the best entry in it: XLA's CPU
    argmax over 152k entries costs more than the LM head; two small ones do not."""
    x_bnc = _blocks(logits_bv, -jnp.inf)
    block_b = jnp.argmax(jnp.max(x_bnc, axis=-1), axis=-1)
    return block_b * x_bnc.shape[-1] + jnp.argmax(_take_block(x_bnc, block_b), axis=-1)


def _inverse_cdf(values_bnc, weight_fn, u_b):
    """The first index whose cumulative weight reaches ``u_b`` x the row's total, among
    entries of positive weight, with weights ``weight_fn(values)`` (elementwise, leading
    axis the row). Two levels, block sums then one block's prefix sums, and the weights
    never stored for the whole vocabulary: a [B, 152k] prefix sum (or any stored [B, V]
    array) costs more on CPU than the LM head. -> (index ``[B]``, total weight ``[B]``)."""
    block_sum_bn = jnp.sum(weight_fn(values_bnc), axis=-1)
    block_cdf_bn = jnp.cumsum(block_sum_bn, axis=-1)
    total_b = block_cdf_bn[:, -1]
    threshold_b = u_b * total_b  # > 0: u is in (0, 1]
    block_b = jnp.argmax((block_cdf_bn >= threshold_b[:, None]) & (block_sum_bn > 0), axis=-1)
    before_b = jnp.take_along_axis(block_cdf_bn - block_sum_bn, block_b[:, None], axis=-1)[:, 0]
    inner_bc = weight_fn(_take_block(values_bnc, block_b))
    inner_cdf_bc = jnp.cumsum(inner_bc, axis=-1)
    # The two sums round differently: a residue past the block's own sum takes its last entry.
    residue_b = jnp.minimum(threshold_b - before_b, inner_cdf_bc[:, -1])
    index_b = jnp.argmax((inner_cdf_bc >= residue_b[:, None]) & (inner_bc > 0), axis=-1)
    return block_b * values_bnc.shape[-1] + index_b, total_b


def _rows(x_b, like):
    """``[B]`` broadcast against an array whose leading axis is the row."""
    return x_b.reshape((-1,) + (1,) * (like.ndim - 1))


def sample_token(logits_bv, keys_b, params: SamplingParams):
    """Pick one token per row. Returns (tokens ``[B]`` int32, log-probs ``[B]``).

    Sampling inverts the CDF with one uniform draw per row (``_inverse_cdf``), rather than
    adding a Gumbel draw to every vocabulary entry: V times fewer random bits and no
    per-entry logs, which is most of a decode step's cost on CPU at a 152k vocabulary.
    The log-probs are under the model's own distribution (temperature 1, unfiltered):
    the quantity importance ratios and RL baselines need.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    max_b = jnp.max(logits_bv, axis=-1)
    mass_fn = lambda x: jnp.exp(x - _rows(max_b, x))  # noqa: E731  (the unnormalised softmax)
    unscaled = params.temperature == 1.0 and params.top_p >= 1.0 and params.top_k == 0
    if params.temperature == 0:
        tokens_b = _blocked_argmax(logits_bv)
    else:
        # One key per row: a row's sample depends only on its own key and logits.
        u_b = 1.0 - jax.vmap(lambda key: jax.random.uniform(key, ()))(keys_b)
        if unscaled:
            tokens_b, total_b = _inverse_cdf(_blocks(logits_bv, -jnp.inf), mass_fn, u_b)
        else:
            scaled_bv = _filter_logits(logits_bv / params.temperature, params.top_p, params.top_k)
            t_max_b = max_b / params.temperature
            tokens_b, _ = _inverse_cdf(_blocks(scaled_bv, -jnp.inf), lambda x: jnp.exp(x - _rows(t_max_b, x)), u_b)
    if not unscaled:  # greedy and filtered draws: the softmax's total, over the logits
        total_b = jnp.sum(mass_fn(logits_bv), axis=-1)
    # log p = logit - logsumexp(logits): no [B, V] log-softmax is materialised.
    logp_b = jnp.take_along_axis(logits_bv, tokens_b[:, None], axis=-1)[:, 0] - (jnp.log(total_b) + max_b)
    return tokens_b.astype(jnp.int32), logp_b


def _shard_cache(cache: KVCache, mesh, num_kv_heads: int) -> KVCache:
    """Constrain the cache to rows over (data, fsdp) and kv heads over tensor (when they
    divide evenly), so each device holds and reads only its own part."""
    rows = ("data", "fsdp")
    heads = "tensor" if num_kv_heads % mesh.shape["tensor"] == 0 else None
    kv = NamedSharding(mesh, PartitionSpec(rows, None, heads, None))
    constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=kv)
    return KVCache(
        k=tuple(map(constrain, cache.k)),
        v=tuple(map(constrain, cache.v)),
        valid_bs=jax.lax.with_sharding_constraint(cache.valid_bs, NamedSharding(mesh, PartitionSpec(rows))),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "mesh"))
def generate(graphdef, state, prompt_bp, valid_bp, keys_b, max_new_b, *, params: SamplingParams, mesh=None):
    """Sample continuations of left-padded prompts.

    Args:
      graphdef, state: ``nnx.split(model)``; the weights are a jit argument, not constants.
      prompt_bp: ``[B, P]`` int32 prompt tokens, left-padded.
      valid_bp: ``[B, P]`` bool, False on padding. Every row needs >= 1 real token.
      keys_b: ``[B]`` PRNG keys, one per row (fold_in'ed with the step index).
      max_new_b: ``[B]`` int32 per-row budget (<= params.max_new_tokens); 0 = skip row.
      mesh: optional ``(data, fsdp, tensor)`` mesh (static): the KV cache is sharded
        like the batch rows (see ``_shard_cache``); place the inputs with
        ``drift_jax.parallel.sharding.batch_sharding(mesh)``.
    Returns:
      tokens ``[B, N]`` (pad 0 after a row stops; the stop token itself is kept),
      lengths ``[B]``, log-probs ``[B, N]`` of the sampled tokens (0 after the end).
    """
    model: Transformer = nnx.merge(graphdef, state)
    b, p = prompt_bp.shape
    n = params.max_new_tokens
    # The cache is created inside the program, so XLA updates it in place in the loop.
    cache = KVCache.zeros(model.cfg, b, p + n)
    if mesh is not None:
        cache = _shard_cache(cache, mesh, model.cfg.num_kv_heads)
    positions_bp = default_positions(valid_bp)
    # Logits of the last prompt position only: the prompt is left-padded, so it is real.
    hidden_bpd, cache = model.decode_hidden(prompt_bp, cache, 0, positions_bp, valid_bp)
    logits_bv = model.logits(hidden_bpd[:, -1])
    stop_ids = jnp.asarray(params.stop_ids or (-1,), jnp.int32)

    def cond(carry):
        i, _, _, _, _, done_b, _ = carry
        return (i < n) & ~jnp.all(done_b)

    def body(carry):
        i, cache, logits_bv, tokens_bn, logp_bn, done_b, lengths_b = carry
        step_keys_b = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_b, i)
        tok_b, lp_b = sample_token(logits_bv, step_keys_b, params)
        tok_b = jnp.where(done_b, 0, tok_b)
        tokens_bn = tokens_bn.at[:, i].set(tok_b)
        logp_bn = logp_bn.at[:, i].set(jnp.where(done_b, 0.0, lp_b))
        lengths_b = lengths_b + (~done_b).astype(jnp.int32)
        done_b = done_b | jnp.isin(tok_b, stop_ids) | (lengths_b >= max_new_b)
        pos_b1 = (positions_bp[:, -1] + 1 + i)[:, None]
        new_logits_btv, cache = model.decode(tok_b[:, None], cache, p + i, pos_b1)
        if mesh is not None:  # keep the loop carry's sharding fixed across iterations
            cache = _shard_cache(cache, mesh, model.cfg.num_kv_heads)
        return i + 1, cache, new_logits_btv[:, 0], tokens_bn, logp_bn, done_b, lengths_b

    init = (
        jnp.int32(0),
        cache,
        logits_bv,
        jnp.zeros((b, n), jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        max_new_b <= 0,
        jnp.zeros((b,), jnp.int32),
    )
    _, _, _, tokens_bn, logp_bn, _, lengths_b = jax.lax.while_loop(cond, body, init)
    return tokens_bn, lengths_b, logp_bn




def generate_batched(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    keys,
    params: SamplingParams,
    *,
    batch_size: int = 64,
    max_new: Sequence[int] | None = None,
    max_len: int | None = None,
    min_bucket: int = 16,
    mesh=None,
    stats: dict | None = None,
):
    """Generate for any number of tokenised prompts of any lengths.

    Rows are processed in chunks of exactly ``batch_size`` (the last chunk padded with
    empty rows) and left-padded to ``bucket_length`` of the chunk's longest prompt, so
    the program compiles once per (bucket, params).

    Args:
      prompts: N token-id lists, each non-empty.
      keys: ``[N]`` PRNG keys, one per prompt (e.g. ``jax.random.split``).
      max_new: optional per-prompt budget (default ``params.max_new_tokens``).
      max_len: context limit; a prompt that cannot fit with its budget is an error.
      mesh: optional ``(data, fsdp, tensor)`` mesh (single process): each chunk's rows
        are split over data x fsdp, so ``batch_size`` must be a multiple of their size.
      stats: optional dict; work-done counters are added to it (``add_work``).
    Returns:
      list of N (tokens: list[int], log-probs: np.ndarray) pairs, tokens up to and
      including the stop token.
    """
    n_rows = len(prompts)
    if max_new is None:
        max_new = [params.max_new_tokens] * n_rows
    for i, (toks, budget) in enumerate(zip(prompts, max_new)):
        if len(toks) == 0:
            raise ValueError(f"prompt {i} is empty")
        if max_len is not None and len(toks) + budget > max_len:
            raise ValueError(
                f"prompt {i} has {len(toks)} tokens + {budget} new > context {max_len}; "
                "truncate it or raise the model's context"
            )
    if mesh is not None:
        row_devices = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size % row_devices:
            raise ValueError(f"batch_size={batch_size} must be a multiple of data x fsdp = {row_devices} "
                             "to shard sampling rows over the mesh")
        rows_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    graphdef, state = nnx.split(model)
    # Sort by length so each chunk pads to a tight bucket; results go back in order.
    order = sorted(range(n_rows), key=lambda i: len(prompts[i]))
    results: list = [None] * n_rows
    for start in range(0, n_rows, batch_size):
        rows = order[start : start + batch_size]
        p = bucket_length(max(len(prompts[i]) for i in rows), min_bucket)
        prompt_bp = np.zeros((batch_size, p), np.int32)
        valid_bp = np.zeros((batch_size, p), bool)
        budget_b = np.zeros((batch_size,), np.int32)
        for r, i in enumerate(rows):
            toks = prompts[i]
            prompt_bp[r, p - len(toks) :] = toks
            valid_bp[r, p - len(toks) :] = True
            budget_b[r] = max_new[i]
        valid_bp[len(rows) :, -1] = True  # filler rows: one dummy token, budget 0
        row_keys = keys[np.asarray(rows)]
        if len(rows) < batch_size:
            filler = jnp.broadcast_to(keys[:1], (batch_size - len(rows),) + keys.shape[1:])
            row_keys = jnp.concatenate([row_keys, filler])
        inputs = (prompt_bp, valid_bp, row_keys, budget_b)
        if mesh is not None:
            inputs = jax.device_put(inputs, rows_sharding)
        tokens_bn, lengths_b, logp_bn = jax.device_get(
            generate(graphdef, state, *inputs, params=params, mesh=mesh)
        )
        for r, i in enumerate(rows):
            length = int(lengths_b[r])
            results[i] = (tokens_bn[r, :length].tolist(), logp_bn[r, :length])
        if stats is not None:  # the loop runs until the chunk's longest row stops
            add_work(stats, useful_tokens=int(lengths_b.sum()), slot_steps=batch_size * int(lengths_b.max()),
                     prefill_tokens=sum(len(prompts[i]) for i in rows), prefill_padded_tokens=batch_size * p)
    return results


def add_work(stats: dict, **counts: int) -> None:
    """Add work counters to ``stats`` and refresh its ``slot_utilization`` (useful
    decoded tokens / (rows x decode steps))."""
    for name, n in counts.items():
        stats[name] = stats.get(name, 0) + n
    stats["slot_utilization"] = stats.get("useful_tokens", 0) / max(1, stats.get("slot_steps", 0))
