"""LoRA adapters on the Transformer's projections, in PEFT's layout.

A LoRA adapter adds a trainable low-rank update to a frozen ``Linear``:

    y = x @ W (+ b) + scale * dropout(x) @ A @ B        A: [in, r], B: [r, out]

with ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), A drawn as PEFT draws it
(Kaiming-uniform, bound ``1 / sqrt(in)``) and B zero, so a fresh adapter changes no
logit. The adapter is ``nnx.LoRA`` (Flax's module: its A and B are ``nnx.LoRAParam``, a
subclass of ``nnx.Param``), so ``nnx.state(model, nnx.LoRAParam)`` is exactly the trained
parameters and every ``nnx.Param`` tool (shardings, checkpoints) still sees them. A and B
carry the logical axes of their base kernel (A the input's, B the output's; the rank axis
is never split), so they shard on a mesh like the weight they adapt.

Dropout acts on the adapter's input only, as PEFT's ``lora_dropout``, and only when the
forward is given a ``dropout_rng`` (the train step passes one; evaluation and sampling do
not, so they are deterministic).

Files follow PEFT (``save_pretrained`` of a ``PeftModel`` on a Qwen2 / Qwen3 / Llama
causal LM): ``adapter_config.json`` and ``adapter_model.safetensors`` with tensors
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]`` (torch's layout: A and B transposed from ours), which
PEFT and vLLM load as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from drift_jax.models.transformer import Linear, Transformer

# Projection name (HF's) -> the submodule of a decoder layer that holds it.
TARGETS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model.model.layers"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank, ``alpha`` (scale ``alpha / rank``, or ``alpha / sqrt(rank)`` with
    ``use_rslora``), input ``dropout`` (training only), the projections adapted in every
    layer (HF names, a sequence or a comma-separated string) and the adapters' storage
    dtype (float32 by default, whatever the base's: they are the trained weights)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        targets = tuple(t.strip() for t in targets if t.strip())
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets:
            raise ValueError(f"LoRA targets {unknown or targets!r}: expected a non-empty subset of {list(TARGETS)}")
        # Canonical order, so equal sets of targets give equal (hashable) configs.
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _peft_uniform_a(key, shape, dtype=jnp.float32):
    """PEFT's A init: ``kaiming_uniform_(a=sqrt(5))`` on torch's ``[r, in]`` weight, i.e.
    U(-1/sqrt(in), 1/sqrt(in)); ours is ``[in, r]``, so the fan-in is ``shape[0]``."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _axes(*names) -> dict:
    # Logical axes as on the base kernels (see transformer._param): lazily applied.
    return {"out_sharding": names, "eager_sharding": False}


class Adapter(nnx.LoRA):
    """``scale * dropout(x) @ lora_a @ lora_b`` in the compute dtype: ``nnx.LoRA`` (no
    base module) plus PEFT's scaling and input dropout. ``lora_a`` ``[in, r]``,
    ``lora_b`` ``[r, out]``; ``index`` tells the adapters of one model apart, so each
    draws its own dropout mask from the forward's one key."""

    def __init__(self, kernel: nnx.Param, config: LoRAConfig, index: int, dtype, rngs: nnx.Rngs):
        d_in, d_out = kernel.shape
        in_axis, out_axis = kernel.get_metadata()["out_sharding"]
        super().__init__(
            d_in, config.rank, d_out, dtype=dtype, param_dtype=config.param_dtype,
            a_initializer=_peft_uniform_a, b_initializer=nnx.initializers.zeros, rngs=rngs,
            a_metadata=_axes(in_axis, None), b_metadata=_axes(None, out_axis),
        )
        self.config = config
        self.index = index

    def __call__(self, x, dropout_rng=None):
        rate = self.config.dropout
        if dropout_rng is not None and rate > 0.0:
            # torch.nn.Dropout: zero with probability `rate`, scale the kept by 1/(1-rate).
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, self.index), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
        return super().__call__(x) * jnp.asarray(self.config.scale, x.dtype)


def _projections(model: Transformer, targets=TARGETS) -> Iterator[tuple[int, str, Linear]]:
    """(layer index, projection name, its Linear) for ``targets`` in every layer."""
    for i, layer in enumerate(model.layers):
        for name in targets:
            yield i, name, getattr(getattr(layer, TARGETS[name]), name)


def _adapted(model: Transformer) -> Iterator[tuple[int, str, Linear]]:
    return ((i, name, lin) for i, name, lin in _projections(model) if lin.lora is not None)


def has_lora(model: Transformer) -> bool:
    """Whether any projection of ``model`` carries an adapter."""
    return any(True for _ in _adapted(model))


def lora_config(model: Transformer) -> LoRAConfig | None:
    """The ``LoRAConfig`` the model's adapters were made with, or None without adapters."""
    return next((lin.lora.config for _, _, lin in _adapted(model)), None)


def apply_lora(model: Transformer, config: LoRAConfig, rngs: nnx.Rngs) -> Transformer:
    """Add a fresh adapter (B = 0: logits unchanged) to each of ``config.targets`` in every
    layer of ``model``, in place; returns ``model``, for chaining. Raises ValueError if
    the model already has adapters (merge them first: ``merge_lora``)."""
    if has_lora(model):
        raise ValueError("model already has LoRA adapters; merge_lora(model) first to stack another")
    for i, name, linear in _projections(model, config.targets):
        index = i * len(TARGETS) + list(TARGETS).index(name)
        linear.lora = Adapter(linear.kernel, config, index, model.cfg.dtype, rngs)
    return model


