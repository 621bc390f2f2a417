"""The continuous engine's KV page pool at a paper config's shapes on each AOT target:
what ``drift_jax.rollout.pool_size.pool_pages`` gives for the memory the target's JAX
pool holds (``drift_jax.aot.targets``: 0.75 of a GPU, libtpu's available HBM of a TPU
chip), the bf16 weights resident, the engine's workspace estimate, and a cap of
``--slot_tokens`` tokens per slot (the protocol's longest request).

  python benchmarks/pool_size.py --slot_tokens 3072 5632
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax.numpy as jnp  # noqa: E402

from drift_jax.aot.targets import TARGETS  # noqa: E402
from drift_jax.models import paged, preset  # noqa: E402
from drift_jax.rollout.interface import EngineOptions  # noqa: E402
from drift_jax.rollout.pool_size import pool_pages, workspace_bytes  # noqa: E402

GIB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-3b"])
    ap.add_argument("--targets", nargs="+", default=["h100", "h200", "v5e-8", "v6e-8"])
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--slot_tokens", type=int, nargs="+", default=[3072, 5632])
    a = ap.parse_args()
    opts = EngineOptions(num_slots=a.slots)
    print("| model | target | memory (GiB) | weights (GiB) | workspace (GiB) | cap (tokens a slot) | pages | "
          "pool (GiB) | tokens a slot |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in a.model:
        cfg = preset(name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        weights = cfg.num_params * 2
        workspace = workspace_bytes(cfg, a.slots, opts.prefill_chunk, paged.CHUNK_PAGES * opts.page_size)
        page = paged.page_bytes(cfg, opts.page_size)
        for target in a.targets:
            memory = TARGETS[target].memory_budget_bytes
            for cap in a.slot_tokens:
                try:
                    pages = pool_pages(num_slots=a.slots, slot_tokens=cap, page_size=opts.page_size,
                                       page_bytes=page, device_bytes=memory, resident_bytes=weights,
                                       workspace=workspace, memory_fraction=opts.memory_fraction)
                    cells = f"{pages:,} | {pages * page / GIB:.1f} | {(pages - 1) * opts.page_size // a.slots:,}"
                except ValueError:
                    cells = "does not fit | | "
                print(f"| {name} | {target} | {memory / GIB:.2f} | {weights / GIB:.2f} | {workspace / GIB:.2f} | "
                      f"{cap:,} | {cells} |")


if __name__ == "__main__":
    main()
