"""The decoder-only transformer, its configs and presets, and Hugging Face checkpoint I/O."""

from drift_jax.models.config import PRESETS, ModelConfig, RopeScaling, preset
from drift_jax.models.hf import config_from_hf, config_to_hf, from_pretrained, load_tokenizer, save_pretrained
from drift_jax.models.transformer import KVCache, Transformer

__all__ = [
    "PRESETS", "KVCache", "ModelConfig", "RopeScaling", "Transformer", "config_from_hf", "config_to_hf",
    "from_pretrained", "load_tokenizer", "preset", "save_pretrained",
]
