"""Training and sampling throughput of drift_jax against HF transformers, in one process.

For each model shape (random init, bf16 compute):
  (a) train: our weighted-SFT train step (AdamW, grad clip 1.0) at batch x seq tokens,
      tokens/s and MFU, against HF transformers PyTorch (sdpa attention, AdamW, grad clip
      1.0, labels = inputs) on the same shapes;
  (b) sample: our sampler's new tokens/s (greedy, prompt P + N new tokens, no stop
      token, so every row decodes all N) at each batch size, against HF ``generate()``;
  (c) the decode HBM roofline of that shape: bytes one decode step must read (weights +
      the KV cache of the live context) over ``--hbm-bandwidth``.
A table with the ratios (ours / HF, ours / roofline) is printed last. Absolute figures
depend on the card; the ratios are what the run is for (both sides measured here, now).

MFU = tokens/s x (6 N + 12 L n_heads head_dim T) / --peak-flops, where N counts the
weights that take part in matmuls (the tied embedding counts once, as the LM head) and
the attention term is the PaLM convention (no discount for causality), so it is
comparable with the usual published figures.

The torch side runs when torch is importable and CUDA is available (or with --tiny, on
CPU, to exercise the code). It runs first: JAX's GPU backend is started before torch
loads its CUDA libraries (so JAX's cuDNN is the one loaded), without preallocating, and
JAX allocates its working memory after torch has freed its own.

  python benchmarks/throughput.py                      # Qwen2.5-0.5B and 1.5B, peaks of the device kind
  python benchmarks/throughput.py --tiny               # small shapes, a few steps, any CPU
  python benchmarks/throughput.py --models qwen2.5-0.5b --sample-batches 64 --peak-flops 989e12
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from drift_jax.models import ModelConfig, Transformer, preset  # noqa: E402
from drift_jax.models.hf import config_to_hf  # noqa: E402
from drift_jax.parallel import sharding  # noqa: E402
from drift_jax.rollout.sampling import SamplingParams, generate  # noqa: E402
from drift_jax.training.sharded_state import create_sharded_train_state  # noqa: E402
from drift_jax.training.step import make_train_step  # noqa: E402
from drift_jax.training.train_state import make_optimizer  # noqa: E402

TINY = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True)


# -- the arithmetic ------------------------------------------------------------------------

def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in matmuls: all but an untied input embedding (a lookup)."""
    return cfg.num_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 N + 12 L n_heads head_dim T (PaLM, App. B)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def decode_roofline(cfg: ModelConfig, batch: int, prompt: int, new: int, hbm_bandwidth: float,
                    bytes_per_value: int = 2) -> dict:
    """HBM-bound decode: every step reads all weights once and the KV cache of the
    context. ``ideal``: only the live context (P + i at step i; mean P + (N - 1) / 2);
    ``dense``: the whole P + N cache each step, as our fixed-shape sampler does."""
    weight_bytes = matmul_params(cfg) * bytes_per_value
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * bytes_per_value
    out = {"weight_GB": weight_bytes / 1e9}
    for name, context in (("ideal", prompt + (new - 1) / 2), ("dense", prompt + new)):
        kv_bytes = batch * context * kv_bytes_per_token
        step_s = (weight_bytes + kv_bytes) / hbm_bandwidth
        out[f"{name}_kv_GB"] = kv_bytes / 1e9
        out[f"{name}_step_ms"] = 1e3 * step_s
        out[f"{name}_tokens_per_s"] = batch / step_s
    return out


# -- JAX side ------------------------------------------------------------------------------

def _time(fn, repeats: int, warmup=None) -> float:
    """Seconds per call of ``fn`` (which must block), after one untimed call of ``warmup``
    (default ``fn`` itself; None-returning callables only)."""
    (fn if warmup is None else warmup)()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def jax_train(cfg: ModelConfig, args) -> float:
    """Tokens/s of our train step on one device (the state built by the sharded path)."""
    tx, schedule = make_optimizer(1e-5, total_steps=1000, warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
    mesh = sharding.make_mesh(1, 1, 1)
    graphdef, state = create_sharded_train_state(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), tx, mesh)
    step_fn = make_train_step(graphdef, tx, args.micro_batches, schedule_fn=schedule,
                              loss_chunk_size=args.loss_chunk_size)
    b, t = args.train_batch, args.train_seq
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch({
        "tokens": rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32),  # t predicted tokens
        "valid": np.ones((b, t + 1), bool),
        "loss_mask": np.arange(t + 1)[None, :].repeat(b, 0) >= (t + 1) // 4,  # prompt quarter unsupervised
        "weights": rng.uniform(0.1, 2.0, b).astype(np.float32),
    }, mesh)
    holder = {"state": state}

    def steps(n):
        for _ in range(n):
            holder["state"], metrics = step_fn(holder["state"], batch)
        float(metrics["loss"])  # blocks on the last step

    seconds = _time(lambda: steps(args.train_steps), 1, warmup=lambda: steps(args.warmup)) / args.train_steps
    return b * t / seconds


