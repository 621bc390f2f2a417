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

Packing (``pack=True``): each epoch's examples are packed into rows of ``pack_length``
tokens (``pack_examples``), several examples per row, and rows are batched; a batch is
``[batch_size rows, pack_length]`` (one compiled shape) and carries ``segment_ids``, so
the model attends within an example only and the loss reduces per example
(``collate_packed``, ``training.objective.sft_loss_fn``): the same examples give the same
loss and gradient as one per row, with almost no padding. ``epoch_plan`` / ``padding_fraction``
report the padding of any of the three schemes from the lengths alone.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np


def bucket_length(n: int, min_bucket: int = 16) -> int:
    """Padded length for ``n`` tokens: the next multiple of ``min_bucket`` up to
    ``8 * min_bucket``, then the next power of two. Few compiled shapes, little waste."""
    if n <= 8 * min_bucket:
        return max(min_bucket, -(-n // min_bucket) * min_bucket)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass
class SFTExample:
    """One training sequence. ``loss_mask`` marks the supervised TOKENS; ``weight`` is its
    importance weight in the SFT loss."""

    tokens: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] bool
    weight: float = 1.0
    truncated: bool = False


def collate(examples: list[SFTExample], length: int, pad_id: int, batch_size: int | None = None,
            row_scalars: Mapping[str, Sequence[float]] | None = None) -> dict:
    """Right-pad examples into a batch dict of numpy arrays: ``tokens``, ``valid``,
    ``loss_mask`` ``[B, T]`` and one float32 ``[B]`` array per key of ``row_scalars`` (one
    number per example, e.g. ``{"advantages": advantages_n}`` for online RL); by default
    ``weights``, each example's ``weight``. Extra rows (up to ``batch_size``) are
    all-padding with 0 in every row scalar (weight 0), which the loss ignores."""
    b = batch_size or len(examples)
    if row_scalars is None:
        row_scalars = {"weights": [ex.weight for ex in examples]}
    batch = {
        "tokens": np.full((b, length), pad_id, np.int32),
        "valid": np.zeros((b, length), bool),
        "loss_mask": np.zeros((b, length), bool),
    }
    for key, values_n in row_scalars.items():
        if len(values_n) != len(examples):
            raise ValueError(f"{len(values_n)} values of {key!r} for {len(examples)} examples")
        batch[key] = np.zeros((b,), np.float32)
        batch[key][: len(examples)] = values_n
    for r, ex in enumerate(examples):
        n = len(ex.tokens)
        if n > length:
            raise ValueError(f"example of {n} tokens does not fit batch length {length}")
        batch["tokens"][r, :n] = ex.tokens
        batch["valid"][r, :n] = True
        batch["loss_mask"][r, :n] = ex.loss_mask
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


def _check_fits(lengths: Sequence[int], row_length: int) -> None:
    """Raise naming the first example longer than a row (it cannot be packed)."""
    for i, n in enumerate(lengths):
        if n > row_length:
            raise ValueError(f"example {i} has {n} tokens, more than the pack row length {row_length}; "
                             "truncate it (train.max_len) or raise pack_length")


def _lengths(examples) -> list[int]:
    return [int(e) if isinstance(e, (int, np.integer)) else len(e.tokens) for e in examples]


def pack_examples(examples: Sequence[SFTExample] | Sequence[int], row_length: int,
                  keep_order: bool = False) -> list[list[int]]:
    """Assign examples (or their lengths) to rows of at most ``row_length`` tokens.

    Returns rows as lists of indices into ``examples``; every index appears exactly once.
    Deterministic in (lengths, row_length, keep_order).

    ``keep_order=False``: best-fit decreasing. Longest first (a stable sort, so equal
    lengths keep their input order), each into the row it fills the most (the lowest
    such row on ties), a new row when none has room: at most 11/9 x the fewest rows + 1
    (first-fit decreasing's bound, which best-fit decreasing shares). The rows' lengths
    depend on the multiset of lengths only, so a reshuffled epoch packs into the same
    number of rows (steps per epoch stay fixed).
    ``keep_order=True``: next-fit in the given order (a row closes when the next example
    does not fit), so the rows concatenated are the input order (file-order training).

    Raises ValueError naming the first example longer than ``row_length``.
    """
    lengths = _lengths(examples)
    if row_length < 1:
        raise ValueError(f"row_length must be positive, got {row_length}")
    _check_fits(lengths, row_length)
    rows: list[list[int]] = []
    if keep_order:
        used = row_length  # no open row yet
        for i, n in enumerate(lengths):
            if used + n > row_length:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows
    # (free tokens, row index), sorted: the first entry with free >= n is the best fit.
    free: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            rows.append([i])
            bisect.insort(free, (row_length - n, len(rows) - 1))
        else:
            room, r = free.pop(j)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
    return rows


def collate_packed(examples: Sequence[SFTExample], rows: Sequence[Sequence[int]], length: int, pad_id: int,
                   batch_size: int | None = None) -> dict:
    """Packed rows into a batch dict of numpy arrays, all ``[B, T]`` (B = ``batch_size``
    or ``len(rows)``, T = ``length``): ``tokens`` (right-padded with ``pad_id``),
    ``valid``, ``loss_mask``, ``segment_ids`` (int32: 0 on padding, then 1, 2, ... for
    the row's examples in order) and ``token_weights`` (float32: each token carries its
    example's weight, 0 on padding). ``rows[r]`` lists indices into ``examples``; extra
    rows (up to ``batch_size``) are all padding, which the loss ignores.

    ``training.objective.sft_loss_fn`` reduces such a batch per segment, so its loss is
    that of the same examples collated one per row (``collate``)."""
    b = len(rows) if batch_size is None else batch_size
    if len(rows) > b:
        raise ValueError(f"{len(rows)} rows do not fit batch_size {b}")
    batch = {
        "tokens": np.full((b, length), pad_id, np.int32),
        "valid": np.zeros((b, length), bool),
        "loss_mask": np.zeros((b, length), bool),
        "segment_ids": np.zeros((b, length), np.int32),
        "token_weights": np.zeros((b, length), np.float32),
    }
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row, start=1):
            ex = examples[i]
            end = start + len(ex.tokens)
            if end > length:
                raise ValueError(f"row {r} holds {sum(len(examples[j].tokens) for j in row)} tokens, "
                                 f"more than batch length {length}")
            batch["tokens"][r, start:end] = ex.tokens
            batch["valid"][r, start:end] = True
            batch["loss_mask"][r, start:end] = ex.loss_mask
            batch["segment_ids"][r, start:end] = segment
            batch["token_weights"][r, start:end] = ex.weight
            start = end
    return batch


