"""The device check (benchmarks/device_check.sh) in its smoke mode: the same code on the
CPU at tiny shapes, the Pallas paged decode kernel in interpret mode; the cuDNN checks,
which have no CPU mode, skipped with the reason after a run with XLA standing in. The
HF side is left out here (``--no-hf``: torch's import and a tiny generate() would double
the test's time); ``bash benchmarks/device_check.sh --smoke`` runs it too."""

import json
import math
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import device_check  # imports no JAX: the orchestrating process


def test_smoke_run_writes_every_item_and_every_check_that_ran_passed(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "device_check.sh"), "--smoke", "--no-hf",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke"
    env = result["environment"]["jax"]
    assert env["backend"] == "cpu" and env["jax"] and env["device"]
    plan = device_check.plan(smoke=True)
    assert set(result["checks"]) == {i["name"] for i in plan if i["kind"] == "check"}
    assert set(result["speed"]) == {i["name"] for i in plan if i["kind"] == "speed"}

    # The Pallas kernel ran (interpreted) against the gather paths and dense float32.
    paged = next(r for name, r in result["checks"].items() if name.startswith("paged_decode"))
    assert paged["status"] == "passed"
    assert {"pallas_interpret", "xla_gather_heads_major", "xla_gather_token_major"} <= set(paged["candidates"])
    for name, record in result["checks"].items():
        assert record["status"] in ("passed", "skipped"), (name, record.get("error"), record.get("traceback"))
        if record["status"] == "skipped":  # cuDNN: the reason, and its code run with XLA in its place
            assert "cuDNN" in record["reason"]
            record = record["stand_in"]
        assert record["passed"] is True, name
        for cand_name, cand in record["candidates"].items():
            assert cand["passed"] and cand["finite"], (name, cand_name)
            assert set(cand["tolerance"]) >= {"rule"}
            if "rel_l2" in cand["tolerance"]:  # the verdict agrees with the numbers it records
                assert 0 <= cand["rel_l2"] <= cand["tolerance"]["rel_l2"], (name, cand_name)
        assert record["timings_s"] and all(t > 0 for t in record["timings_s"].values())

    for name, record in result["speed"].items():
        assert record["status"] == "passed", (name, record.get("error"), record.get("traceback"))
        assert record["tokens_per_s"] > 0 and record["timings_s"]
        assert record["hf"]["status"] == "skipped" and record["hf"]["reason"] == "--no-hf"
    engine = next(r for name, r in result["speed"].items() if name.startswith("engine_decode"))
    assert engine["engine"]["useful_tokens"] == engine["shapes"]["slots"] * engine["shapes"]["new"]

    s = result["summary"]
    assert s["all_passed"] and s["failed"] == s["error"] == 0
    assert s["passed"] + s["skipped"] == len(result["checks"]) + 2 * len(result["speed"])


def test_the_tolerances_pass_bf16_rounding_and_fail_one_wrong_row():
    """What the checks rely on: bf16 rounding of a float32 result is within the XLA
    bound, and one row of a kernel's output read from the wrong pages fails, although
    it is one row in 64 (the error is the worst row's, not the average)."""
    import device_check_numerics as numerics
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 1, 8, 32)).astype(np.float32)
    rounded = np.asarray(jnp.asarray(ref, jnp.bfloat16).astype(jnp.float32))
    xla = numerics.compare(rounded, ref)
    assert numerics.verdict(xla, None)["passed"]
    wrong = rounded.copy()
    wrong[5] = rounded[6]
    bad = numerics.compare(wrong, ref)
    assert not numerics.verdict(bad, xla["rel_l2"])["passed"]
    assert not numerics.verdict(numerics.compare(rounded * math.nan, ref), xla["rel_l2"])["passed"]
