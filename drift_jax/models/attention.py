"""The attention of multi-token calls (training, scoring, prefill): which kernel runs, the
mask or segment ids it takes, and the RoPE positions of padded and packed rows.

Kernels (``ModelConfig.attention_impl``): XLA's and cuDNN's fused attention through
``jax.nn.dot_product_attention``, which take a ``[B, T, S]`` mask, and the Pallas TPU
splash kernel (``drift_jax.models.splash``), which takes per-token segment ids and
never forms ``[T, T]`` scores. Each gives every real token the same output.

Shape letters: b batch, t query positions, s key positions, n query heads, k kv heads,
h head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from drift_jax.models import splash
from drift_jax.models.config import ModelConfig

SPLASH_IMPLS = ("splash", "splash_interpret")


def attention_implementation(cfg: ModelConfig, num_queries: int) -> str:
    """The attention kernel of a call with ``num_queries`` new tokens: "xla" for
    one-token decode steps, else ``cfg.attention_impl``, or when that is None "splash"
    on TPU, "cudnn" on GPU for bf16/fp16 and head_dim in cuDNN's range, else "xla"."""
    if num_queries == 1:
        return "xla"
    if cfg.attention_impl is not None:
        return cfg.attention_impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    half = jnp.dtype(cfg.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    cudnn_head = cfg.head_dim <= 128 and cfg.head_dim % 8 == 0
    return "cudnn" if backend == "gpu" and half and cudnn_head else "xla"


def uses_splash(cfg: ModelConfig, num_queries: int) -> bool:
    """Whether a call with ``num_queries`` new tokens that sees only its own keys runs
    the splash kernel (it then takes ``attention_segments``, not a mask): a splash
    ``attention_implementation`` where the kernel can run (``splash.partitionable``;
    elsewhere XLA's attention)."""
    return attention_implementation(cfg, num_queries) in SPLASH_IMPLS and splash.partitionable()


def default_positions(valid_bt: jax.Array) -> jax.Array:
    """RoPE positions that skip left padding: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(valid_bt.astype(jnp.int32), axis=1) - 1, 0)


def segment_positions(segment_ids_bt: jax.Array) -> jax.Array:
    """``[B, T]`` int32 RoPE positions of packed rows: 0 at the first token of each
    segment (a run of equal ids), counting up within it; 0 on padding (id 0).

    An example packed after others then gets the positions it has alone, so its
    attention scores (which depend on relative positions only within it) are unchanged."""
    segment_ids_bt = jnp.asarray(segment_ids_bt, jnp.int32)
    t = segment_ids_bt.shape[1]
    idx_t = jnp.arange(t, dtype=jnp.int32)
    starts_bt = jnp.concatenate(
        [jnp.ones_like(segment_ids_bt[:, :1], bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    # Index of the current segment's first token: a running max of the start indices.
    first_bt = jax.lax.cummax(jnp.where(starts_bt, idx_t, 0), axis=1)
    return jnp.where(segment_ids_bt > 0, idx_t - first_bt, 0)


def attention_mask(valid_bt: jax.Array, segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """``[B, T, T]`` bool mask of the uncached forward: query t sees key s <= t that is
    real and, with ``segment_ids_bt``, in the same segment (packed examples never see
    each other). A padding query may see only itself, so no softmax row is ever empty.

    It is a plain boolean mask, which both XLA and cuDNN take: XLA applies it, and cuDNN
    folds it into an additive bias (as it does the padding mask), so packed rows need
    no fallback from the fused kernel."""
    t = valid_bt.shape[1]
    idx = jnp.arange(t)
    causal_ts = idx[:, None] >= idx[None, :]
    if segment_ids_bt is None:
        return (causal_ts & valid_bt[:, None, :]) | jnp.eye(t, dtype=bool)
    same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return (causal_ts & valid_bt[:, None, :] & same_bts) | jnp.eye(t, dtype=bool)


def attention_segments(valid_bt: jax.Array, segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """``[B, T]`` int32 segment ids of the splash kernel, the same attention as
    ``attention_mask`` for every real query: 0 on padding, else the token's segment id
    (1 on every real token of an unpacked row)."""
    ids_bt = jnp.ones(valid_bt.shape, jnp.int32) if segment_ids_bt is None else jnp.asarray(segment_ids_bt, jnp.int32)
    return jnp.where(valid_bt, ids_bt, 0)


def attend(q_btnh, k_bskh, v_bskh, impl: str, mask_bts=None, segment_ids_bt=None, is_causal: bool = False):
    """``[B, T, N, H]`` attention of the queries over the keys and values ``[B, S, K, H]``
    (K dividing N: grouped-query heads).

    With ``segment_ids_bt`` (``attention_segments``; only when the keys are the queries'
    own, S == T, and ``uses_splash``) the splash kernel attends causally within equal
    ids. Otherwise ``impl`` ("xla" for a splash one) over ``mask_bts`` ``[B, T, S]``;
    ``is_causal`` (only valid when S == T) lets cuDNN skip the upper triangle, the mask
    being causal already."""
    k_bskh, v_bskh = k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype)
    if segment_ids_bt is not None:
        return splash.causal_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, interpret=impl == "splash_interpret")
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None, :, :], is_causal=is_causal,
                                        implementation="xla" if impl in SPLASH_IMPLS else impl)
