"""Compile one device program for a target without the device, and report it.

A ``Program`` is a jitted function of the library and the abstract arguments it is
called with (``jax.ShapeDtypeStruct`` leaves carrying a ``NamedSharding`` on the
target's compile-only devices; static arguments as they are). ``compile_program``
lowers and compiles it for the target and returns a report:

- compiled, or the first line of the error (a kernel that rejects a shape, a program
  that does not fit: "RESOURCE_EXHAUSTED" on TPU);
- per-device bytes of the compiled program (XLA's ``memory_analysis``): arguments,
  outputs, temporaries, and the outputs aliased to donated arguments; the peak
  ``arguments + outputs - aliased + temporaries`` against the target's memory budget
  (on TPU libtpu checks it: a compiled program fits);
- FLOPs and bytes accessed per device (``hlo.module_cost``: XLA's cost analysis with
  loops counted as often as they run, and cuDNN attention, cuBLAS and kernels added
  analytically; a program's own model of its work where XLA's bytes are known to be
  off, ``Program.analytic``), and the roofline time ``max(FLOPs / peak, bytes /
  bandwidth)``;
- seconds spent lowering and compiling on this host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax

from drift_jax.aot import hlo
from drift_jax.aot.targets import Target


@dataclasses.dataclass
class Program:
    """One device program of a pipeline, for one target.

    name: the report's key ("train_step", "decode"). fn: the jitted function.
    args / kwargs: what it is called with (abstract arrays with shardings, static
    values). loop_trips / kernel_hints: ``hlo.module_cost``'s estimates for loops and
    kernels whose work is decided at run time. analytic: {"flops", "bytes"} of a model
    of the program's work, where XLA's byte count is known to be off (a gather or
    scatter over a page pool counts the whole pool, not the pages touched): the roofline
    then uses it, and XLA's figures are kept beside it. mesh: the context mesh
    (``jax.set_mesh``) the run traces the program under, None for none (kernels that XLA
    cannot partition run under ``shard_map`` over it). note: what the figures assume.
    shapes: the program's sizes, for the report.
    """

    name: str
    fn: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    loop_trips: dict = dataclasses.field(default_factory=dict)
    kernel_hints: dict = dataclasses.field(default_factory=dict)
    analytic: dict | None = None
    mesh: Any = None
    note: str = ""
    shapes: dict = dataclasses.field(default_factory=dict)


def first_line(error: BaseException) -> str:
    """The error's first non-empty line, prefixed by its type, at most 400 characters."""
    text = str(error).strip()
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return f"{type(error).__name__}: {line}"[:400]


def _raw_cost(text: str) -> tuple[float, float]:
    """XLA's cost analysis (FLOPs, bytes accessed) of an HLO module text, through the
    CPU client (a CUDA executable compiled without a device reports none itself)."""
    import jaxlib._hlo as xla_hlo
    from jax._src.lib import _jax

    module = xla_hlo.hlo_module_from_text(text)
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return max(0.0, float(cost.get("flops", 0.0))), max(0.0, float(cost.get("bytes accessed", 0.0)))


def memory_report(compiled, target: Target) -> dict:
    """Per-device bytes of a compiled program against ``target``'s budget."""
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
                         + out["generated_code_bytes"])
    out["budget_bytes"] = target.memory_budget_bytes
    return {**out, **verdict(out, target.platform)}


def verdict(memory: dict, platform: str) -> dict:
    """{"fits"} of a compiled program's memory report, and on TPU {"at_limit"}: on GPU the
    peak against the budget; libtpu refuses a program that needs more than the available
    HBM (RESOURCE_EXHAUSTED), so a compiled TPU program fits, though the sum of its listed
    bytes can be above the HBM (``at_limit``: temporaries whose lifetimes do not overlap
    the arguments', or that libtpu lists in full)."""
    if platform == "tpu":
        return {"fits": True, "at_limit": memory["peak_bytes"] > memory["budget_bytes"]}
    return {"fits": memory["peak_bytes"] <= memory["budget_bytes"]}


def cost_report(compiled, target: Target, program: Program) -> dict:
    """FLOPs, bytes accessed and roofline seconds of one run of a compiled program, per
    device."""
    text = compiled.runtime_executable().hlo_modules()[0].to_string()
    cost = hlo.module_cost(text, _raw_cost, program.loop_trips, program.kernel_hints)
    basis = program.analytic or {"flops": cost.flops, "bytes": cost.bytes}
    compute_s, memory_s = basis["flops"] / target.peak_flops, basis["bytes"] / target.hbm_bytes_per_s
    return {
        "flops": basis["flops"],
        "bytes": basis["bytes"],
        "basis": "analytic" if program.analytic else "xla",
        "xla_flops": cost.flops,
        "xla_bytes": cost.bytes,
        "custom_calls": {k: {"calls": n, "flops": f, "bytes": b} for k, (n, f, b) in cost.custom_calls.items()},
        "unknown_trip_loops": cost.unknown_loops,
        "compute_s": compute_s,
        "memory_s": memory_s,
        "roofline_s": max(compute_s, memory_s),
        "bound": "compute" if compute_s >= memory_s else "memory",
    }


def compile_program(program: Program, target: Target) -> dict[str, Any]:
    """Lower and compile ``program`` for ``target``; the report of the module
    docstring. A failure at any point is reported (``compiled: False`` and the error's
    first line), never raised."""
    report: dict[str, Any] = {"program": program.name, "target": target.name, "note": program.note,
                              "shapes": program.shapes}
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(program.mesh) if program.mesh is not None else contextlib.nullcontext():
            lowered = program.fn.lower(*program.args, **program.kwargs)
            t1 = time.perf_counter()
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (every failure is a finding of the report)
        report.update(compiled=False, error=first_line(e), compile_s=round(time.perf_counter() - t0, 2))
        return report
    t2 = time.perf_counter()
    report.update(compiled=True, error=None, lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2))
    try:
        report["memory"] = memory_report(compiled, target)
    except Exception as e:  # noqa: BLE001
        report["memory"] = {"error": first_line(e)}
    try:
        report["cost"] = cost_report(compiled, target, program)
    except Exception as e:  # noqa: BLE001
        report["cost"] = {"error": first_line(e)}
    return report
