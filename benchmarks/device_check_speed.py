"""The device check's throughput measurements (``benchmarks/device_check.py`` runs them):
tokens/s of the rollout engine's decode and of the trainer's step at Qwen2.5 widths
(random weights, synthetic prompts and batches), and of HF transformers' ``generate()``
and a PyTorch training step at the same shapes.

Engine: ``episodes.make_sampler`` builds the continuous engine with ``slots`` slots;
``slots`` requests of ``prompt`` random tokens each, temperature 1, no stop token, so
every row decodes exactly ``new`` tokens. new tokens/s = slots x new / wall of the run,
its prefill included (as in HF's ``generate()``, which prefills too; ``throughput.py``'s
``torch_generate`` runs it greedy with ``min_new_tokens`` forcing the count). A first
run of the same shapes with fewer new tokens compiles the engine's programs outside the
clock.

Trainer: the paper configs' step (``make_train_step``, weighted SFT, AdamW, bf16 compute
over float32 weights, remat "full", the LM head chunked, the attention the device picks)
on rows of ``seq`` tokens, whose ``seq - 1`` predicted tokens count; one step compiles,
``steps`` more are timed. The HF step (``benchmarks/throughput.py``'s ``torch_train``)
is bf16 weights and AdamW states, sdpa attention, full logits: what a plain HF loop
does, not the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import throughput  # benchmarks/throughput.py: the HF side and the FLOP and roofline arithmetic
from device_check_numerics import model_config, random_model

from drift_jax.rollout.episodes import make_sampler
from drift_jax.rollout.interface import EngineOptions, Request
from drift_jax.rollout.sampling import SamplingParams
from drift_jax.training.step import make_train_step
from drift_jax.training.train_state import create_train_state, make_optimizer


def _peaks() -> tuple[float | None, float | None]:
    return throughput.device_peaks(jax.devices()[0].device_kind)


def engine_decode(*, model: str, layers: int, slots: int, prompt: int, new: int, seed: int = 0) -> dict:
    """New tokens/s of the continuous engine (see the module docstring)."""
    cfg = model_config(model, layers).replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    policy = random_model(cfg, seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, cfg.vocab_size, prompt).tolist() for _ in range(slots)]

    def play(n_new: int) -> dict:
        sampler = make_sampler(EngineOptions(num_slots=slots), policy, SamplingParams(max_new_tokens=n_new),
                               seed=seed, batch_size=slots, max_len=prompt + new)
        requests = [Request(i, prompts[i], (1, i, 0), n_new) for i in range(slots)]
        return sampler.run(iter([requests]), lambda *_: [])

    t0 = time.perf_counter()
    play(min(new, 16))  # compiles prefill and decode: the decode program does not depend on the budget
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    work = play(new)
    wall = time.perf_counter() - t0
    _, bandwidth = _peaks()
    roof = throughput.decode_roofline(cfg, slots, prompt, new, bandwidth) if bandwidth else None
    tokens_per_s = work["useful_tokens"] / wall
    return {"passed": work["useful_tokens"] == slots * new, "tokens_per_s": tokens_per_s,
            "shapes": {"model": model, "layers": layers, "slots": slots, "prompt": prompt, "new": new,
                       "dtype": "bfloat16"},
            "timings_s": {"first_run_with_compiles": first, "timed_run": wall},
            "engine": {k: work[k] for k in ("useful_tokens", "decode_steps", "slot_utilization", "prefill_tokens")},
            "roofline_tokens_per_s": roof and roof["ideal_tokens_per_s"],
            "share_of_roofline": roof and tokens_per_s / roof["ideal_tokens_per_s"]}


def trainer(*, model: str, layers: int, batch: int, seq: int, steps: int, seed: int = 0) -> dict:
    """Trained tokens/s of the train step (see the module docstring)."""
    cfg = model_config(model, layers).replace(dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="full")
    tx, schedule = make_optimizer(5e-6, total_steps=1000, warmup_steps=0)
    graphdef, state = create_train_state(random_model(cfg, seed), tx, seed)
    step_fn = make_train_step(graphdef, tx, schedule_fn=schedule)
    rng = np.random.default_rng(seed)
    data = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32),
            "valid": jnp.ones((batch, seq), bool),
            "loss_mask": jnp.asarray(np.arange(seq)[None, :].repeat(batch, 0) >= seq // 4),
            "weights": jnp.asarray(rng.uniform(0.1, 2.0, batch), jnp.float32)}
    t0 = time.perf_counter()
    state, metrics = step_fn(state, data)
    float(metrics["loss"])  # blocks
    first = time.perf_counter() - t0
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, data)
        losses.append(metrics["loss"])
    losses = [float(x) for x in losses]  # blocks on the last step
    wall = time.perf_counter() - t0
    tokens_per_s = batch * (seq - 1) * steps / wall
    peak, _ = _peaks()
    flops = throughput.train_flops_per_token(cfg, seq - 1)
    return {"passed": bool(np.all(np.isfinite(losses))), "tokens_per_s": tokens_per_s,
            "mfu": peak and tokens_per_s * flops / peak,
            "shapes": {"model": model, "layers": layers, "batch": batch, "seq": seq, "steps": steps,
                       "params": cfg.num_params, "dtype": "bfloat16 over float32 weights", "remat": "full",
                       "attention": "default (cudnn on GPU)"},
            "timings_s": {"first_step_with_compile": first, "timed_steps": wall},
            "loss_first_last": [losses[0], losses[-1]]}


# -- HF transformers (PyTorch) -------------------------------------------------------------

def hf_unavailable(cpu_ok: bool) -> str | None:
    """Why the HF side cannot run here (None: it can): torch missing, or no CUDA device
    (a CPU is accepted only with ``cpu_ok``, the smoke mode's code-path run)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        return f"torch / transformers not importable ({e})"
    if not torch.cuda.is_available() and not cpu_ok:
        return "torch sees no CUDA device"
    return None


def hf_environment() -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu"}


def _hf_config(model: str, layers: int):
    # throughput.py's torch side builds the HF model from our config (config_to_hf).
    return dataclasses.replace(model_config(model, layers), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def hf_generate(*, model: str, layers: int, slots: int, prompt: int, new: int, seed: int = 0) -> dict:
    """New tokens/s of HF ``generate()`` (greedy, ``new`` tokens forced) at the engine's shapes."""
    del seed
    args = types.SimpleNamespace(prompt_len=prompt, new_tokens=new, sample_repeats=1)
    t0 = time.perf_counter()
    tokens_per_s = throughput.torch_generate(_hf_config(model, layers), slots, args)
    throughput._torch_free()
    return {"passed": True, "tokens_per_s": tokens_per_s, "timings_s": {"total": time.perf_counter() - t0}}


def hf_train(*, model: str, layers: int, batch: int, seq: int, steps: int, seed: int = 0) -> dict:
    """Trained tokens/s of an HF training step on ``seq - 1`` tokens a row, as the trainer's."""
    del seed
    args = types.SimpleNamespace(train_batch=batch, train_seq=seq - 1, train_steps=steps, warmup=1)
    t0 = time.perf_counter()
    tokens_per_s = throughput.torch_train(_hf_config(model, layers), args)
    throughput._torch_free()
    return {"passed": True, "tokens_per_s": tokens_per_s, "timings_s": {"total": time.perf_counter() - t0}}
