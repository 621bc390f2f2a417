"""The continuous engine's device programs compiled without a device (XLA's deviceless
compile; no accelerator needed), in two modes:

``bytes``: the bytes one decode step moves on an H100, per paged-attention path,
against the ideal (the weights and every row's live keys and values read once). The
step is ``engine._decode`` with ``n_steps=1``, every slot live at ``--context`` tokens,
the model at a preset's widths and depth in bf16. Paths: "pallas" (JAX's Pallas Triton
paged-attention kernel over the heads-major pool) and "xla" (the plain-JAX loop over
chunks of pages, token-major pool; ``drift_jax.models.paged``). Bytes are counted from
the optimised HLO, instruction by instruction outside fusions, each loop body times its
trips (the page-chunk loops: one per ``CHUNK_PAGES`` pages of context after the first): a fusion moves
its operands and results, except that an operand it only gathers or slices from counts
as the bytes it takes, and a buffer it updates in place (scatter,
dynamic-update-slice: the page pool) as the updates. XLA's own cost analysis counts
such operands whole (the pool read and written by every layer's scatter, the embedding
table by the token lookup); its figure is kept beside ("xla_cost_bytes_one_trip",
loops once). The Pallas kernel (a custom call) counts as what it reads: the query, the
keys and values of the live pages (whole blocks of 8 pages) and the block tables, and
its output. The attention's share (the page-chunk loops, or the kernel's calls) is
printed against the live keys and values it must read: the rest of a step (weights,
activations, logits and sampling) is the same program on either path.

``memory``: the decode and prefill programs' memory (arguments, temporaries, outputs
aliased to donated arguments) on one chip of a TPU topology (or an H100), for a pool
of ``--pages_per_slot`` pages a slot in either layout (``--layout``), decode over
``--slots`` rows with ``--decode_impl`` (the XLA loop, or the Pallas TPU kernel over a
heads-major pool), prefill at the engine's largest call (``EngineOptions``: 2,048
tokens in rows of 16): the check that a program fits the chip.

  JAX_PLATFORMS=cpu python benchmarks/engine_aot.py bytes --model qwen2.5-0.5b qwen2.5-3b --context 512 2048 4096
  ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python benchmarks/engine_aot.py memory --target v5e \
      --model qwen2.5-0.5b --pages_per_slot 128 --layout heads tokens
  JAX_PLATFORMS=cpu python benchmarks/engine_aot.py memory --target v5e --model qwen2.5-3b --pages_per_slot 40 \
      --max_len 4096 --layout heads --decode_impl pallas_tpu
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from drift_jax.aot import targets  # noqa: E402
from drift_jax.models import Transformer, paged, preset  # noqa: E402
from drift_jax.rollout import engine as engine_lib  # noqa: E402
from drift_jax.rollout.interface import EngineOptions  # noqa: E402
from drift_jax.rollout.sampling import SamplingParams  # noqa: E402

PAGE = 16  # tokens a page (rollout.page_size)
LAYOUTS = {"tokens": "token-major", "heads": "heads-major"}
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_SIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
         "replica-id", "iota"}
_PASS = {"bitcast", "reshape", "copy", "convert", "transpose", "broadcast", "get-tuple-element"}


def nbytes(text: str) -> int:
    return sum(_SIZE[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(text))


def parse(text: str) -> tuple[dict, str]:
    """{computation: [(name, result shape text, op, operand names, line)]}, entry name."""
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$", line)
        if head:
            cur = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
        elif cur is not None and line.strip() == "}":
            cur = None
        elif cur is not None:
            m = _INSTR.match(line)
            if m:
                args = m.group(4).split(")", 1)[0]
                cur.append((m.group(1), m.group(2), m.group(3), re.findall(r"%([\w.\-]+)", args), line))
    return comps, entry


def _fusion_bytes(instr, comps, shapes) -> int:
    """Bytes a fusion moves: operands it only gathers / slices from count as what it
    takes; an operand updated in place and the matching result count as the updates."""
    name, result, _, operands, line = instr
    body = comps[re.search(r"calls=%([\w.\-]+)", line).group(1)]
    by_name = {i[0]: i for i in body}
    users: dict = {}
    for i in body:
        for pos, o in enumerate(i[3]):
            users.setdefault(o, []).append((i, pos))
    params = {int(re.search(r"parameter\((\d+)\)", i[4]).group(1)): i[0] for i in body if i[2] == "parameter"}

    def taken(value, seen=()) -> tuple[int, int] | None:
        """(bytes read, in-place update bytes) if every use of ``value`` is a gather /
        slice / in-place update (through shape-only ops), else None."""
        read = updated = 0
        for user, pos in users.get(value, []):
            op = user[2]
            if op in ("gather", "dynamic-slice", "slice") and pos == 0:
                read += nbytes(user[1])
            elif op == "scatter" and pos == 0:
                updated += nbytes(shapes_of(by_name, shapes, user[3][2]))
            elif op == "dynamic-update-slice" and pos == 0:
                updated += nbytes(shapes_of(by_name, shapes, user[3][1]))
            elif op in ("bitcast", "reshape") and user[0] not in seen:
                sub = taken(user[0], seen + (user[0],))
                if sub is None:
                    return None
                read, updated = read + sub[0], updated + sub[1]
            else:
                return None
        return read, updated

    total, in_place = 0, 0
    for pos, operand in enumerate(operands):
        full = nbytes(shapes.get(operand, ""))
        t = taken(params.get(pos)) if pos in params else None
        if t is None or t[0] + t[1] >= full:
            total += full
        else:
            total += t[0] + t[1]
            in_place += t[1] > 0
    root = next(i for i in body if i[4].lstrip().startswith("ROOT"))
    outs = [by_name[o] for o in root[3]] if root[2] == "tuple" else [root]
    for out in outs:
        src = out
        while src[2] in ("bitcast", "reshape") and src[3][0] in by_name:
            src = by_name[src[3][0]]
        if src[2] == "scatter":
            total += nbytes(shapes_of(by_name, shapes, src[3][2]))
        elif src[2] == "dynamic-update-slice":
            total += nbytes(shapes_of(by_name, shapes, src[3][1]))
        else:
            total += nbytes(out[1])
    return total


def shapes_of(by_name, shapes, value) -> str:
    return by_name[value][1] if value in by_name else shapes.get(value, "")


def step_bytes(text: str, chunk_trips: int, kernel_bytes: float) -> tuple[float, float]:
    """(bytes of one run of the module, the attention's share of them): loops nested in
    a loop (the page-chunk loops) run ``chunk_trips`` times and are attention, the outer
    loops run once; each Pallas custom call (attention) moves ``kernel_bytes``."""
    comps, entry = parse(text)
    shapes = {i[0]: i[1] for body in comps.values() for i in body}

    def walk(comp: str, depth: int) -> tuple[float, float]:
        total = attention = 0.0
        for instr in comps[comp]:
            _, result, op, operands, line = instr
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                b, a = walk(body, depth + 1)
                n = chunk_trips if depth >= 1 else 1
                total, attention = total + n * b, attention + n * (b if depth >= 1 else a)
            elif op in ("call", "conditional"):
                for sub in re.findall(r"(?:to_apply|calls|branch_computations=\{[^}]*)%([\w.\-]+)", line):
                    b, a = walk(sub, depth)
                    total, attention = total + b, attention + a
            elif op == "fusion":
                total += _fusion_bytes(instr, comps, shapes)
            elif op == "custom-call" and ("triton" in line or "pallas" in line.lower()):
                total, attention = total + kernel_bytes, attention + kernel_bytes
            elif op not in _FREE:
                total += nbytes(result) + sum(nbytes(shapes.get(o, "")) for o in operands)
        return total, attention

    return walk(entry, 0)


def _model(model_name: str, layers: int | None, impl: str):
    cfg = preset(model_name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, paged_attention_impl=impl)
    if layers:
        cfg = cfg.replace(num_layers=layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return cfg, engine_lib._Graph(graphdef), state


def _program_args(cfg, graph, state, slots: int, width: int, num_pages: int, heads_major: bool, device, prefill=0):
    """Abstract arguments of ``_decode`` (``prefill`` 0) or ``_prefill`` (``prefill``
    tokens a row) for ``slots`` rows, block tables ``width`` pages wide, on ``device``."""
    rep = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
    sds = functools.partial(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep))
    pool = jax.eval_shape(lambda: paged.PagedKV.zeros(cfg, num_pages, PAGE, heads_major=heads_major))
    rows = lambda dtype, *s: jax.ShapeDtypeStruct((slots, *s), dtype, sharding=rep)  # noqa: E731
    head = (graph, jax.tree.map(sds, state), jax.tree.map(sds, pool))
    if prefill:
        return head + (rows(jnp.int32, prefill), rows(jnp.int32), rows(jnp.int32), rows(jnp.int32, width))
    return head + (rows(jnp.int32), rows(jnp.float32), rows(jnp.uint32, 2), rows(jnp.int32, width), rows(jnp.int32),
                   rows(jnp.int32), rows(jnp.int32), rows(bool), jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))


def _compile(args, prefill: bool):
    if prefill:
        return engine_lib._prefill.lower(*args).compile()
    return engine_lib._decode.lower(*args, params=SamplingParams(max_new_tokens=1024, stop_ids=(1,)),
                                    n_steps=1).compile()


def measure_bytes(model_name: str, layers: int | None, slots: int, context: int, path: str, device) -> dict:
    cfg, graph, state = _model(model_name, layers, "pallas" if path == "pallas" else "xla")
    width = -(-context // PAGE // paged.CHUNK_PAGES) * paged.CHUNK_PAGES
    t0 = time.time()
    compiled = _compile(_program_args(cfg, graph, state, slots, width, slots * width + 1, path == "pallas", device),
                        prefill=False)
    compile_s = time.time() - t0
    cost = jax._src.lib._jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client,
                                                      compiled.runtime_executable().hlo_modules()[0])
    kv_token = paged.page_bytes(cfg, 1) // cfg.num_layers  # one layer's keys + values of a token
    live_blocks = -(-context // (paged.CHUNK_PAGES * PAGE)) * paged.CHUNK_PAGES * PAGE
    itemsize = jnp.dtype(cfg.dtype).itemsize
    kernel = slots * (live_blocks * kv_token + 2 * cfg.num_heads * cfg.head_dim * itemsize + 4 * width)
    chunks = -(-context // (paged.CHUNK_PAGES * PAGE))
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    live_kv = slots * context * paged.page_bytes(cfg, 1)
    # The page-chunk loop runs once per chunk after the first, which runs before it
    # (paged._attend_chunked) and moves what a trip does: the attention is chunks trips.
    moved, attention = step_bytes(compiled.as_text(), chunks - 1, kernel)
    if path == "xla" and chunks > 1:
        attention *= chunks / (chunks - 1)
    return {"model": model_name, "layers": cfg.num_layers, "slots": slots, "context": context, "path": path,
            "bytes": moved, "ideal": weights + live_kv, "weights": weights, "live_kv": live_kv,
            "ratio": moved / (weights + live_kv), "attention_bytes": attention,
            "attention_ratio": attention / live_kv, "xla_cost_bytes_one_trip": cost.get("bytes accessed"),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "compile_s": round(compile_s, 1)}


def measure_memory(model_name: str, layers: int | None, slots: int, pages_per_slot: int, layout: str, program: str,
                   prefill_tokens: int, device, decode_impl: str = "xla", max_len: int = 32_768) -> dict:
    cfg, graph, state = _model(model_name, layers, decode_impl)
    num_pages = slots * pages_per_slot + 1
    width = -(-max_len // PAGE // paged.CHUNK_PAGES) * paged.CHUNK_PAGES
    row = {"model": model_name, "layers": cfg.num_layers, "slots": slots, "pages": num_pages, "layout": layout,
           "program": program, "decode_impl": decode_impl, "pool_bytes": num_pages * paged.page_bytes(cfg, PAGE)}
    if program == "prefill":  # the engine's largest prefill call: prefill_chunk tokens in rows of prefill_piece
        options = EngineOptions()
        rows, prefill = options.prefill_chunk // options.prefill_piece, options.prefill_piece
    else:
        rows, prefill = slots, 0
    args = _program_args(cfg, graph, state, rows, width, num_pages, layout == "heads", device, prefill=prefill)
    try:
        memory = _compile(args, prefill=program == "prefill").memory_analysis()
    except Exception as e:  # noqa: BLE001 - the compile's error is the finding
        return {**row, "error": str(e).strip().splitlines()[0][:300]}
    return {**row, "argument_bytes": memory.argument_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
            "alias_bytes": memory.alias_size_in_bytes, "output_bytes": memory.output_size_in_bytes}


def _device(target: str):
    """One compile-only chip: an H100, or one of four v5e / v6e chips (drift_jax.aot.targets)."""
    return targets.devices({"h100": "h100", "v5e": "v5e-4", "v6e": "v6e-4"}[target])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["bytes", "memory"])
    ap.add_argument("--model", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-3b"])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset's (quick looks)")
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048, 4096], help="bytes: live tokens a row")
    ap.add_argument("--path", nargs="+", default=["pallas", "xla"], choices=["pallas", "xla"])
    ap.add_argument("--target", default=None, choices=["h100", "v5e", "v6e"], help="bytes: h100; memory: v5e")
    ap.add_argument("--pages_per_slot", type=int, default=128, help="memory: the pool's pages a slot")
    ap.add_argument("--layout", nargs="+", default=["tokens"], choices=["tokens", "heads"], help="memory")
    ap.add_argument("--program", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    ap.add_argument("--max_len", type=int, default=32_768,
                    help="memory: the context limit that sets the block tables' width (Qwen2.5's context)")
    ap.add_argument("--decode_impl", default="xla", choices=["xla", "pallas_tpu"],
                    help="memory: decode's paged attention (pallas_tpu: JAX's Pallas TPU kernel, heads-major pool)")
    ap.add_argument("--out", default=None, help="a JSON file for the rows")
    a = ap.parse_args()
    device = _device(a.target or ("h100" if a.mode == "bytes" else "v5e"))
    out = []
    for model_name in a.model:
        if a.mode == "bytes":
            for context in a.context:
                for path in a.path:
                    row = measure_bytes(model_name, a.layers, a.slots, context, path, device)
                    out.append(row)
                    print(f"{model_name} L={row['layers']} ctx={context} {path:6s}: {row['bytes'] / 1e9:7.2f} GB/step, "
                          f"ideal {row['ideal'] / 1e9:6.2f} GB (weights {row['weights'] / 1e9:.2f} + live KV "
                          f"{row['live_kv'] / 1e9:.2f}), x{row['ratio']:.2f}; attention "
                          f"{row['attention_bytes'] / 1e9:.2f} GB = x{row['attention_ratio']:.2f} live KV; "
                          f"temporaries {row['temp_bytes'] / 2**30:.2f} GiB", flush=True)
            continue
        for layout in a.layout:
            for program in a.program:
                row = measure_memory(model_name, a.layers, a.slots, a.pages_per_slot, layout, program,
                                     device, a.decode_impl, a.max_len)
                out.append(row)
                what = row.get("error") or (
                    f"arguments {row['argument_bytes'] / 2**30:.2f} GiB, temporaries {row['temp_bytes'] / 2**30:.2f} "
                    f"GiB, aliased {row['alias_bytes'] / 2**30:.2f} GiB")
                print(f"{model_name} L={row['layers']} {row['slots']} slots, {row['pages']} pages "
                      f"({row['pool_bytes'] / 2**30:.2f} GiB) {LAYOUTS[layout]} {program} ({a.decode_impl}): {what}",
                      flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
