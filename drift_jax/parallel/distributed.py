"""Multi-host start: one JAX process per host (TPU pod) or per host/GPU (GPU cluster).

Call ``initialize_from_env()`` first thing, before any JAX computation or device query:
with several processes it runs ``jax.distributed.initialize`` so that ``jax.devices()``
lists every chip of the job and one mesh (``drift_jax.parallel.sharding.make_mesh``) spans them;
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

Sampling does not use the cross-process mesh: each process plays its own shard of the
prompts (``shard_range``) on its first local device into its own part file (``part_path``),
and process 0 merges the parts. The processes wait for each other through JAX's
coordination service: ``barrier``, ``agree`` (process 0 decides, e.g. whether a stage is
done, and every process gets the answer) and ``gather``; ``is_main`` gates the writes of
shared files. Every helper is a no-op, or the obvious value, for a single process.
"""

from __future__ import annotations

import json
import os
import time
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


# -- the processes of a job: who am I, waiting for each other, sharing small values -------
#
# Every process runs every stage (SPMD). Sampling is embarrassingly parallel, so each
# process plays its own contiguous shard of the prompts on its first local device and writes
# a part file; process 0 alone writes the shared outputs (merged files, the ledger,
# reports). The processes meet through JAX's coordination service (the one
# ``jax.distributed.initialize`` started): barriers, and its key-value store for small
# values such as process 0's decision to skip a stage. Nothing here polls the file
# system, which on a cluster may be a network file system with stale reads.
# With one process every helper is a no-op (or the obvious value), so the single-process
# code path is the multi-process one with P = 1.

# How long a process waits for the others at a barrier or for a value (seconds). Stages
# end at different times on different hosts (rollouts of a real model can take hours),
# so the default is long; tests set it short, so a dead peer fails them fast.
BARRIER_TIMEOUT_ENV = "DRIFT_BARRIER_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 24 * 3600

_counters: dict[str, int] = {}


def process_index() -> int:
    """This process's rank, 0 .. process_count() - 1 (0 for a single process)."""
    return jax.process_index()


def process_count() -> int:
    """How many processes the job has (1 without ``jax.distributed``)."""
    return jax.process_count()


def is_main() -> bool:
    """Whether this process writes the job's shared outputs (process 0)."""
    return process_index() == 0


def timeout_s(env: Mapping[str, str] | None = None) -> float:
    """The barrier / key-value wait limit, from ``DRIFT_BARRIER_TIMEOUT_S`` (default 24 h)."""
    env = os.environ if env is None else env
    value = env.get(BARRIER_TIMEOUT_ENV)
    if value in (None, ""):
        return _DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{BARRIER_TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{BARRIER_TIMEOUT_ENV}={value!r} must be > 0")
    return seconds


def shard_range(n: int, num_shards: int, index: int, align: int = 1) -> tuple[int, int]:
    """The items ``[start, stop)`` of ``range(n)`` that shard ``index`` of ``num_shards``
    owns: contiguous, in whole blocks of ``align`` items (the last block may be short),
    the blocks spread as evenly as possible, earlier shards taking fewer when they do not
    divide. Contiguity makes the merge a concatenation in shard order; block alignment
    (``align`` = the rollout chunk size) makes every chunk a shard plays the same chunk,
    hence the same numbers, as a single process's. A shard may be empty."""
    if n < 0 or align < 1 or num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"shard_range(n={n}, num_shards={num_shards}, index={index}, align={align}): "
                         "need n >= 0, align >= 1 and 0 <= index < num_shards")
    blocks = -(-n // align)
    first, last = blocks * index // num_shards, blocks * (index + 1) // num_shards
    return min(n, first * align), min(n, last * align)


def part_path(path: str, index: int | None = None, count: int | None = None) -> str:
    """Where process ``index`` of ``count`` (default: this one) writes its part of
    ``path``: ``<path>.parts/<index>-of-<count><ext>``. The count is in the name, so a
    rerun with another process count never resumes a part sharded differently."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    ext = os.path.splitext(path)[1]
    return os.path.join(f"{path}.parts", f"{index:05d}-of-{count:05d}{ext}")


def _client():
    from jax._src import distributed as jax_distributed  # the coordination service's client

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised, but jax.process_count() > 1")
    return client


def _unique(name: str) -> str:
    """``name`` numbered by how often this process used it: every process makes the
    same calls in the same order, so the n-th barrier called ``name`` is the same one
    everywhere, and the coordination service never sees an id twice."""
    _counters[name] = _counters.get(name, 0) + 1
    return f"drift/{name}/{_counters[name]}"


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier ``name`` (no-op for one process).

    Raises (after ``DRIFT_BARRIER_TIMEOUT_S``) naming the barrier when a process does
    not come: it died, or took another path through the stages."""
    if process_count() == 1:
        return
    key, limit = _unique(name), timeout_s()
    try:
        _client().wait_at_barrier(key, timeout_in_ms=int(limit * 1000))
    except Exception as e:  # the runtime's error names only the id
        raise RuntimeError(f"process {process_index()}: not every process of {process_count()} reached "
                           f"barrier {key!r} within {limit:.0f} s ({BARRIER_TIMEOUT_ENV}); a peer died "
                           f"or diverged: {e}") from e


def _get(client, key: str, limit: float) -> str:
    try:
        return client.blocking_key_value_get(key, int(limit * 1000))
    except Exception as e:
        raise RuntimeError(f"process {process_index()}: no value for {key!r} within {limit:.0f} s "
                           f"({BARRIER_TIMEOUT_ENV}); a peer died or diverged: {e}") from e


def agree(name: str, decide):
    """``decide()`` run on process 0 only, its (JSON-serialisable) result returned on
    every process. For decisions that read or change shared files (the ledger: skip a
    stage or run it, move stale outputs aside): one process decides and acts, so the
    processes cannot disagree, and the others wait until it has acted."""
    if process_count() == 1:
        return decide()
    key = _unique(f"agree/{name}")
    client = _client()
    if is_main():
        try:
            value = decide()
        except BaseException as e:  # tell the others, rather than leave them waiting
            client.key_value_set(key, json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        client.key_value_set(key, json.dumps({"value": value}))
        return value
    out = json.loads(_get(client, key, timeout_s()))
    if "error" in out:
        raise RuntimeError(f"process 0 failed at {name!r}: {out['error']}")
    return out["value"]


def gather(name: str, value) -> list:
    """Every process's ``value`` (JSON-serialisable), in process order, on every
    process: e.g. how many groups each one resumed."""
    if process_count() == 1:
        return [value]
    key = _unique(f"gather/{name}")
    client, limit = _client(), timeout_s()
    client.key_value_set(f"{key}/{process_index()}", json.dumps(value))
    deadline = time.monotonic() + limit
    return [json.loads(_get(client, f"{key}/{i}", max(1.0, deadline - time.monotonic())))
            for i in range(process_count())]
