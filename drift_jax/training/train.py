"""Training: AdamW, one accumulating train step that takes a loss function (weighted SFT
by default; online RL's policy-gradient loss plugs in the same way) and a resumable loop.

Device work is one jitted ``step_fn(state, batch, aux)``; the model is rebuilt inside it from
``(graphdef, params)`` so the weights are a jit argument (donated, never baked into the
HLO). Host work -- fetching batches, the NaN check, logging, checkpoints -- is
``train_loop``.

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

LoRA: for a model with adapters (``drift_jax.models.lora``) only the ``nnx.LoRAParam``
leaves train (``split_trainable``): gradients and optimizer state cover the adapters
alone, the frozen base passes through the step bit for bit, and checkpoints hold the
adapters, their optimizer state, step and rng (the base comes from the model the run
starts from). The step then adds ``dropout_rng`` (a key: ``state.rng`` folded with the
step and the micro-batch, so a resumed run draws the same masks) to each micro-batch for
the adapters' dropout; ``next_token_ce`` hands it to the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from drift_jax.parallel import distributed
from drift_jax.training.losses import (chunked_token_cross_entropy, mean_loss, reduce_masked_segments, token_cross_entropy,
                              weighted_token_loss)

Batch = dict[str, Any]


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    warmup_ratio: float = 0.1,
    warmup_steps: int | None = None,
    schedule: str = "constant",
    weight_decay: float = 0.1,
    grad_clip: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """AdamW after global-norm clipping, with linear warm-up then constant or cosine.

    The schedule follows Hugging Face's ``get_{constant,cosine}_schedule_with_warmup``
    (what the released DRIFT recipe used): ``lr * s / warmup`` for update ``s < warmup``
    (so update 0 has lr 0), then ``lr`` or a cosine from ``lr`` to 0 at ``total_steps``.
    ``warmup_steps`` overrides ``ceil(warmup_ratio * total_steps)``.

    Weight decay skips 1-D parameters (norm scales, biases), as is standard.

    Returns:
      (tx, schedule_fn) with ``schedule_fn(update_index) -> lr`` (float32).
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if warmup_steps is None:
        warmup_steps = math.ceil(warmup_ratio * total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule_fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = learning_rate * step / max(warmup_steps, 1)
        if schedule == "constant":
            after = jnp.full_like(step, learning_rate)
        else:
            progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
            after = learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, after)

    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim > 1, params)

    adamw = optax.adamw(schedule_fn, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw
    return tx, schedule_fn


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs. ``step``: int32 scalar, updates applied so far.
    ``rng``: a key for stochastic training; derive per-step keys with
    ``jax.random.fold_in(rng, step)`` so a resumed run draws the same ones.

    ``params`` is every ``nnx.Param`` of the model (``nnx.merge(graphdef, params)`` is
    the model, adapters included); ``opt_state`` covers the trained ones only:
    ``split_trainable(params)[0]``, i.e. all of them, or the LoRA adapters alone."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


def split_trainable(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trained, frozen) parts of a model's params: the ``nnx.LoRAParam`` leaves and the
    rest when there are any (a model with LoRA adapters), else (all, empty). Works on
    abstract states too (``jax.eval_shape`` leaves); ``nnx.merge_state(trained, frozen)``
    puts them back together."""
    adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
    if jax.tree.leaves(adapters):
        return adapters, base
    return params, nnx.State({})


def _init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        params=params,
        opt_state=tx.init(split_trainable(params)[0]),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key(seed),
    )


def _model_params(model: nnx.Module, who: str) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        # step_fn rebuilds the model from params alone; other state would be dropped.
        raise ValueError(
            f"{who} supports models whose only state is nnx.Param; found "
            f"other variables: {rest}. Carry them in TrainState before training this model."
        )
    return graphdef, params


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` into (graphdef, Param state) and initialise the optimizer over the
    trained params (``split_trainable``: the LoRA adapters if the model has any)."""
    graphdef, params = _model_params(model, "create_train_state")
    # Commit the state to a device: a restored checkpoint is committed too, and jit keys
    # its cache on committedness, so a fresh and a restored state share one compile.
    return graphdef, jax.device_put(_init_state(params, tx, seed), jax.local_devices()[0])


def abstract_train_state(
    make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, seed: int = 0
) -> TrainState:
    """``create_train_state(make_model(), tx, seed)[1]`` as ``jax.ShapeDtypeStruct``
    leaves: shapes and dtypes with nothing allocated (for ``state_summary`` of models too
    big for this host, or as a checkpoint's restore target)."""
    return jax.eval_shape(lambda: _init_state(_model_params(make_model(), "abstract_train_state")[1], tx, seed))


def _tree_size(tree) -> tuple[int, int]:
    """(elements, bytes) over the array leaves of ``tree`` (concrete or abstract)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]
    return (sum(int(np.prod(x.shape)) for x in leaves),
            sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.2f} MiB"


def state_summary(state: TrainState) -> tuple[dict[str, int | float], str]:
    """Trained-parameter count and train-state bytes of ``state`` (concrete, or
    ``abstract_train_state``: only shapes and dtypes are read).

    Returns (summary, line). summary: trainable_params / frozen_params (elements),
    trainable_bytes / frozen_bytes / opt_state_bytes and state_bytes (params + optimizer
    state), trainable_fraction (of all params). line: the same in one printable line.
    """
    trained, frozen = split_trainable(state.params)
    (n_train, b_train), (n_frozen, b_frozen) = _tree_size(trained), _tree_size(frozen)
    _, b_opt = _tree_size(state.opt_state)
    summary = {
        "trainable_params": n_train,
        "frozen_params": n_frozen,
        "trainable_fraction": n_train / max(n_train + n_frozen, 1),
        "trainable_bytes": b_train,
        "frozen_bytes": b_frozen,
        "opt_state_bytes": b_opt,
        "state_bytes": b_train + b_frozen + b_opt,
    }
    line = (f"train state: {n_train:,} trained params ({100 * summary['trainable_fraction']:.3g}% of "
            f"{n_train + n_frozen:,}); {_gib(summary['state_bytes'])} = trained {_gib(b_train)} + "
            f"frozen {_gib(b_frozen)} + optimizer {_gib(b_opt)}")
    return summary, line


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


def next_token_ce(model, batch: Batch, loss_chunk_size: int | str | None = 0, dropout_rng=None) -> jax.Array:
    """[B, T-1] float32 cross-entropy of each next token under ``model`` (position t
    predicts tokens[:, t + 1]). With a chunk size > 0 (``resolve_loss_chunk_size``) the LM
    head and the cross-entropy run over sequence chunks (``chunked_token_cross_entropy``):
    no ``[B, T, V]`` logits, same values. ``dropout_rng``: a key for the dropout of LoRA
    adapters (a micro-batch's ``dropout_rng`` in training); None runs them deterministically.
    A packed batch's ``segment_ids`` go to the model (attention within segments,
    positions per segment)."""
    tokens_bt, valid_bt = batch["tokens"], batch["valid"].astype(bool)
    segment_ids_bt = batch.get("segment_ids")
    if segment_ids_bt is not None:
        segment_ids_bt = segment_ids_bt[:, :-1]
    chunk = resolve_loss_chunk_size(loss_chunk_size, model.cfg.vocab_size)
    if chunk:
        hidden_btd = model.hidden_states(tokens_bt[:, :-1], valid_bt[:, :-1], dropout_rng=dropout_rng,
                                         segment_ids_bt=segment_ids_bt)
        return chunked_token_cross_entropy(hidden_btd, model.lm_head_weight(), tokens_bt[:, 1:],
                                           chunk, model.cfg.dtype)
    return token_cross_entropy(model(tokens_bt[:, :-1], valid_bt[:, :-1], dropout_rng=dropout_rng,
                                     segment_ids_bt=segment_ids_bt),
                               tokens_bt[:, 1:])


# loss_fn(graphdef, params, micro_batch, aux) -> (loss SUM, denominator, {stat: sum}); the
# step differentiates the sum wrt the trained params (all, or the LoRA adapters: params is
# always the whole model's) and adds up all three over micro-batches.
LossFn = Callable[[nnx.GraphDef, nnx.State, Batch, Any], tuple[jax.Array, jax.Array, dict]]


def sft_loss_fn(normalize: str = "batch", loss_chunk_size: int | str | None = "auto") -> LossFn:
    """The weighted SFT loss (``losses.weighted_token_loss``) as a ``make_train_step``
    loss; stats: num_tokens (supervised), num_weighted_tokens (sum of weight x tokens) and
    num_squared_weighted_tokens (sum of weight^2 x tokens), from which the step reports
    ``ess_fraction``: the effective sample size of the batch's supervised tokens under
    their weights, over their count.

    A packed batch (``segment_ids`` in it) reduces per segment
    (``losses.reduce_masked_segments``): the same sums, denominator and stats as its
    examples one per row."""
    resolve_loss_chunk_size(loss_chunk_size, 0)  # reject a bad value now, not at trace time

    def loss_fn(graphdef, params, mb, aux):
        del aux
        mask_bt = target_mask(mb)
        ce_bt = next_token_ce(nnx.merge(graphdef, params), mb, loss_chunk_size, mb.get("dropout_rng"))
        if "segment_ids" in mb:
            return packed_sft_sums(ce_bt, mask_bt, mb, normalize)
        weights_b = mb["weights"].astype(jnp.float32)
        loss_sum, denom = weighted_token_loss(ce_bt, mask_bt, weights_b, normalize)
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
                    normalize: str = "batch") -> tuple[jax.Array, jax.Array, dict]:
    """``sft_loss_fn``'s (loss_sum, denominator, stats) for a packed batch from the
    per-target cross-entropies ``ce_bt`` and ``target_mask`` ``mask_bt`` [B, T-1]: each
    target belongs to its token's segment (``target_mask`` already dropped targets
    whose input is in another one) and carries its ``token_weights``."""
    segment_ids_bt = batch["segment_ids"][:, 1:]
    token_weights_bt = batch["token_weights"][:, 1:].astype(jnp.float32)
    # Ids run 0..n with n <= T segments in a row of T tokens.
    loss_sum, denom = reduce_masked_segments(ce_bt, mask_bt, segment_ids_bt, token_weights_bt, normalize,
                                             num_segments=batch["tokens"].shape[1] + 1)
    return loss_sum, denom, {"num_tokens": jnp.sum(mask_bt, dtype=jnp.float32),
                             "num_weighted_tokens": jnp.sum(jnp.where(mask_bt, token_weights_bt, 0.0)),
                             "num_squared_weighted_tokens": jnp.sum(jnp.where(mask_bt, token_weights_bt**2, 0.0))}


def make_eval_fn(graphdef: nnx.GraphDef, batches: Sequence[Batch], normalize: str = "batch",
                 loss_chunk_size: int | str | None = "auto") -> Callable[[TrainState], dict[str, float]]:
    """``eval_fn(state) -> {"loss", "num_tokens"}``: the weighted SFT loss of
    ``state.params`` over ``batches`` (a held-out set), sums and denominators added over
    all batches before the one division, as the train step adds micro-batches; LoRA
    dropout is off."""
    loss_fn = sft_loss_fn(normalize, loss_chunk_size)
    sums = jax.jit(lambda params, batch: loss_fn(graphdef, params, batch, None))

    def eval_fn(state: TrainState) -> dict[str, float]:
        loss_sum = denom = tokens = 0.0
        for batch in batches:
            s, d, stats = jax.device_get(sums(state.params, batch))
            loss_sum, denom, tokens = loss_sum + float(s), denom + float(d), tokens + float(stats["num_tokens"])
        return {"loss": loss_sum / denom if denom else 0.0, "num_tokens": tokens}

    return eval_fn


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    num_micro_batches: int = 1,
    normalize: str = "batch",
    schedule_fn: Callable[[Any], jax.Array] | None = None,
    loss_chunk_size: int | str | None = "auto",
    loss_fn: LossFn | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build the jitted ``step_fn(state, batch, aux=None) -> (state, metrics)``; ``state``
    is donated.

    ``loss_fn`` (see ``LossFn``) defaults to the weighted SFT loss with ``normalize`` and
    ``loss_chunk_size`` (sequence positions per chunk of the LM head + loss, see
    ``resolve_loss_chunk_size``); ``aux`` is passed to it unchanged (e.g. the reference
    params of ``online_rl.pg_loss_fn``: a jit argument, never baked into the program).

    The batch's B rows are split into ``num_micro_batches`` micro-batches of B/M rows,
    scanned in order; gradients of the loss SUM and the (sum, denominator) pair are
    accumulated and divided once by the total denominator, so M micro-batches give
    the same update as one batch of B (only peak memory changes).

    metrics (float32 scalars): loss, grad_norm (before clipping), lr (``schedule_fn`` at
    this update; only if given), denominator, num_input_tokens (real tokens) and the
    loss's stats (summed over micro-batches).

    Only ``split_trainable(state.params)[0]`` trains (the LoRA adapters, if the model has
    any; then each micro-batch also carries a ``dropout_rng``, see the module docstring);
    the rest of ``state.params`` comes back unchanged.
    """
    m = num_micro_batches
    loss_fn = loss_fn or sft_loss_fn(normalize, loss_chunk_size)

    def micro_loss(trained, frozen, mb, aux):
        # tree.map rebuilds the Variables of frozen and aux (e.g. reference params) in
        # this trace: jax.grad passes non-differentiated arguments through as the same
        # objects, made in an outer trace, which nnx transforms inside the model (remat)
        # refuse to update.
        frozen, aux = jax.tree.map(lambda x: x, (frozen, aux))
        loss_sum, denom, stats = loss_fn(graphdef, nnx.merge_state(trained, frozen), mb, aux)
        return loss_sum, (denom, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)  # wrt the trained params only

    def step_fn(state: TrainState, batch: Batch, aux=None):
        b = batch["tokens"].shape[0]
        if b % m:
            raise ValueError(f"batch size {b} is not divisible by num_micro_batches={m}")
        micro = jax.tree.map(lambda x: x.reshape(m, b // m, *x.shape[1:]), batch)
        trained, frozen = split_trainable(state.params)
        if jax.tree.leaves(frozen):  # adapters: a dropout key per (step, micro-batch)
            step_rng = jax.random.fold_in(state.rng, state.step)
            micro = {**micro, "dropout_rng": jax.vmap(lambda i: jax.random.fold_in(step_rng, i))(jnp.arange(m))}

        def accumulate(carry, mb):
            (loss_sum, (denom, stats)), grads = grad_fn(trained, frozen, mb, aux)
            return jax.tree.map(jnp.add, carry, (grads, loss_sum, denom, stats)), None

        zero = jnp.zeros((), jnp.float32)
        # The stats' structure, without running the loss (every input passed explicitly:
        # nnx may not mutate variables of an outer trace).
        stats_shape = jax.eval_shape(lambda t, f, mb, a: micro_loss(t, f, mb, a)[1][1],
                                     trained, frozen, jax.tree.map(lambda x: x[0], micro), aux)
        init = (jax.tree.map(jnp.zeros_like, trained), zero, zero,
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape))
        (grads, loss_sum, denom, stats), _ = jax.lax.scan(accumulate, init, micro)

        # d(sum/denom) = d(sum)/denom: the denominator does not depend on the params.
        inv_denom = mean_loss(jnp.float32(1.0), denom)  # 1 / denom, or 0 if no tokens
        grads = jax.tree.map(lambda g: g * inv_denom.astype(g.dtype), grads)
        updates, opt_state = tx.update(grads, state.opt_state, trained)
        params = nnx.merge_state(optax.apply_updates(trained, updates), frozen)
        metrics = {
            "loss": mean_loss(loss_sum, denom),
            "grad_norm": optax.tree.norm(grads),
            "denominator": denom,
            "num_input_tokens": jnp.sum(batch["valid"]).astype(jnp.float32),
            **stats,
        }
        if "num_squared_weighted_tokens" in stats:  # the weighted SFT loss
            metrics["ess_fraction"] = effective_fraction(
                stats["num_tokens"], stats["num_weighted_tokens"], stats["num_squared_weighted_tokens"])
        if schedule_fn is not None:
            metrics["lr"] = jnp.asarray(schedule_fn(state.step), jnp.float32)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=0)