def merge_lora(model: Transformer) -> Transformer:
    """A copy of ``model`` without adapters, each folded into its kernel:
    ``W + scale * A @ B`` computed in float32 and stored in the kernel's dtype. ``model``
    is left as it was; a model without adapters comes back as a plain copy."""
    merged = nnx.clone(model)
    for _, _, linear in _adapted(merged):
        adapter, kernel = linear.lora, linear.kernel[...]
        # HIGHEST: GPUs and TPUs would otherwise round this float32 matmul to bf16/tf32.
        delta = jnp.matmul(adapter.lora_a[...].astype(jnp.float32), adapter.lora_b[...].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        linear.kernel[...] = (kernel.astype(jnp.float32) + adapter.config.scale * delta).astype(kernel.dtype)
        linear.lora = None
    return merged


# -- PEFT files ----------------------------------------------------------------------

def _peft_name(layer: int, name: str, which: str) -> str:
    return f"{_PEFT_PREFIX}.{layer}.{TARGETS[name]}.{name}.lora_{which}.weight"


def peft_config(config: LoRAConfig, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` dict of adapters made with ``config``: the keys PEFT
    and vLLM read (PEFT fills the rest of its ``LoraConfig`` with defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,  # as peft
        "lora_dropout": config.dropout,
        "target_modules": list(config.targets),
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: Transformer, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write ``model``'s adapters as a PEFT adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``, adapters in their storage dtype), loadable by
    ``peft.PeftModel.from_pretrained(base, path)``, vLLM and ``load_adapter``.
    ``base_model_name_or_path`` is recorded for tools that load the base from it.
    Gathers each adapter to this host (single-host arrays)."""
    config = lora_config(model)
    if config is None:
        raise ValueError("model has no LoRA adapters to save; apply_lora or load_adapter first")
    tensors = {}
    for i, name, linear in _adapted(model):
        # Ours are [in, r] and [r, out]; torch's Linear weights are [out, in].
        tensors[_peft_name(i, name, "A")] = np.ascontiguousarray(np.asarray(jax.device_get(linear.lora.lora_a[...])).T)
        tensors[_peft_name(i, name, "B")] = np.ascontiguousarray(np.asarray(jax.device_get(linear.lora.lora_b[...])).T)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_config(config, base_model_name_or_path), f, indent=2)


def _config_from_peft(peft: dict, targets: set[str], where: str, param_dtype) -> LoRAConfig:
    """Check a PEFT ``adapter_config.json`` asks for nothing ``Adapter`` lacks; its config."""
    def refuse(what):
        return ValueError(f"{where}: {what} is not supported by drift_jax's LoRA adapters")

    if peft.get("peft_type") != "LORA":
        raise refuse(f"peft_type={peft.get('peft_type')!r}")
    if peft.get("bias", "none") != "none" or peft.get("lora_bias"):
        raise refuse(f"bias={peft.get('bias')!r}")
    for key in ("use_dora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
                "layer_replication", "trainable_token_indices", "target_parameters"):
        if peft.get(key):
            raise refuse(f"{key}={peft[key]!r}")
    listed = peft.get("target_modules")
    if isinstance(listed, (list, tuple)) and set(listed) - set(TARGETS):
        raise refuse(f"target_modules {sorted(set(listed) - set(TARGETS))}")
    return LoRAConfig(rank=int(peft["r"]), alpha=float(peft["lora_alpha"]),
                      dropout=float(peft.get("lora_dropout", 0.0)), targets=tuple(sorted(targets)),
                      use_rslora=bool(peft.get("use_rslora", False)), param_dtype=param_dtype)


def load_adapter(model: Transformer, path: str | os.PathLike, param_dtype: Any = jnp.float32) -> Transformer:
    """Add the PEFT adapter in folder ``path`` to ``model`` (which must have none), in
    place; returns ``model``. The adapted projections are those with tensors in the file
    (PEFT may list ``target_modules`` as a regex); adapters are cast to ``param_dtype``.
    Raises ValueError for PEFT features the adapters lack (DoRA, biases, per-module ranks,
    modules_to_save, a subset of layers) and for missing, unexpected or misshapen tensors."""
    path = os.fspath(path)
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        peft = json.load(f)
    with safe_open(os.path.join(path, ADAPTER_WEIGHTS), framework="numpy") as handle:
        names = set(handle.keys())
        # ...layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight -> {proj}
        targets = {n.split(".")[-3] for n in names}
        config = _config_from_peft(peft, targets, path, param_dtype)
        expected = {_peft_name(i, t, w) for i, t, _ in _projections(model, config.targets) for w in "AB"}
        if names != expected:
            raise ValueError(f"adapter {path} does not fit the model: missing tensors "
                             f"{sorted(expected - names)[:10]}, unexpected tensors {sorted(names - expected)[:10]}")
        arrays = {}
        for i, name, linear in _projections(model, config.targets):
            d_in, d_out = linear.kernel.shape
            for which, want in (("A", (config.rank, d_in)), ("B", (d_out, config.rank))):
                key = _peft_name(i, name, which)
                array = handle.get_tensor(key)
                if array.shape != want:
                    raise ValueError(f"tensor {key} in {path} has shape {array.shape}; the model needs {want}")
                arrays[key] = array.T  # torch's [out, in] -> ours [in, out]
    # Only now that every tensor fits: a refused file leaves the model as it was.
    apply_lora(model, config, nnx.Rngs(0))  # A's random init is overwritten just below
    for i, name, linear in _adapted(model):
        linear.lora.lora_a[...] = jnp.asarray(arrays[_peft_name(i, name, "A")], config.param_dtype)
        linear.lora.lora_b[...] = jnp.asarray(arrays[_peft_name(i, name, "B")], config.param_dtype)
    return model
