"""One Flax NNX decoder-only transformer for Qwen2/2.5, Qwen3 (dense) and Llama 3.x.

Family differences are config switches (``qkv_bias``, ``qk_norm``, ``tie_word_embeddings``,
``rope_scaling``), not separate classes. Parameter names follow the Hugging Face module
tree so checkpoint conversion is a rename plus a transpose.

Shape letters: b batch, t query positions, s key/cache positions, d hidden, n query
heads, k kv heads, h head dim, f MLP hidden, v vocabulary.

Every parameter carries logical sharding axes ("embed", "vocab", "heads", "kv_heads",
"mlp", "norm") as NNX metadata; a mesh + rules turn them into shardings (see
``drift_jax.parallel.sharding``). They are not applied eagerly, so the model also builds with no
mesh at all.

Speed switches live in the config: ``remat`` (activation checkpointing per layer) and
``attention_impl`` (cuDNN flash attention on GPU, Pallas splash attention on TPU, XLA
elsewhere; ``drift_jax.models.attention``).

Any ``Linear`` of a layer may carry a LoRA adapter (``drift_jax.models.lora``); the full
forward takes an optional ``dropout_rng`` for the adapters' dropout in training.

Packed rows (``drift_jax.data.batching.collate_packed``): the full forward takes optional
``segment_ids_bt`` (0 = padding, 1..n = the example a token belongs to). Attention is then
causal and within a segment, and RoPE positions restart at 0 in each segment, so every
example's logits are those it has alone in a row (up to float rounding).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from drift_jax.models import paged as paged_kv
from drift_jax.models.attention import (
    attend,
    attention_implementation,
    attention_mask,
    attention_segments,
    default_positions,
    segment_positions,
    uses_splash,
)
from drift_jax.models.config import ModelConfig
from drift_jax.parallel.sharding import gathered, rows_split

_EMBED_STD = 0.02


def _param(rngs: nnx.Rngs, shape, axes, dtype, init="normal", std=None) -> nnx.Param:
    if init == "normal":
        # Kernels: LeCun normal (std 1/sqrt(fan_in)), Flax's default. Unlike HF's flat
        # 0.02 it gives small models attention logits large enough to start learning
        # which positions to attend to; pretrained weights replace it anyway.
        std = shape[0] ** -0.5 if std is None else std
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class KVCache(NamedTuple):
    """Decode state. ``k``/``v``: per-layer ``[B, S, K, H]``; ``valid_bs``: which cache
    slots hold real (non-padding) tokens."""

    k: tuple
    v: tuple
    valid_bs: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        layers = range(cfg.num_layers)
        return cls(
            k=tuple(jnp.zeros(shape, cfg.dtype) for _ in layers),
            v=tuple(jnp.zeros(shape, cfg.dtype) for _ in layers),
            valid_bs=jnp.zeros((batch, max_len), bool),
        )


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, cfg: ModelConfig, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), ("norm",), cfg.param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32 and cast back before the scale, as the HF reference does.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias) (+ lora(x))``; kernel stored ``[in, out]``.

    ``lora``: an optional adapter (``drift_jax.models.lora.apply_lora`` sets it), called
    with the forward's ``dropout_rng`` (None: no dropout)."""

    def __init__(self, d_in, d_out, axes, cfg: ModelConfig, rngs: nnx.Rngs, bias=False):
        self.kernel = _param(rngs, (d_in, d_out), axes, cfg.param_dtype)
        self.bias = _param(rngs, (d_out,), axes[-1:], cfg.param_dtype, "zeros") if bias else None
        self.dtype = cfg.dtype
        self.axes = tuple(axes)
        # nnx.data: a data attribute, so an adapter module may replace the None later.
        self.lora = nnx.data(None)

    def __call__(self, x, dropout_rng=None):
        y = x @ gathered(self.kernel[...].astype(self.dtype), self.axes)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x, dropout_rng)
        return y


