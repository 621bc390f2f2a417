"""One training of a policy in the workdir, shared by every trainer: the optimizer, the
train state on the mesh, the resumable loop with its metrics lines, the final policy.
``fit`` is weighted SFT on a list of examples (the reference, the offline methods);
online RL (``experiments/online_rl.py``) brings its own batches and loss."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import jax
from flax import nnx

from drift_jax.data.batching import epoch_plan, make_batch_fn, padding_fraction
from drift_jax.models import Transformer
from drift_jax.parallel import distributed, sharding
from drift_jax.training.loop import train_loop
from drift_jax.training.sharded_state import move_to_mesh, shard_model
from drift_jax.training.step import make_eval_fn, make_train_step
from drift_jax.training.train_state import create_train_state, make_optimizer, state_summary
from experiments.workdir import Experiment, read_metrics, warn_if_unchanged, write_json


def train_policy(exp: Experiment, name: str, init_model: Transformer, tcfg, steps: int,
                 make_batches: Callable, *, loss_fn=None, aux_model: Transformer | None = None,
                 held_out_batches=(), desc: str | None = None) -> tuple[list[dict], int, float]:
    """Train ``init_model`` for ``steps`` updates under ``<workdir>/<name>``, resumable
    from its last checkpoint; save the final policy as ``name``.

    ``tcfg``: the optimizer's settings (learning_rate, warmup_ratio, schedule,
    weight_decay, grad_clip), num_micro_batches, checkpoint_every, and for the default
    weighted SFT loss loss_normalize and loss_chunk_size. ``make_batches(graphdef)``
    gives ``batch_fn(step, state)`` (``loop.train_loop``); ``loss_fn`` replaces the SFT
    loss, and the params of ``aux_model`` go to it at every update. The loss on
    ``held_out_batches`` is logged every ``tcfg.eval_every`` updates. On a training mesh
    (``exp.mesh``) the train state and every batch are sharded over it, and the loop
    runs with it as the context mesh (``jax.set_mesh``); ``init_model`` and ``aux_model``
    are then consumed (``sharded_state.shard_model``): their params move onto the mesh
    and their first copies are freed. Returns (the
    metrics lines of every update, over every resume; the updates made; the time.time()
    the loop started at)."""
    tx, schedule = make_optimizer(
        tcfg.learning_rate, steps, warmup_ratio=tcfg.warmup_ratio, schedule=tcfg.schedule,
        weight_decay=tcfg.weight_decay, grad_clip=tcfg.grad_clip)
    mesh = exp.mesh
    aux = None if aux_model is None else nnx.state(aux_model, nnx.Param)
    if mesh is None:
        graphdef, state = create_train_state(init_model, tx, seed=exp.cfg.seed)
    else:  # params + optimizer state by their logical axes, batch rows over data x fsdp
        # The models are consumed: their first copies (on one device) are freed as they move.
        graphdef, state = shard_model(init_model, tx, mesh, seed=exp.cfg.seed)
        if aux is not None:  # laid out like the trained params it is compared with
            aux = jax.tree.map(move_to_mesh, aux, sharding.param_shardings(aux, mesh))
    del init_model, aux_model
    print(f"train {name}: {state_summary(state)[1]}")
    if loss_fn is None:  # weighted SFT
        step_fn = make_train_step(graphdef, tx, tcfg.num_micro_batches, tcfg.loss_normalize, schedule,
                                        loss_chunk_size=tcfg.loss_chunk_size)
    else:
        step_fn = make_train_step(graphdef, tx, tcfg.num_micro_batches, schedule_fn=schedule, loss_fn=loss_fn)
    batch_fn = make_batches(graphdef)
    if mesh is not None:
        batch_fn = sharded(batch_fn, mesh)
    eval_fn = None
    if held_out_batches:
        batches = list(held_out_batches)
        if mesh is not None:
            batches = [sharding.shard_batch(b, mesh) for b in batches]
        # In the train step's micro-batches: 128 rows at once would need ~10x its memory.
        eval_fn = make_eval_fn(graphdef, batches, tcfg.loss_normalize, tcfg.loss_chunk_size,
                               num_micro_batches=tcfg.num_micro_batches)
    ckpt = exp.checkpointer(name, tcfg.checkpoint_every)
    metrics_path = exp.path(name, "metrics.jsonl")
    t0 = time.time()
    # The mesh as context: kernels that XLA cannot partition (splash attention on TPU)
    # run under shard_map over it.
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        state = train_loop(state, step_fn, batch_fn, steps, aux=aux, checkpointer=ckpt,
                           metrics_path=metrics_path, desc=desc or f"train {name}", eval_fn=eval_fn,
                           eval_every=getattr(tcfg, "eval_every", 0),
                           tensorboard_dir=exp.path(name, "tensorboard"))
    ckpt.close()
    exp.save_policy(name, nnx.merge(graphdef, state.params))
    distributed.barrier(f"trained:{name}")  # the metrics process 0 wrote are complete
    return read_metrics(metrics_path), int(state.step), t0


def sharded(batch_fn: Callable, mesh) -> Callable:
    """``batch_fn`` whose batches (or the batch of a ``(batch, info)`` pair) are placed on
    ``mesh``, rows over data x fsdp."""
    def on_mesh(step, state=None):
        out = batch_fn(step, state)
        if isinstance(out, tuple):
            return sharding.shard_batch(out[0], mesh), out[1]
        return sharding.shard_batch(out, mesh)

    return on_mesh


def fit(exp: Experiment, name: str, examples, init_model: Transformer, tcfg, steps: int | None = None,
        held_out=()) -> dict:
    """Weighted SFT of ``init_model`` on ``examples`` under ``<workdir>/<name>``
    (``train_policy``); resumable. ``steps`` None: ``tcfg.epochs`` passes over the data.
    The weighted loss on ``held_out`` examples is logged every ``tcfg.eval_every``
    updates. Writes and returns ``train_stats.json``."""
    pad_id, pack = exp.tokenizer.pad_token_id, tcfg.pack
    layout = dict(bucket_window=tcfg.bucket_window, shuffle=tcfg.shuffle, pack=pack,
                  pack_length=(tcfg.pack_length or tcfg.max_len) if pack else None)
    batch_fn, per_epoch = make_batch_fn(examples, tcfg.batch_size, exp.cfg.seed, pad_id, **layout)
    steps = tcfg.epochs * per_epoch if steps is None else steps
    held_out_batches = []
    if held_out:  # file order, padded to whole batches with zero-weight rows
        eval_batch, n = make_batch_fn(held_out, tcfg.batch_size, exp.cfg.seed, pad_id,
                                      **{**layout, "bucket_window": 0, "shuffle": False})
        held_out_batches = [eval_batch(i) for i in range(n)]
    history, _, t0 = train_policy(exp, name, init_model, tcfg, steps, lambda graphdef: batch_fn,
                                  held_out_batches=held_out_batches)
    lengths = [len(e.tokens) for e in examples]
    padding = {"padding_fraction": padding_fraction(lengths, epoch_plan(lengths, tcfg.batch_size, exp.cfg.seed, 0,
                                                                        **layout), tcfg.batch_size)}
    if pack:  # what the same data would pad to one example per row
        unpacked = {**layout, "pack": False, "pack_length": None}
        padding["padding_fraction_unpacked"] = padding_fraction(
            lengths, epoch_plan(lengths, tcfg.batch_size, exp.cfg.seed, 0, **unpacked), tcfg.batch_size)
    stats = {
        "steps": steps,
        "examples": len(examples),
        "truncated_examples": sum(e.truncated for e in examples),
        # Real tokens of real rows through forward+backward, and the supervised targets
        # among them, from each update's metrics (a resumed run logs each update once).
        "trained_tokens": int(sum(r["num_input_tokens"] for r in history)),
        "supervised_tokens": int(sum(r["num_tokens"] for r in history)),
        "unchanged_policy": warn_if_unchanged(name, history),
        **padding,
        **({"held_out_examples": len(held_out), "eval_loss": history[-1]["eval_loss"]} if held_out else {}),
        # This attempt and the interrupted ones before it (a resumed training's full cost).
        "wall_s": time.time() - t0 + exp.ledger.earlier_s("reference" if name == "reference" else f"train:{name}"),
    }
    write_json(exp.path(name, "train_stats.json"), stats)
    return stats
