"""A paged KV cache: keys and values live in fixed-size pages of one shared pool, and each
sequence reads its own through a block table (the layout of vLLM and of JAX's Pallas
paged-attention kernels).

Device side (pure functions): ``PagedKV`` holds, per layer, the key and value pages,
token-major ``[P, page, K * H]`` or, for the Pallas kernels, heads-major
``[K, P, page, H]``; ``write`` scatters new keys to (page, offset) pairs; ``attend`` is
attention of new queries over a sequence's pages: the Pallas GPU or TPU kernel for
one-token decode steps where it runs, else a plain-JAX loop over chunks of pages with
an online softmax that stops at the last live page (CPU, prefill, small heads on TPU).
Page 0 is never handed out: writes of padding tokens go there, so a program needs no
branch for them.

Which pages hold what is host-side bookkeeping: ``drift_jax.rollout.page_pool``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

TRASH_PAGE = 0  # written by padding tokens, read by nothing


class PagedKV(NamedTuple):
    """Per-layer key and value pages in one of two layouts, told apart by rank:

    - token-major ``[P, page_size, K * H]`` (rank 3, the default): a token's keys of
      every kv head are one contiguous row, the unit the scatter of ``write`` and the
      gather of ``attend`` move, so XLA keeps one layout for the pool through the
      whole program (on TPU a pool of another layout is copied whole at every loop
      boundary) and the row is lane-dense when K * H is a multiple of 128;
    - heads-major ``[K, P, page_size, H]`` (rank 4): the Pallas kernels' layout (GPU and TPU)
      (``heads_major=True``).
    """

    k: tuple
    v: tuple

    @classmethod
    def zeros(cls, cfg, num_pages: int, page_size: int, heads_major: bool = False) -> "PagedKV":
        kv, h = cfg.num_kv_heads, cfg.head_dim
        shape = (kv, num_pages, page_size, h) if heads_major else (num_pages, page_size, kv * h)
        layers = range(cfg.num_layers)
        return cls(k=tuple(jnp.zeros(shape, cfg.dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, cfg.dtype) for _ in layers))

    @property
    def page_size(self) -> int:
        return self.k[0].shape[-2]


def page_bytes(cfg, page_size: int) -> int:
    """Device bytes of one page over all layers, keys and values (the pool's unit)."""
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


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


def write(pages, new_btkh, refs: PageRefs):
    """Scatter new keys (or values) ``[B, T, K, H]`` into the pages (either layout)."""
    b, t, k, h = new_btkh.shape
    if pages.ndim == 4:
        # Through the [K, P * page, H] view, one index a token: a scatter over (page,
        # offset) pairs makes XLA's TPU compiler lay the pool out anew and copy it whole.
        kv_heads, num_pages, page, head_dim = pages.shape
        new_kbth = jnp.transpose(new_btkh, (2, 0, 1, 3)).astype(pages.dtype)
        slot_bt = refs.write_page_bt * page + refs.write_offset_bt
        flat = pages.reshape(kv_heads, num_pages * page, head_dim).at[:, slot_bt].set(new_kbth)
        return flat.reshape(pages.shape)
    return pages.at[refs.write_page_bt, refs.write_offset_bt].set(new_btkh.reshape(b, t, k * h).astype(pages.dtype))


def gather(pages, block_tables_bm, head_dim: int):
    """A row's pages in position order (either layout): ``[B, M * page_size, K, H]``."""
    b, m = block_tables_bm.shape
    if pages.ndim == 4:
        k, _, page, h = pages.shape
        gathered_kbmsh = pages[:, block_tables_bm]
        return jnp.transpose(gathered_kbmsh, (1, 2, 3, 0, 4)).reshape(b, m * page, k, h)
    _, page, kh = pages.shape
    return pages[block_tables_bm].reshape(b, m * page, kh // head_dim, head_dim)


@functools.cache
def pallas_kernel():
    """JAX's Pallas Triton paged-attention kernel for GPUs
    (``jax.experimental.pallas.ops.gpu.paged_attention``), or None where this JAX has
    none: its Triton backend is deprecated from JAX 0.11 and to be removed
    (docs/scaling.md, "The decode kernel on GPUs")."""
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention
    except ImportError:
        return None
    return paged_attention


@functools.cache
def pallas_tpu_kernel():
    """JAX's Pallas TPU (Mosaic) paged-attention kernel
    (``jax.experimental.pallas.ops.tpu.paged_attention``), or None where this JAX has none."""
    try:
        from jax.experimental.pallas.ops.tpu import paged_attention
    except ImportError:
        return None
    return paged_attention


def _pallas_decode(q_bnh, k_pages, v_pages, block_tables_bm, lengths_b, interpret=False):
    scale = q_bnh.shape[-1] ** -0.5  # the kernel does not scale the logits itself
    m = block_tables_bm.shape[1]
    return pallas_kernel().paged_attention(
        (q_bnh * scale).astype(q_bnh.dtype), k_pages, v_pages, block_tables_bm, lengths_b,
        pages_per_compute_block=math.gcd(m, 8), k_splits=1, interpret=interpret)


TPU_TABLE_BYTES = 512 * 1024  # block-table bytes one TPU kernel call prefetches into SMEM (1 MiB a core)


def _pallas_tpu_decode(q_bnh, k_pages, v_pages, block_tables_bm, lengths_b, interpret=False):
    """The TPU kernel over the heads-major pool (its layout); ``interpret``: run it on
    the CPU under Pallas's TPU interpreter (tests). The kernel reads whole blocks of
    ``pages_per_compute_block`` pages and skips the blocks past a row's length. It
    prefetches its rows' block tables into SMEM, so rows go in groups whose tables fit
    ``TPU_TABLE_BYTES`` (256 rows of a 32k-token context need 2 MiB)."""
    scale = q_bnh.shape[-1] ** -0.5  # the kernel does not scale the logits itself
    b, m = block_tables_bm.shape
    kernel = functools.partial(pallas_tpu_kernel().paged_attention, pages_per_compute_block=math.gcd(m, 8))
    q_bnh = (q_bnh * scale).astype(q_bnh.dtype)
    group = max(1, TPU_TABLE_BYTES // (4 * m))

    def run():
        return jnp.concatenate([kernel(q_bnh[r:r + group], k_pages, v_pages, lengths_b[r:r + group],
                                       block_tables_bm[r:r + group]) for r in range(0, b, group)])

    if not interpret:
        return run()
    from jax.experimental.pallas import tpu as pltpu

    with pltpu.force_tpu_interpret_mode():
        return run()


_IMPLS = ("auto", "xla", "pallas", "pallas_interpret", "pallas_tpu", "pallas_tpu_interpret")


def attention_backend(num_queries: int, impl: str = "auto", head_dim: int | None = None) -> str:
    """The path of attention over pages for calls of ``num_queries`` new tokens a row:
    "pallas" (the Pallas GPU paged kernel) or "pallas_tpu" (the Pallas TPU one) for
    one-token decode steps on that platform where this JAX has the kernel, else "xla"
    (the chunked plain-JAX loop; also every multi-token call). "*_interpret": the
    kernel interpreted on the CPU (tests). "auto" takes the TPU kernel only for a
    ``head_dim`` that is a multiple of 128: its float32 softmax statistics get blocks
    of the head dim, which Mosaic refuses below 128 lanes (Qwen2.5-0.5B's 64)."""
    if impl not in _IMPLS:
        raise ValueError(f"paged attention impl {impl!r}: expected one of {', '.join(_IMPLS)}")
    kernels = {"gpu": ("pallas", pallas_kernel), "tpu": ("pallas_tpu", pallas_tpu_kernel)}
    if impl == "auto":
        platform = jax.default_backend()
        name, found = kernels.get(platform, ("xla", lambda: None))
        lanes_ok = platform != "tpu" or (head_dim or 0) % 128 == 0
        return name if num_queries == 1 and lanes_ok and found() is not None else "xla"
    if impl != "xla":
        name = impl.removesuffix("_interpret")
        if dict(kernels.values())[name]() is None:
            raise ValueError(f"paged_attention_impl={impl!r}: JAX {jax.__version__} has no {name} "
                             "paged-attention kernel; use 'auto' or 'xla'")
    return impl if num_queries == 1 else "xla"


CHUNK_PAGES = 8  # pages per step of the plain-JAX attention loop


def attend(q_btnh, k_pages, v_pages, refs: PageRefs, impl: str = "auto", chunk_pages: int = CHUNK_PAGES):
    """Causal attention of new queries ``[B, T, N, H]`` over their rows' pages (which
    already hold the new keys): query at position p sees positions 0..p. -> ``[B, T, N, H]``."""
    b, t, _, h = q_btnh.shape
    backend = attention_backend(t, impl, h)
    if backend.startswith("pallas"):
        lengths_b = (refs.positions_bt[:, 0] + 1).astype(jnp.int32)
        decode = _pallas_tpu_decode if backend.startswith("pallas_tpu") else _pallas_decode
        out_bnh = decode(q_btnh[:, 0], k_pages, v_pages, refs.block_tables_bm, lengths_b,
                         interpret=backend.endswith("_interpret"))
        return out_bnh[:, None]
    return _attend_chunked(q_btnh, k_pages, v_pages, refs, chunk_pages)


def _attend_chunked(q_btnh, k_pages, v_pages, refs: PageRefs, chunk_pages: int):
    """The plain-JAX path: a loop over chunks of ``chunk_pages`` pages with an online
    softmax, whose trip count is traced: it stops after the chunk holding the furthest
    position, so a program reads only live pages whatever the block tables' width, and
    one program serves every context length (no compile per pages-read bucket)."""
    b, t, n, h = q_btnh.shape
    page = k_pages.shape[-2]
    kv_heads = k_pages.shape[0] if k_pages.ndim == 4 else k_pages.shape[-1] // h
    g = n // kv_heads
    c = min(chunk_pages, refs.block_tables_bm.shape[1])
    span = c * page
    tables_bm = refs.block_tables_bm
    tables_bm = jnp.pad(tables_bm, ((0, 0), (0, -tables_bm.shape[1] % c)))  # pads read TRASH_PAGE, masked
    q_btkgh = (q_btnh * h ** -0.5).reshape(b, t, kv_heads, g, h)
    pos_bt = refs.positions_bt
    n_chunks = jnp.minimum(jnp.max(pos_bt) // span + 1, tables_bm.shape[1] // c)

    def scores(i):
        """Chunk ``i``'s masked scores ``[B, K, G, T, S]`` and values ``[B, S, K, H]``."""
        pages_bc = jax.lax.dynamic_slice_in_dim(tables_bm, i * c, c, axis=1)
        k_bskh, v_bskh = gather(k_pages, pages_bc, h), gather(v_pages, pages_bc, h)
        s_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh.astype(q_btnh.dtype),
                             preferred_element_type=jnp.float32)
        visible_bts = (i * span + jnp.arange(span))[None, None, :] <= pos_bt[:, :, None]
        return jnp.where(visible_bts[:, None, None], s_bkgts, -jnp.inf), v_bskh

    def weighted_values(p_bkgts, v_bskh):
        return jnp.einsum("bkgts,bskh->bkgth", p_bkgts.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype),
                          preferred_element_type=jnp.float32)

    def body(i, carry):
        max_bkgt, sum_bkgt, acc_bkgth = carry
        s_bkgts, v_bskh = scores(i)
        new_max_bkgt = jnp.maximum(max_bkgt, jnp.max(s_bkgts, axis=-1))
        p_bkgts = jnp.exp(s_bkgts - new_max_bkgt[..., None])
        rescale_bkgt = jnp.exp(max_bkgt - new_max_bkgt)
        acc_bkgth = acc_bkgth * rescale_bkgt[..., None] + weighted_values(p_bkgts, v_bskh)
        return new_max_bkgt, sum_bkgt * rescale_bkgt + jnp.sum(p_bkgts, axis=-1), acc_bkgth

    # The running softmax starts from chunk 0's statistics, not from broadcast constants:
    # XLA's GPU fusion merges every layer's constant [B, K, G, T, H] accumulator into one
    # fusion at the program's start, all live at once (10 GiB of temporaries for a
    # 256 x 128-token prefill at Qwen2.5-3B widths on an H100). Chunk 0 holds position 0,
    # which every query sees: its max is finite.
    s_bkgts, v_bskh = scores(0)
    max_bkgt = jnp.max(s_bkgts, axis=-1)
    p_bkgts = jnp.exp(s_bkgts - max_bkgt[..., None])
    init = (max_bkgt, jnp.sum(p_bkgts, axis=-1), weighted_values(p_bkgts, v_bskh))
    _, sum_bkgt, acc_bkgth = jax.lax.fori_loop(1, n_chunks, body, init)
    out_bkgth = acc_bkgth / sum_bkgt[..., None]
    return jnp.transpose(out_bkgth, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q_btnh.dtype)
