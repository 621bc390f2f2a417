"""The resumable training loop: host work around the jitted step -- fetching batches, the
NaN check, logging (``MetricsWriter``: JSON lines and TensorBoard), checkpoints.

A checkpoint holds ``checkpoint_view(state)``: the trained params (all of them, or the
LoRA adapters alone), the optimizer state, step and rng; ``restore_checkpoint`` puts one
back into a state whose frozen params come from the model the run starts from.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
from flax import nnx
from tqdm.auto import tqdm

from drift_jax.parallel import distributed
from drift_jax.training.objective import Batch
from drift_jax.training.train_state import TrainState, split_trainable


def checkpoint_view(state: TrainState) -> TrainState:
    """What ``train_loop`` checkpoints: ``state`` with params cut to the trained ones (the
    whole state without adapters; with them, the adapters and not the frozen base)."""
    return state.replace(params=split_trainable(state.params)[0])


def restore_checkpoint(checkpointer, state: TrainState, step: int | None = None) -> TrainState:
    """``state`` with the trained params, optimizer state, step and rng of checkpoint
    ``step`` (default: the latest) written by ``train_loop``; frozen params are kept from
    ``state`` (concrete, not abstract, when the model has adapters)."""
    trained, frozen = split_trainable(state.params)
    restored = checkpointer.restore(state.replace(params=trained), step)
    return restored.replace(params=nnx.merge_state(restored.params, frozen))


def _keep_metrics_upto(metrics_path: str, step: int) -> None:
    """Drop metrics lines past ``step`` (the restored checkpoint): those updates are
    redone, and a resumed run must not log them twice."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(metrics_path, "w") as f:
        f.writelines(lines)


class MetricsWriter:
    """Where ``train_loop``'s metrics lines go: one JSON line each to ``metrics_path`` and,
    with ``tensorboard_dir``, every number of it as a TensorBoard scalar there (tag = key,
    step = the line's step). Opened at ``start``, the step training starts from: lines and
    events past it are discarded, since those updates are redone. ``enabled=False`` (every
    process but 0 in a multi-process job) writes nothing. A context manager."""

    def __init__(self, metrics_path: str | None, tensorboard_dir: str | None, start: int, enabled: bool = True):
        self._file = self._board = None
        if enabled and metrics_path:
            _keep_metrics_upto(metrics_path, start)
            self._file = open(metrics_path, "a")
        if enabled and tensorboard_dir:
            from tensorboardX import SummaryWriter  # lazy: only training that asks for it

            self._board = SummaryWriter(tensorboard_dir, purge_step=start or None)

    def write(self, record: dict[str, Any]) -> None:
        """Log ``record`` (with "step" and "wall_time", unix seconds)."""
        if self._board is not None:
            for key, value in record.items():
                if key not in ("step", "wall_time") and isinstance(value, (int, float)):
                    self._board.add_scalar(key, value, record["step"], walltime=record["wall_time"])
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._board is not None:
            self._board.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_finite(metrics: dict[str, float], done: int, checkpointer) -> None:
    """Raise at a non-finite loss or gradient norm: a finite loss with non-finite
    gradients has already poisoned the params."""
    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
        return
    last = checkpointer.latest_step() if checkpointer is not None else None
    raise FloatingPointError(
        f"non-finite loss {metrics['loss']} / grad_norm {metrics['grad_norm']} "
        f"at step {done} (batch_fn({done - 1})); last checkpoint: step {last}. "
        "Check that batch's weights and tokens, or lower the learning rate."
    )


def train_loop(
    state: TrainState,
    step_fn: Callable[..., tuple[TrainState, dict]],
    batch_fn: Callable[[int, TrainState], Batch | tuple[Batch, dict]],
    num_steps: int,
    *,
    aux: Any = None,
    checkpointer=None,
    metrics_path: str | None = None,
    desc: str = "train",
    log_every: int = 1,
    progress: bool = True,
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
    eval_every: int = 0,
    tensorboard_dir: str | None = None,
) -> TrainState:
    """Run updates until ``state.step == num_steps`` (a total, not an increment).

    If ``checkpointer`` (a ``drift_jax.training.checkpoint.Checkpointer``) holds a step newer
    than ``state.step``, training resumes from it; ``batch_fn(step, state)`` must be
    deterministic in ``step`` (and, for on-policy data, the state) so the resumed run
    sees the same data. It returns a batch, or ``(batch, info)`` whose host-side numbers
    are logged with the step. ``aux`` is passed to every ``step_fn`` call.

    Every ``log_every`` updates, one JSON line goes to ``metrics_path``: step (updates
    done), the step's metrics and info, batch_s (making the batch), step_time_s (the
    update), tokens_per_s (real input tokens per step second) and wall_time (unix
    seconds); lines past the step training starts from are dropped first. Every
    ``eval_every`` updates and after the last, ``eval_fn(state)``'s numbers join the line
    as ``eval_<name>`` (a held-out loss, ``step.make_eval_fn``). With ``tensorboard_dir``,
    every number of each line also goes to TensorBoard event files there
    (``MetricsWriter``). The checkpointer saves on its own interval and once at the end
    (every process calls it: Orbax saves collectively); in a multi-process job only
    process 0 writes the metrics and TensorBoard files. Raises FloatingPointError at the
    first non-finite loss or gradient norm, before that step is saved: the last
    checkpoint stays a good one.
    """
    if checkpointer is not None:
        latest = checkpointer.latest_step()
        if latest is not None and latest > int(state.step):
            state = restore_checkpoint(checkpointer, state, latest)
    start = int(state.step)
    # Multi-process: every process computes each line (the held-out eval is a collective
    # on the mesh) and process 0 alone writes it.
    writer = MetricsWriter(metrics_path, tensorboard_dir, start, enabled=distributed.is_main())
    bar = tqdm(total=num_steps, initial=start, desc=desc, dynamic_ncols=True, disable=not progress)
    with writer, bar:
        for step in range(start, num_steps):
            t0 = time.perf_counter()
            batch = batch_fn(step, state)
            batch, info = batch if isinstance(batch, tuple) else (batch, {})
            t1 = time.perf_counter()
            state, metrics = step_fn(state, batch, aux)
            # Fetching the metrics waits for the step: the NaN check must precede
            # any save, and the step time must be the device's, not dispatch's.
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            step_time = time.perf_counter() - t1
            done = step + 1
            _check_finite(metrics, done, checkpointer)
            if metrics_path and (done % log_every == 0 or done == num_steps):
                record = {"step": done, **metrics, **info, "batch_s": t1 - t0, "step_time_s": step_time,
                          "tokens_per_s": metrics["num_input_tokens"] / step_time, "wall_time": time.time()}
                if eval_fn is not None and (done == num_steps or (eval_every and done % eval_every == 0)):
                    record.update({f"eval_{k}": v for k, v in eval_fn(state).items()})
                writer.write(record)
            if checkpointer is not None:
                checkpointer.save(done, checkpoint_view(state))
            # No forced redraw: into a log file the bar redraws once per TQDM_MININTERVAL.
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', math.nan):.2e}", refresh=False)
            bar.update(1)
    if checkpointer is not None:
        checkpointer.save(int(state.step), checkpoint_view(state), force=True)
    return state
