"""SFT examples and deterministic batches: the batch of step ``s`` depends only on
(examples, seed, s).

That is what lets a killed run resume from a checkpoint and see the same data order.

Length bucketing (``bucket_window > 0``): rather than padding every batch to the longest
example of the data set, each epoch's shuffled order is cut into windows of
``bucket_window`` batches; a window is sorted by length and cut into batches, so a batch
holds examples of similar length, and each batch is padded only to ``bucket_length`` of
its own longest example. The batch order is then shuffled again, so long and short
batches interleave. Padding changes no loss (the model masks padded keys, the loss
masks padded targets), and the bucketed lengths keep the number of compiled shapes small.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import numpy as np

from drift_jax.sampling import bucket_length


@dataclasses.dataclass
class SFTExample:
    """One training sequence. ``loss_mask`` marks the supervised TOKENS."""

    tokens: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] bool
    weight: float = 1.0
    truncated: bool = False


def collate(examples: list[SFTExample], length: int, pad_id: int, batch_size: int | None = None) -> dict:
    """Right-pad examples into a batch dict of numpy arrays (``tokens``, ``valid``,
    ``loss_mask`` ``[B, T]``; ``weights`` ``[B]``). Extra rows (up to ``batch_size``) are
    all-padding with weight 0, which the loss ignores."""
    b = batch_size or len(examples)
    batch = {
        "tokens": np.full((b, length), pad_id, np.int32),
        "valid": np.zeros((b, length), bool),
        "loss_mask": np.zeros((b, length), bool),
        "weights": np.zeros((b,), np.float32),
    }
    for r, ex in enumerate(examples):
        n = len(ex.tokens)
        if n > length:
            raise ValueError(f"example of {n} tokens does not fit batch length {length}")
        batch["tokens"][r, :n] = ex.tokens
        batch["valid"][r, :n] = True
        batch["loss_mask"][r, :n] = ex.loss_mask
        batch["weights"][r] = ex.weight
    return batch


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  bucket_window: int = 0, shuffle: bool = True) -> list[np.ndarray]:
    """Example indices of each batch of one epoch, in step order (the last or, with
    bucketing, one batch may be short). Every index appears exactly once.

    ``bucket_window == 0``: a plain permutation cut into consecutive batches.
    ``bucket_window > 0``: windows of ``bucket_window * batch_size`` examples of the
    permutation, each sorted by length (stable) and cut into batches; then the batches
    are shuffled. Deterministic in (lengths, batch_size, seed, epoch, bucket_window).
    ``shuffle=False``: file order, consecutive batches, every epoch (the reference
    release's ``--disable_shuffle``: a batch then holds whole prompt groups).
    """
    n = len(lengths)
    if not shuffle:
        if bucket_window > 0:
            raise ValueError("bucket_window > 0 reorders the batches; it needs shuffle=True")
        return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if bucket_window <= 0:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    lengths = np.asarray(lengths)
    window = bucket_window * batch_size
    batches = []
    for start in range(0, n, window):
        rows = order[start : start + window]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches.extend(rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    # A separate stream, so the bucketed epoch's permutation equals the plain one's.
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return [batches[i] for i in shuffle]


def make_batch_fn(examples: Sequence[SFTExample], batch_size: int, seed: int, pad_id: int,
                  min_bucket: int = 16, bucket_window: int = 0,
                  shuffle: bool = True) -> tuple[Callable[..., dict], int]:
    """Returns ``(batch_fn, steps_per_epoch)``; ``batch_fn(step)`` (or
    ``batch_fn(step, state)``, as ``train.train_loop`` calls it) is step ``step``'s batch.

    Each epoch is a fresh permutation of the examples (``seed``, epoch); a short batch
    is filled with zero-weight padding rows, so every example is seen once per epoch.
    With ``bucket_window == 0`` all batches share one length (the longest example,
    bucketed), so the train step compiles once; with ``bucket_window > 0`` batches
    group similar lengths and each is padded to its own bucket (see ``epoch_batches``):
    fewer padding tokens, one compile per bucket length met.
    """
    if not examples:
        raise ValueError("no training examples")
    n = len(examples)
    steps_per_epoch = math.ceil(n / batch_size)
    lengths = [len(e.tokens) for e in examples]
    global_length = bucket_length(max(lengths), min_bucket)

    @functools.lru_cache(maxsize=2)
    def plan(epoch: int) -> list[np.ndarray]:
        return epoch_batches(lengths, batch_size, seed, epoch, bucket_window, shuffle)

    def batch_fn(step: int, state=None) -> dict:
        del state  # the data do not depend on the policy
        epoch, index = divmod(step, steps_per_epoch)
        rows = plan(epoch)[index]
        length = global_length
        if bucket_window > 0:
            length = bucket_length(max(lengths[i] for i in rows), min_bucket)
        return collate([examples[i] for i in rows], length, pad_id, batch_size)

    return batch_fn, steps_per_epoch
