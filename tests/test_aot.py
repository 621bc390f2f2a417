"""The library's device programs compile for an H100 and a TPU topology without either
(drift_jax.aot), at Qwen2.5-0.5B widths and vocabulary with 2 layers, and their memory
figures are what their shapes imply.

Needs the CUDA plugin and libtpu (requirements-aot.txt); without them these tests skip,
unless DRIFT_REQUIRE_AOT=1 (CI), where a missing backend fails."""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from drift_jax.aot import pipeline, targets
from drift_jax.aot.compile import compile_program
from drift_jax.models import paged, preset
from drift_jax.rollout import pool_size
from drift_jax.rollout.interface import EngineOptions

TARGETS = ("h100", "v5e-4")
OPTIMIZER = dict(learning_rate=1e-5, warmup_ratio=0.1, schedule="constant", weight_decay=0.1, grad_clip=1.0)
SLOTS, NEW_TOKENS, MAX_LEN = 4, 8, 256


def settings(length: int) -> pipeline.Settings:
    """Two layers at Qwen2.5-0.5B widths, the real 151,936-token vocabulary, bf16 over
    float32 master weights; a train batch of 8 rows of ``length`` tokens in 2
    micro-batches (4 rows each: one per chip of a v5e-4), the LM head and loss in chunks of 32 positions (so that a chunk's
    padding stays small beside 63 positions); an engine of 4 slots over a 256-token
    context, greedy."""
    model = preset("qwen2.5-0.5b", num_layers=2, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="full")
    sampling = pipeline.Sampling(SLOTS, NEW_TOKENS, 0.0, 2, 48, 40, EngineOptions(page_size=16, prefill_chunk=32))
    fit = pipeline.Fit(8, length, 2, OPTIMIZER, loss_chunk_size=32)
    return pipeline.Settings(model=model, train=fit, rollout=sampling, eval=sampling, max_len=MAX_LEN)


def target_or_skip(name: str) -> targets.Target:
    target = targets.get(name)
    reason = targets.missing_backend(target)
    if reason:
        if os.environ.get("DRIFT_REQUIRE_AOT") == "1":
            pytest.fail(f"DRIFT_REQUIRE_AOT=1: {reason}")
        pytest.skip(reason)
    return target


_reports: dict = {}


def report(target_name: str, program: str, length: int = 64) -> dict:
    """The compile report of one program (compiled once per test session)."""
    key = (target_name, program, length)
    if key not in _reports:
        target = target_or_skip(target_name)
        _reports[key] = compile_program(pipeline.build(program, settings(length), target), target)
    return _reports[key]


def param_bytes(dtype) -> int:
    return settings(64).model.num_params * jnp.dtype(dtype).itemsize


@pytest.mark.parametrize(("target", "length"), [("h100", 64), ("h100", 65), ("v5e-4", 64)])
def test_train_step_compiles_at_odd_and_even_lengths_with_the_target_attention(target, length):
    """cuDNN's fused attention (the H100's default for bf16) takes only even lengths in
    training, and the step runs the model on a batch's T - 1 positions: both parities of
    T must compile, and the train state is updated in place (donated, aliased). On the
    TPU (splash attention under shard_map over the FSDP mesh) T = 64 only: the model runs
    on 64 positions at T = 64 and T = 65 alike, and each TPU compile costs CI about 15 s
    of CPU."""
    r = report(target, "train_step", length)
    assert r["compiled"], r["error"]
    assert r["shapes"]["attention"] == {"h100": "cudnn", "v5e-4": "splash"}[target]
    # Per device: master weights + AdamW's two moments, split over the FSDP devices (the
    # TPU's four chips; norms and biases are whole on each, a few KiB).
    devices = math.prod(r["shapes"]["mesh"].values())
    m, state = r["memory"], 3 * param_bytes(jnp.float32) / devices
    assert state <= m["argument_bytes"] < 2 * state
    assert m["alias_bytes"] >= state  # the new state takes the donated one's buffers
    assert m["fits"]


@pytest.mark.parametrize("target", TARGETS)
def test_train_step_flops_count_every_micro_batch(target):
    """XLA's cost analysis counts a loop's body once; the report counts it per trip: the
    two micro-batches' forward and backward are at least 6 FLOPs per parameter and token
    (and at most 10: remat's second forward, attention and the softmax come on top)."""
    r = report(target, "train_step")
    tokens = 8 * 63 / math.prod(r["shapes"]["mesh"].values())  # per device: rows split over FSDP
    n = settings(64).model.num_params
    assert 6 * n * tokens <= r["cost"]["flops"] <= 10 * n * tokens
    assert r["cost"]["roofline_s"] == max(r["cost"]["compute_s"], r["cost"]["memory_s"]) > 0
    if target == "h100":
        assert r["cost"]["custom_calls"]["cudnn_attention"]["flops"] > 0


def cache_bytes(s: pipeline.Settings, target: targets.Target) -> int:
    _, cache = pipeline.abstract_engine(pipeline.sampling_model(s, target), s.rollout, target, s.max_len)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in cache.k + cache.v)


def dead_in_prefill_bytes() -> int:
    """bf16 bytes of the last layer's weights that prefill never reads: it computes no
    logits, so the final norm and, of the last layer, all but what makes the keys and
    values it writes to the pages are dead code (its query, output and MLP weights and
    its second norm)."""
    cfg = settings(64).model
    d, q = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    return 2 * (d * q + q + q * d + 3 * d * cfg.intermediate_size + d + d)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("program", ["prefill", "decode"])
