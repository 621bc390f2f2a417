"""Checkpoints of the train state (Orbax ``CheckpointManager``) and of bare params.

Any pytree of arrays saves as-is: ``nnx.State`` params (whose leaves sit under
``nnx.Param`` nodes), optax states (NamedTuples), int32 steps and typed PRNG keys.
Restoring always goes through a ``like`` tree (a state of the same model and optimizer,
freshly built or ``jax.eval_shape``-d): its leaves give shape, dtype and sharding, its
treedef the structure, so a restore yields exactly the pytree that training produced.

Orbax writes each step to a temporary directory and renames it when complete, so a
crash mid-save never leaves a step that looks valid. Saves here are synchronous: when
``save`` returns the step is on disk (and the caller may donate the state's buffers).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins for every leaf: Orbax's restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore_into(restore_fn, like: Any, where: str) -> Any:
    """Run an Orbax restore against ``like``'s abstract tree, naming the checkpoint when
    it does not fit (Orbax's own message says which leaf and how)."""
    try:
        return restore_fn(_abstract(like))
    except ValueError as e:
        raise ValueError(
            f"checkpoint {where} does not match the target state (another model config "
            f"or optimizer?): {e}"
        ) from e


class Checkpointer:
    """Keeps the last ``keep`` train-state checkpoints under ``directory/<step>``.

    ``save(step, state)`` writes when ``step`` is a multiple of ``save_every`` (or when
    ``force``); use one instance per run directory.
    """

    def __init__(self, directory: str | os.PathLike, save_every: int = 1000, keep: int | None = 3):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = os.path.abspath(os.fspath(directory))  # Orbax wants absolute paths
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # Leftovers of a crashed save are never valid steps; clear them on start.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None if the directory holds none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Save ``state`` as ``step`` if due (``step % save_every == 0``) or ``force``.

        Returns whether a checkpoint was written; a step already on disk is not
        rewritten (e.g. the end-of-run save right after a periodic one).
        """
        step = int(step)
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        # force=True: the due-or-not decision is ours, not Orbax's interval policy
        # (which would also save the first step it ever sees).
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
        return True

    def restore(self, state_like: Any, step: int | None = None) -> Any:
        """Load ``step`` (default: the latest) into the structure of ``state_like``.

        ``state_like``: a state of the same model and optimizer, concrete or abstract
        (``jax.eval_shape`` of ``create_train_state``: nothing is allocated twice);
        restored arrays take its leaves' shardings. Raises FileNotFoundError if there
        is no such checkpoint, ValueError if it does not fit ``state_like``.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"no checkpoint in {self.directory}; check the path, or start from a "
                    "fresh state (Checkpointer.latest_step() is None)"
                )
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
        return _restore_into(
            lambda target: self._manager.restore(step, args=ocp.args.StandardRestore(target)),
            state_like,
            f"{self.directory}/{step}",
        )

    def wait(self) -> None:
        """Block until any save in flight is on disk (saves are synchronous; cheap)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_params(path: str | os.PathLike, params: Any, force: bool = False) -> None:
    """Write a standalone params pytree (e.g. a trained reference policy) to ``path``.

    Atomic like the train-state checkpoints; refuses to overwrite unless ``force``.
    """
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(os.fspath(path)), params, force=force)
        ckptr.wait_until_finished()


def load_params(path: str | os.PathLike, params_like: Any) -> Any:
    """Read params saved by ``save_params`` into the structure of ``params_like``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no params checkpoint at {path}; write one with save_params")
    with ocp.StandardCheckpointer() as ckptr:
        return _restore_into(lambda target: ckptr.restore(path, target), params_like, path)
