"""The decoder-only transformer, its configs and presets."""

from drift_jax.models.config import PRESETS, ModelConfig, RopeScaling, preset
from drift_jax.models.transformer import KVCache, Transformer

__all__ = ["PRESETS", "KVCache", "ModelConfig", "RopeScaling", "Transformer", "preset"]