def rope_inverse_frequencies(cfg: ModelConfig) -> jax.Array:
    """``[H/2]`` inverse frequencies, with Llama-3 wavelength-dependent scaling if set."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_btnh, positions_bt, inv_freq_h2):
    """Rotate-half RoPE (the HF convention) at integer positions ``[B, T]``."""
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq_h2
    cos = jnp.cos(angles_bth)[:, :, None, :]
    sin = jnp.sin(angles_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_btnh.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_heads * h, ("embed", "heads"), cfg, rngs, cfg.qkv_bias)
        self.k_proj = Linear(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), cfg, rngs, cfg.qkv_bias)
        self.v_proj = Linear(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), cfg, rngs, cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * h, d, ("heads", "embed"), cfg, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, cfg, rngs)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, cfg, rngs)
        self.cfg = cfg

    def __call__(self, x_btd, positions_bt, inv_freq, mask_bts, kv=None, index=None, is_causal=False,
                 dropout_rng=None, paged=None, segment_ids_bt=None):
        """Attention over the new tokens' own keys, or over a cache ``kv=(k, v)`` into
        which the new keys are first written at slot ``index``. Returns (out, (k, v)).

        ``segment_ids_bt`` (``attention.attention_segments``; only when the queries see
        no key but their own, as in the uncached forward or a prefill at cache slot 0,
        and ``attention.uses_splash``): the splash kernel attends causally within equal
        ids over the new keys, and ``mask_bts`` (then may be None) is unused.

        ``paged``: a ``drift_jax.models.paged.PageRefs``; ``kv`` is then one layer's
        ``(k_pages, v_pages)``, the new keys are written where ``paged`` says and the
        queries attend causally over their rows' pages (``mask_bts`` is unused).

        ``is_causal`` (only valid when T == S, query t at key slot t) tells the kernel
        the mask is causal, so cuDNN can skip the upper triangle; ``mask_bts`` must then
        already be causal, and is applied as well. ``dropout_rng``: for LoRA adapters'
        dropout (training only)."""
        cfg = self.cfg
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd, dropout_rng).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x_btd, dropout_rng).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x_btd, dropout_rng).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions_bt, inv_freq)
        k = apply_rope(k, positions_bt, inv_freq)
        if paged is not None:
            k_pages, v_pages = paged_kv.write(kv[0], k, paged), paged_kv.write(kv[1], v, paged)
            out = paged_kv.attend(q, k_pages, v_pages, paged, cfg.paged_attention_impl)
            return self.o_proj(out.reshape(b, t, -1), dropout_rng), (k_pages, v_pages)
        k_new, v_new = k, v
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        impl = attention_implementation(cfg, t)
        if segment_ids_bt is not None:
            out = attend(q, k_new, v_new, impl, segment_ids_bt=segment_ids_bt)
        else:
            out = attend(q, k, v, impl, mask_bts, is_causal=is_causal)
        return self.o_proj(out.reshape(b, t, -1), dropout_rng), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), cfg, rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), cfg, rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x, dropout_rng=None):
        hidden = jax.nn.silu(self.gate_proj(x, dropout_rng)) * self.up_proj(x, dropout_rng)
        return self.down_proj(hidden, dropout_rng)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions_bt, inv_freq, mask_bts, kv=None, index=None, is_causal=False,
                 dropout_rng=None, paged=None, segment_ids_bt=None):
        h, kv = self.self_attn(self.input_layernorm(x), positions_bt, inv_freq, mask_bts, kv, index,
                               is_causal, dropout_rng, paged, segment_ids_bt)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), dropout_rng), kv


def _layer_forward(layer: DecoderLayer, x_btd, positions_bt, inv_freq, mask_bts, dropout_rng=None,
                   segment_ids_bt=None):
    """One layer of the uncached forward (query t at key slot t, so causal): over
    ``mask_bts``, or the attention ``segment_ids_bt`` of a splash kernel."""
    return layer(x_btd, positions_bt, inv_freq, mask_bts, is_causal=True, dropout_rng=dropout_rng,
                 segment_ids_bt=segment_ids_bt)[0]


# remat policy -> layer forward. "dots" saves matmuls without batch dimensions (the
# projections and the MLP: the expensive recomputation) and recomputes the attention
# scores and the element-wise ops, which are cheap to redo but [B, N, T, S]-sized to keep.
_LAYER_FORWARD = {
    "none": _layer_forward,
    "full": nnx.remat(_layer_forward),
    "dots": nnx.remat(_layer_forward, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


class Transformer(nnx.Module):
    """Decoder-only LM. ``model(tokens_bt)`` -> logits ``[B, T, V]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                   cfg.param_dtype, std=_EMBED_STD)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)

    # -- pieces, exposed so a loss can chunk the LM head over the sequence -------------
    def embed(self, tokens_bt):
        return self.embed_tokens[...][tokens_bt].astype(self.cfg.dtype)

    def lm_head_weight(self) -> jax.Array:
        """The LM head as a ``[D, V]`` matrix in the storage dtype (the embedding,
        transposed, when tied): what a loss that chunks the head over the sequence needs."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden_btd):
        """Final hidden states ``[B, T, D]`` -> logits ``[B, T, V]`` in the compute dtype."""
        if self.cfg.tie_word_embeddings:
            return hidden_btd @ self.embed_tokens[...].astype(self.cfg.dtype).T
        return self.lm_head(hidden_btd)

    def hidden_states(self, tokens_bt, valid_bt=None, positions_bt=None, dropout_rng=None,
                      segment_ids_bt=None):
        """Full (uncached) forward up to the final norm: ``[B, T]`` -> ``[B, T, D]``.

        ``valid_bt`` marks real tokens (False = padding, left or right); padding keys are
        never attended to by real tokens, so padding changes no real token's output.
        ``dropout_rng``: a PRNG key for the dropout of LoRA adapters (training); None
        (evaluation, sampling) runs them deterministically. Without adapters it is unused.
        ``segment_ids_bt``: ``[B, T]`` int, for packed rows (0 = padding, 1..n = the
        example of the token): attention stays within a segment and, when
        ``positions_bt`` is None, positions restart per segment (``segment_positions``);
        ``valid_bt`` defaults to ``segment_ids_bt > 0``. None: one sequence per row.
        """
        b, t = tokens_bt.shape
        if segment_ids_bt is not None:
            segment_ids_bt = jnp.asarray(segment_ids_bt, jnp.int32)
            if valid_bt is None:
                valid_bt = segment_ids_bt > 0
            if positions_bt is None:
                positions_bt = segment_positions(segment_ids_bt)
        if valid_bt is None:
            valid_bt = jnp.ones((b, t), bool)
        if positions_bt is None:
            positions_bt = default_positions(valid_bt)
        # The splash kernel takes segment ids; the others a [B, T, T] mask.
        mask_bts = attn_segments_bt = None
        if uses_splash(self.cfg, t):
            attn_segments_bt = attention_segments(valid_bt, segment_ids_bt)
        else:
            mask_bts = attention_mask(valid_bt, segment_ids_bt)
        inv_freq = rope_inverse_frequencies(self.cfg)
        layer_forward = _LAYER_FORWARD[self.cfg.remat]
        x = rows_split(self.embed(tokens_bt))
        for layer in self.layers:
            x = rows_split(layer_forward(layer, x, positions_bt, inv_freq, mask_bts, dropout_rng, attn_segments_bt))
        return self.norm(x)

    def __call__(self, tokens_bt, valid_bt=None, positions_bt=None, dropout_rng=None, segment_ids_bt=None):
        """Logits ``[B, T, V]``; arguments as ``hidden_states``."""
        return self.logits(self.hidden_states(tokens_bt, valid_bt, positions_bt, dropout_rng, segment_ids_bt))

    def decode(self, tokens_bt, cache: KVCache, index, positions_bt, valid_bt=None):
        """Run ``T`` new tokens through the model, writing their keys/values into the
        cache at slots ``[index, index + T)``. Used for both prefill and per-token decode.

        Returns (logits ``[B, T, V]``, updated cache).
        """
        hidden_btd, cache = self.decode_hidden(tokens_bt, cache, index, positions_bt, valid_bt)
        return self.logits(hidden_btd), cache

    def decode_hidden(self, tokens_bt, cache: KVCache, index, positions_bt, valid_bt=None):
        """``decode`` up to the final norm: (hidden ``[B, T, D]``, updated cache). A
        prefill needs logits at its last position only; ``[B, P, V]`` would be wasted."""
        b, t = tokens_bt.shape
        if valid_bt is None:
            valid_bt = jnp.ones((b, t), bool)
        valid_bs = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, valid_bt, index, axis=1)
        s = valid_bs.shape[1]
        q_slot_t = index + jnp.arange(t)
        slot_s = jnp.arange(s)
        causal_ts = slot_s[None, :] <= q_slot_t[:, None]
        mask_bts = (causal_ts & valid_bs[:, None, :]) | (slot_s[None, :] == q_slot_t[:, None])
        # A prefill at slot 0 sees only its own keys: the splash kernel's case.
        attn_segments_bt = None
        if isinstance(index, int) and index == 0 and uses_splash(self.cfg, t):
            attn_segments_bt = attention_segments(valid_bt)
        inv_freq = rope_inverse_frequencies(self.cfg)
        x = self.embed(tokens_bt)
        ks, vs = [], []
        for layer, k_c, v_c in zip(self.layers, cache.k, cache.v):
            x, (k_c, v_c) = layer(x, positions_bt, inv_freq, mask_bts, (k_c, v_c), index,
                                  segment_ids_bt=attn_segments_bt)
            ks.append(k_c)
            vs.append(v_c)
        return self.norm(x), KVCache(tuple(ks), tuple(vs), valid_bs)

    def paged_hidden(self, tokens_bt, cache, block_tables_bm, positions_bt, valid_bt):
        """Run new tokens over a paged cache (``drift_jax.models.paged``), writing their keys
        and values into their rows' pages: (hidden ``[B, T, D]``, updated ``PagedKV``).

        block_tables_bm: ``[B, M]`` each row's pages; positions_bt: ``[B, T]`` each
        token's position, which is also its cache index (a paged sequence has no
        padding inside); valid_bt: False on padding, whose keys go to the trash page.
        Each query attends to positions 0..its own of its row.
        """
        refs = paged_kv.page_refs(block_tables_bm, positions_bt, valid_bt, cache.page_size)
        inv_freq = rope_inverse_frequencies(self.cfg)
        x = self.embed(tokens_bt)
        ks, vs = [], []
        for layer, k_p, v_p in zip(self.layers, cache.k, cache.v):
            x, (k_p, v_p) = layer(x, positions_bt, inv_freq, None, (k_p, v_p), paged=refs)
            ks.append(k_p)
            vs.append(v_p)
        return self.norm(x), type(cache)(tuple(ks), tuple(vs))