def packed_epoch_rows(lengths: Sequence[int], row_length: int, seed: int, epoch: int,
                      shuffle: bool = True) -> list[list[int]]:
    """Rows (example indices) of one packed epoch, in step order.

    ``shuffle=True``: the epoch's permutation (that of ``epoch_batches``), packed best-fit
    decreasing (``pack_examples``), then the rows shuffled by a separate stream (the
    packing emits the longest examples' rows first). ``shuffle=False``: file order,
    next-fit, rows in order. Deterministic in (lengths, row_length, seed, epoch, shuffle).
    """
    n = len(lengths)
    if not shuffle:
        return pack_examples(lengths, row_length, keep_order=True)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    rows = [[int(order[j]) for j in row] for row in pack_examples([lengths[i] for i in order], row_length)]
    shuffle_rows = np.random.default_rng([seed, epoch, 2]).permutation(len(rows))
    return [rows[i] for i in shuffle_rows]


# One epoch's batches: (rows, length) per step; a row lists example indices (one index
# per row unless packed).
Plan = list[tuple[list[list[int]], int]]


def epoch_plan(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *, min_bucket: int = 16,
               bucket_window: int = 0, shuffle: bool = True, pack: bool = False,
               pack_length: int | None = None) -> Plan:
    """What ``make_batch_fn`` puts in each batch of one epoch, from the lengths alone:
    ``[(rows, length)]`` in step order, ``rows`` up to ``batch_size`` lists of example
    indices (one each unless ``pack``), ``length`` the batch's padded length. Arguments
    as ``make_batch_fn``'s."""
    if pack:
        if bucket_window > 0:
            raise ValueError("pack=True fills fixed-length rows; it replaces bucket_window (set it to 0)")
        row_length = pack_length or bucket_length(max(lengths), min_bucket)
        rows = packed_epoch_rows(lengths, row_length, seed, epoch, shuffle)
        return [(rows[i : i + batch_size], row_length) for i in range(0, len(rows), batch_size)]
    global_length = bucket_length(max(lengths), min_bucket)
    plan = []
    for batch in epoch_batches(lengths, batch_size, seed, epoch, bucket_window, shuffle):
        length = bucket_length(max(lengths[i] for i in batch), min_bucket) if bucket_window > 0 else global_length
        plan.append(([[int(i)] for i in batch], length))
    return plan


