"""Device meshes and parameter shardings from the model's logical axis names.

Every parameter carries logical axes ("vocab", "embed", "heads", "kv_heads", "mlp",
"norm"); ``LOGICAL_RULES`` maps them onto mesh axes ``data`` / ``fsdp`` / ``tensor``.
Parallelism is then a config change: the same jitted train step and sampler run on any
mesh, with XLA inserting the collectives.

``training.sharded_state`` puts a train state on a mesh with these shardings; batches go
with ``shard_batch``, their rows split over ``data`` x ``fsdp``.
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
