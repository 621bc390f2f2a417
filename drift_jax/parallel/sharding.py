"""Device meshes and parameter shardings from the model's logical axis names.

Every parameter carries logical axes ("vocab", "embed", "heads", "kv_heads", "mlp",
"norm"); ``LOGICAL_RULES`` maps them onto mesh axes ``data`` / ``fsdp`` / ``tensor``.
Parallelism is then a config change: the same jitted train step and sampler run on any
mesh, with XLA inserting the collectives.

Two ways to a sharded ``TrainState``: ``shard_train_state`` moves a state built on one
device onto the mesh (a model that fits one device; with several processes each copies
in its own devices' slices, ``to_mesh``);
``create_sharded_train_state`` builds it inside one jitted program whose outputs are
already sharded, so no device (and no host) ever holds the whole model: the way for
multi-host runs (see ``drift_jax.parallel.distributed``) and big models.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from drift_jax.training.train import TrainState, split_trainable

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the model dimension of every matrix; tensor parallelism splits heads,
# the MLP hidden dimension and the vocabulary.
LOGICAL_RULES = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``data * fsdp * tensor`` devices."""
    devices = jax.devices() if devices is None else devices
    n = data * fsdp * tensor
    if n > len(devices):
        raise ValueError(f"mesh {data}x{fsdp}x{tensor} needs {n} devices, found {len(devices)}")
    return jax.sharding.Mesh(np.asarray(devices[:n]).reshape(data, fsdp, tensor), MESH_AXES)


def logical_to_mesh(spec: PartitionSpec, rules=LOGICAL_RULES) -> PartitionSpec:
    return PartitionSpec(*(rules.get(name) if name is not None else None for name in spec))


def param_shardings(params: nnx.State, mesh, rules=LOGICAL_RULES):
    """A pytree like ``params`` of ``NamedSharding``s from the Params' logical axes."""
    specs = nnx.get_partition_spec(params)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_mesh(spec, rules)),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh) -> NamedSharding:
    """Rows of a batch split over the ``data`` and ``fsdp`` axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def to_mesh(value, sharding: NamedSharding):
    """``jax.device_put(value, sharding)``, also when ``sharding`` spans other processes'
    devices: there a device_put of a local array would be a cross-host transfer, which
    most backends lack. Every process holds the same value (same seed, same program), so
    each copies in just the slices of its own devices from a host copy. Typed PRNG keys
    travel as their key data."""
    if jax.process_count() == 1 or sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = to_mesh(jax.random.key_data(value), NamedSharding(sharding.mesh, PartitionSpec()))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


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
        state = TrainState(params=params, opt_state=tx.init(split_trainable(params)[0]), step=jnp.zeros((), jnp.int32),
                           rng=jax.random.key(seed))
        return jax.lax.with_sharding_constraint(state, shardings)

    return graphdef, init()


def shard_batch(batch: dict, mesh) -> dict:
    """Place a host batch (the same numpy arrays on every process) with its rows split
    over ``data`` x ``fsdp``; each process copies only the rows of its own devices."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, batch)
