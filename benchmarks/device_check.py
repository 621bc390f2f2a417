"""The device check: every GPU-only path of drift_jax against its reference at real
shapes, and the engine's and the trainer's tokens/s beside HF transformers', in one run
that writes one JSON. Meant for a fresh H100 / H200 with no internet (random weights,
synthetic data, nothing downloaded), within 8 minutes.

Checks (``device_check_numerics``; tolerances there, in its docstring):
  paged_decode   the Pallas GPU paged decode kernel (``drift_jax.models.paged``) and the
                 XLA gather path against dense float32 attention, 256 rows of 1..4,096
                 tokens, at Qwen2.5-0.5B and -3B head shapes;
  attention      cuDNN against XLA attention, forward and backward, 2 x 4,096 tokens
                 with the model's mask, at both head shapes;
  train_update   one train step at Qwen2.5-3B widths (2 layers) through cuDNN against the
                 same step through XLA attention, both against float32, rows of 1,024
                 tokens (the model sees an odd length, 1,023).
Measurements (``device_check_speed``): engine_decode (new tokens/s of the continuous
engine, 256 slots, 256 + 256 tokens) and trainer (tokens/s of the train step, 8 x 2,048)
at Qwen2.5-0.5B (24 layers) and Qwen2.5-3B widths (8 of its 36 layers, for time), each
beside HF ``generate()`` / an HF training step at the same shapes where torch sees a CUDA
device (else skipped, the reason recorded).

The JAX side and the HF side run in two processes one after the other (each then has the
device's memory to itself); this process only orchestrates. Items run in the order above
while the time budget (``--budget-s``) allows: each item has an estimate of its seconds,
and one that would end past the budget is skipped with the reason recorded. A worker
rewrites its file (``--out`` + ``.jax.json`` / ``.hf.json``, removed at the end) after
every item, so a run killed from outside keeps what it measured.

``--smoke``: the same code on the CPU at tiny shapes, in seconds (CI runs it). The Pallas
kernel runs in interpret mode; cuDNN has no CPU or interpret mode, so its checks are
recorded as skipped with the reason, after running their code with XLA standing in for
cuDNN (``stand_in``); the HF side runs on the CPU where torch is installed.

  bash benchmarks/device_check.sh --out device_check.json   # on the GPU machine
  bash benchmarks/device_check.sh --smoke --out /tmp/device_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Seconds a worker may run past its deadline to finish the item in flight (then it is
# stopped): with the default budget a run ends within 420 + 30 s, 7.5 minutes.
GRACE_S = 30
CUDNN_ONLY = "cuDNN attention runs on NVIDIA GPUs only (no CPU or interpret mode): XLA stood in, code path only"


def _item(name, part, kind, fn, estimate_s, **kwargs) -> dict:
    return {"name": name, "part": part, "kind": kind, "fn": fn, "estimate_s": estimate_s, "kwargs": kwargs}


def _smoke_item(name, part, kind, fn, estimate_s, **kwargs) -> dict:
    return _item(name, part, kind, fn, 1, **kwargs)  # seconds at tiny shapes, whatever the device estimate


def _layers(n: int) -> str:
    return f"{n} layer{'s' * (n != 1)}"


def plan(smoke: bool) -> list[dict]:
    """The items in run order. Estimates are seconds on an H100 with compiles, guessed
    before any device run (``--budget-s`` uses them; the JSON records the real ones)."""
    item = _smoke_item if smoke else _item
    if smoke:
        heads = {"tiny": dict(heads=4, kv_heads=2, head_dim=16)}
        paged, attn = dict(rows=6, max_context=40, page_size=4), dict(batch=2, seq=32)
        update = dict(model="tiny", layers=1, batch=2, seq=16)
        engines = [dict(model="tiny", layers=1, slots=4, prompt=8, new=8)]
        trainers = [dict(model="tiny", layers=1, batch=2, seq=16, steps=2)]
    else:
        heads = {"qwen2.5-0.5b": dict(heads=14, kv_heads=2, head_dim=64),
                 "qwen2.5-3b": dict(heads=16, kv_heads=2, head_dim=128)}
        paged, attn = dict(rows=256, max_context=4096, page_size=16), dict(batch=2, seq=4096)
        update = dict(model="qwen2.5-3b", layers=2, batch=4, seq=1024)
        engines = [dict(model="qwen2.5-0.5b", layers=24, slots=256, prompt=256, new=256),
                   dict(model="qwen2.5-3b", layers=36, slots=256, prompt=256, new=256)]
        trainers = [dict(model="qwen2.5-0.5b", layers=24, batch=8, seq=2048, steps=5),
                    dict(model="qwen2.5-3b", layers=8, batch=8, seq=2048, steps=5)]
    items = [item(f"paged_decode[{m}]", "jax", "check", "paged_decode", 15, **h, **paged) for m, h in heads.items()]
    items += [item(f"attention[{m}]", "jax", "check", "attention", 20, **h, **attn) for m, h in heads.items()]
    items.append(item(f"train_update[{update['model']}, {_layers(update['layers'])}]", "jax", "check",
                       "train_update", 75, **update))
    for e in engines:
        name = f"engine_decode[{e['model']}, {_layers(e['layers'])}]"
        big = e["model"] == "qwen2.5-3b" and e["layers"] > 8  # the whole 3B: longer compiles and HF decode
        items += [item(name, "jax", "speed", "engine_decode", 75 if big else 45, **e),
                  item(name, "hf", "speed", "hf_generate", 40 if big else 25, **e)]
    for t in trainers:
        name = f"trainer[{t['model']}, {_layers(t['layers'])}]"
        items += [item(name, "jax", "speed", "trainer", 50, **t), item(name, "hf", "speed", "hf_train", 20, **t)]
    return items


# -- the two worker processes --------------------------------------------------------------

def _jax_environment() -> dict:
    import importlib.metadata as md

    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    versions = {p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax") if importlib.util.find_spec(p)}
    return {**versions, "python": platform.python_version(), "backend": jax.default_backend(),
            "device": device.device_kind, "devices": jax.device_count(),
            "device_memory_bytes": stats.get("bytes_limit"),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_"))}}


def _run_one(item: dict, backend: str) -> dict:
    """One item's record: its function's result with a status, or the error."""
    import device_check_numerics as numerics
    import device_check_speed as speed

    fn = getattr(numerics if item["kind"] == "check" else speed, item["fn"])
    kwargs, stand_in = dict(item["kwargs"]), None
    if item["fn"] == "paged_decode":
        kwargs["kernel"] = "pallas" if backend == "gpu" else "pallas_interpret"
    elif item["fn"] in ("attention", "train_update"):
        kwargs["kernel"] = "cudnn" if backend == "gpu" else "xla"
        stand_in = None if backend == "gpu" else CUDNN_ONLY
    t0 = time.perf_counter()
    try:
        result = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - recorded, and the run goes on to the next item
        return {"status": "error", "passed": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:500]}",
                "traceback": traceback.format_exc()[-3000:], "wall_s": time.perf_counter() - t0}
    result["wall_s"] = time.perf_counter() - t0
    if stand_in:
        return {"status": "skipped", "passed": None, "reason": stand_in, "stand_in": result}
    return {**result, "status": "passed" if result["passed"] else "failed"}


def run_part(args) -> int:
    """A worker: run this part's items named in ``args.names`` until the deadline,
    rewriting ``args.part_out`` after each."""
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)
    items = [i for i in plan(args.smoke) if i["part"] == args.part and i["name"] in args.names]
    out: dict = {"environment": {}, "items": {}}
    if args.part == "jax":
        # Imported before the backend starts: it imports throughput.py, which sets
        # XLA_PYTHON_CLIENT_PREALLOCATE=false (JAX takes device memory as it needs it).
        import device_check_speed  # noqa: F401
        import jax

        backend = jax.default_backend()
        out["environment"] = _jax_environment()
        if backend != "gpu" and not args.smoke:
            out["error"] = f"no GPU: JAX's backend is {backend!r} (run with --smoke on a CPU)"
            items = []
        unavailable = None
    else:
        import device_check_speed as speed

        backend = None
        unavailable = speed.hf_unavailable(cpu_ok=args.smoke)
        out["environment"] = {"unavailable": unavailable} if unavailable else speed.hf_environment()
    for item in items:
        if unavailable:
            record = {"status": "skipped", "passed": None, "reason": unavailable}
        elif time.time() + item["estimate_s"] > args.deadline:
            record = {"status": "skipped", "passed": None,
                      "reason": f"time budget: about {item['estimate_s']} s needed, "
                                f"{max(0, args.deadline - time.time()):.0f} s left"}
        else:
            record = _run_one(item, backend)
        out["items"][item["name"]] = {"kind": item["kind"], "estimate_s": item["estimate_s"], **record}
        print(f"[{args.part}] {item['name']}: {record['status']}"
              + (f" ({record.get('reason') or record.get('error')})" if record["status"] in ("skipped", "error")
                 else ""), flush=True)
        _write(args.part_out, out)
    _write(args.part_out, out)
    return 0


# -- the orchestrating process -------------------------------------------------------------

def _write(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def smoke_xla_flags() -> str:
    """XLA flags of a smoke run: compiles are most of its time and its timings mean
    nothing. Without LLVM optimisation and with XLA CPU's older fusion emitters, a small
    train step compiles about 4x faster (jax 0.10.2). XLA aborts on a flag it does not
    know, so the second is passed only to the jaxlib it was measured on."""
    import importlib.metadata as md

    flags = "--xla_backend_optimization_level=0"
    return flags + " --xla_cpu_use_fusion_emitters=false" if md.version("jaxlib").startswith("0.10.") else flags


def _spawn(part: str, args, deadline: float, names: list[str], part_out: str) -> dict:
    """Run one worker to the deadline (plus ``GRACE_S`` for an item in flight) and read
    what it wrote to ``part_out``."""
    if os.path.exists(part_out):  # a killed run's: not this one's
        os.remove(part_out)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--deadline", str(deadline),
           "--part-out", part_out, *(["--smoke"] if args.smoke else []), "--names", *names]
    env = dict(os.environ)
    if args.smoke or part == "hf":  # the HF side imports JAX (model configs) but must leave the GPU to torch
        env["JAX_PLATFORMS"] = "cpu"
    if args.smoke:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {smoke_xla_flags()}".strip()
    note = None
    try:
        proc = subprocess.run(cmd, env=env, timeout=max(1.0, deadline - time.time()) + GRACE_S, check=False)
        if proc.returncode:
            note = f"the {part} process exited with code {proc.returncode}"
    except subprocess.TimeoutExpired:
        note = f"the {part} process ran past the time budget and was stopped"
    data = {"environment": {}, "items": {}}
    if os.path.exists(part_out):
        with open(part_out) as f:
            data = json.load(f)
    if note:
        data["error"] = "; ".join(filter(None, [data.get("error"), note]))
    return data


def _merge(items: list[dict], jax_part: dict, hf_part: dict) -> dict:
    checks, speed = {}, {}
    for item in items:
        if item["part"] == "jax":
            record = jax_part["items"].get(item["name"], {"status": "skipped", "passed": None,
                                                          "reason": jax_part.get("error", "not run")})
            (checks if item["kind"] == "check" else speed)[item["name"]] = record
    for item in items:
        if item["part"] == "hf" and item["name"] in speed:
            hf = hf_part["items"].get(item["name"], {"status": "skipped", "passed": None,
                                                     "reason": hf_part.get("error") or "its JAX side did not run"})
            ours = speed[item["name"]]
            speed[item["name"]] = {**ours, "hf": hf}
            if ours.get("tokens_per_s") and hf.get("tokens_per_s"):
                speed[item["name"]]["ours_over_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    return {"checks": checks, "speed": speed}


def summary(result: dict) -> dict:
    """Counts of every record (checks, speed items and their HF sides) by status."""
    records = list(result["checks"].values()) + [r for s in result["speed"].values() for r in (s, s.get("hf"))
                                                  if r is not None]
    counts = {status: sum(r["status"] == status for r in records) for status in ("passed", "failed", "error",
                                                                                  "skipped")}
    return {**counts, "all_passed": counts["failed"] == counts["error"] == 0 and counts["passed"] > 0}


def print_table(result: dict) -> None:
    env = result["environment"]["jax"]
    note = " (tiny shapes on the CPU: the code runs, its speeds mean nothing)" if result["mode"] == "smoke" else ""
    print(f"\n=== device check on {env.get('device')}, jax {env.get('jax')}, {result['wall_s']:.0f} s{note} ===")
    for name, r in result["checks"].items():
        worst = max((c.get("rel_l2", 0) / c["tolerance"]["rel_l2"] for c in (r.get("candidates") or {}).values()
                     if c.get("tolerance", {}).get("rel_l2")), default=None)
        detail = r.get("reason") or r.get("error") or (f"worst rel_l2 / tolerance {worst:.2f}" if worst else "")
        print(f"{r['status']:<8} {name:<44} {detail}")
    for name, r in result["speed"].items():
        ours, hf = r.get("tokens_per_s"), (r.get("hf") or {}).get("tokens_per_s")
        text = (f"{ours:,.0f} tok/s" if ours else r.get("reason") or r.get("error") or "-")
        text += f", HF {hf:,.0f} tok/s, ours/HF {ours / hf:.2f}x" if ours and hf else ""
        print(f"{r['status']:<8} {name:<44} {text}")
    s = result["summary"]
    print(f"passed {s['passed']}, failed {s['failed']}, errors {s['error']}, skipped {s['skipped']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    ap.add_argument("--out", default="device_check.json", help="the JSON written")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget in seconds (default: 420 on a device, 120 smoke)")
    ap.add_argument("--only", default=None, help="run only items whose name contains one of these (comma-separated)")
    ap.add_argument("--no-hf", action="store_true", help="leave the HF side out")
    ap.add_argument("--part", choices=["jax", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    ap.add_argument("--names", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        return run_part(args)
    start = time.time()
    budget = args.budget_s or (120.0 if args.smoke else 420.0)
    items = [i for i in plan(args.smoke)
             if not args.only or any(s in i["name"] for s in args.only.split(","))]
    hf_wanted = not args.no_hf and importlib.util.find_spec("torch") is not None
    hf_items = [i for i in items if i["part"] == "hf" and hf_wanted]
    # The JAX side leaves the HF side the time its items are estimated to need.
    jax_deadline = start + budget - sum(i["estimate_s"] for i in hf_items)

    def write(jax_part: dict, hf_part: dict) -> dict:
        result = {"mode": "smoke" if args.smoke else "device", "budget_s": budget,
                  "environment": {"jax": jax_part["environment"], "hf": hf_part["environment"]},
                  **_merge(items, jax_part, hf_part), "wall_s": time.time() - start}
        if jax_part.get("error"):
            result["error"] = jax_part["error"]
        result["summary"] = summary(result)
        _write(args.out, result)
        return result

    # The workers' files sit beside --out until the end: a run killed from outside keeps them.
    parts = {part: f"{args.out}.{part}.json" for part in ("jax", "hf")}
    jax_part = _spawn("jax", args, jax_deadline, [i["name"] for i in items if i["part"] == "jax"], parts["jax"])
    ran = {n for n, r in jax_part["items"].items() if r.get("tokens_per_s")}
    hf_names = [i["name"] for i in hf_items if i["name"] in ran]
    why = "--no-hf" if args.no_hf else "torch is not installed" if not hf_wanted else "no JAX side ran"
    hf_part = {"environment": {"unavailable": why}, "items": {}, "error": why}
    if hf_names:
        write(jax_part, {"environment": {}, "items": {}, "error": "the HF side is running"})
        hf_part = _spawn("hf", args, start + budget, hf_names, parts["hf"])
    result = write(jax_part, hf_part)
    for path in parts.values():
        if os.path.exists(path):
            os.remove(path)
    print_table(result)
    print(f"wrote {args.out}")
    return 0 if result["summary"]["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
