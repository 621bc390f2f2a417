"""A paged KV cache: keys and values live in fixed-size pages of one shared pool, and each
sequence reads its own through a block table (the layout of vLLM and of JAX's Pallas
paged-attention kernels).

Device side (pure functions): ``PagedKV`` holds, per layer, ``[K, P, page, H]`` pages
(kv heads first, as the Pallas kernels want them); ``write`` scatters new keys to
(page, offset) pairs; ``attend`` is attention of new queries over a sequence's pages:
the Pallas GPU kernel for one-token decode steps where it runs, else a plain-JAX loop
over chunks of pages with an online softmax that stops at the last live page (CPU,
prefill). Page 0 is never handed out: writes of
padding tokens go there, so a program needs no branch for them.

Which pages hold what is host-side bookkeeping: ``drift_jax.rollout.page_pool``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

TRASH_PAGE = 0  # written by padding tokens, read by nothing


class PagedKV(NamedTuple):
    """Per-layer key and value pages, each ``[K, P, page_size, H]``."""

    k: tuple
    v: tuple

    @classmethod
    def zeros(cls, cfg, num_pages: int, page_size: int) -> "PagedKV":
        shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        layers = range(cfg.num_layers)
        return cls(k=tuple(jnp.zeros(shape, cfg.dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, cfg.dtype) for _ in layers))

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]


class PageRefs(NamedTuple):
    """Where one call's tokens go and what they read, shared by every layer.

    block_tables_bm: ``[B, M]`` page ids of each row's sequence, in position order
      (position p lives in page ``block_tables_bm[b, p // page]``); unused entries 0.
    write_page_bt, write_offset_bt: ``[B, T]`` where each new token's key is written
      (TRASH_PAGE for padding).
    positions_bt: ``[B, T]`` each new token's position (= its cache index).
    """

    block_tables_bm: jax.Array
    write_page_bt: jax.Array
    write_offset_bt: jax.Array
    positions_bt: jax.Array


def page_refs(block_tables_bm, positions_bt, valid_bt, page_size: int) -> PageRefs:
    """``PageRefs`` for new tokens at ``positions_bt`` (False in ``valid_bt`` = padding)."""
    m = block_tables_bm.shape[1]
    page_index_bt = jnp.clip(positions_bt // page_size, 0, m - 1)
    page_bt = jnp.take_along_axis(block_tables_bm, page_index_bt, axis=1)
    return PageRefs(block_tables_bm, jnp.where(valid_bt, page_bt, TRASH_PAGE),
                    positions_bt % page_size, positions_bt)


def write(pages_kpsh, new_btkh, refs: PageRefs):
    """Scatter new keys (or values) ``[B, T, K, H]`` into the pages."""
    new_kbth = jnp.transpose(new_btkh, (2, 0, 1, 3)).astype(pages_kpsh.dtype)
    return pages_kpsh.at[:, refs.write_page_bt, refs.write_offset_bt].set(new_kbth)


def gather(pages_kpsh, block_tables_bm):
    """A row's pages in position order: ``[B, M * page_size, K, H]``."""
    k, _, page, h = pages_kpsh.shape
    b, m = block_tables_bm.shape
    gathered_kbmsh = pages_kpsh[:, block_tables_bm]
    return jnp.transpose(gathered_kbmsh, (1, 2, 3, 0, 4)).reshape(b, m * page, k, h)


def _pallas_decode(q_bnh, k_pages, v_pages, block_tables_bm, lengths_b, interpret=False):
    from jax.experimental.pallas.ops.gpu import paged_attention as pallas_paged

    scale = q_bnh.shape[-1] ** -0.5  # the kernel does not scale the logits itself
    m = block_tables_bm.shape[1]
    return pallas_paged.paged_attention(
        (q_bnh * scale).astype(q_bnh.dtype), k_pages, v_pages, block_tables_bm, lengths_b,
        pages_per_compute_block=math.gcd(m, 8), k_splits=1, interpret=interpret)


def attention_backend(num_queries: int, impl: str = "auto") -> str:
    """"pallas" (the Pallas GPU paged kernel, one-token decode on GPU) or "xla"."""
    if impl not in ("auto", "xla", "pallas", "pallas_interpret"):
        raise ValueError(f"paged attention impl {impl!r}: expected auto, xla, pallas or pallas_interpret")
    if impl == "auto":
        return "pallas" if num_queries == 1 and jax.default_backend() == "gpu" else "xla"
    return impl if num_queries == 1 else "xla"


CHUNK_PAGES = 8  # pages per step of the plain-JAX attention loop


def attend(q_btnh, k_pages, v_pages, refs: PageRefs, impl: str = "auto", chunk_pages: int = CHUNK_PAGES):
    """Causal attention of new queries ``[B, T, N, H]`` over their rows' pages (which
    already hold the new keys): query at position p sees positions 0..p. -> ``[B, T, N, H]``."""
    b, t, _, _ = q_btnh.shape
    backend = attention_backend(t, impl)
    if backend.startswith("pallas"):
        lengths_b = (refs.positions_bt[:, 0] + 1).astype(jnp.int32)
        out_bnh = _pallas_decode(q_btnh[:, 0], k_pages, v_pages, refs.block_tables_bm, lengths_b,
                                 interpret=backend == "pallas_interpret")
        return out_bnh[:, None]
    return _attend_chunked(q_btnh, k_pages, v_pages, refs, chunk_pages)


def _attend_chunked(q_btnh, k_pages, v_pages, refs: PageRefs, chunk_pages: int):
    """The plain-JAX path: a loop over chunks of ``chunk_pages`` pages with an online
    softmax, whose trip count is traced: it stops after the chunk holding the furthest
    position, so a program reads only live pages whatever the block tables' width, and
    one program serves every context length (no compile per pages-read bucket)."""
    b, t, n, h = q_btnh.shape
    kv_heads, _, page, _ = k_pages.shape
    g = n // kv_heads
    c = min(chunk_pages, refs.block_tables_bm.shape[1])
    span = c * page
    tables_bm = refs.block_tables_bm
    tables_bm = jnp.pad(tables_bm, ((0, 0), (0, -tables_bm.shape[1] % c)))  # pads read TRASH_PAGE, masked
    q_btkgh = (q_btnh * h ** -0.5).reshape(b, t, kv_heads, g, h)
    pos_bt = refs.positions_bt
    n_chunks = jnp.minimum(jnp.max(pos_bt) // span + 1, tables_bm.shape[1] // c)

    def body(i, carry):
        max_bkgt, sum_bkgt, acc_bkgth = carry
        pages_bc = jax.lax.dynamic_slice_in_dim(tables_bm, i * c, c, axis=1)
        k_bskh, v_bskh = gather(k_pages, pages_bc), gather(v_pages, pages_bc)
        s_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh.astype(q_btnh.dtype),
                             preferred_element_type=jnp.float32)
        visible_bts = (i * span + jnp.arange(span))[None, None, :] <= pos_bt[:, :, None]
        s_bkgts = jnp.where(visible_bts[:, None, None], s_bkgts, -jnp.inf)
        # Chunk 0 holds position 0, which every query sees: the running max is finite from then on.
        new_max_bkgt = jnp.maximum(max_bkgt, jnp.max(s_bkgts, axis=-1))
        p_bkgts = jnp.exp(s_bkgts - new_max_bkgt[..., None])
        rescale_bkgt = jnp.exp(max_bkgt - new_max_bkgt)
        acc_bkgth = acc_bkgth * rescale_bkgt[..., None] + jnp.einsum(
            "bkgts,bskh->bkgth", p_bkgts.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype),
            preferred_element_type=jnp.float32)
        return new_max_bkgt, sum_bkgt * rescale_bkgt + jnp.sum(p_bkgts, axis=-1), acc_bkgth

    init = (jnp.full((b, kv_heads, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, kv_heads, g, t), jnp.float32),
            jnp.zeros((b, kv_heads, g, t, h), jnp.float32))
    _, sum_bkgt, acc_bkgth = jax.lax.fori_loop(0, n_chunks, body, init)
    out_bkgth = acc_bkgth / sum_bkgt[..., None]
    return jnp.transpose(out_bkgth, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q_btnh.dtype)
