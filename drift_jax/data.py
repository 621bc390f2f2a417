"""Deterministic SFT batches: the batch of step ``s`` depends only on (examples, seed, s).

That is what lets a killed run resume from a checkpoint and see the same data order.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from drift_jax.chat import SFTExample, collate
from drift_jax.sampling import bucket_length


def make_batch_fn(examples: Sequence[SFTExample], batch_size: int, seed: int, pad_id: int,
                  min_bucket: int = 16) -> tuple[Callable[[int], dict], int]:
    """Returns ``(batch_fn, steps_per_epoch)``.

    Each epoch is a fresh permutation of the examples (``seed``, epoch); the last batch
    of an epoch is filled with zero-weight padding rows, so every example is seen once
    per epoch. All batches share one length (the longest example, bucketed), so the
    train step compiles once.
    """
    if not examples:
        raise ValueError("no training examples")
    n = len(examples)
    steps_per_epoch = math.ceil(n / batch_size)
    length = bucket_length(max(len(e.tokens) for e in examples), min_bucket)

    def batch_fn(step: int) -> dict:
        epoch, index = divmod(step, steps_per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        rows = order[index * batch_size : (index + 1) * batch_size]
        return collate([examples[i] for i in rows], length, pad_id, batch_size)

    return batch_fn, steps_per_epoch
