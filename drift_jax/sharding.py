"""Device meshes and parameter shardings from the model's logical axis names.

Every parameter carries logical axes ("vocab", "embed", "heads", "kv_heads", "mlp",
"norm"); ``LOGICAL_RULES`` maps them onto mesh axes ``data`` / ``fsdp`` / ``tensor``.
Parallelism is then a config change: the same jitted train step and sampler run on any
mesh, with XLA inserting the collectives.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

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


def shard_train_state(state, tx, mesh, rules=LOGICAL_RULES):
    """Place a ``TrainState`` on ``mesh``: params by their logical axes, the optimizer
    state re-initialised from them (so its moments inherit the same shardings), scalars
    replicated."""
    params = jax.device_put(state.params, param_shardings(state.params, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())

    def like(value, fresh):
        # Moments shaped like a param got its sharding from tx.init; counters and other
        # scalars are replicated.
        target = fresh.sharding if isinstance(fresh.sharding, NamedSharding) else replicated
        return jax.device_put(value, target)

    return state.replace(
        params=params,
        opt_state=jax.tree.map(like, state.opt_state, tx.init(params)),
        step=jax.device_put(state.step, replicated),
        rng=jax.device_put(state.rng, replicated),
    )


def shard_batch(batch: dict, mesh) -> dict:
    return jax.device_put(batch, batch_sharding(mesh))
