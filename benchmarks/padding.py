"""Padding of the three SFT batching schemes on a SIMULATED paper-scale length distribution.

The lengths are a seeded simulation, not measured rollouts: they stand in for the paper
config (experiments/configs/qwen2_5_3b_metamath.py: 1,800 MetaMathQA prompts x 16 samples,
dialogues of up to 5 turns, replies of up to 512 new tokens, train.max_len = 8,704) until
real rollouts are at hand. Per prompt: a length ~ U[150, 400] tokens and a difficulty
p ~ Beta(2, 1.5), the chance one reply is right. Per sample: turns go on until a reply is
right or 5 turns were played; each reply has min(512, lognormal(median 250, sigma 0.6))
tokens (at least 16), each feedback message between turns U[20, 60]; the chat template
adds 20 tokens (system message) plus 5 per message. One dialogue is one example.

It prints the share of the token slots of one epoch's batches that are padding, as
``drift_jax.data.batching.epoch_plan`` / ``padding_fraction`` compute it from the lengths
(the plan ``make_batch_fn`` collates; filler rows of a short last batch count as padding):
  (a) global length: every batch padded to the longest example, bucketed (bucket_window=0);
  (b) length bucketing (bucket_window = W batches per sorted window, as the runner passes
      train.bucket_window), each batch padded to its own bucket;
  (c) packing into rows of 8,704 tokens (pack=True, pack_length=8704), batch = --rows rows;
then the ratios of (c)'s padding fraction and token slots against (a) and (b). The last
lines count attention score pairs: the mask is dense (XLA, or cuDNN taking it as a bias),
so a packed row computes all T x T pairs of its 8,704 tokens, the off-diagonal blocks
wasted; packing saves the linear layers' FLOPs (proportional to token slots), not those.

  python benchmarks/padding.py                  # the defaults above, seconds on a CPU
  python benchmarks/padding.py --seed 1 --rows 8 --windows 1 8 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from drift_jax.data.batching import epoch_plan, padding_fraction  # noqa: E402

MAX_TURNS, MAX_REPLY, TEMPLATE_SYSTEM, TEMPLATE_PER_MESSAGE = 5, 512, 20, 5


def simulate_lengths(num_prompts: int = 1800, samples: int = 16, seed: int = 0) -> np.ndarray:
    """``[num_prompts * samples]`` int token counts of simulated multi-turn dialogues
    (the module docstring gives the model); prompt-major order, as rollouts are written."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(150, 401, num_prompts)
    p_right = rng.beta(2.0, 1.5, num_prompts)
    lengths = []
    for i in range(num_prompts):
        for _ in range(samples):
            n = TEMPLATE_SYSTEM + prompt_len[i] + TEMPLATE_PER_MESSAGE
            for turn in range(MAX_TURNS):
                reply = int(np.clip(round(rng.lognormal(np.log(250.0), 0.6)), 16, MAX_REPLY))
                n += reply + TEMPLATE_PER_MESSAGE
                if rng.random() < p_right[i] or turn == MAX_TURNS - 1:
                    break
                n += int(rng.integers(20, 61)) + TEMPLATE_PER_MESSAGE  # feedback, then another turn
            lengths.append(n)
    return np.asarray(lengths)


def attention_used(lengths, plan, batch_size: int) -> float:
    """Share of the computed attention score pairs (batch_size x T x T per batch, a dense
    mask) that a causal mask within one example keeps: sum L (L + 1) / 2 over examples."""
    used = sum(lengths[i] * (lengths[i] + 1) / 2 for rows, _ in plan for row in rows for i in row)
    return used / sum(batch_size * float(length) ** 2 for _, length in plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="simulation and epoch-shuffle seed")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per batch, (a) and (b): train.batch_size")
    parser.add_argument("--rows", type=int, default=16, help="packed rows per batch, (c)")
    parser.add_argument("--pack-length", type=int, default=8192 + 512, help="row length, (c): train.max_len")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 8, 32], help="bucket_window values, (b)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    lengths = simulate_lengths(seed=args.seed).tolist()
    print(f"SIMULATED lengths (seed {args.seed}; not measured rollouts): {len(lengths):,} examples, "
          f"mean {np.mean(lengths):.0f}, median {np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}, "
          f"max {max(lengths)} tokens; {sum(lengths):,} real tokens")

    def report(name, plan, batch_size):
        pad = padding_fraction(lengths, plan, batch_size)
        slots = sum(batch_size * length for _, length in plan)
        print(f"  {name:<34} padding {100 * pad:5.1f}%  {len(plan):4d} steps  {slots / 1e6:7.1f}M slots  "
              f"attention pairs used {100 * attention_used(lengths, plan, batch_size):5.1f}%")
        return pad, slots

    print("padding fraction of one epoch's token slots:")
    plan_a = epoch_plan(lengths, args.batch_size, args.seed, 0)
    a = report(f"(a) global length {plan_a[0][1]}", plan_a, args.batch_size)
    b = {w: report(f"(b) bucket_window={w}", epoch_plan(lengths, args.batch_size, args.seed, 0, bucket_window=w),
                   args.batch_size) for w in args.windows}
    plan_c = epoch_plan(lengths, args.rows, args.seed, 0, pack=True, pack_length=args.pack_length)
    c = report(f"(c) packed, {args.rows} x {args.pack_length} rows", plan_c, args.rows)
    rows_c = sum(len(rows) for rows, _ in plan_c)
    in_rows = 1.0 - sum(lengths) / (rows_c * args.pack_length)
    print(f"      {rows_c:,} rows, {len(lengths) / rows_c:.2f} examples per row; padding inside the rows "
          f"{100 * in_rows:.2f}% (the rest is the last batch's filler rows)")

    print("(c) against the others: padding fraction ratio, token slots ratio")
    for name, (pad, slots) in [("(a)", a)] + [(f"(b) window {w}", v) for w, v in b.items()]:
        print(f"  (c) / {name:<14} padding x{c[0] / pad:.3f}   slots x{c[1] / slots:.3f}")
    print(f"target: packed padding below 10%: {'met' if c[0] < 0.10 else 'NOT met'} ({100 * c[0]:.2f}%); "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
