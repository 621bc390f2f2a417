"""Sharded == unsharded, on 8 simulated CPU devices; multi-host start from the environment.

XLA reads the device count when the backend starts, so the sharding checks run in one
subprocess with ``--xla_force_host_platform_device_count=8``: 3 train steps and greedy
sampling (params AND batch rows sharded) on meshes (data, fsdp, tensor) = 2x2x2, 8x1x1
(pure data parallel) and 1x8x1 (pure FSDP, with the state built directly on the mesh by
``create_sharded_train_state``), each against one device."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from drift_jax.parallel import distributed

SCRIPT = textwrap.dedent("""
    import contextlib, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from drift_jax.parallel import sharding
    from drift_jax.models import LoRAConfig, ModelConfig, Transformer, apply_lora
    from drift_jax.rollout.sampling import SamplingParams, generate, generate_batched
    from drift_jax.training.sharded_state import create_sharded_train_state, shard_train_state
    from drift_jax.training.step import make_train_step
    from drift_jax.training.train_state import create_train_state, make_optimizer

    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    tx, schedule = make_optimizer(1e-2, total_steps=10, warmup_steps=1)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        tokens = rng.integers(1, 32, (8, 12)).astype(np.int32)
        mask = np.zeros((8, 12), bool); mask[:, 6:] = True
        batches.append({"tokens": tokens, "valid": np.ones((8, 12), bool), "loss_mask": mask,
                        "weights": rng.uniform(0.1, 2.0, 8).astype(np.float32)})

    make_model = lambda: Transformer(cfg, rngs=nnx.Rngs(0))
    make_lora_model = lambda: apply_lora(make_model(), LoRAConfig(rank=4, alpha=8.0, dropout=0.0), nnx.Rngs(1))

    def train(mesh, build_on_mesh=False, make=make_model, initial=None):
        if build_on_mesh:
            graphdef, state = create_sharded_train_state(make, tx, mesh, 0)
        else:
            graphdef, state = create_train_state(make(), tx, 0)
            if mesh is not None:
                state = shard_train_state(state, tx, mesh)
        if initial is not None:  # a host copy of the params before any update
            initial.append(jax.device_get(state.params))
        step_fn = make_train_step(graphdef, tx, schedule_fn=schedule)
        # Under the mesh as context, as experiments/fitting.py trains: the model then keeps
        # rows split and gathers weights (sharding.rows_split, sharding.gathered).
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            for batch in batches:
                state, _ = step_fn(state, batch if mesh is None else sharding.shard_batch(batch, mesh))
        return graphdef, state

    def gathered_activations(mesh):
        # All-gathers in the FSDP step whose result holds every row of a micro-batch (2 of
        # 8 rows x 12 positions): activations gathered to every device.
        import re
        graphdef, state = create_train_state(make_model(), tx, 0)
        state = shard_train_state(state, tx, mesh)
        step_fn = make_train_step(graphdef, tx, 4, schedule_fn=schedule)
        with jax.set_mesh(mesh):
            text = step_fn.lower(state, sharding.shard_batch(batches[0], mesh)).compile().as_text()
        return [l.strip()[:120] for l in text.splitlines()
                if re.search(r"= (f32|bf16)\[2,12(,\d+)*\]\S* all-gather\(", l)]

    # 8 rows (one per device on 8x1x1), ragged lengths so the left padding differs.
    prompts = [np.random.default_rng(1).integers(1, 32, n).tolist() for n in (3, 7, 5, 9, 1, 12, 4, 6)]
    keys = jax.random.split(jax.random.key(0), 8)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)

    def sample(graphdef, params, mesh=None):
        model = nnx.merge(graphdef, params)
        out = generate_batched(model, prompts, keys, greedy, batch_size=8, mesh=mesh)
        return [toks for toks, _ in out]

    def sampled_rows_sharded(graphdef, params, mesh):
        # The same call generate_batched makes (a jit cache hit): are the rows split?
        inputs = jax.device_put((np.ones((8, 16), np.int32), np.ones((8, 16), bool), keys,
                                 np.full(8, 6, np.int32)), sharding.batch_sharding(mesh))
        tokens_bn, _, _ = generate(graphdef, params, *inputs, params=greedy, mesh=mesh)
        return not tokens_bn.sharding.is_fully_replicated

    def num_sharded(tree):
        return int(sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(tree)))

    graphdef, base = train(None)
    base_tokens = sample(graphdef, base.params)
    report = {}
    for shape, build_on_mesh in [((2, 2, 2), False), ((8, 1, 1), False), ((1, 8, 1), True)]:
        mesh = sharding.make_mesh(*shape)
        _, state = train(mesh, build_on_mesh)
        diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - jax.device_get(b)))), base.params, state.params)
        report["x".join(map(str, shape))] = {
            "max_param_diff": max(jax.tree.leaves(diffs)),
            "sharded_leaves": num_sharded(state.params),
            "sharded_opt_leaves": num_sharded(state.opt_state),
            "greedy_equal": sample(graphdef, state.params, mesh) == base_tokens,
            "rows_sharded": sampled_rows_sharded(graphdef, state.params, mesh),
            "base_tokens": base_tokens,
        }
    # LoRA adapters on the mesh: sharded by the base's axes, the same updates, base frozen.
    _, lora_base = train(None, make=make_lora_model)
    for shape, build_on_mesh in [((2, 2, 2), False), ((1, 8, 1), True)]:
        initial = []
        _, state = train(sharding.make_mesh(*shape), build_on_mesh, make=make_lora_model, initial=initial)
        adapters = [nnx.split_state(p, nnx.LoRAParam, ...)[0] for p in (lora_base.params, state.params)]
        diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(jax.device_get(b))).ravel()
                                for a, b in zip(*map(jax.tree.leaves, adapters))])
        frozen = nnx.split_state(state.params, nnx.LoRAParam, ...)[1]
        start = nnx.split_state(initial[0], nnx.LoRAParam, ...)[1]
        report["lora " + "x".join(map(str, shape))] = {
            "max_param_diff": float(diffs.max()),
            "p99_param_diff": float(np.percentile(diffs, 99)),
            "base_unchanged": all(bool(jnp.array_equal(a, jax.device_get(b)))
                                  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(frozen))),
            "sharded_opt_leaves": num_sharded(state.opt_state),
            "adapters_moved": float(max(jnp.max(jnp.abs(x)) for x in jax.tree.leaves(
                nnx.split_state(state.params, nnx.LoRAParam, ...)[0]))),
        }
    report["gathered_activations"] = gathered_activations(sharding.make_mesh(1, 2, 1))
    print("REPORT" + json.dumps(report))
