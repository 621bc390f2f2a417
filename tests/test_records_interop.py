"""Interop with the authors' release: their rollout records train here, ours train there.

``fixtures/rollouts/authors_format.jsonl`` is written by hand in the release's record format:
three prompts, failed and successful trajectories, a missing turn key (math-17's 4th record
has no "t1"), format penalties, and stale ``weight`` fields that must be recomputed.
"""

import json
import math
import os

import numpy as np
import pytest

from drift_jax.data.records import read_jsonl, write_jsonl
from drift_jax.weights import trajectory_returns, trajectory_weights

from helpers import tiny_hf_checkpoint

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "rollouts", "authors_format.jsonl")
GAMMA, BETA, LAM = 0.9, 0.1, 0.5  # the released values

# R = sum_t gamma^(t-1) r_t + format_penalty - lam * (1 - unique/answers), worked out by hand.
HAND_RETURNS = {
    0: 1.0,                          # solved at t1
    1: 0.81 - 0.5 * (1 - 2 / 3),     # solved at t3; answers 1/4, 1/4, 0.5
    2: -0.1 - 0.5 * (1 - 3 / 4),     # never solved; one unparsable reply; 1/8 twice
    3: 0.9,                          # solved at t2; "t1" key missing (counts as 0)
    4: -0.2 - 0.5 * (1 - 1 / 3),     # never solved; two unparsable replies; 7, 7, 7
    5: 0.9**4,                       # solved at t5 after four distinct wrong answers
    6: -0.5 * (1 - 3 / 5),           # a, c, d, a, c
    7: -0.5 * (1 - 1 / 5),           # a five times
}
GROUPS = {"math-17": [0, 1, 2, 3], "math-42": [4, 5], "gpqa-3": [6, 7]}


def _hand_weights() -> np.ndarray:
    weights = np.zeros(len(HAND_RETURNS))
    for members in GROUPS.values():
        mean = sum(math.exp(HAND_RETURNS[i] / BETA) for i in members) / len(members)
        for i in members:
            weights[i] = math.exp(HAND_RETURNS[i] / BETA) / mean
    return weights


def test_fixture_reads_strictly():
    records, skipped = read_jsonl(FIXTURE)
    assert len(records) == 8 and not skipped
    assert [r["prompt_id"] for r in records].count("math-17") == 4


def test_returns_equal_the_formula():
    records, _ = read_jsonl(FIXTURE)
    for i, record in enumerate(records):
        assert trajectory_returns(record, GAMMA, LAM) == pytest.approx(HAND_RETURNS[i], abs=1e-9), i


def test_weights_equal_the_formula_and_ignore_stale_weights():
    records, _ = read_jsonl(FIXTURE)
    assert any("weight" in r for r in records)
    got = trajectory_weights(records, GAMMA, BETA, LAM)
    np.testing.assert_allclose(got, _hand_weights(), rtol=1e-5)
    for members in GROUPS.values():  # the group mean of the weights is 1
        assert got[members].mean() == pytest.approx(1.0, rel=1e-5)
    stale = [r["weight"] for r in records if "weight" in r]
    assert not np.allclose(stale, got[[i for i, r in enumerate(records) if "weight" in r]])


def test_write_read_roundtrip_keeps_records(tmp_path):
    records, _ = read_jsonl(FIXTURE)
    path = str(tmp_path / "copy.jsonl")
    write_jsonl(path, records)
    again, _ = read_jsonl(path)
    assert again == records
    # One JSON object per line, as the authors' scripts read it.
    with open(path) as f:
        assert [json.loads(line) for line in f] == records


