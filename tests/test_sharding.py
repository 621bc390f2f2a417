"""Sharded == unsharded, on 8 simulated CPU devices.

XLA reads the device count when the backend starts, so the check runs in a subprocess
with ``--xla_force_host_platform_device_count=8``."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from drift_jax import sharding
    from drift_jax.models import ModelConfig, Transformer
    from drift_jax.sampling import SamplingParams, generate_batched
    from drift_jax.train import create_train_state, make_optimizer, make_train_step

    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    tx, schedule = make_optimizer(1e-2, total_steps=10, warmup_steps=1)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        tokens = rng.integers(1, 32, (8, 12)).astype(np.int32)
        mask = np.zeros((8, 12), bool); mask[:, 6:] = True
        batches.append({"tokens": tokens, "valid": np.ones((8, 12), bool), "loss_mask": mask,
                        "weights": rng.uniform(0.1, 2.0, 8).astype(np.float32)})

    def train(mesh):
        graphdef, state = create_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), tx, 0)
        step_fn = make_train_step(graphdef, tx, schedule_fn=schedule)
        if mesh is not None:
            state = sharding.shard_train_state(state, tx, mesh)
        for batch in batches:
            state, _ = step_fn(state, batch if mesh is None else sharding.shard_batch(batch, mesh))
        return graphdef, state

    def sample(graphdef, params):
        model = nnx.merge(graphdef, params)
        prompts = [rng2.integers(1, 32, n).tolist() for n in (3, 7, 5, 9)]
        keys = jax.random.split(jax.random.key(0), 4)
        out = generate_batched(model, prompts, keys, SamplingParams(temperature=0.0, max_new_tokens=6), batch_size=4)
        return [toks for toks, _ in out]

    graphdef, base = train(None)
    rng2 = np.random.default_rng(1); base_tokens = sample(graphdef, base.params)
    report = {}
    for shape in [(2, 2, 2), (8, 1, 1)]:
        mesh = sharding.make_mesh(*shape)
        _, state = train(mesh)
        diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - jax.device_get(b)))), base.params, state.params)
        sharded_leaves = sum(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                             for x in jax.tree.leaves(state.params))
        rng2 = np.random.default_rng(1)
        report["x".join(map(str, shape))] = {
            "max_param_diff": max(jax.tree.leaves(diffs)),
            "sharded_leaves": int(sharded_leaves),
            "greedy_equal": sample(graphdef, state.params) == base_tokens,
        }
    print("REPORT" + json.dumps(report))
""")


@pytest.fixture(scope="module")
def shard_report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


@pytest.mark.parametrize("mesh", ["2x2x2", "8x1x1"])
def test_sharded_train_steps_equal_single_device(shard_report, mesh):
    result = shard_report[mesh]
    assert result["max_param_diff"] < 1e-5, result
    if mesh == "2x2x2":
        assert result["sharded_leaves"] > 0  # FSDP/tensor axes really split the params


@pytest.mark.parametrize("mesh", ["2x2x2", "8x1x1"])
def test_sharded_greedy_sampling_equals_unsharded(shard_report, mesh):
    assert shard_report[mesh]["greedy_equal"]
