"""Multi-host start: one JAX process per host (TPU pod) or per host/GPU (GPU cluster).

Call ``initialize_from_env()`` first thing, before any JAX computation or device query:
with several processes it runs ``jax.distributed.initialize`` so that ``jax.devices()``
lists every chip of the job and one mesh (``drift_jax.sharding.make_mesh``) spans them;
with one process it does nothing. Every process then runs the same program
(single-program multi-data): same config, same seed, same ``batch_fn``; ``shard_batch``
and ``create_sharded_train_state`` make each process touch only its own devices' shards.

How the job is recognised (first match wins):
  1. Explicit: ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES=N`` and
     ``JAX_PROCESS_ID=i`` (0 on the coordinator host). Works anywhere, e.g. a GPU
     cluster started by hand or by a launcher that sets them. ``JAX_LOCAL_DEVICE_IDS``
     (read by JAX itself) restricts a process to some local GPUs.
  2. SLURM (``SLURM_NTASKS`` > 1) or Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1): JAX reads
     the coordinator, the process count and the rank from the launcher's variables.
  3. A Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES`` lists more than one host, or
     ``MEGASCALE_NUM_SLICES`` > 1): JAX reads the worker list from the TPU environment.
  4. ``DRIFT_DISTRIBUTED=1``: call ``jax.distributed.initialize()`` and let JAX detect the
     cluster itself (e.g. a TPU VM whose metadata, not its environment, names the hosts).
``DRIFT_DISTRIBUTED=0`` disables all of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax


def _int(env: Mapping[str, str], name: str, default: int = 1) -> int:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect(env: Mapping[str, str] | None = None) -> dict | None:
    """How this process should join a multi-process job, from ``env`` (default
    ``os.environ``): None for a single process, else the keyword arguments for
    ``jax.distributed.initialize`` ({} = let JAX detect the cluster itself)."""
    env = os.environ if env is None else env
    if env.get("DRIFT_DISTRIBUTED") == "0":
        return None
    if env.get("JAX_COORDINATOR_ADDRESS") and "JAX_NUM_PROCESSES" in env:
        num_processes = _int(env, "JAX_NUM_PROCESSES")
        if num_processes < 1:
            raise ValueError(f"JAX_NUM_PROCESSES={num_processes} must be >= 1")
        if num_processes == 1:
            return None
        if "JAX_PROCESS_ID" not in env:
            raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but JAX_PROCESS_ID "
                             "is not: set it to this process's rank, 0 .. JAX_NUM_PROCESSES - 1")
        process_id = _int(env, "JAX_PROCESS_ID")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"JAX_PROCESS_ID={process_id} is not in [0, JAX_NUM_PROCESSES={num_processes})")
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": num_processes,
                "process_id": process_id}
    if _int(env, "SLURM_NTASKS") > 1 or _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return {}
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or _int(env, "MEGASCALE_NUM_SLICES") > 1:
        return {}
    if env.get("DRIFT_DISTRIBUTED") == "1":
        return {}
    return None


def initialize_from_env(env: Mapping[str, str] | None = None) -> bool:
    """Join the multi-process job described by the environment (see the module doc).

    Returns True if this process is part of a multi-process JAX job (initialised now or
    before), False for a single process, where it does nothing. Must run before any
    other JAX call touches the devices.
    """
    if jax.distributed.is_initialized():
        return True
    kwargs = detect(env)
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    return True
