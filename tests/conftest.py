"""Shared fixtures: a tiny model config covering GQA, q/k/v bias, q/k norm and llama3 RoPE."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from drift_jax.models import ModelConfig, RopeScaling  # noqa: E402


@pytest.fixture
def tiny_cfg():
    return ModelConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=12, qkv_bias=True, qk_norm=True,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=8),
    )