def test_from_rollouts_trains_a_checkpoint_on_the_authors_file(tmp_path):
    """experiments/configs/from_rollouts.py end to end: HF checkpoint + authors' rollouts in,
    a trained HF checkpoint out, weights from the formula."""
    import subprocess
    import sys

    from flax import nnx

    from drift_jax.models import from_pretrained

    init = tiny_hf_checkpoint(str(tmp_path / "init"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(repo, "experiments", "run.py"),
           "--config=" + os.path.join(repo, "experiments", "configs", "from_rollouts.py"),
           f"--config.model.checkpoint={tmp_path / 'init'}", f"--config.rollouts={FIXTURE}",
           f"--workdir={workdir}", "--config.model.dtype=float32", "--config.model.param_dtype=float32",
           "--config.model.remat=none", "--config.train.batch_size=4", "--config.train.num_micro_batches=2",
           "--config.train.epochs=2", "--config.train.learning_rate=1e-2", "--config.train.max_len=128",
           "--config.train.checkpoint_every=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    records, _ = read_jsonl(FIXTURE)
    saved = json.loads((workdir / "weights.json").read_text())
    np.testing.assert_allclose(saved["drift"], trajectory_weights(records, GAMMA, BETA, LAM), rtol=1e-6)
    stats = json.loads((workdir / "drift" / "train_stats.json").read_text())
    # The paper config's release protocol holds out the last ceil(5% x 8) = 1 record.
    assert stats["steps"] == 4 and stats["examples"] == 7 and stats["held_out_examples"] == 1
    assert stats["truncated_examples"] > 0  # the longest dialogues exceed 128 tokens

    trained = from_pretrained(str(workdir / "drift" / "hf"), dtype=np.float32)
    before, after = nnx.state(init, nnx.Param), nnx.state(trained, nnx.Param)
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax_leaves(before), jax_leaves(after))]
    assert max(moved) > 0.0, "training did not change the weights"
    results = json.loads((workdir / "results.json").read_text())
    assert results["rollout_files"] == [FIXTURE]
    assert results["methods"]["drift"]["cost"]["generated_tokens"] is None  # made elsewhere


def jax_leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("protocol", ["drift-jax", "release"])
def test_paper_pipeline_runs_on_a_tiny_checkpoint(protocol, tiny_math_run):
    """qwen2_5_3b_metamath's every stage, shrunk (tests/configs/tiny_math.py), under both
    protocols: rollouts in the release format from the math environment, training, and
    per-benchmark evaluation; under "release", full-mode rollout prompts with the think
    prefill, simple-mode eval prompts, a held-out eval loss, and later turns that
    prefill about their new tokens though replies are stored rewritten."""
    workdir, _, _ = tiny_math_run(protocol)
    records, _ = read_jsonl(str(workdir / "rollouts.jsonl"))
    assert len(records) == 2 * 2  # the fixture's 2 MATH_ prompts (of 4 records) x K=2
    evaluated, _ = read_jsonl(str(workdir / "eval" / "math500_reference.jsonl"))
    for r in records + evaluated:
        assert r["messages"][0] == {"role": "system", "content": "You're a helpful assistant. "}
    stats = json.loads((workdir / "drift" / "train_stats.json").read_text())
    if protocol == "drift-jax":
        for r in records + evaluated:
            assert r["messages"][1]["content"].endswith("Strictly follow this format.")
        assert "eval_loss" not in stats
    else:
        for r in records:  # the release's turn block; each reply starts with the prefill or is rewritten
            assert "\nTurn 1:\nState:\n" in r["messages"][1]["content"]
            assert "Max response length: 400 words (tokens)." in r["messages"][1]["content"]
            assert all(m["content"].startswith("<think>") for m in r["messages"] if m["role"] == "assistant")
        for r in evaluated:  # eval in simple mode
            assert "Turn 1:" not in r["messages"][1]["content"]
        # 4 rows, the last ceil(0.05 x 4) = 1 held out; its loss logged at the last update.
        assert stats["examples"] == 3 and stats["held_out_examples"] == 1
        assert math.isfinite(stats["eval_loss"]) and stats["eval_loss"] > 0
        # The next context holds the rewritten reply, not the sampled tokens; the engine
        # keeps the cached positions up to where they diverge, so turn 2 prefills at most
        # 1.2x its new tokens (the feedback block and the rewritten part).
        work = json.loads((workdir / "rollout_stats.json").read_text())["work"]
        new = sum(n for t, n in work["new_tokens_by_turn"].items() if int(t) > 1)
        prefilled = sum(n for t, n in work["prefill_tokens_by_turn"].items() if int(t) > 1)
        reuse_free = sum(n for t, n in work["prompt_tokens_by_turn"].items() if int(t) > 1)
        assert 0 < new <= prefilled <= 1.2 * new < reuse_free
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["benchmarks"]) == {"math500", "mmlu_pro"}
    for method in ("reference", "drift"):
        per_bench = [results["benchmarks"][b][method]["multi@2"] for b in ("math500", "mmlu_pro")]
        assert results["methods"][method]["multi@2"] == pytest.approx(np.mean(per_bench))
    assert (workdir / "drift" / "hf" / "model.safetensors").exists()
    assert (workdir / "drift" / "hf" / "tokenizer.json").exists()
