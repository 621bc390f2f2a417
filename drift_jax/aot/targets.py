"""Accelerators to compile for without one: each target's compile-only devices, memory and
peaks, and the attention kernels a run on it would pick.

XLA compiles a JAX program for a GPU or a TPU topology on a CPU-only host (JAX's
``jax.experimental.topologies``): for CUDA from a ``GpuTargetConfigProto`` text (the
H100 SXM spec below is XLA's own, ``xla/backends/gpu/target_config/specs/h100_sxm.txtpb``,
Apache 2.0, without the field ``collective_memory_granularity`` that jaxlib 0.10's XLA
does not know), for TPU from a topology name that libtpu knows. The CUDA plugin
(``jax-cuda13-plugin``) or libtpu must be installed (``requirements-aot.txt``); run with
``JAX_PLATFORMS=cpu`` so that no process tries to open a device.

Peaks are vendor figures (dense bf16 FLOP/s, HBM bytes/s). Memory: a GPU process of JAX
preallocates ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the device's memory (0.75 by
default) and every program must fit in that pool; a TPU program may use the HBM libtpu
reports as available, a quarter GiB short of the chip's (its ``RESOURCE_EXHAUSTED``
errors name 15.75G on a 16 GiB v5e chip and 31.25G on a 32 GiB v6e chip), so
``memory_fraction`` is that share.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import re
from unittest import mock

SPECS = pathlib.Path(__file__).resolve().parent / "specs"
GIB = 2**30
GPU_MEMORY_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default
TPU_RESERVED_BYTES = GIB // 4


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator setup to compile for.

    name: the report's name ("h100", "v5e-8"). platform: "gpu" or "tpu". topology: the
    topology string of ``get_topology_desc`` ("1x1x1": one GPU; "v5e:2x4": 8 v5e chips).
    num_devices, num_hosts: the topology's chips and the processes a run of it has.
    device_memory_bytes: one device's memory. memory_fraction: the share of it a
    program may use (module docstring). peak_flops: dense bf16 FLOP/s of one device.
    hbm_bytes_per_s: its memory bandwidth. spec_changes: ``GpuTargetConfigProto`` fields
    replaced in the H100 spec (a GPU of the same chip with other memory).
    """

    name: str
    platform: str
    topology: str
    num_devices: int
    num_hosts: int
    device_memory_bytes: int
    memory_fraction: float
    peak_flops: float
    hbm_bytes_per_s: float
    spec_changes: tuple[tuple[str, int], ...] = ()

    @property
    def memory_budget_bytes(self) -> int:
        """Bytes a program may use on one device."""
        return int(self.device_memory_bytes * self.memory_fraction)

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "spec_changes"} | {
            "memory_budget_bytes": self.memory_budget_bytes}


_H100_MEMORY = 84_942_979_072  # the spec's device_memory_size (cudaMemGetInfo's total)
_H200_MEMORY = 143_771 * 2**20  # nvidia-smi's total of an H200 SXM (141 GB HBM3e)
_TPU = {  # chip: (HBM bytes, bf16 FLOP/s, HBM bytes/s)
    "v5e": (16 * GIB, 197e12, 819e9),
    "v6e": (32 * GIB, 918e12, 1640e9),
}


def _tpu(name: str, topology: str, num_devices: int, num_hosts: int) -> Target:
    memory, flops, bandwidth = _TPU[topology.split(":")[0]]
    return Target(name, "tpu", topology, num_devices, num_hosts, memory, (memory - TPU_RESERVED_BYTES) / memory,
                  flops, bandwidth)


TARGETS: dict[str, Target] = {
    "h100": Target("h100", "gpu", "1x1x1", 1, 1, _H100_MEMORY, GPU_MEMORY_FRACTION, 989e12, 3.35e12),
    "h200": Target("h200", "gpu", "1x1x1", 1, 1, _H200_MEMORY, GPU_MEMORY_FRACTION, 989e12, 4.8e12,
                   spec_changes=(("device_memory_size", _H200_MEMORY), ("memory_bandwidth", 4_800_000_000_000))),
    "v5e-8": _tpu("v5e-8", "v5e:2x4", 8, 2),
    "v6e-8": _tpu("v6e-8", "v6e:2x4", 8, 2),
    # Four hosts of four chips: a multi-host program compiles as one.
    "v5e-16": _tpu("v5e-16", "v5e:4x4", 16, 4),
    # Four chips on one host: the CI compile test's TPU (v5e), and benchmarks/engine_aot.py's.
    "v5e-4": _tpu("v5e-4", "v5e:2x2", 4, 1),
    "v6e-4": _tpu("v6e-4", "v6e:2x2", 4, 1),
}


def get(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown AOT target {name!r}; known: {sorted(TARGETS)}") from None


def missing_backend(target: Target) -> str | None:
    """Why ``target`` cannot be compiled for here (its plugin is not installed), or None."""
    module = "jax_plugins.xla_cuda13" if target.platform == "gpu" else "libtpu"
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return None
    what = "jax-cuda13-plugin" if target.platform == "gpu" else "libtpu"
    return f"{what} is not installed (pip install -r requirements-aot.txt) to compile for {target.name}"


def gpu_target_config(target: Target) -> str:
    """The ``GpuTargetConfigProto`` text of a GPU target: the H100 SXM spec with the
    target's ``spec_changes``."""
    text = (SPECS / "h100_sxm.txtpb").read_text()
    for field, value in target.spec_changes:
        text, n = re.subn(rf"(\b{field}: )\d+", rf"\g<1>{value}", text)
        if n != 1:
            raise ValueError(f"{field} occurs {n} times in the H100 spec, expected once")
    return text


@functools.cache
def devices(name: str) -> tuple:
    """The compile-only devices of target ``name`` (one per chip, each with its
    ``process_index``), for a ``jax.sharding.Mesh``."""
    from jax.experimental import topologies

    target = get(name)
    reason = missing_backend(target)
    if reason:
        raise RuntimeError(reason)
    if target.platform == "gpu":
        topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target),
                                            topology=target.topology)
    else:
        # libtpu lets one process per host load it (a lock file), else "ABORTED ... libtpu
        # multi-process lockfile"; compile-only devices hold no chip, so every process may.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    found = tuple(topo.devices)
    if len(found) != target.num_devices:
        raise RuntimeError(f"{name}: topology {target.topology} has {len(found)} devices, expected "
                           f"{target.num_devices}")
    return found


def kernels(target: Target, model_cfg):
    """``model_cfg`` with the attention kernels a run on ``target`` picks, named
    explicitly: the model's own choices (``models.attention.attention_implementation``
    for multi-token calls, ``models.paged.attention_backend`` for decode steps over pages)
    read the running backend, which here is the CPU, so they are asked under the
    target's platform. A kernel set in ``model_cfg`` is kept."""
    import jax

    from drift_jax.models import attention, paged

    with mock.patch.object(jax, "default_backend", lambda: target.platform):
        multi = attention.attention_implementation(model_cfg, 2)
        decode = paged.attention_backend(1, model_cfg.paged_attention_impl, model_cfg.head_dim)
    return model_cfg.replace(attention_impl=multi, paged_attention_impl=decode)
