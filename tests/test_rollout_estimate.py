"""The paper-scale rollout estimate (``drift_jax.aot.rollout_estimate``): the engine's
scheduler over a drawn release-protocol workload records every device call, the calls
account for every token, later turns prefill exactly their new tokens, the pricing
agrees with the accelerator compile's model of the engine's programs, and
``benchmarks/rollout.py --estimate`` writes the figures per target."""

import dataclasses
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from drift_jax.aot import pipeline, targets
from drift_jax.aot import rollout_estimate as est
from drift_jax.models import preset
from drift_jax.rollout.interface import EngineOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = est.Workload(prompts=3, samples=4, budget=24, prompt_tokens=(20, 40), reply_median=12.0,
                     first_correct=0.3, later_correct=0.3, feedback_tokens=9)


# Eight slots: on every target the pool is capped at eight of SMALL's longest requests,
# so the fixture and ``est.run`` below share one set of compiled programs.
OPTIONS = EngineOptions(num_slots=8, prefill_chunk=64, prefill_piece=8)


@pytest.fixture(scope="module")
def played():
    d = est.draw(SMALL, seed=1)
    pages = 8 * -(-SMALL.max_len // 16) + 1
    options = dataclasses.replace(OPTIONS.for_platform("gpu"), num_pages=pages)
    stats, trace = est.play(SMALL, d, options, est.tiny_model(), seed=1)
    return d, stats, trace


def test_the_trace_accounts_for_every_token(played):
    d, stats, trace = played
    decode = [c for c in trace if c[0] == "decode"]
    prefill = [c for c in trace if c[0] == "prefill"]
    assert stats["useful_tokens"] == est.reply_tokens(d)
    # Each request's first decode step feeds its context's last token, not a reply token.
    assert sum(c[3] for c in decode) == stats["useful_tokens"] + stats["requests"]
    assert sum(c[2] for c in decode) == stats["decode_steps"] and len(decode) == stats["visits"]
    assert sum(c[3] for c in prefill) == stats["prefill_call_tokens"]
    assert sum(c[1] * c[2] for c in prefill) == stats["prefill_padded_tokens"]
    assert stats["requests"] == int(d["ends"].sum())


def test_rewritten_replies_prefill_exactly_their_new_tokens(played):
    _, stats, _ = played
    assert est.later_turn_ratio(stats) == 1.0
    later = sum(n for t, n in stats["prompt_tokens_by_turn"].items() if t > 1)
    assert sum(stats["new_tokens_by_turn"].values()) < later  # the prompt and earlier turns are reused


def test_pricing_is_the_compiles_model_of_the_engines_programs():
    """A decode step priced here is ``pipeline._paged_model``'s (the roofline the
    accelerator compile reports for the engine's decode), plus the kernel's whole
    blocks; a prefill call is its ``logits=False`` model with each row's context read."""
    cfg = preset("qwen2.5-3b", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    cost, h100 = est.Cost.of(cfg), targets.get("h100")
    rows, context = 256, 1856
    model = pipeline._paged_model(cfg, rows, 1, context, logits=True)
    blocks = rows * est.BLOCK_TOKENS // 2
    want = max((model["flops"] + cost.attn_flops * blocks) / h100.peak_flops,
               (model["bytes"] + blocks * cost.kv_token) / h100.hbm_bytes_per_s)
    assert cost.decode(h100, rows, 1, rows * context, "pallas") == pytest.approx(want, rel=1e-9)
    model = pipeline._paged_model(cfg, 128, 16, context, logits=False)
    kv = 128 * context * cost.kv_token
    want = max(model["flops"] / h100.peak_flops,
               (model["bytes"] + (est.ATTENTION_BYTES["xla"] - 1) * kv) / h100.hbm_bytes_per_s)
    assert cost.prefill(h100, 128, 16, 128 * context) == pytest.approx(want, rel=1e-9)
    # More slots read the weights once for more tokens: a step per token costs less.
    assert cost.decode(h100, 256, 1, 256 * 1000, "pallas") / 256 < cost.decode(h100, 64, 1, 64 * 1000, "pallas") / 64


def test_the_static_sampler_costs_more_than_the_engine_on_the_same_episodes(played):
    d, stats, trace = played
    cfg = preset("qwen2.5-3b", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    cost, h100 = est.Cost.of(cfg), targets.get("h100")
    priced = est.price_trace(trace, cost, h100, "pallas")
    from drift_jax.data.batching import bucket_length
    static = est.static_s(SMALL, d, cost, h100, 8, bucket_length)
    ideal = est.ideal_s(stats, trace, cost, h100, 8)
    assert ideal["decode_s"] + ideal["prefill_s"] < priced["decode_s"] + priced["prefill_s"] < static
    assert sum(priced["calls"].values()) == len(trace)


def test_draws_follow_the_stated_workload():
    w = est.Workload(prompts=400)
    d = est.draw(w)
    assert d["lengths"].max() <= w.budget and d["lengths"].min() >= w.rewrite_trim + 2
    ends = d["ends"]
    assert abs(np.mean(ends == 1) - w.first_correct) < 0.02
    assert set(np.unique(ends)) <= set(range(1, w.turns + 1))
    assert w.max_len == w.prompt_tokens[1] + w.turns * w.budget + (w.turns - 1) * w.feedback_tokens


def test_the_estimate_has_every_figure_per_target(played):
    """``est.run`` (what ``benchmarks/rollout.py --estimate`` writes): per target the
    engine's, the static sampler's and the ideal time, the prefill padding and the
    later turns' prefill; a v5e-8 plays half the prompts on each of its hosts."""
    e = est.run(SMALL, OPTIONS, seed=1)
    for name in est.TARGETS:
        for key in ("engine_s", "static_s", "ideal_s", "prefill_padding_ratio"):
            assert e[name][key] > 0, (name, key)
        assert e[name]["ideal_s"] < e[name]["decode_s"] + e[name]["prefill_s"] < e[name]["engine_s"]
    assert e["h100"]["visits"] == played[1]["visits"]  # the fixture's run, the same schedule
    assert e["release_prefill_ratio"] == 1.0
    assert e["v5e-8"]["decode_path"] == "pallas_tpu" and e["h100"]["decode_path"] == "pallas"
    assert e["v5e-8"]["hosts"] == 2 and e["h100"]["hosts"] == 1
    assert e["v5e-8"]["visits"] < e["h100"]["visits"]


def test_the_docs_carry_the_generated_estimate(tmp_path):
    """docs/scaling.md's estimate block is ``--docs``'s rendering of a full run, and
    ``--docs`` replaces exactly that block."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import rollout as bench

    text = open(os.path.join(REPO, "docs", "scaling.md")).read()
    block = text.split("<!-- estimate:start -->\n", 1)[1].split("<!-- estimate:end -->", 1)[0]
    assert block.startswith("Made by `python benchmarks/rollout.py --estimate --out r.json` at commit ")
    assert "1,800 prompts x K=16" in block and "| Qwen2.5-3B, one device per host | h100 | h200 | v5e-8 |" in block
    doc = tmp_path / "scaling.md"
    doc.write_text("before\n<!-- estimate:start -->\nold\n<!-- estimate:end -->\nafter\n")
    e = {"commit": "abc", "workload": {"prompts": 2, "samples": 4}, "reply_tokens": 10, "slots": 8,
         "release_prefill_ratio": 1.0,
         "h100": {"engine_s": 60.0, "decode_s": 40.0, "prefill_s": 15.0, "host_s": 5.0, "static_s": 600.0,
                  "static_rows": 128, "ideal_s": 50.0, "engine_over_ideal": 1.2, "prefill_padding_ratio": 1.05,
                  "slot_utilization": 0.9, "decode_path": "pallas", "visits": 3, "evictions": 0, "pages": 9,
                  "hosts": 1, "release_prefill_ratio": 1.0}}
    bench.write_docs(e, str(doc))
    out = doc.read_text()
    assert out.startswith("before\n<!-- estimate:start -->\nMade by") and out.endswith("<!-- estimate:end -->\nafter\n")
    assert "old" not in out and "| continuous engine | 1.0 min |" in out
