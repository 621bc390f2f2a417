"""Multi-turn rollout throughput: the continuous engine against the static sampler and HF
transformers ``generate()``, in one process, on the same workload.

The workload is DRIFT's stage 1 in miniature: prompts of mixed lengths, K samples each,
up to 5 turns; turn t+1's context is turn t's + the reply + a feedback message. A random
model never samples a stop token, so each (episode, turn) draws its reply length from a
long-tailed distribution between 20 tokens and the budget, and each episode the turn it
ends after (a share at each turn). Every system generates exactly those lengths:

- static: the static sampler's schedule (``static.StaticSampler``): chunks of
  batch_size // K prompts, one ``generate_batched`` call per turn on the live episodes'
  whole contexts;
- engine: ``drift_jax.rollout.engine.Engine`` with batch_size slots over all prompts;
- hf: the same chunks and turns through ``model.generate()`` (PyTorch, KV cache), each
  call run to the longest reply it holds (only the drawn lengths count as useful).

Useful tokens/s = drawn reply tokens / wall seconds, at steady state: each system first
plays a warm-up workload of the same size drawn with another seed (``--warmup-prompts``),
so its compiles fall outside the clock; any still met during the timed run count in its
time. The warm-up's wall (compiles included) is reported too, as ``first_wall_s``.
Slot utilisation = useful tokens / (rows computed x decode steps). Prefill tokens are
those run through prefill, without padding. The engine's replies are compared with the
static sampler's, (episode, turn) by (episode, turn): the same keys give the same tokens.

``--estimate``: the rollout stage at paper scale (1,800 prompts x K=16, release protocol)
for Qwen2.5-3B on one H100, one H200 and a v5e-8, an estimate any machine can make:
the engine's scheduler plays the workload with a tiny model standing in for the device
and every device call is priced at its roofline (``drift_jax.aot.rollout_estimate``),
beside the static sampler's and the ideal time. Minutes on two CPU cores.

  python benchmarks/rollout.py --cpu --out r.json   # Qwen2.5 architecture, tiny width, real vocabulary
  python benchmarks/rollout.py                      # the Qwen2.5-0.5B shape (accelerator)
  python benchmarks/rollout.py --estimate --out r.json   # paper scale, estimated (no accelerator needed)
  python benchmarks/rollout.py --docs r.json             # its table into docs/scaling.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from drift_jax.models import Transformer, preset  # noqa: E402
from drift_jax.rollout.engine import Engine  # noqa: E402
from drift_jax.rollout.episodes import episode_keys, prompt_hash  # noqa: E402
from drift_jax.rollout.interface import EngineOptions, Request  # noqa: E402
from drift_jax.rollout.sampling import SamplingParams, add_work, generate_batched  # noqa: E402

END_SHARES = (0.3, 0.2, 0.2, 0.15, 0.15)  # share of episodes ending after turn 1..5
MAX_PROMPT, FEEDBACK = 120, 24  # prompt lengths are drawn below MAX_PROMPT; feedback tokens per turn


def workload(n_prompts: int, k: int, budget: int, vocab: int, seed: int = 0) -> dict:
    """Prompts, per-(episode, turn) reply lengths, feedback tokens and end turns."""
    rng = np.random.default_rng(seed)
    turns = len(END_SHARES)
    lengths = 20 + rng.lognormal(3.0, 1.0, size=(n_prompts * k, turns + 1)).astype(int)
    return {
        "k": k,
        "prompts": [rng.integers(1, vocab, size=n).tolist() for n in rng.integers(30, MAX_PROMPT, size=n_prompts)],
        "lengths": np.minimum(lengths, budget),
        "feedback": rng.integers(1, vocab, size=(n_prompts * k, turns + 1, FEEDBACK)).tolist(),
        "ends": rng.choice(np.arange(1, turns + 1), size=n_prompts * k, p=END_SHARES),
    }


def chunks(w: dict, batch_size: int):
    """Episode ids of each static chunk (batch_size // K prompts, as ``static.StaticSampler``)."""
    g = max(1, batch_size // w["k"])
    n = len(w["prompts"])
    return [list(range(s * w["k"], min(s + g, n) * w["k"])) for s in range(0, n, g)]


def turn_calls(w: dict, batch_size: int):
    """(turn, live episode ids) per generate call of a chunked, turn-by-turn player."""
    for chunk in chunks(w, batch_size):
        for turn in range(1, len(END_SHARES) + 1):
            live = [e for e in chunk if turn <= w["ends"][e]]
            if live:
                yield turn, live


def run_static(model, params, w: dict, batch_size: int, replies: dict | None = None) -> dict:
    """The static sampler's schedule; ``replies`` (if given) gets {(episode, turn): reply ids}."""
    k = w["k"]
    contexts = [list(w["prompts"][e // k]) for e in range(len(w["ends"]))]
    stats: dict = {"prefill_tokens_by_turn": {}}
    for turn, live in turn_calls(w, batch_size):
        keys = episode_keys(0, [f"p{e // k}" for e in live], [e % k for e in live], turn)
        call: dict = {}
        out = generate_batched(model, [contexts[e] for e in live], keys, params, batch_size=batch_size,
                               max_new=[int(w["lengths"][e, turn]) for e in live], stats=call)
        by_turn = stats["prefill_tokens_by_turn"]
        by_turn[turn] = by_turn.get(turn, 0) + call["prefill_tokens"]
        add_work(stats, **{n: v for n, v in call.items() if n != "slot_utilization"})
        for e, (reply, _) in zip(live, out):
            contexts[e] += reply + w["feedback"][e][turn]
            if replies is not None:
                replies[e, turn] = list(reply)
    return stats


def run_engine(model, params, w: dict, batch_size: int, steps_per_visit: int, refill_after: int,
               row_buckets: int, replies: dict | None = None) -> dict:
    """The engine over all prompts; ``replies`` (if given) gets {(episode, turn): reply ids}."""
    k = w["k"]

    def request(e, turn, tokens, share=None):
        return Request(e, tokens, (turn, prompt_hash(f"p{e // k}"), e % k), int(w["lengths"][e, turn]),
                       share=share, share_count=k)

    def source():
        for p, prompt in enumerate(w["prompts"]):
            yield [request(p * k + j, 1, list(prompt), share=p) for j in range(k)]

    def on_finish(req, reply, _):
        e, turn = req.episode, req.key_ids[0]
        if replies is not None:
            replies[e, turn] = list(reply)
        if turn < w["ends"][e]:
            return [request(e, turn + 1, list(req.tokens) + list(reply) + w["feedback"][e][turn])]
        return []

    options = EngineOptions(num_slots=batch_size, steps_per_visit=steps_per_visit, refill_after=refill_after,
                            row_buckets=row_buckets)
    eng = Engine(model, params, seed=0, options=options,
                 max_len=MAX_PROMPT + len(END_SHARES) * (params.max_new_tokens + FEEDBACK) + params.max_new_tokens)
    return {**eng.run(source(), on_finish), "compiled_programs": eng.compiled_programs}


def run_hf(cfg, w: dict, batch_size: int, torch_dtype: str) -> dict:
    import torch
    import transformers

    from drift_jax.models.hf import config_to_hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hf = config_to_hf(cfg)
    hf.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, torch_dtype),
                                                          attn_implementation="sdpa")
    model = model.to(device).eval()
    k = w["k"]
    contexts = [list(w["prompts"][e // k]) for e in range(len(w["ends"]))]
    useful = steps = 0
    for turn, live in turn_calls(w, batch_size):
        for s in range(0, len(live), batch_size):
            rows = live[s:s + batch_size]
            want = [int(w["lengths"][e, turn]) for e in rows]
            p = max(len(contexts[e]) for e in rows)
            ids = torch.zeros((len(rows), p), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, e in enumerate(rows):  # left padding, as generate() expects
                ids[r, p - len(contexts[e]):] = torch.tensor(contexts[e])
                mask[r, p - len(contexts[e]):] = 1
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                     max_new_tokens=max(want), min_new_tokens=max(want), pad_token_id=0)
            for r, e in enumerate(rows):
                contexts[e] += out[r, p:p + want[r]].tolist() + w["feedback"][e][turn]
            useful += sum(want)
            steps += len(rows) * max(want)
    return {"useful_tokens": useful, "slot_steps": steps, "slot_utilization": useful / steps}


_COMPILES = {"programs": 0, "seconds": 0.0}


def _on_compile_event(name: str, seconds: float, **_) -> None:
    if name.startswith("/jax/core/compile/"):  # tracing, lowering and XLA compile
        _COMPILES["seconds"] += seconds
        _COMPILES["programs"] += name.endswith("backend_compile_duration")


jax.monitoring.register_event_duration_secs_listener(_on_compile_event)


def timed(fn, *args):
    """(fn's output, wall seconds, {"programs", "seconds"} compiled inside that wall)."""
    before = dict(_COMPILES)
    t0 = time.perf_counter()
    out = fn(*args)
    jax.effects_barrier()
    wall = time.perf_counter() - t0
    return out, wall, {k: _COMPILES[k] - before[k] for k in before}


def estimate(args) -> dict:
    """The paper-scale estimate per target (``drift_jax.aot.rollout_estimate.run``)."""
    from drift_jax.aot import rollout_estimate as est
    from experiments.run import git_commit

    options = EngineOptions(num_slots=args.batch_size or 256, steps_per_visit=args.steps_per_visit,
                            refill_after=args.refill_after, row_buckets=args.row_buckets,
                            prefill_chunk=args.prefill_chunk, prefill_piece=args.prefill_piece)
    out = est.run(est.Workload(prompts=args.estimate_prompts), options, args.estimate_targets.split(","))
    out["commit"] = git_commit() or "unknown"
    print("\n" + est.markdown(out))
    return out


def write_docs(e: dict, path: str = os.path.join(REPO, "docs", "scaling.md")) -> None:
    """Replace the estimate block of docs/scaling.md with ``e``'s tables."""
    from drift_jax.aot.rollout_estimate import markdown
    from experiments.readme_results import rewrite

    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(rewrite(text, markdown(e), "<!-- estimate:start -->", "<!-- estimate:end -->", "docs/scaling.md"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimate", action="store_true",
                    help="the paper-scale rollout stage estimated for Qwen2.5-3B on h100, h200, v5e-8")
    ap.add_argument("--estimate-prompts", type=int, default=1800, help="--estimate: prompts (K=16 each)")
    ap.add_argument("--estimate-targets", default="h100,h200,v5e-8", help="--estimate: comma-separated")
    ap.add_argument("--docs", default=None, metavar="R_JSON",
                    help="write the estimate of R_JSON (an --estimate --out file) into docs/scaling.md")
    ap.add_argument("--prefill-chunk", type=int, default=EngineOptions.prefill_chunk)
    ap.add_argument("--prefill-piece", type=int, default=EngineOptions.prefill_piece)
    ap.add_argument("--cpu", action="store_true", help="a Qwen2.5-architecture model small enough for 2 CPU cores")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--budget", type=int, default=None, help="max new tokens per turn")
    ap.add_argument("--batch-size", type=int, default=None, help="static rows per call = engine slots")
    ap.add_argument("--steps-per-visit", type=int, default=None,
                    help="default: the engine's for the platform (--estimate: the target's)")
    ap.add_argument("--refill-after", type=int, default=None,
                    help="default: the engine's for the platform (--estimate: the target's)")
    ap.add_argument("--row-buckets", type=int, default=None,
                    help="the engine's decode row shapes (default 8; --estimate: 4, the configs')")
    ap.add_argument("--warmup-prompts", type=int, default=None,
                    help="prompts in the warm-up workload (default: as many as the timed one)")
    ap.add_argument("--systems", default="static,engine,hf", help="comma-separated subset of static,engine,hf")
    ap.add_argument("--no-hf", action="store_true", help="same as leaving hf out of --systems")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    args.row_buckets = args.row_buckets or (4 if args.estimate else 8)
    if args.docs:
        with open(args.docs) as f:
            write_docs(json.load(f)["estimate"])
        return
    if args.estimate:
        result = estimate(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"estimate": result}, f, indent=1)
        return
    if args.cpu:
        cfg = preset("qwen2.5-0.5b", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16)
        n_prompts, budget, batch = args.prompts or 8, args.budget or 96, args.batch_size or 64
        torch_dtype = "float32"
    else:
        import jax.numpy as jnp

        cfg = preset("qwen2.5-0.5b", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        n_prompts, budget, batch = args.prompts or 64, args.budget or 512, args.batch_size or 256
        torch_dtype = "bfloat16"
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    # A random model's next-token distribution over 152k tokens is nearly uniform, so
    # float rounding, which differs between any two batch shapes (two static batch sizes
    # too), moves CDF boundaries past the uniform draws in about a third of the replies.
    # Scaling the final norm makes it peaked, as a trained model's is, so equal replies
    # test the schedule rather than rounding.
    model.norm.weight[...] = model.norm.weight[...] * 200.0
    params = SamplingParams(temperature=1.0, max_new_tokens=budget)
    w = workload(n_prompts, args.samples, budget, cfg.vocab_size)
    # Warm-up on a workload of the same size (another seed): both systems meet the shapes
    # they compile before the clock starts, so the ratio compares steady-state throughput.
    warm = workload(args.warmup_prompts or n_prompts, args.samples, budget, cfg.vocab_size, seed=1)
    print(f"workload: {n_prompts} prompts x K={args.samples}, <= 5 turns, budget {budget}, "
          f"{int(sum(w['lengths'][e, t] for e in range(len(w['ends'])) for t in range(1, w['ends'][e] + 1)))} "
          f"reply tokens; vocab {cfg.vocab_size}, {jax.devices()[0].device_kind}")

    results: dict = {}
    wanted = set(args.systems.split(",")) - ({"hf"} if args.no_hf else set())
    engine_args = (batch, args.steps_per_visit, args.refill_after, args.row_buckets)
    replies: dict = {"static": {}, "engine": {}}  # the timed runs' replies, compared below
    systems = [("static", lambda: run_static(model, params, w, batch, replies["static"]),
                lambda: run_static(model, params, warm, batch)),
               ("engine", lambda: run_engine(model, params, w, *engine_args, replies=replies["engine"]),
                lambda: run_engine(model, params, warm, *engine_args))]
    systems = [s for s in systems if s[0] in wanted]
    if "hf" in wanted:
        try:
            import torch  # noqa: F401

            systems.append(("hf", lambda: run_hf(cfg, w, batch, torch_dtype), lambda: None))  # eager: no compiles
        except ImportError:
            print("hf: torch is not installed; skipped (pip install torch)")
    for name, run, warmup in systems:
        _, first_wall, _ = timed(warmup)
        stats, wall, compiled = timed(run)
        stats["first_wall_s"] = first_wall
        stats["timed_compiles"], stats["timed_compile_s"] = compiled["programs"], compiled["seconds"]
        stats["wall_s"] = wall
        stats["tokens_per_s"] = stats["useful_tokens"] / wall
        results[name] = stats
        print(f"{name}: {stats['useful_tokens']} tokens in {wall:.1f} s = {stats['tokens_per_s']:.0f} tok/s, "
              f"slot utilisation {stats['slot_utilization']:.3f}, warm-up {first_wall:.1f} s, "
              f"{compiled['programs']} compiles ({compiled['seconds']:.1f} s) inside the timed run"
              + (f", {stats['compiled_programs']} programs compiled" if "compiled_programs" in stats else ""))

    flat = {f"{n}_{key}": v for n, s in results.items() for key, v in s.items()
            if key in ("tokens_per_s", "slot_utilization", "prefill_tokens", "wall_s", "first_wall_s", "useful_tokens",
                       "timed_compile_s")}
    for n in ("static", "engine", "hf"):
        flat.setdefault(f"{n}_tokens_per_s", None)
    later = {n: sum(v for t, v in s["prefill_tokens_by_turn"].items() if int(t) > 1)
             for n, s in results.items() if "prefill_tokens_by_turn" in s}
    for n, v in later.items():
        flat[f"{n}_prefill_tokens_turns_2_5"] = v
    print("\n| system | useful tok/s | slot utilisation | prefill tokens (turns 2-5) | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for n, s in results.items():
        print(f"| {n} | {s['tokens_per_s']:.0f} | {s['slot_utilization']:.3f} | {later.get(n, '-')} | "
              f"{s['wall_s']:.1f} |")
    print()
    if flat["engine_tokens_per_s"] and flat["static_tokens_per_s"]:
        flat["engine_over_static_tokens_per_s"] = flat["engine_tokens_per_s"] / flat["static_tokens_per_s"]
        flat["static_over_engine_prefill_turns_2_5"] = later["static"] / max(1, later["engine"])
        # The same ratio with the seconds each timed run spent compiling taken out: what
        # remains once every shape met has been compiled (the static sampler compiles
        # eager key ops per distinct row count, which a longer run meets less often).
        steady = {n: results[n]["useful_tokens"] / (results[n]["wall_s"] - results[n]["timed_compile_s"])
                  for n in ("static", "engine")}
        flat["engine_over_static_tokens_per_s_without_compiles"] = steady["engine"] / steady["static"]
        print(f"engine / static tokens/s: {flat['engine_over_static_tokens_per_s']:.2f}x "
              f"({flat['engine_over_static_tokens_per_s_without_compiles']:.2f}x without the compiles "
              "inside the timed runs)")
        print(f"static / engine prefill tokens, turns 2-5: {flat['static_over_engine_prefill_turns_2_5']:.2f}x")
        same = sum(replies["engine"].get(key) == reply for key, reply in replies["static"].items())
        flat["identical_replies"], flat["replies"] = same, len(replies["static"])
        print(f"engine replies equal to the static sampler's: {same} of {len(replies['static'])}")
    if flat["engine_tokens_per_s"] and flat["hf_tokens_per_s"]:
        flat["engine_over_hf_tokens_per_s"] = flat["engine_tokens_per_s"] / flat["hf_tokens_per_s"]
        print(f"engine / hf generate() tokens/s: {flat['engine_over_hf_tokens_per_s']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**flat, "systems": results}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
