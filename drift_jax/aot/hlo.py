"""FLOPs and bytes of a compiled program from its optimised HLO, loops counted as often as
they run.

XLA's cost analysis (``HloCostAnalysis``, run through the CPU client on the target's
optimised module) counts the body of a ``while`` loop once, whatever its trip count, and
custom calls (cuDNN attention, cuBLAS, Pallas and Mosaic kernels) as no FLOPs. Here the
module's text is split into its computations; every loop body is analysed on its own and
added ``trip count - 1`` more times (XLA's ``known_trip_count``, a caller's estimate for
a loop whose count is decided at run time, matched on the loop's ``op_name``, or the
constant bound of a ``counter < N`` condition), and each custom call gets an analytic
count (``custom_call_cost``) times the trips of the loops around it.
"""

from __future__ import annotations

import dataclasses
import math
import re

_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$")
_WHILE = re.compile(r"while\(.*?condition=%([\w.\-]+), body=%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_REFERENCE = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


@dataclasses.dataclass
class Cost:
    """FLOPs and bytes accessed; ``custom_calls``: {target: [calls, flops, bytes]} of the
    analytic part; ``unknown_loops``: loops whose trip count nobody gave (counted once)."""

    flops: float = 0.0
    bytes: float = 0.0
    custom_calls: dict = dataclasses.field(default_factory=dict)
    unknown_loops: list = dataclasses.field(default_factory=list)

    def add(self, other: Cost, times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        for name, (n, f, b) in other.custom_calls.items():
            m = self.custom_calls.setdefault(name, [0, 0.0, 0.0])
            m[0] += times * n
            m[1] += times * f
            m[2] += times * b
        self.unknown_loops += [u for u in other.unknown_loops if u not in self.unknown_loops]


def computations(text: str) -> tuple[dict[str, list[str]], dict[str, str], str]:
    """({name: instruction lines}, {name: header line}, entry name) of an HLO module's
    text."""
    comps: dict[str, list[str]] = {}
    headers: dict[str, str] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current], headers[current] = [], line
            if m.group(1):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, headers, entry


def counted_loop(condition: list[str]) -> int | None:
    """N for a loop condition ``counter < N`` of a constant N (what ``lax.scan`` and
    ``lax.fori_loop`` with static bounds emit, their counter from 0 by 1; TPU programs
    carry no ``known_trip_count``); None for any other condition."""
    root = next((line for line in condition if line.lstrip().startswith("ROOT ")), "")
    if " compare(" not in root or "direction=LT" not in root:
        return None
    operands = re.search(r"compare\(([^)]*)\)", root).group(1)
    for line in condition:
        m = re.match(r"\s*%([\w.\-]+) = [su]\d+\[\][^=]* constant\((\d+)\)", line)
        if m and f"%{m.group(1)}" in operands.split(", ")[1:]:
            return int(m.group(2))
    return None


def shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array shape written in ``text``, as (dtype, dims)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(text)]


def nbytes(shape_list) -> float:
    return sum(_BYTES[t] * math.prod(d) for t, d in shape_list)


def _attention_flops(q, k, backward: bool, causal: bool) -> float:
    """cuDNN fused attention: q ``[B, Tq, N, H]``, k ``[B, Tk, K, H]``: two matmuls of
    2 B N Tq Tk H each forward, five backward (the scores recomputed); causal halves it."""
    b, tq, n, h = q
    tk = k[1]
    flops = 4.0 * b * n * tq * tk * h * (2.5 if backward else 1.0)
    return flops / 2 if causal else flops


def custom_call_cost(line: str) -> tuple[str, float, float]:
    """(family, FLOPs, bytes) of one custom-call instruction. Bytes: its operands and
    results. FLOPs: cuDNN attention and cuBLAS GEMMs from their shapes; 0 for others
    (kernels: see ``kernel_hints`` of ``module_cost``)."""
    target = re.search(r'custom_call_target="([^"]+)"', line).group(1)
    lhs, _, rhs = line.partition(" custom-call(")
    result = shapes(lhs.split("=", 1)[1])
    operand_text = rhs.split("custom_call_target=")[0]
    constraints = line.partition("operand_layout_constraints={")[2]
    constraints = re.split(r"\}, (?:api_version|metadata|backend_config|custom_call_has_side_effect|output_to_operand)",
                           constraints)[0]
    operands = shapes(constraints) if constraints else shapes(operand_text)
    moved = nbytes(result) + nbytes(operands)
    if target.startswith("__cudnn$fmha"):
        causal = '"mask_type": "CAUSAL"' in line or '"mask_type":"CAUSAL"' in line
        backward = "Backward" in target
        q, k = operands[0][1], operands[1][1]
        return "cudnn_attention", _attention_flops(q, k, backward, causal), moved
    if target.startswith("__cublas"):
        config = re.search(r'"lhs_contracting_dimensions":\["?([\d",]*)"?\]', line)
        contracting = [int(c) for c in config.group(1).replace('"', "").split(",") if c] if config else []
        lhs_dims = operands[0][1]
        k = math.prod(lhs_dims[c] for c in contracting) if contracting else 1
        return "cublas_gemm", 2.0 * math.prod(result[0][1]) * k, moved
    return target, 0.0, moved