def checkpoint_view(state: TrainState) -> TrainState:
    """What ``train_loop`` checkpoints: ``state`` with params cut to the trained ones (the
    whole state without adapters; with them, the adapters and not the frozen base)."""
    return state.replace(params=split_trainable(state.params)[0])


def restore_checkpoint(checkpointer, state: TrainState, step: int | None = None) -> TrainState:
    """``state`` with the trained params, optimizer state, step and rng of checkpoint
    ``step`` (default: the latest) written by ``train_loop``; frozen params are kept from
    ``state`` (concrete, not abstract, when the model has adapters)."""
    trained, frozen = split_trainable(state.params)
    restored = checkpointer.restore(state.replace(params=trained), step)
    return restored.replace(params=nnx.merge_state(restored.params, frozen))


def _keep_metrics_upto(metrics_path: str, step: int) -> None:
    """Drop metrics lines past ``step`` (the restored checkpoint): those updates are
    redone, and a resumed run must not log them twice."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(metrics_path, "w") as f:
        f.writelines(lines)


def train_loop(
    state: TrainState,
    step_fn: Callable[..., tuple[TrainState, dict]],
    batch_fn: Callable[[int, TrainState], Batch | tuple[Batch, dict]],
    num_steps: int,
    *,
    aux: Any = None,
    checkpointer=None,
    metrics_path: str | None = None,
    desc: str = "train",
    log_every: int = 1,
    progress: bool = True,
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
    eval_every: int = 0,
    tensorboard_dir: str | None = None,
) -> TrainState:
    """Run updates until ``state.step == num_steps`` (a total, not an increment).

    If ``checkpointer`` (a ``drift_jax.training.checkpoint.Checkpointer``) holds a step newer
    than ``state.step``, training resumes from it; ``batch_fn(step, state)`` must be
    deterministic in ``step`` (and, for on-policy data, the state) so the resumed run
    sees the same data. It returns a batch, or ``(batch, info)`` whose host-side numbers
    are logged with the step. ``aux`` is passed to every ``step_fn`` call.

    Every ``log_every`` updates, one JSON line goes to ``metrics_path``: step (updates
    done), the step's metrics and info, batch_s (making the batch), step_time_s (the
    update), tokens_per_s (real input tokens per step second) and wall_time (unix
    seconds); lines past the step training starts from are dropped first. Every
    ``eval_every`` updates and after the last, ``eval_fn(state)``'s numbers join the line
    as ``eval_<name>`` (a held-out loss, ``make_eval_fn``). With ``tensorboard_dir``,
    every number of each line also goes to TensorBoard event files there (tag = key,
    step = updates done); a resumed run discards the events past its start step. The
    checkpointer saves on its own interval and once at the end (every process calls it:
    Orbax saves collectively); in a multi-process job only process 0 writes the metrics
    and TensorBoard files. Raises
    FloatingPointError at the first non-finite loss or gradient norm, before that step
    is saved: the last checkpoint stays a good one.
    """
    if checkpointer is not None:
        latest = checkpointer.latest_step()
        if latest is not None and latest > int(state.step):
            state = restore_checkpoint(checkpointer, state, latest)
    start = int(state.step)
    # Multi-process: every process computes each line (the held-out eval is a collective
    # on the mesh) and process 0 alone writes it.
    writer = distributed.is_main()
    if metrics_path and writer:
        _keep_metrics_upto(metrics_path, start)
    log_cm = open(metrics_path, "a") if metrics_path and writer else contextlib.nullcontext()
    board = None
    if tensorboard_dir and writer:
        from tensorboardX import SummaryWriter  # lazy: only training that asks for it

        board = SummaryWriter(tensorboard_dir, purge_step=start or None)
    bar_cm = tqdm(total=num_steps, initial=start, desc=desc, dynamic_ncols=True, disable=not progress)
    with log_cm as log_file, bar_cm as bar:
        for step in range(start, num_steps):
            t0 = time.perf_counter()
            batch = batch_fn(step, state)
            batch, info = batch if isinstance(batch, tuple) else (batch, {})
            t1 = time.perf_counter()
            state, metrics = step_fn(state, batch, aux)
            # Fetching the metrics waits for the step: the NaN check must precede
            # any save, and the step time must be the device's, not dispatch's.
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            step_time = time.perf_counter() - t1
            done = step + 1
            # A finite loss with non-finite gradients has already poisoned the params.
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                last = checkpointer.latest_step() if checkpointer is not None else None
                raise FloatingPointError(
                    f"non-finite loss {metrics['loss']} / grad_norm {metrics['grad_norm']} "
                    f"at step {done} (batch_fn({step})); last checkpoint: step {last}. "
                    "Check that batch's weights and tokens, or lower the learning rate."
                )
            if metrics_path and (done % log_every == 0 or done == num_steps):
                record = {"step": done, **metrics, **info, "batch_s": t1 - t0, "step_time_s": step_time,
                          "tokens_per_s": metrics["num_input_tokens"] / step_time, "wall_time": time.time()}
                if eval_fn is not None and (done == num_steps or (eval_every and done % eval_every == 0)):
                    record.update({f"eval_{k}": v for k, v in eval_fn(state).items()})
                if board is not None:
                    for key, value in record.items():
                        if key not in ("step", "wall_time") and isinstance(value, (int, float)):
                            board.add_scalar(key, value, done, walltime=record["wall_time"])
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
            if checkpointer is not None:
                checkpointer.save(done, checkpoint_view(state))
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', math.nan):.2e}")
    if board is not None:
        board.close()
    if checkpointer is not None:
        checkpointer.save(int(state.step), checkpoint_view(state), force=True)
    return state
