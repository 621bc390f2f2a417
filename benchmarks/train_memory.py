"""Train-state memory of full fine-tuning vs LoRA at real model shapes, from shapes alone.

The train state (``train_state.abstract_train_state``: the model and optimizer traced with
``jax.eval_shape``, nothing allocated) of:
  full FT: float32 master weights (bf16 compute) + AdamW's two float32 moments;
  LoRA:    the bf16 base, frozen (no moments) + float32 adapters (rank 16, alpha 32, on
           q, k, v, o in every layer) + AdamW's moments over the adapters only.
Bytes are ``train_state.state_summary``'s: params + optimizer state; "+ grads" adds the
step's gradients (one copy of what trains, in its dtype), which live through every
update. Activations and the compiler's workspace come on top.

  python benchmarks/train_memory.py                       # Qwen2.5-3B and Llama-3.1-8B
  python benchmarks/train_memory.py --models qwen2.5-0.5b --rank 8 --out memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from drift_jax.models import PRESETS, LoRAConfig, Transformer, apply_lora, preset  # noqa: E402
from drift_jax.training.train_state import abstract_train_state, make_optimizer, state_summary  # noqa: E402

jax.config.update("jax_platforms", "cpu")  # shapes only: never touch an accelerator


def setups(name: str, lora: LoRAConfig) -> dict:
    """setup name -> the function building its (abstract) model."""
    full_cfg = preset(name, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    lora_cfg = preset(name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    return {
        "full": lambda: Transformer(full_cfg, rngs=nnx.Rngs(0)),
        "lora": lambda: apply_lora(Transformer(lora_cfg, rngs=nnx.Rngs(0)), lora, nnx.Rngs(1)),
    }


def measure(models, lora: LoRAConfig) -> list[dict]:
    tx, _ = make_optimizer(1e-5, total_steps=1000)
    rows = []
    for name in models:
        for setup, make_model in setups(name, lora).items():
            summary, _ = state_summary(abstract_train_state(make_model, tx))
            rows.append({"model": name, "setup": setup, **summary,
                         "state_and_grad_bytes": summary["state_bytes"] + summary["trainable_bytes"]})
    return rows


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | setup | trained params | frozen params | trained GB | frozen GB | optimizer GB "
             "| state GB | + grads GB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setup']} | {r['trainable_params']:,} | {r['frozen_params']:,} | "
                     f"{_gb(r['trainable_bytes'])} | {_gb(r['frozen_bytes'])} | {_gb(r['opt_state_bytes'])} | "
                     f"{_gb(r['state_bytes'])} | {_gb(r['state_and_grad_bytes'])} |")
    return "\n".join(lines)


def ratios(rows: list[dict], key: str = "state_bytes") -> dict[str, float]:
    """model -> full FT's ``key`` bytes over LoRA's."""
    by = {(r["model"], r["setup"]): r[key] for r in rows}
    return {m: by[m, "full"] / by[m, "lora"] for m, s in by if s == "full"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen2.5-3b,llama-3.1-8b",
                        help=f"comma-separated presets, of {sorted(PRESETS)}")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--out", help="also write the rows and ratios as JSON here")
    args = parser.parse_args(argv)
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, targets=args.targets)
    rows = measure([m.strip() for m in args.models.split(",") if m.strip()], lora)
    print(f"Train state (params + AdamW state; GB = 1e9 bytes). LoRA: rank {lora.rank}, "
          f"targets {','.join(lora.targets)}; full FT: float32 master weights.\n")
    print(table(rows))
    print()
    with_grads = ratios(rows, "state_and_grad_bytes")
    for model, ratio in ratios(rows).items():
        print(f"{model}: full fine-tuning needs {ratio:.1f}x the train-state memory of LoRA "
              f"({with_grads[model]:.1f}x with gradients)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"lora": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
                       "rows": rows, "full_over_lora": ratios(rows),
                       "full_over_lora_with_grads": with_grads}, f, indent=2)


if __name__ == "__main__":
    main()