def padding_fraction(lengths: Sequence[int], plan: Plan, batch_size: int) -> float:
    """Share of the token slots of ``plan``'s batches (``epoch_plan``: each
    ``batch_size x length``, filler rows of a short batch included) that are padding."""
    real = sum(lengths[i] for rows, _ in plan for row in rows for i in row)
    slots = sum(batch_size * length for _, length in plan)
    return 1.0 - real / slots if slots else 0.0


def held_out_count(n: int, fraction: float) -> int:
    """Rows of ``n`` held out for an eval loss: ceil(fraction * n), as
    ``datasets.Dataset.train_test_split(test_size=fraction, shuffle=False)`` holds out its
    last rows (0 when fraction is 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    return math.ceil(fraction * n) if fraction > 0 else 0


def split_held_out(examples: Sequence, fraction: float) -> tuple[list, list]:
    """(train, held_out): the last ``held_out_count`` examples held out, order kept."""
    k = held_out_count(len(examples), fraction)
    return list(examples[:len(examples) - k]), list(examples[len(examples) - k:])


def make_batch_fn(examples: Sequence[SFTExample], batch_size: int, seed: int, pad_id: int,
                  min_bucket: int = 16, bucket_window: int = 0, shuffle: bool = True,
                  pack: bool = False, pack_length: int | None = None) -> tuple[Callable[..., dict], int]:
    """Returns ``(batch_fn, steps_per_epoch)``; ``batch_fn(step)`` (or
    ``batch_fn(step, state)``, as ``training.loop.train_loop`` calls it) is step ``step``'s batch.

    Each epoch is a fresh permutation of the examples (``seed``, epoch); a short batch
    is filled with zero-weight padding rows, so every example is seen once per epoch.
    With ``bucket_window == 0`` all batches share one length (the longest example,
    bucketed), so the train step compiles once; with ``bucket_window > 0`` batches
    group similar lengths and each is padded to its own bucket (see ``epoch_batches``):
    fewer padding tokens, one compile per bucket length met.

    ``pack=True``: each epoch's examples are packed into rows of ``pack_length`` tokens
    (default: the longest example, bucketed) by ``packed_epoch_rows``, and a batch is
    ``batch_size`` such ROWS (``collate_packed``; one compiled shape). steps_per_epoch
    then counts packed batches; it is the same every epoch. Raises ValueError naming an
    example longer than ``pack_length``. Needs ``bucket_window == 0``.
    """
    if not examples:
        raise ValueError("no training examples")
    lengths = [len(e.tokens) for e in examples]
    if pack:
        if bucket_window > 0:
            raise ValueError("pack=True fills fixed-length rows; it replaces bucket_window (set it to 0)")
        _check_fits(lengths, pack_length or bucket_length(max(lengths), min_bucket))

    @functools.lru_cache(maxsize=2)
    def plan(epoch: int) -> Plan:
        return epoch_plan(lengths, batch_size, seed, epoch, min_bucket=min_bucket, bucket_window=bucket_window,
                          shuffle=shuffle, pack=pack, pack_length=pack_length)

    steps_per_epoch = len(plan(0)) if pack else math.ceil(len(examples) / batch_size)

    def batch_fn(step: int, state=None) -> dict:
        del state  # the data do not depend on the policy
        epoch, index = divmod(step, steps_per_epoch)
        batches = plan(epoch)
        if pack and len(batches) != steps_per_epoch:  # cannot happen: see pack_examples
            raise RuntimeError(f"epoch {epoch} packs into {len(batches)} batches, epoch 0 into {steps_per_epoch}")
        rows, length = batches[index]
        if pack:
            return collate_packed(examples, rows, length, pad_id, batch_size)
        return collate([examples[row[0]] for row in rows], length, pad_id, batch_size)

    return batch_fn, steps_per_epoch
