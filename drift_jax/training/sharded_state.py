"""A ``TrainState`` on a device mesh, its parameters sharded by their logical axes
(``parallel.sharding``'s rules).

Three ways there: ``shard_train_state`` moves a state built on one device onto the mesh (a
model that fits one device; with several processes each copies in its own devices'
slices, ``sharding.to_mesh``); ``shard_model`` moves a loaded model's params onto the
mesh, freeing their first copies, and makes the optimizer state there, so no device holds
more than the model once besides its shard of the state; ``create_sharded_train_state``
builds it inside one jitted program whose outputs are already sharded, so no device (and
no host) ever holds the whole model: the way for multi-host runs (see
``drift_jax.parallel.distributed``) and big models.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from drift_jax.parallel.sharding import LOGICAL_RULES, param_shardings, to_mesh
from drift_jax.training.train_state import TrainState, init_train_state, model_params, split_trainable


def shard_train_state(state, tx, mesh, rules=LOGICAL_RULES):
    """Place a ``TrainState`` on ``mesh``: params by their logical axes, the optimizer
    state re-initialised from them (so its moments inherit the same shardings), scalars
    replicated. Multi-process, every process calls it with the same ``state``
    (``to_mesh``)."""
    params = jax.tree.map(to_mesh, state.params, param_shardings(state.params, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())

    def like(value, fresh):
        # Moments shaped like a param got its sharding from tx.init; counters and other
        # scalars are replicated.
        target = fresh.sharding if isinstance(fresh.sharding, NamedSharding) else replicated
        return to_mesh(value, target)

    return state.replace(
        params=params,
        # The optimizer covers the trained params only (the adapters, under LoRA).
        opt_state=jax.tree.map(like, state.opt_state, tx.init(split_trainable(params)[0])),
        step=to_mesh(state.step, replicated),
        rng=to_mesh(state.rng, replicated),
    )


def _buffers(array: jax.Array) -> set[int]:
    return {shard.data.unsafe_buffer_pointer() for shard in array.addressable_shards}


def move_to_mesh(value, sharding: NamedSharding):
    """``to_mesh(value, sharding)`` that gives ``value`` up: its buffers are deleted once
    copied (unless the moved array reuses them), so their memory is free as each array
    moves; whatever else held ``value`` (the model it came from) holds a deleted array."""
    moved = to_mesh(value, sharding)
    if isinstance(value, jax.Array) and not value.is_deleted() and not _buffers(value) & _buffers(moved):
        value.delete()
    return moved


def shard_model(model: nnx.Module, tx: optax.GradientTransformation, mesh, seed: int = 0,
                rules=LOGICAL_RULES) -> tuple[nnx.GraphDef, TrainState]:
    """``shard_train_state(create_train_state(model, tx, seed)[1], tx, mesh)`` without
    the unsharded state: ``model``'s params move onto ``mesh`` by their logical axes
    (``move_to_mesh``: their first copies are freed, so ``model`` is consumed and must
    not be used afterwards), and the optimizer state is made from the moved params (its
    moments take their shardings); step and rng replicated. A float32 model loaded on
    one device then costs that device the model once, not the model plus a whole
    optimizer state, and nothing of it stays referenced during training."""
    graphdef, params = model_params(model, "shard_model")
    params = jax.tree.map(move_to_mesh, params, param_shardings(params, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    fresh = init_train_state(params, tx, seed)

    def on_mesh(value):
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return value
        return to_mesh(value, replicated)  # counters, step, rng

    return graphdef, fresh.replace(opt_state=jax.tree.map(on_mesh, fresh.opt_state),
                                   step=on_mesh(fresh.step), rng=on_mesh(fresh.rng))


def create_sharded_train_state(
    make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh, seed: int = 0,
    rules=LOGICAL_RULES,
) -> tuple[nnx.GraphDef, TrainState]:
    """``create_train_state(make_model(), tx, seed)``, built directly on ``mesh``.

    The model is traced abstractly for its shapes and logical axes; then one jitted
    program initialises the parameters and the optimizer state with ``out_shardings``
    from the rules, so each device materialises only its own shards (random init is
    partitionable: the values equal an unsharded init's). Optimizer moments take their
    parameter's sharding, counters are replicated. Every process calls it the same way.
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"create_sharded_train_state supports models whose only state is nnx.Param; found {rest}")
    params_sharding = param_shardings(abstract_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sharding = optax.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, split_trainable(abstract_params)[0]),
        split_trainable(params_sharding)[0], transform_non_params=lambda _: replicated,
    )
    shardings = TrainState(params=params_sharding, opt_state=opt_sharding, step=replicated, rng=replicated)

    @jax.jit
    def init() -> TrainState:
        params = nnx.state(make_model(), nnx.Param)
        return jax.lax.with_sharding_constraint(init_train_state(params, tx, seed), shardings)

    return graphdef, init()