class ModuleCost:
    """``module_cost``'s walk over one module: raw XLA costs per computation, cached."""

    def __init__(self, text: str, raw_cost, loop_trips, kernel_hints):
        self.text = text
        self.comps, self.headers, self.entry = computations(text)
        self.raw_cost = raw_cost
        self.loop_trips = loop_trips or {}
        self.kernel_hints = kernel_hints or {}
        self._raw: dict[str, tuple[float, float]] = {}
        self._nested: dict[str, Cost] = {}

    def raw(self, name: str) -> tuple[float, float]:
        """(flops, bytes) of XLA's cost analysis with ``name`` as the entry."""
        if name not in self._raw:
            if name == self.entry:
                text = self.text
            else:
                text = self.module_text(name)
            self._raw[name] = self.raw_cost(text)
        return self._raw[name]

    def module_text(self, name: str) -> str:
        """A module of computation ``name`` as its entry and what it calls (the original
        header's aliasing, layouts and schedule describe the old entry: dropped)."""
        reachable, todo = set(), [name]
        while todo:
            comp = todo.pop()
            if comp in reachable or comp not in self.comps:
                continue
            reachable.add(comp)
            # Any name a line mentions that is a computation's (an instruction's is skipped).
            todo += [ref for line in self.comps[comp] for ref in _REFERENCE.findall(line) if ref in self.comps]
        blocks = []
        for comp, lines in self.comps.items():  # callees are written before their callers
            if comp in reachable:
                header = self.headers[comp].removeprefix("ENTRY ")
                blocks.append(("ENTRY " if comp == name else "") + header + "\n" + "\n".join(lines) + "\n}\n")
        # Stack frame ids index the original module's frame table, which is left out.
        return "HloModule loop_body\n\n" + re.sub(r" stack_frame_id=\d+", "", "\n".join(blocks))

    def trips(self, line: str, condition: str) -> int | None:
        """A loop's trip count: XLA's ``known_trip_count`` (GPU), else the caller's estimate
        for its op_name, else read from its condition (``counted_loop``), else None."""
        m = _TRIP.search(line)
        if m:
            return int(m.group(1))
        op = _OP_NAME.search(line)
        for pattern, n in self.loop_trips.items():
            if op and re.search(pattern, op.group(1)):
                return n
        return counted_loop(self.comps.get(condition, []))

    def cost(self, name: str, top: bool = True) -> Cost:
        """The computation's cost with its loops run as often as they run. ``top``: XLA's
        figures of it come from the raw analysis (which already holds everything it
        calls once); nested calls add only their loops' extra trips and custom calls."""
        if not top and name in self._nested:
            return self._nested[name]
        out = Cost()
        if top:
            out.flops, out.bytes = self.raw(name)
        for line in self.comps.get(name, []):
            w = _WHILE.search(line) if " while(" in line else None
            if w:
                body = w.group(2)
                n = self.trips(line, w.group(1))
                if n is None:
                    op = _OP_NAME.search(line)
                    out.unknown_loops.append(op.group(1) if op else body)
                    n = 1
                inner = self.cost(body, top=True)
                raw_flops, raw_bytes = self.raw(body)
                # Already counted once by the caller's raw figure: add the rest.
                out.flops += n * inner.flops - raw_flops
                out.bytes += n * inner.bytes - raw_bytes
                out.add(Cost(custom_calls=inner.custom_calls, unknown_loops=inner.unknown_loops), n)
                continue
            if " custom-call(" in line:
                family, flops, moved = custom_call_cost(line)
                op = _OP_NAME.search(line)
                for pattern, (hint_family, hint_flops, hint_bytes) in self.kernel_hints.items():
                    if op and re.search(pattern, op.group(1)):
                        family, flops, moved = hint_family, hint_flops, hint_bytes
                        break
                out.add(Cost(flops=flops, custom_calls={family: [1, flops, moved]}))
                continue
            called = _CALLS.findall(line)
            branches = _BRANCHES.search(line)
            if branches:
                called += re.findall(r"%([\w.\-]+)", branches.group(1))
            for sub in called:
                if sub in self.comps and sub != name:
                    out.add(self.cost(sub, top=False))
        if not top:
            self._nested[name] = out
        return out


def module_cost(text: str, raw_cost, loop_trips: dict | None = None, kernel_hints: dict | None = None) -> Cost:
    """The cost of an optimised HLO module (its text) run once.

    ``raw_cost(text) -> (flops, bytes)``: XLA's cost analysis of a module text.
    ``loop_trips``: {regex on a loop's op_name: trips} for loops without a known trip
    count. ``kernel_hints``: {regex on a custom call's op_name: (family, FLOPs, bytes)}
    per call, for kernels whose work the shapes do not tell (a paged-attention kernel
    reads the live pages, not its whole pool operand). A custom call's analytic FLOPs
    are added to XLA's; its bytes replace nothing (XLA counts a custom call's operands
    and results already)."""
    walk = ModuleCost(text, raw_cost, loop_trips, kernel_hints)
    return walk.cost(walk.entry)
