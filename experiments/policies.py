"""Where a run's policies live, and loading and saving them: the reference and each
method's trained policy, as Orbax params (embedded task) or Hugging Face folders (a
real model), LoRA adapters included."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from drift_jax import methods
from drift_jax.models import Transformer, from_pretrained, save_pretrained
from drift_jax.models.hf import resolve, token_ids
from drift_jax.models.lora import LoRAConfig, apply_lora, has_lora, load_adapter, merge_lora
from drift_jax.parallel import distributed
from drift_jax.training import checkpoint

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def cast_params(model: Transformer, dtype) -> Transformer:
    """``model`` itself when its weights are stored in ``dtype``; else a copy whose
    weights are (``model`` is left as it is)."""
    if jnp.dtype(model.cfg.param_dtype) == jnp.dtype(dtype):
        return model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), params), rest)


def on_this_host(model: Transformer) -> Transformer:
    """A copy of ``model`` whose weights are whole numpy arrays on every process
    (collective: every process calls it). A policy trained on a mesh across hosts has
    shards on other hosts; an HF folder needs every tensor whole in one process."""
    from jax.experimental import multihost_utils

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, multihost_utils.process_allgather(params, tiled=True), rest)


class Policies:
    """The policies of one ``experiments.workdir.Experiment`` (a base class of it: it
    reads the experiment's ``cfg``, ``checkpoint``, ``parent``, ``previous``, ``path``,
    ``tokenizer`` and ``new_model``).

    Round r > 1 of iterative DRIFT has round r-1's DRIFT policy as its reference."""

    def policy_dir(self, name: str) -> str | None:
        """Where a policy lives: "reference" (None: the HF checkpoint itself), a method,
        or ``drift_round<r>``, round r of iterative DRIFT."""
        if name == "reference":
            if self.parent is not None:
                return self.parent.policy_dir(self.previous)
            return None if self.checkpoint else self.path("reference")
        method = methods.get(name)
        return self.path(f"round{method.round}", "drift") if method.round > 1 else self.path(name)

    def load_policy(self, name: str, for_sampling: bool = False) -> Transformer:
        """The reference (``name="reference"``) or a trained method's final policy.

        ``for_sampling``: the weights stored in the compute dtype (``model.dtype``), cast
        once here: a sampler then reads bf16, not float32 master weights cast at every
        token (twice the bytes per decode step)."""
        if self.parent is not None and name == "reference":  # round r: round r-1's policy
            return self.parent.load_policy(self.previous, for_sampling)
        where = self.policy_dir(name)
        m = self.cfg.model
        param_dtype = DTYPES[m.dtype if for_sampling else m.param_dtype]
        if self.checkpoint is not None:
            if where is not None and not os.path.isdir(os.path.join(where, "hf")):
                # LoRA saved unmerged: the reference plus the adapter, merged once here.
                base = self.load_policy("reference", for_sampling)
                return merge_lora(load_adapter(base, os.path.join(where, "adapter"), param_dtype=param_dtype))
            return from_pretrained(self.checkpoint if where is None else os.path.join(where, "hf"),
                                   dtype=DTYPES[m.dtype], param_dtype=param_dtype,
                                   remat=m.remat, attention_impl=m.attention_impl)
        model = self.new_model()
        nnx.update(model, checkpoint.load_params(os.path.join(where, "params"), nnx.state(model, nnx.Param)))
        return cast_params(model, param_dtype)

    def policy_path(self, name: str) -> str:
        """The saved final policy of ``name``: an HF folder (real model; the PEFT adapter
        folder when LoRA adapters are saved unmerged) or Orbax params."""
        if self.checkpoint is None:
            return self.path(name, "params")
        unmerged = self.cfg.lora.rank > 0 and not self.cfg.lora.merged and name != "reference"
        return self.path(name, "adapter" if unmerged else "hf")

    def save_policy(self, name: str, model: Transformer) -> None:
        """A trained policy: Orbax params (embedded task) or, for a real model, an HF
        folder vLLM can serve and ``load_policy`` reads back. A policy with LoRA adapters
        is also written as a PEFT adapter folder ``<method>/adapter`` (real models), and
        its merged weights go to ``<method>/hf`` unless ``lora.merged`` is False."""
        where = self.path(name)
        if self.checkpoint is None:
            checkpoint.save_params(os.path.join(where, "params"), nnx.state(merge_lora(model), nnx.Param),
                                   force=True)
            return
        if distributed.process_count() > 1:  # HF files hold whole tensors: gather them, then one writer
            model = on_this_host(model)
            if not distributed.is_main():
                return
        if has_lora(model):
            save_pretrained(model, os.path.join(where, "adapter"), lora="adapter",
                            base_model_name_or_path=self.reference_source)
            if not self.cfg.lora.merged:
                return
            model = merge_lora(model)
        dtype = self.save_dtype
        out = os.path.join(where, "hf")
        save_pretrained(cast_params(model, dtype), out,
                        hf_config_extra={**token_ids(self.checkpoint), "torch_dtype": dtype.name})
        self.tokenizer.save_pretrained(out)
        source = os.path.join(resolve(self.checkpoint, patterns=["generation_config.json"]),
                              "generation_config.json")
        if os.path.exists(source):  # sampling defaults and stop ids, as vLLM and transformers read them
            shutil.copyfile(source, os.path.join(out, "generation_config.json"))

    @property
    def reference_source(self) -> str:
        """Where this run's reference policy is read from: the checkpoint, or (iterative
        DRIFT) the previous round's merged HF folder."""
        where = self.policy_dir("reference")
        return self.checkpoint if where is None else os.path.join(where, "hf")

    def adapt(self, model: Transformer) -> Transformer:
        """``model`` with fresh LoRA adapters when ``lora.rank`` > 0 (only they are then
        trained), else ``model``. Every call makes the same adapters (seeded by ``seed``)."""
        lc = self.cfg.lora
        if lc.rank <= 0:
            return model
        config = LoRAConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets)
        return apply_lora(model, config, nnx.Rngs(self.cfg.seed))

    @functools.cached_property
    def save_dtype(self) -> jnp.dtype:
        """The dtype of saved HF folders: ``model.save_dtype``, else the checkpoint's own
        (so a bf16 model is not written back at twice its size in float32)."""
        if self.cfg.model.save_dtype:
            return jnp.dtype(self.cfg.model.save_dtype)
        with open(os.path.join(resolve(self.checkpoint), "config.json")) as f:
            hf = json.load(f)
        return jnp.dtype(hf.get("torch_dtype") or hf.get("dtype") or "float32")

    def checkpointer(self, name: str, save_every: int) -> checkpoint.Checkpointer:
        """The train-state checkpoints of ``name``'s training: the newest one is kept."""
        return checkpoint.Checkpointer(self.path(name, "checkpoints"), save_every=save_every, keep=1)
