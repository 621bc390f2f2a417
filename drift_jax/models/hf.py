"""Hugging Face checkpoints <-> ``Transformer``: configs, safetensors weights, tokenizers.

Parameter paths mirror the HF module tree, so a tensor's HF name is its path joined with
dots (under ``model.``, except ``lm_head``). Linear kernels are stored ``[in, out]`` here
and ``[out, in]`` (torch's ``Linear.weight``) in the files, so they are transposed both
ways. Loading fills an abstract model one tensor at a time straight from the safetensors
files, so host memory never holds more than one tensor beyond the file's page cache.

LoRA: ``from_pretrained(..., lora_adapter=DIR)`` adds a PEFT adapter to the loaded base;
``save_pretrained(..., lora="adapter")`` writes the adapters as a PEFT folder, and a model
with adapters otherwise saves merged (``drift_jax.models.lora``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from drift_jax.models import lora as lora_lib
from drift_jax.models.config import ModelConfig, RopeScaling
from drift_jax.models.transformer import Transformer

_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_INDEX = "model.safetensors.index.json"
_CHECKPOINT_FILES = ("config.json", "*.safetensors", _INDEX)
_ADAPTER_FILES = (lora_lib.ADAPTER_CONFIG, lora_lib.ADAPTER_WEIGHTS)


def _unsupported(model_type: str, what: str) -> ValueError:
    return ValueError(f"config.json ({model_type}): {what} is not supported by drift_jax's Transformer")


def config_from_hf(hf_config: dict, dtype: Any = jnp.float32, param_dtype: Any = None) -> ModelConfig:
    """A ``ModelConfig`` from an HF ``config.json`` dict (qwen2, qwen3 or llama).

    Reads both the transformers-4 layout (``rope_theta`` and ``rope_scaling`` at top level)
    and the transformers-5 one (both inside ``rope_parameters``). ``param_dtype`` defaults
    to ``dtype``. Raises ``ValueError`` for families or features the model lacks, rather
    than loading something that silently computes different logits.
    """
    mt = hf_config.get("model_type")
    if mt not in _ARCHITECTURES:
        raise ValueError(f"config.json: model_type={mt!r} is not supported; "
                         f"expected one of {sorted(_ARCHITECTURES)}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise _unsupported(mt, f"hidden_act={hf_config['hidden_act']!r}")
    if hf_config.get("use_sliding_window") or "sliding_attention" in (hf_config.get("layer_types") or []):
        raise _unsupported(mt, "sliding-window attention")
    if hf_config.get("mlp_bias"):
        raise _unsupported(mt, "mlp_bias=true")
    # Qwen2 always biases q/k/v (never o); llama and qwen3 bias o_proj too when
    # attention_bias is set, which our o_proj cannot hold.
    if mt != "qwen2" and hf_config.get("attention_bias"):
        raise _unsupported(mt, "attention_bias=true (it also biases o_proj)")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        rope_scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type == "default":
        rope_scaling = None
    else:
        raise _unsupported(mt, f"rope_type={rope_type!r} (only 'default' and 'llama3')")
    heads = hf_config["num_attention_heads"]
    # transformers 5 writes explicit nulls for unset optional fields, hence `or`.
    return ModelConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        rope_theta=float(hf_config.get("rope_theta") or rope.get("rope_theta") or 10_000.0),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf_config.get("rms_norm_eps") or 1e-6),
        qkv_bias=mt == "qwen2",
        qk_norm=mt == "qwen3",
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_position_embeddings=hf_config.get("max_position_embeddings") or 32_768,
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else param_dtype,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF ``config.json`` dict for ``cfg``; the inverse of ``config_from_hf``.

    The family follows from the switches (q/k norm: qwen3; qkv bias: qwen2; else llama).
    Rope settings use the transformers-4 layout, which transformers 4 and 5 (and vLLM) read.
    """
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("no HF family has both qk_norm and qkv_bias (without an o_proj bias)")
    model_type = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    rs = cfg.rope_scaling
    hf = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rs is None else {"rope_type": "llama3", **dataclasses.asdict(rs)},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": jnp.dtype(cfg.param_dtype).name,
        "use_cache": True,
    }
    if model_type == "qwen2":
        hf["use_sliding_window"] = False
    else:
        hf["attention_bias"] = False
    return hf


def _names(key_path) -> tuple:
    """A jax key path into an ``nnx.State`` -> plain names, e.g. ``('layers', 0, 'mlp', ...)``
    (drops the trailing ``.value`` attribute of each Variable)."""
    return tuple(k.key if isinstance(k, jax.tree_util.DictKey) else k.idx
                 for k in key_path if not isinstance(k, jax.tree_util.GetAttrKey))


def _hf_name(names: tuple) -> tuple[str, bool]:
    """Our parameter path -> (HF tensor name, whether it is a Linear kernel to transpose)."""
    if names == ("embed_tokens",):
        return "model.embed_tokens.weight", False
    *modules, leaf = (str(n) for n in names)
    transpose = leaf == "kernel"
    name = ".".join([*modules, "weight" if transpose else leaf])
    return (name if modules[0] == "lm_head" else "model." + name), transpose


def resolve(name_or_path: str | os.PathLike, patterns=_CHECKPOINT_FILES) -> str:
    """A local folder as-is; anything else is a hub id, downloaded (only the files matching
    ``patterns``: by default config + weights)."""
    if os.path.isdir(name_or_path):
        return os.fspath(name_or_path)
    from huggingface_hub import snapshot_download  # lazy: only hub ids need it

    return snapshot_download(str(name_or_path), allow_patterns=list(patterns))


