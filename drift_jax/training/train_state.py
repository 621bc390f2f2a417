"""The train state: AdamW with its schedule, the ``TrainState`` a resumed run needs, and
what in it trains.

LoRA: for a model with adapters (``drift_jax.models.lora``) only the ``nnx.LoRAParam``
leaves train (``split_trainable``): gradients and optimizer state cover the adapters
alone, the frozen base passes through the step bit for bit, and checkpoints hold the
adapters, their optimizer state, step and rng (the base comes from the model the run
starts from).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


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


def init_train_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh ``TrainState`` of ``params``: the optimizer initialised over the trained ones,
    step 0 and the key of ``seed``."""
    return TrainState(
        params=params,
        opt_state=tx.init(split_trainable(params)[0]),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key(seed),
    )


def model_params(model: nnx.Module, who: str) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, Param state) of ``model``; raises, naming ``who``, if it holds other state."""
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
    graphdef, params = model_params(model, "create_train_state")
    # Commit the state to a device: a restored checkpoint is committed too, and jit keys
    # its cache on committedness, so a fresh and a restored state share one compile.
    return graphdef, jax.device_put(init_train_state(params, tx, seed), jax.local_devices()[0])


def abstract_train_state(
    make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, seed: int = 0
) -> TrainState:
    """``create_train_state(make_model(), tx, seed)[1]`` as ``jax.ShapeDtypeStruct``
    leaves: shapes and dtypes with nothing allocated (for ``state_summary`` of models too
    big for this host, or as a checkpoint's restore target)."""
    return jax.eval_shape(lambda: init_train_state(model_params(make_model(), "abstract_train_state")[1], tx, seed))


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
