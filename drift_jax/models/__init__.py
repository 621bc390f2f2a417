"""The decoder-only transformer, its configs and presets, Hugging Face checkpoint I/O and
LoRA adapters (PEFT format)."""

from drift_jax.models.config import PRESETS, ModelConfig, RopeScaling, preset
from drift_jax.models.hf import config_from_hf, config_to_hf, from_pretrained, load_tokenizer, save_pretrained
from drift_jax.models.lora import LoRAConfig, apply_lora, has_lora, load_adapter, merge_lora, save_adapter
from drift_jax.models.transformer import KVCache, Transformer

__all__ = [
    "PRESETS", "KVCache", "LoRAConfig", "ModelConfig", "RopeScaling", "Transformer", "apply_lora",
    "config_from_hf", "config_to_hf", "from_pretrained", "has_lora", "load_adapter", "load_tokenizer",
    "merge_lora", "preset", "save_adapter", "save_pretrained",
]