def jax_sample(cfg: ModelConfig, batch: int, args) -> float:
    """New tokens/s of our sampler (greedy, no stop ids: every row decodes all N)."""
    model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(model)
    p, n = args.prompt_len, args.new_tokens
    prompt_bp = jax.random.randint(jax.random.key(1), (batch, p), 0, cfg.vocab_size, jnp.int32)
    valid_bp = jnp.ones((batch, p), bool)
    keys_b = jax.random.split(jax.random.key(2), batch)
    budget_b = jnp.full((batch,), n, jnp.int32)
    params = SamplingParams(temperature=0.0, max_new_tokens=n)

    def run():
        _, lengths_b, _ = generate(graphdef, state, prompt_bp, valid_bp, keys_b, budget_b, params=params)
        assert int(jnp.min(lengths_b)) == n  # blocks; and every row really decoded N tokens

    seconds = _time(run, args.sample_repeats)
    return batch * n / seconds


# -- torch side ----------------------------------------------------------------------------

def torch_available(tiny: bool) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() or tiny


def _torch_model(cfg: ModelConfig):
    import torch
    import transformers

    hf = config_to_hf(cfg)
    hf.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16,
                                                          attn_implementation="sdpa")
    return model.to(device), device


def _torch_sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _torch_free():
    """Return the memory of a finished measurement (its locals are gone) to the driver."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_train(cfg: ModelConfig, args) -> float:
    import torch

    model, device = _torch_model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=device == "cuda")
    x = torch.randint(0, cfg.vocab_size, (args.train_batch, args.train_seq), device=device)

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def steps(n):
        for _ in range(n):
            step()
        _torch_sync()

    seconds = _time(lambda: steps(args.train_steps), 1, warmup=lambda: steps(args.warmup)) / args.train_steps
    return args.train_batch * args.train_seq / seconds


def torch_generate(cfg: ModelConfig, batch: int, args) -> float:
    import torch

    model, device = _torch_model(cfg)
    model.eval()
    x = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), device=device)
    mask = torch.ones_like(x)
    n = args.new_tokens

    def run(n=n):
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        _torch_sync()
        assert out.shape[1] == args.prompt_len + n

    # A short generate warms kernels and the allocator; nothing is compiled per length.
    seconds = _time(run, args.sample_repeats, warmup=lambda: run(8))
    return batch * n / seconds


# -- driver --------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b", help="comma-separated presets")
    ap.add_argument("--tiny", action="store_true", help="small shapes, few steps: a CPU smoke run")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=2048)
    ap.add_argument("--train-steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (compile)")
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--sample-batches", default="64,256")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sample-repeats", type=int, default=1, help="timed calls per sampler run")
    ap.add_argument("--master-fp32", action="store_true",
                    help="our train step keeps float32 master weights + Adam state (HF side stays bf16)")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument("--attention", default=None, choices=["xla", "cudnn"], help="default: auto")
    ap.add_argument("--loss-chunk-size", type=int, default=512, help="0: full [B, T, V] logits")
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="dense bf16 FLOP/s (default: DEVICE_PEAKS for the device kind)")
    ap.add_argument("--hbm-bandwidth", type=float, default=None,
                    help="bytes/s (default: DEVICE_PEAKS for the device kind)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-sample", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.train_steps < 1 or args.sample_repeats < 1:
        ap.error("--warmup, --train-steps and --sample-repeats must be >= 1")
    if args.tiny:
        args.models, args.train_batch, args.train_seq, args.train_steps, args.warmup = "tiny", 2, 64, 2, 1
        args.sample_batches, args.prompt_len, args.new_tokens, args.sample_repeats = "4", 16, 16, 1
        args.loss_chunk_size = min(args.loss_chunk_size, 32)
    return args


# Device kind (a substring of jax's device_kind, first match wins) -> (dense bf16 FLOP/s,
# HBM bytes/s), from the vendors' data sheets; H200's bandwidth is the one measured on it.
DEVICE_PEAKS = (
    ("H200", 989e12, 4.2e12), ("H100", 989e12, 3.35e12), ("A100", 312e12, 2.0e12), ("L4", 121e12, 0.3e12),
    ("TPU v4", 275e12, 1.2e12), ("TPU v5 lite", 197e12, 0.82e12), ("TPU v5", 459e12, 2.76e12),
    ("TPU v6 lite", 918e12, 1.64e12),
)


def device_peaks(device_kind: str) -> tuple[float | None, float | None]:
    """(peak FLOP/s, HBM bytes/s) of a device kind; (None, None) when unknown (a CPU):
    then MFU and roofline shares are not reported rather than measured against an H100."""
    for kind, flops, bandwidth in DEVICE_PEAKS:
        if kind.lower() in device_kind.lower():
            return flops, bandwidth
    return None, None


def model_config(name: str, args, train: bool) -> ModelConfig:
    base = TINY if name == "tiny" else preset(name)
    # Sampling always reads bf16 weights: float32 masters would double the bytes per step.
    param_dtype = jnp.float32 if (train and args.master_fp32) else jnp.bfloat16
    return dataclasses.replace(base, dtype=jnp.bfloat16, param_dtype=param_dtype, remat=args.remat,
                               attention_impl=args.attention)


def main(argv=None):
    args = parse_args(argv)
    names = args.models.split(",")
    batches = [int(b) for b in args.sample_batches.split(",")]
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)  # starts JAX's backend first
    peak_flops, bandwidth = device_peaks(jax.devices()[0].device_kind)
    args.peak_flops = args.peak_flops or peak_flops
    args.hbm_bandwidth = args.hbm_bandwidth or bandwidth
    use_torch = not args.no_torch and torch_available(args.tiny)
    results = {name: {} for name in names}

    if use_torch:  # first, so that JAX later gets the memory torch frees
        import torch
        import transformers
        print(f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
        for name in names:
            r = results[name]
            if not args.skip_train:
                r["hf_train_tok_s"] = torch_train(model_config(name, args, True), args)
                _torch_free()
                print(f"{name}: HF train {r['hf_train_tok_s']:,.0f} tokens/s", flush=True)
            if not args.skip_sample:
                for b in batches:
                    r[f"hf_sample_b{b}_tok_s"] = torch_generate(model_config(name, args, False), b, args)
                    _torch_free()
                    print(f"{name}: HF generate batch {b}: {r[f'hf_sample_b{b}_tok_s']:,.0f} new tokens/s", flush=True)

    for name in names:
        r = results[name]
        cfg = model_config(name, args, True)
        flops = train_flops_per_token(cfg, args.train_seq)
        r["params"] = cfg.num_params
        r["train_flops_per_token"] = flops
        if not args.skip_train:
            r["jax_train_tok_s"] = jax_train(cfg, args)
            if args.peak_flops:
                r["jax_mfu"] = r["jax_train_tok_s"] * flops / args.peak_flops
                if "hf_train_tok_s" in r:
                    r["hf_mfu"] = r["hf_train_tok_s"] * flops / args.peak_flops
            print(f"{name}: our train {r['jax_train_tok_s']:,.0f} tokens/s, MFU {_share(r.get('jax_mfu'))}",
                  flush=True)
        if not args.skip_sample:
            for b in batches:
                scfg = model_config(name, args, False)
                r[f"jax_sample_b{b}_tok_s"] = jax_sample(scfg, b, args)
                print(f"{name}: our sampler batch {b}: {r[f'jax_sample_b{b}_tok_s']:,.0f} new tokens/s", flush=True)
                if not args.hbm_bandwidth:
                    continue
                roof = decode_roofline(scfg, b, args.prompt_len, args.new_tokens, args.hbm_bandwidth)
                r[f"roofline_b{b}"] = roof
                print(f"{name}: roofline: {roof['weight_GB']:.2f} GB weights + {roof['ideal_kv_GB']:.2f} GB KV "
                      f"per step -> {roof['ideal_step_ms']:.3f} ms -> {roof['ideal_tokens_per_s']:,.0f} "
                      f"new tokens/s (dense-cache read: {roof['dense_tokens_per_s']:,.0f})", flush=True)

    print_table(results, names, batches, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


def _share(x):
    return "-" if x is None else f"{x:.1%}"


def _ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def print_table(results, names, batches, args):
    device = jax.devices()[0].device_kind
    peaks = (f"peak {args.peak_flops / 1e12:.0f} TFLOP/s" if args.peak_flops else
             "peak unknown for this device kind: pass --peak-flops for MFU")
    peaks += (f", HBM {args.hbm_bandwidth / 1e12:.1f} TB/s" if args.hbm_bandwidth else
              ", HBM unknown: pass --hbm-bandwidth for the roofline")
    print(f"\n=== throughput on {device} ({peaks}) ===")
    header = f"{'shape':<14} {'measure':<34} {'ours':>12} {'HF':>12} {'ours/HF':>8} {'ours/roof':>9}"
    print(header)
    print("-" * len(header))
    for name in names:
        r = results[name]
        if "jax_train_tok_s" in r:
            hf = r.get("hf_train_tok_s")
            print(f"{name:<14} {f'train tok/s, {args.train_batch}x{args.train_seq}':<34} "
                  f"{r['jax_train_tok_s']:>12,.0f} {hf or 0:>12,.0f} {_ratio(r['jax_train_tok_s'], hf):>8}")
            print(f"{name:<14} {'train MFU (6N + attention)':<34} {_share(r.get('jax_mfu')):>12} "
                  f"{_share(r.get('hf_mfu')):>12}")
        for b in batches:
            if f"jax_sample_b{b}_tok_s" not in r:
                continue
            ours, hf = r[f"jax_sample_b{b}_tok_s"], r.get(f"hf_sample_b{b}_tok_s")
            roof = r.get(f"roofline_b{b}", {}).get("ideal_tokens_per_s")
            label = f"new tok/s, batch {b}, {args.prompt_len}+{args.new_tokens}"
            print(f"{name:<14} {label:<34} {ours:>12,.0f} {hf or 0:>12,.0f} {_ratio(ours, hf):>8} "
                  f"{_share(roof and ours / roof):>9}")
            if roof:
                print(f"{name:<14} {f'  decode roofline, batch {b}':<34} {roof:>12,.0f}")


if __name__ == "__main__":
    main()