""")


@pytest.fixture(scope="module")
def shard_report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


MESHES = ["2x2x2", "8x1x1", "1x8x1"]


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_train_steps_equal_single_device(shard_report, mesh):
    result = shard_report[mesh]
    assert result["max_param_diff"] < 1e-5, result
    if mesh != "8x1x1":  # FSDP/tensor axes really split the params and the Adam moments
        assert result["sharded_leaves"] > 0 and result["sharded_opt_leaves"] >= result["sharded_leaves"]
    else:  # pure data parallelism replicates them
        assert result["sharded_leaves"] == 0


@pytest.mark.parametrize("mesh", ["2x2x2", "1x8x1"])
def test_sharded_lora_training_equals_single_device(shard_report, mesh):
    """Adapters only: the same updates on the mesh, the base bitwise frozen, and the
    adapters' Adam moments sharded like them (the base's axes).

    LoRA's B starts at zero, so A's first nonzero gradients are tiny sums with heavy
    cancellation, and Adam steps every coordinate by up to lr (1e-2) whatever its
    gradient's size: a coordinate whose near-zero gradient the mesh's reduction order
    rounds differently can move by a sizeable part of lr (seen: 2e-5 to 3e-5 on some
    CPUs). So 99% of the adapter coordinates must agree to rounding (1e-6) and none may
    differ by lr / 10; a sharding bug (a missing reduction over the batch rows) moves
    most coordinates by about lr."""
    result = shard_report["lora " + mesh]
    assert result["p99_param_diff"] < 1e-6 and result["max_param_diff"] < 1e-3, result
    assert result["base_unchanged"], result
    assert result["sharded_opt_leaves"] > 0 and result["adapters_moved"] > 0


def test_fsdp_step_keeps_rows_split(shard_report):
    """Under FSDP no activation is gathered to every device: each device computes its own
    rows of a micro-batch, the weights are gathered instead."""
    assert shard_report["gathered_activations"] == []


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_greedy_sampling_equals_unsharded(shard_report, mesh):
    result = shard_report[mesh]
    assert result["rows_sharded"]  # the batch rows were really split over the devices
    assert result["greedy_equal"], result
    assert all(len(tokens) == 6 for tokens in result["base_tokens"])  # no stop ids: full budget


# -- multi-host start (drift_jax.parallel.distributed) ---------------------------------------------

EXPLICIT = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1", "TPU_WORKER_HOSTNAMES": "t1"}, None),
    (EXPLICIT, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}),
    (dict(EXPLICIT, JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0"), None),
    ({"SLURM_NTASKS": "16"}, {}),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, {}),
    ({"MEGASCALE_NUM_SLICES": "2"}, {}),
    ({"DRIFT_DISTRIBUTED": "1"}, {}),
    (dict(EXPLICIT, DRIFT_DISTRIBUTED="0"), None),
])
def test_detect_multi_process_jobs_from_the_environment(env, expected):
    assert distributed.detect(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
    (dict(EXPLICIT, JAX_PROCESS_ID="4"), r"not in \[0, JAX_NUM_PROCESSES=4\)"),
    (dict(EXPLICIT, JAX_NUM_PROCESSES="four"), "JAX_NUM_PROCESSES='four' is not an integer"),
])
def test_detect_names_the_bad_variable(env, message):
    with pytest.raises(ValueError, match=message):
        distributed.detect(env)


def test_initialize_from_env_is_a_no_op_for_one_process_and_passes_the_job_on(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.initialize_from_env({}) is False and calls == []
    assert distributed.initialize_from_env(EXPLICIT) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}]
    assert distributed.initialize_from_env({"SLURM_NTASKS": "8"}) is True and calls[-1] == {}