def test_engine_programs_compile_and_update_the_page_pool_in_place(target, program):
    r = report(target, program)
    assert r["compiled"], r["error"]
    weights = param_bytes(jnp.bfloat16)  # sampling reads the weights in the compute dtype
    read = weights - (dead_in_prefill_bytes() if program == "prefill" else 0)
    cache = cache_bytes(settings(64), targets.get(target))
    m = r["memory"]
    assert read + cache <= m["argument_bytes"] < 2 * weights + cache
    assert m["alias_bytes"] >= cache  # the donated pool is written in place
    # The pool is sized to leave pool_size.workspace_bytes for these programs' temporaries.
    options = settings(64).rollout.options
    assert m["temp_bytes"] <= pool_size.workspace_bytes(
        settings(64).model, SLOTS, options.prefill_chunk, paged.CHUNK_PAGES * options.page_size)
    if program == "decode" and target == "h100":
        assert r["shapes"]["impl"] == "pallas"
        assert r["cost"]["custom_calls"]["paged_attention_kernel"]["calls"] > 0


def test_static_sampler_compiles():
    """The static sampler's cache lives inside its program: temporaries at least the
    dense cache of its rows over prompt + new tokens, per layer, keys and values. For the
    H100 only: the paper configs sample with the engine, and a TPU compile of this
    program costs CI about 5 s of CPU (benchmarks/aot.py compiles it for every target)."""
    r = report("h100", "static_rollout")
    assert r["compiled"], r["error"]
    s = settings(64)
    prompt = r["shapes"]["prompt"]
    cfg = s.model
    dense = 2 * cfg.num_layers * SLOTS * (prompt + NEW_TOKENS) * cfg.num_kv_heads * cfg.head_dim * 2
    m = r["memory"]
    assert param_bytes(jnp.bfloat16) <= m["argument_bytes"] < 2 * param_bytes(jnp.bfloat16)
    assert m["temp_bytes"] >= dense
    assert np.isfinite(r["cost"]["roofline_s"])


def test_loop_bodies_count_once_per_trip():
    """XLA's cost analysis counts a loop body once; ``hlo.module_cost`` counts it per trip:
    XLA's known trip count, or the caller's for a loop whose count is data-dependent
    (its op_name matched). Compiled for this host's CPU: no plugin needed."""
    import jax

    from drift_jax.aot import hlo
    from drift_jax.aot.compile import _raw_cost

    def matmuls(x, w, n):
        fixed = jax.lax.fori_loop(0, 10, lambda i, x: jnp.tanh(x @ w), x)
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, fixed))[1]

    x, w = jnp.ones((64, 128), jnp.float32), jnp.ones((128, 128), jnp.float32)
    text = jax.jit(matmuls).lower(x, w, 7).compile().runtime_executable().hlo_modules()[0].to_string()
    one = 2 * 64 * 128 * 128
    guessed = hlo.module_cost(text, _raw_cost)
    assert len(guessed.unknown_loops) == 1  # the while_loop: its count depends on n
    assert 11 * one <= guessed.flops < 12 * one
    told = hlo.module_cost(text, _raw_cost, loop_trips={r"while$": 7})
    assert told.unknown_loops == [] and 17 * one <= told.flops < 18 * one
    assert _raw_cost(text)[0] < 3 * one  # what XLA alone counts: each body once


def test_stage_estimates_follow_the_work_and_need_every_program():
    """The stage model: decode steps are the episodes' reply tokens over the slots, at a
    visit's roofline per its steps; hosts split the sampling; a stage one of whose
    programs did not compile has no estimate."""
    from drift_jax.aot import estimate

    def compiled(seconds):
        return {"compiled": True, "cost": {"roofline_s": seconds}}

    entries = {"decode": compiled(0.008), "prefill": compiled(0.0), "eval_decode": compiled(0.016),
               "train_step": compiled(2.0), "held_out_loss": compiled(0.5)}
    work = {"episodes": 512, "turns": 5, "rollout_new_tokens": 512, "rollout_slots": 256,
            "rollout_prefill_tokens": 0, "prefill_chunk": 128, "decode_steps": 8, "updates": 10,
            "held_out_batches": 2, "held_out_evals": 3, "eval_questions": 256, "eval_new_tokens": 1024,
            "eval_slots": 256, "eval_prefill_tokens": 0}
    one, two = estimate.stage_times(entries, work, hosts=1), estimate.stage_times(entries, work, hosts=2)
    assert one["rollout"] == pytest.approx(512 * 5 * 512 / 256 * 0.001) == 2 * two["rollout"]
    assert one["eval (per policy)"] == pytest.approx(5 * 1024 * 0.002)
    assert one["train (per method)"] == pytest.approx(10 * 2.0 + 3 * 2 * 0.5)
    failed = {**entries, "decode": {"compiled": False, "error": "x"}}
    assert estimate.stage_times(failed, work, hosts=1)["rollout"] is None


def test_failures_name_the_static_sampler_and_the_rows_that_fit():
    from drift_jax.aot import estimate

    over = {"compiled": True, "memory": {"fits": False, "peak_bytes": 80 * 2**30, "budget_bytes": 60 * 2**30}}
    entries = {"h100": {"decode": {"compiled": True, "memory": {"fits": True}},
                        "static_eval": {**over, "fits_at_rows": {"rows": 64, "peak_bytes": 40 * 2**30}},
                        "static_rollout": {"compiled": False, "error": "RESOURCE_EXHAUSTED", "fits_at_rows": None}}}
    assert estimate.failures(entries) == [
        "h100 static_eval (static sampler, not the configured engine): peak 80.00 GiB > budget 60.00 GiB; "
        "fits at 64 rows (40.0 GiB)",
        "h100 static_rollout (static sampler, not the configured engine): RESOURCE_EXHAUSTED; "
        "fits at no chunk of 8 rows or more"]
