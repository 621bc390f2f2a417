"""How many rollout records two runs share: e.g. the continuous engine against the static sampler.

    python experiments/run.py --config=experiments/configs/tiny.py --config.rollout.engine=static --workdir=/tmp/s
    python experiments/run.py --config=experiments/configs/tiny.py --workdir=/tmp/c
    python experiments/compare_rollouts.py /tmp/s /tmp/c

Records are compared in file order (rollout files are written in prompt order, K samples
per prompt); for each one that differs it prints the prompt, the sample and the first
turn whose reply differs. Exits 1 when fewer than ``--min-identical`` of them agree.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from drift_jax.data.records import read_jsonl  # noqa: E402


def first_different_turn(a: dict, b: dict) -> int | None:
    """1-based turn of the first assistant message that differs (None: same replies)."""
    replies = [[m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in (a, b)]
    for turn, (x, y) in enumerate(zip(*replies), start=1):
        if x != y:
            return turn
    return None if len(replies[0]) == len(replies[1]) else min(map(len, replies)) + 1


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 when enough records agree, else 1."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdirs", nargs=2, help="two run directories (or rollouts.jsonl files)")
    ap.add_argument("--min-identical", type=float, default=0.99, help="share of identical records required")
    args = ap.parse_args(argv)
    paths = [p if p.endswith(".jsonl") else os.path.join(p, "rollouts.jsonl") for p in args.workdirs]
    (a, _), (b, _) = (read_jsonl(p) for p in paths)
    if len(a) != len(b) or any(x["prompt_id"] != y["prompt_id"] for x, y in zip(a, b)):
        sys.exit(f"{paths[0]} and {paths[1]} do not hold the same prompts in the same order "
                 f"({len(a)} and {len(b)} records)")
    sample = {}
    same = 0
    for x, y in zip(a, b):
        k = sample[x["prompt_id"]] = sample.get(x["prompt_id"], -1) + 1
        if x == y:
            same += 1
        else:
            print(f"differs: {x['prompt_id']} sample {k}, from turn {first_different_turn(x, y)}")
    share = same / max(1, len(a))
    print(f"{same} of {len(a)} records identical ({share:.2%})")
    return 0 if share >= args.min_identical else 1


if __name__ == "__main__":
    sys.exit(main())