def _open_tensors(path: str, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Tensor name -> open ``safe_open`` handle holding it, over all weight files in ``path``.

    With an index only the files it names count (some repos also ship a consolidated copy).
    """
    if os.path.exists(os.path.join(path, _INDEX)):
        with open(os.path.join(path, _INDEX)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    handles: dict[str, Any] = {}
    for file in files:
        handle = stack.enter_context(safe_open(os.path.join(path, file), framework="numpy"))
        for name in handle.keys():
            if name in handles:
                raise ValueError(f"tensor {name} appears in more than one file under {path}")
            handles[name] = handle
    return handles


def from_pretrained(name_or_path: str | os.PathLike, dtype: Any = jnp.bfloat16, param_dtype: Any = None,
                    shardings: Any = None, lora_adapter: str | os.PathLike | None = None,
                    **overrides) -> Transformer:
    """Load an HF qwen2 / qwen3 / llama checkpoint (local folder or hub id) as a ``Transformer``.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype (default ``dtype``);
    weights are cast on load. ``shardings``: optional pytree shaped like
    ``nnx.state(model)`` of the base (no adapters) with a ``jax.sharding.Sharding`` per
    parameter; each tensor is placed straight onto its sharding, else onto the default
    device. ``lora_adapter``: a PEFT adapter folder (or hub id) to add to the base
    (``lora.load_adapter``; adapters in float32, uncommitted to any device).
    ``overrides`` set ``ModelConfig`` fields that the file does not describe (``remat``,
    ``attention_impl``). Raises ``ValueError`` naming any missing, unexpected or wrongly
    shaped tensor.
    """
    path = resolve(name_or_path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = dataclasses.replace(config_from_hf(json.load(f), dtype, param_dtype), **overrides)
    # Build shapes only: the real values come from the files, so nothing is initialised twice.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    with contextlib.ExitStack() as stack:
        handles = _open_tensors(path, stack)
        expected = {_hf_name(_names(kp))[0] for kp, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        missing = sorted(expected - set(handles))
        # A tied head may still be saved as a copy; old llama files carry RoPE buffers.
        unexpected = sorted(n for n in set(handles) - expected if not n.endswith("rotary_emb.inv_freq")
                            and not (n == "lm_head.weight" and cfg.tie_word_embeddings))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match its config.json: missing tensors "
                             f"{missing[:10]}, unexpected tensors {unexpected[:10]}")

        def fill(key_path, like, sharding=None):
            name, transpose = _hf_name(_names(key_path))
            array = handles[name].get_tensor(name)
            if transpose:
                array = array.T
            if array.shape != like.shape:  # report both in the file's (torch) layout
                got, want = (array.T.shape, like.shape[::-1]) if transpose else (array.shape, like.shape)
                raise ValueError(f"tensor {name} in {path} has shape {got}; config.json implies {want}")
            return jax.device_put(array.astype(like.dtype, copy=False), sharding)

        state = jax.tree_util.tree_map_with_path(fill, abstract, *([] if shardings is None else [shardings]))
    model = nnx.merge(graphdef, state)
    if lora_adapter is not None:
        lora_lib.load_adapter(model, resolve(lora_adapter, _ADAPTER_FILES))
    return model


def save_pretrained(model: Transformer, path: str | os.PathLike, hf_config_extra: dict | None = None,
                    lora: str | None = None, base_model_name_or_path: str | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (torch layout) loadable by
    ``transformers.AutoModelForCausalLM.from_pretrained(path)``.

    ``hf_config_extra`` adds or overrides config keys (e.g. ``eos_token_id``). Weights are
    saved in their storage dtype; a tied head is not written (as HF does). Gathers each
    parameter to this host, so it needs fully addressable (single-host) arrays.

    ``lora`` says what to write for a model with LoRA adapters: ``"adapter"`` only the
    adapters, as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``,
    ``base_model_name_or_path`` recorded in it; no ``config.json``, so
    ``hf_config_extra`` must be None); ``"merged"`` or None (the default) the full
    checkpoint with the adapters folded into the weights (``lora.merge_lora``): what
    ``save_pretrained`` always writes is a checkpoint that computes what the model does.
    """
    if lora not in (None, "merged", "adapter"):
        raise ValueError(f"lora must be None, 'merged' or 'adapter', got {lora!r}")
    if lora == "adapter":
        if hf_config_extra:
            raise ValueError("lora='adapter' writes no config.json, so hf_config_extra has nowhere to go")
        lora_lib.save_adapter(model, path, base_model_name_or_path)
        return
    if lora_lib.has_lora(model):
        model = lora_lib.merge_lora(model)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for key_path, value in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        name, transpose = _hf_name(_names(key_path))
        array = np.asarray(jax.device_get(value))
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    # transformers refuses safetensors files whose metadata lacks a known format.
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config_to_hf(model.cfg), **(hf_config_extra or {})}, f, indent=2)


def load_tokenizer(path_or_name: str | os.PathLike):
    """``transformers.AutoTokenizer`` for a folder or hub id; it must have a chat template,
    since prompts here are always built with ``apply_chat_template``."""
    from transformers import AutoTokenizer  # lazy: importing transformers takes seconds

    tokenizer = AutoTokenizer.from_pretrained(path_or_name)
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {path_or_name} has no chat_template; use an instruct/chat "
                         "checkpoint or set tokenizer.chat_template")
    return tokenizer


def token_ids(name_or_path: str | os.PathLike) -> dict:
    """The bos / eos / pad token ids of a checkpoint's config.json (kept on save, so a
    saved policy generates and stops like its source)."""
    with open(os.path.join(resolve(name_or_path), "config.json")) as f:
        hf = json.load(f)
    return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
