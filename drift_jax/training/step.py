"""The jitted train step: one accumulating update of any ``objective.LossFn`` (weighted
SFT by default; online RL's policy-gradient loss plugs in the same way), and the
held-out eval of the SFT loss.

Device work is one jitted ``step_fn(state, batch, aux)``; the model is rebuilt inside it
from ``(graphdef, params)`` so the weights are a jit argument (donated, never baked into
the HLO). Batches are ``objective``'s.

LoRA: only the adapters train (``train_state.split_trainable``). The step then adds
``dropout_rng`` (a key: ``state.rng`` folded with the step and the micro-batch, so a
resumed run draws the same masks) to each micro-batch for the adapters' dropout.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from drift_jax.training.losses import mean_loss
from drift_jax.training.objective import Batch, LossFn, effective_fraction, sft_loss_fn
from drift_jax.training.train_state import TrainState, split_trainable


def check_micro_batches(rows: int, num_micro_batches: int) -> None:
    """Raise unless ``num_micro_batches`` (>= 1) divides a batch of ``rows`` rows."""
    if num_micro_batches < 1 or rows % num_micro_batches:
        raise ValueError(f"batch size {rows} is not divisible by num_micro_batches={num_micro_batches}")


def split_micro_batches(batch: Batch, num_micro_batches: int) -> Batch:
    """``batch`` with each array's rows ``[B, ...]`` as ``[M, B/M, ...]``: ``M``
    micro-batches for a scan, micro-batch j holding rows j, j + M, j + 2M, ... On a mesh
    the rows are sharded in contiguous blocks, so strided micro-batches spread over every
    device; consecutive ones would each sit on one device and be gathered to all (a
    micro-batch's activations whole on every chip). Raises if M does not divide B."""
    b, m = batch["tokens"].shape[0], num_micro_batches
    check_micro_batches(b, m)
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(b // m, m, *x.shape[1:]), 0, 1), batch)


def eval_sums_fn(graphdef: nnx.GraphDef, num_micro_batches: int = 1, loss_denominator: str = "batch",
                 loss_chunk_size: int | str | None = "auto") -> Callable:
    """The jitted ``sums(params, batch) -> (loss_sum, denominator, num_tokens)`` of the
    weighted SFT loss (float32 scalars): the batch's rows in ``num_micro_batches``
    micro-batches (``split_micro_batches``), scanned, their sums added; so peak memory is one
    micro-batch's forward, as in the train step. LoRA dropout is off."""
    loss_fn = sft_loss_fn(loss_denominator, loss_chunk_size)

    def sums(params, batch):
        def add(carry, mb):
            # Variables rebuilt in the scan's trace: nnx transforms inside the model
            # (remat) refuse to update ones made in an outer trace.
            loss_sum, denom, stats = loss_fn(graphdef, jax.tree.map(lambda x: x, params), mb, None)
            return jax.tree.map(jnp.add, carry, (loss_sum, denom, stats["num_tokens"])), None

        zero = jnp.zeros((), jnp.float32)
        return jax.lax.scan(add, (zero, zero, zero), split_micro_batches(batch, num_micro_batches))[0]

    return jax.jit(sums)


def make_eval_fn(graphdef: nnx.GraphDef, batches: Sequence[Batch], loss_denominator: str = "batch",
                 loss_chunk_size: int | str | None = "auto",
                 num_micro_batches: int = 1) -> Callable[[TrainState], dict[str, float]]:
    """``eval_fn(state) -> {"loss", "num_tokens"}``: the weighted SFT loss of
    ``state.params`` over ``batches`` (a held-out set), sums and denominators added over
    all batches and their micro-batches (``eval_sums_fn``: each batch's rows in
    ``num_micro_batches`` parts, the train step's) before the one division, as the train
    step adds micro-batches; LoRA dropout is off."""
    for batch in batches:  # now, not at the first evaluation hours into a run
        check_micro_batches(batch["tokens"].shape[0], num_micro_batches)
    sums = eval_sums_fn(graphdef, num_micro_batches, loss_denominator, loss_chunk_size)

    def eval_fn(state: TrainState) -> dict[str, float]:
        loss_sum = denom = tokens = 0.0
        for batch in batches:
            s, d, n = jax.device_get(sums(state.params, batch))
            loss_sum, denom, tokens = loss_sum + float(s), denom + float(d), tokens + float(n)
        return {"loss": loss_sum / denom if denom else 0.0, "num_tokens": tokens}

    return eval_fn


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    num_micro_batches: int = 1,
    loss_denominator: str = "batch",
    schedule_fn: Callable[[Any], jax.Array] | None = None,
    loss_chunk_size: int | str | None = "auto",
    loss_fn: LossFn | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build the jitted ``step_fn(state, batch, aux=None) -> (state, metrics)``; ``state``
    is donated.

    ``loss_fn`` (see ``objective.LossFn``) defaults to the weighted SFT loss
    (``objective.sft_loss_fn``) with ``loss_denominator`` (``losses.reduce_masked``) and
    ``loss_chunk_size`` (sequence positions per chunk of the LM head + loss, see
    ``objective.resolve_loss_chunk_size``); ``aux`` is passed to it unchanged (e.g. the
    reference params of ``policy_gradient.pg_loss_fn``: a jit argument, never baked into
    the program).

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
    loss_fn = loss_fn or sft_loss_fn(loss_denominator, loss_chunk_size)

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
        micro = split_micro_batches(batch, m)
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
