"""Transformer configuration: one dataclass covers Qwen2/2.5, Qwen3 (dense) and Llama 3.x."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash", "splash_interpret")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3-style RoPE frequency scaling (``rope_type="llama3"`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of a decoder-only transformer.

    ``head_dim`` need not equal ``hidden_size // num_heads`` (Qwen3 uses 128 with
    hidden 1024 and 16 heads). ``dtype`` is the compute dtype; ``param_dtype`` the
    storage dtype of parameters (bf16 compute over float32 master weights is
    ``dtype=jnp.bfloat16, param_dtype=jnp.float32``).

    Speed switches, which change no result beyond float rounding:
      remat: what a layer keeps for the backward pass. "none" keeps every activation;
        "full" keeps only the layer input and recomputes the rest; "dots" keeps the
        matmul outputs and recomputes the cheap element-wise ops between them.
      attention_impl: the attention kernel of multi-token calls (training, prefill;
        ``drift_jax.models.attention``): "xla" or "cudnn" (``jax.nn.dot_product_attention``),
        "splash" (the Pallas TPU splash kernel: no ``[T, T]`` scores; "xla" serves a
        prefill over a cache that does not start at slot 0, and a program on several
        devices traced without a context mesh) or "splash_interpret" (that kernel on
        CPU, for tests). None picks "splash" on TPU, "cudnn" on GPU for bf16/fp16 with
        a head_dim cuDNN takes, else "xla". Single-token decode steps always use "xla"
        (memory-bound; a flash kernel gains nothing there).
      paged_attention_impl: decode steps over a paged cache (the continuous engine):
        "auto" takes JAX's Pallas paged-attention kernel on GPU ("pallas") and on TPU
        ("pallas_tpu") and gather + XLA elsewhere; "xla", "pallas", "pallas_tpu", or
        "pallas_interpret" / "pallas_tpu_interpret" (the kernel on CPU, for tests).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32_768
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None
    paged_attention_impl: str = "auto"

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * h, self.num_kv_heads * h
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * h if self.qk_norm else 0
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head


_LLAMA3_SCALING = RopeScaling(factor=32.0, original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1_000_000.0,
        qkv_bias=True, tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": ModelConfig(
        vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1_000_000.0,
        qkv_bias=True, tie_word_embeddings=True,
    ),
    "qwen2.5-3b": ModelConfig(
        vocab_size=151_936, hidden_size=2048, intermediate_size=11_008, num_layers=36,
        num_heads=16, num_kv_heads=2, head_dim=128, rope_theta=1_000_000.0,
        qkv_bias=True, tie_word_embeddings=True,
    ),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0,
        qkv_bias=True, tie_word_embeddings=False,
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500_000.0,
        rope_scaling=_LLAMA3_SCALING, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131_072,
    ),
    "llama-3.2-3b": ModelConfig(
        vocab_size=128_256, hidden_size=3072, intermediate_size=8192, num_layers=28,
        num_heads=24, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
        rope_scaling=_LLAMA3_SCALING, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131_072,
    ),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
        rope_scaling=RopeScaling(factor=8.0), rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=131_072,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset (see ``PRESETS``), optionally with fields replaced."""
    try:
        cfg = PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
    return cfg.replace(**overrides)
