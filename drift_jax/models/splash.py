"""Causal self-attention with JAX's Pallas TPU splash attention kernel: flash-style
tiles over the sequence, so no ``[T, T]`` scores exist, forward or backward.

``jax.experimental.pallas.ops.tpu.splash_attention`` (the kernel MaxText uses) takes one
row's ``[N, T, H]`` queries and ``[K, T, H]`` keys and values (grouped-query heads: N a
multiple of K), a static causal mask and per-token segment ids (a query sees a key only
with the same id). Padding and packed rows are segment ids here: 0 on padding, each
example's own id on its tokens. A padding query then sees earlier padding (at least
itself, so no softmax row is empty) and no real query ever sees padding, so every real
token's output equals that of the masked XLA attention (``transformer.attention_mask``).

Shapes: b batch, t positions, n query heads, k kv heads, h head dim.

On a device mesh the kernel is a Mosaic custom call, which XLA's partitioner cannot
split: ``causal_attention`` runs it under ``jax.shard_map`` over the context mesh
(``jax.set_mesh``), rows over ``data`` x ``fsdp`` and heads over ``tensor`` where they
divide, so each chip runs its own rows and heads. A program traced on several devices
without a context mesh cannot run it (``partitionable``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from drift_jax.parallel.sharding import MESH_AXES

try:  # a TPU kernel; on other platforms only interpret mode (tests) runs it
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _mask
except ImportError:  # pragma: no cover - a jax without the module
    _kernel = _mask = None

# Tile sizes (queries and keys per block, forward and backward): MaxText's defaults. The
# kernel's key tiles must be multiples of 128 lanes; shorter sequences use one tile.
BLOCK = 512
LANES = 128


def block_size(t: int) -> int:
    """The tile of a ``t``-position sequence: ``BLOCK``, or ``t`` rounded up to 128
    lanes when shorter."""
    return min(BLOCK, -(-t // LANES) * LANES)


def padded_length(t: int) -> int:
    """``t`` rounded up to a whole number of tiles (``block_size``)."""
    block = block_size(t)
    return -(-t // block) * block


def _row_kernel(num_heads: int, t: int, interpret: bool):
    """The splash kernel for one row of ``num_heads`` query heads over ``t`` positions
    (a multiple of ``block_size(t)``), causal, forward and backward tiles set."""
    if _kernel is None:
        raise ImportError("attention_impl='splash' needs jax.experimental.pallas.ops.tpu.splash_attention")
    b = block_size(t)
    sizes = _kernel.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = _mask.MultiHeadMask([_mask.CausalMask((t, t))] * num_heads)
    return _kernel.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _attend(q_btnh, k_btkh, v_btkh, segment_ids_bt, interpret: bool):
    """``causal_attention`` on one device's rows and heads (T already tiled)."""
    _, t, n, _ = q_btnh.shape
    kernel = _row_kernel(n, t, interpret)
    segments = _kernel.SegmentIds(q=segment_ids_bt, kv=segment_ids_bt)
    out_bnth = jax.vmap(kernel)(q_btnh.transpose(0, 2, 1, 3), k_btkh.transpose(0, 2, 1, 3),
                                v_btkh.transpose(0, 2, 1, 3), segment_ids=segments)
    return out_bnth.transpose(0, 2, 1, 3)


def partitionable() -> bool:
    """Whether the kernel can run in the program being traced: under a context mesh
    (``jax.set_mesh``: it runs under ``shard_map``) or in a process of one device. XLA
    cannot split a Mosaic call over a mesh it is not told about, so elsewhere (several
    devices, no context mesh) the model takes XLA's attention instead."""
    return not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1


def _mesh_specs(b: int, n: int, k: int):
    """(segment-id spec, q/k/v spec) for ``shard_map`` over the context mesh, or None
    when there is no mesh: rows over the ``data``/``fsdp`` axes whose sizes divide ``b``,
    heads over ``tensor`` when it divides both ``n`` and ``k``; the rest replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = dict(mesh.shape)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"attention_impl='splash' shards over mesh axes {MESH_AXES}; the context mesh "
                         f"also has {sorted(unknown)}")
    rows, split = [], 1
    for axis in ("data", "fsdp"):
        if sizes.get(axis, 1) > 1 and b % (split * sizes[axis]) == 0:
            rows.append(axis)
            split *= sizes[axis]
    row_axes = tuple(rows) or None
    tensor = sizes.get("tensor", 1)
    heads = "tensor" if tensor > 1 and n % tensor == 0 and k % tensor == 0 else None
    return PartitionSpec(row_axes, None), PartitionSpec(row_axes, None, heads, None)


def causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, segment_ids_bt: jax.Array,
                     interpret: bool = False) -> jax.Array:
    """Causal attention within segments: query t sees key s <= t with the same segment id.

    Args:
      q_btnh: [B, T, N, H] queries (RoPE applied, not yet scaled).
      k_btkh, v_btkh: [B, T, K, H] keys and values, K dividing N.
      segment_ids_bt: [B, T] int, 0 on padding, the example's id on its tokens (one
        example a row: 1 on every real token).
      interpret: run the kernel in Pallas interpret mode (CPU tests).
    Returns:
      [B, T, N, H] in the dtype of ``q_btnh``; rows of padding queries hold attention
      over earlier padding, meaningless but finite.
    """
    b, t, n, h = q_btnh.shape
    k = k_btkh.shape[2]
    # The kernel does not scale the logits; the softmax scale of dot_product_attention.
    q_btnh = q_btnh * jnp.asarray(1.0 / math.sqrt(h), q_btnh.dtype)
    pad = padded_length(t) - t
    if pad:  # padding positions: segment 0, after every real token, cut off again below
        q_btnh, k_btkh, v_btkh = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_btnh, k_btkh, v_btkh))
        segment_ids_bt = jnp.pad(segment_ids_bt, ((0, 0), (0, pad)))
    segment_ids_bt = segment_ids_bt.astype(jnp.int32)
    specs = _mesh_specs(b, n, k)
    if specs is None:
        out_btnh = _attend(q_btnh, k_btkh, v_btkh, segment_ids_bt, interpret)
    else:
        row_spec, head_spec = specs
        out_btnh = jax.shard_map(
            lambda q, k, v, s: _attend(q, k, v, s, interpret),
            in_specs=(head_spec, head_spec, head_spec, row_spec), out_specs=head_spec, check_vma=False,
        )(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    return out_btnh[:, :t]
