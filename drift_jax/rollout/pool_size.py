"""How many pages the continuous engine's KV pool gets: from the device's memory on an
accelerator (as vLLM's ``gpu_memory_utilization``), a fixed share per slot on a CPU.

On an accelerator the pool takes what is left of ``memory_fraction`` of the memory XLA's
allocator holds (``device.memory_stats()["bytes_limit"]``: on a GPU
``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the device, 0.75 by default; on a TPU the HBM
libtpu makes available) once the arrays already on the device (the weights, at least)
and the engine programs' workspace (``workspace_bytes``) are set aside, and never more
than every slot's worst-case request (``slot_tokens``). Fewer pages than that are safe:
the engine admits a request only while pages last, and drops the caches of episodes
waiting between turns first. On a CPU (no memory figure) every slot gets
``CPU_SLOT_TOKENS`` (or ``slot_tokens``, if fewer).

``pool_pages`` and ``workspace_bytes`` are pure: a report can size a pool at a paper's
shapes for a device it does not have.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import numpy as np

from drift_jax.models import paged
from drift_jax.rollout.interface import EngineOptions

CPU_SLOT_TOKENS = 2048  # tokens per slot where the device reports no memory (CPU)
# Matmul split-K partial sums and library workspaces, which small calls need beside
# their activations (12 MiB for a 4 x 32-token prefill at Qwen2.5-0.5B widths on an H100).
SCRATCH_BYTES = 64 * 2**20


def pool_pages(*, num_slots: int, slot_tokens: int, page_size: int, page_bytes: int, device_bytes: int | None = None,
               resident_bytes: int = 0, workspace: int = 0, memory_fraction: float) -> int:
    """Pages of the pool (page 0, the trash page, included).

    Args:
      num_slots, slot_tokens: rows decoded together, and the tokens one request may hold
        (context + budget): the pool never exceeds ``num_slots`` such requests.
      page_size, page_bytes: tokens per page, and one page's bytes over all layers, keys
        and values (``paged.page_bytes``).
      device_bytes: the memory XLA's allocator holds on the device; None: no figure (CPU),
        the pool is the cap.
      resident_bytes: what already lives on the device (weights, other arrays).
      workspace: the engine programs' temporaries (``workspace_bytes``).
      memory_fraction: the share of ``device_bytes`` for resident arrays + workspace + pool.
    """
    per_slot = math.ceil(slot_tokens / page_size)
    cap = num_slots * per_slot + 1
    if device_bytes is None:
        return cap
    free = device_bytes * memory_fraction - resident_bytes - workspace
    fit = int(free // page_bytes)
    if fit < per_slot + 1:
        raise ValueError(
            f"rollout.memory_fraction={memory_fraction} of {device_bytes / 2**30:.2f} GiB leaves "
            f"{max(free, 0) / 2**30:.2f} GiB after {resident_bytes / 2**30:.2f} GiB on the device and "
            f"{workspace / 2**30:.2f} GiB of workspace: less than one request of {slot_tokens} tokens "
            f"({(per_slot + 1) * page_bytes / 2**30:.2f} GiB); raise it, or set rollout.num_pages")
    return min(cap, fit)


def workspace_bytes(cfg, num_slots: int, prefill_tokens: int, chunk_tokens: int) -> int:
    """An upper estimate of the temporaries of the engine's largest program (decode or
    prefill: one runs at a time): decode's ``[R, V]`` float32 logits and the sampler's
    passes over them (four copies), a prefill call's activations of ``prefill_tokens``
    tokens (two at the hidden width, two at the MLP's, in the compute dtype) and its
    float32 scores over a chunk of ``chunk_tokens`` keys per query head, plus
    ``SCRATCH_BYTES``. At Qwen2.5-3B widths and 256 slots decode's logits are the larger
    (0.58 GiB, against 0.12 GiB for a 2,048-token prefill call)."""
    item = np.dtype(cfg.dtype).itemsize
    decode = 4 * num_slots * cfg.vocab_size * 4
    per_token = item * 2 * (cfg.hidden_size + cfg.intermediate_size) + 4 * cfg.num_heads * chunk_tokens
    return int(max(decode, prefill_tokens * per_token)) + SCRATCH_BYTES


def device_memory(device=None) -> tuple[int | None, int]:
    """(bytes XLA's allocator holds on ``device`` (default: this process's first), bytes
    in use there); (None, 0) where the backend reports no memory (CPU)."""
    stats = (device or jax.local_devices()[0]).memory_stats() or {}
    limit = stats.get("bytes_limit")
    return (int(limit) if limit else None), int(stats.get("bytes_in_use", 0))


def engine_pages(cfg, state, options: EngineOptions, max_len: int) -> int:
    """The pool of an engine for the model ``cfg`` whose weights are ``state`` (arrays or
    shapes), with ``options`` (``num_slots`` set) and context limit ``max_len``, on this
    process's first device; the sizing is logged once per process."""
    device_bytes, in_use = device_memory()
    slot_tokens = min(max_len, options.slot_tokens or max_len)
    if device_bytes is None:
        slot_tokens = min(slot_tokens, CPU_SLOT_TOKENS)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    workspace = workspace_bytes(cfg, options.num_slots, options.prefill_chunk, paged.CHUNK_PAGES * options.page_size)
    page_bytes = paged.page_bytes(cfg, options.page_size)
    pages = pool_pages(num_slots=options.num_slots, slot_tokens=slot_tokens, page_size=options.page_size,
                       page_bytes=page_bytes, device_bytes=device_bytes, resident_bytes=max(weights, in_use),
                       workspace=workspace, memory_fraction=options.memory_fraction)
    where = ("no device memory figure (CPU)" if device_bytes is None else
             f"{options.memory_fraction} of {device_bytes / 2**30:.2f} GiB less {max(weights, in_use) / 2**30:.2f} GiB "
             f"on the device and {workspace / 2**30:.2f} GiB of workspace")
    _log_once(f"engine page pool: {pages} pages of {options.page_size} tokens ({pages * page_bytes / 2**30:.2f} GiB, "
              f"{(pages - 1) * options.page_size // options.num_slots} tokens a slot for {options.num_slots} slots; "
              f"cap {slot_tokens} tokens a slot) from {where}")
    return pages


@functools.cache
def _log_once(message: str) -> None:
    logging.info(message)
