"""One run's workdir: its config, task, data, policies and paths (shared by every stage)."""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from drift_jax.training import checkpoint

from drift_jax.parallel import distributed, sharding

from drift_jax import methods
from experiments import ledger
from drift_jax.data import records as records_io
from drift_jax.data.chat import context_check, encode_dialogue, end_of_turn_id
from drift_jax.rollout.engine import EngineOptions
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer
from drift_jax.models import ModelConfig, Transformer, from_pretrained, load_tokenizer, save_pretrained
from drift_jax.models.hf import resolve, token_ids
from drift_jax.models.lora import LoRAConfig, apply_lora, has_lora, load_adapter, merge_lora
from drift_jax.rollout.sampling import SamplingParams


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make_env(name: str, task, stage: str = "rollout", benchmark: str | None = None):
    """The environment named ``name`` with the turn/answer budgets of ``task`` under
    ``task.protocol`` at ``stage`` ("rollout" or "eval"; ``benchmark`` picks the release's
    per-benchmark grader, see ``drift_jax.envs.protocol``)."""
    budget = dict(max_turns=task.max_turns, max_answers=task.max_answers, format_penalty=task.format_penalty)
    if name == "secret":
        return SecretGuessEnv(**budget, num_candidates=task.num_candidates,
                              num_values=task.num_values, id_length=task.id_length)
    if name in ("math", "choice"):
        from drift_jax.envs.protocol import make_env as protocol_env
        return protocol_env(name, task.protocol, stage, benchmark=benchmark, **budget)
    raise ValueError(f"unknown task.name {name!r}; expected 'secret', 'math' or 'choice'")


def load_questions(source: str, **kwargs) -> list:
    from drift_jax.data.questions import load_questions as load  # lazy: pulls pyarrow / tfds
    return load(source, **kwargs)


def write_json(path: str, obj) -> None:
    """Write ``obj`` atomically; in a multi-process job on process 0 only (the others
    computed the same value: every process runs every stage), so no two processes ever
    write one file."""
    if not distributed.is_main():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)  # atomic: a stage's output exists only once complete


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_metrics(path: str) -> list[dict]:
    """The metrics lines of a training: one per update, over every resume."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def warn_if_unchanged(name: str, history: list[dict]) -> bool:
    """True, and a loud warning, when every update ran at learning rate 0: AdamW's
    update (decay included) is scaled by the learning rate, so the policy is then
    exactly its initial weights."""
    if any(r["lr"] > 0 for r in history):
        return False
    message = (f"policy {name!r} equals its initial weights: all {len(history)} updates ran at "
               "learning rate 0 (the warm-up covers every step). Train on more data or more "
               "epochs, or lower the warm-up ratio.")
    logging.warning(message)
    print(f"\n*** WARNING: {message}\n", file=sys.stderr)
    return True


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


class Experiment:
    """The config, the task, the policy's source and the workdir paths shared by all stages.

    Two kinds of run share the stages:
    - the embedded task (``cfg.model.checkpoint`` empty): a random-init policy of
      ``cfg.model``'s sizes is first trained into a reference from synthetic transcripts;
      policies are saved as Orbax params under ``<workdir>/<method>/params``;
    - a real model (``cfg.model.checkpoint`` a Hugging Face folder or hub id): that
      checkpoint is the reference, and trained policies are saved in HF format under
      ``<workdir>/<method>/hf`` (servable by vLLM, loadable by transformers).
    ``cfg.rollouts`` (comma-separated JSONL files, e.g. from the authors' vLLM scripts)
    replaces the rollout stage.
    """

    def __init__(self, cfg, workdir: str, parent: "Experiment | None" = None, round_number: int = 1):
        # Nothing is read or written here: ``experiments/preflight.py`` checks the config,
        # paths and model first, and a start that fails it leaves no workdir behind.
        self.cfg = cfg
        self.workdir = workdir
        # Iterative DRIFT: round r > 1 runs in <workdir>/round<r> of its parent, with
        # round r-1's DRIFT policy as its reference.
        self.parent, self.round_number = parent, round_number
        self.previous = methods.get(f"drift_round{round_number}").previous if parent else None
        self.checkpoint = cfg.model.checkpoint or None
        # Round r > 1 rolls out its own reference; only round 1 may train on given files.
        self.given_rollouts = [] if parent else [p for p in cfg.rollouts.split(",") if p]
        self.skipped_records = collections.Counter()
        self.ledger = ledger.Ledger(workdir, ran=parent.ledger.ran if parent else None,
                                    label=f"{os.path.basename(workdir)}/" if parent else "")

    @functools.cached_property
    def _flat_cfg(self) -> dict:
        """The config as flat keys (tuples as lists), read at the first ``settings`` call:
        after preflight has filled in the protocol's settings, so the ledger records the
        values the stages use."""
        return ledger.flatten(json.loads(json.dumps(self.cfg.to_dict())))

    @functools.cached_property
    def tokenizer(self):
        if self.checkpoint is None:
            return build_tokenizer(self.cfg.task.num_values)
        return load_tokenizer(self.checkpoint)

    @functools.cached_property
    def model_cfg(self) -> ModelConfig:
        """The embedded task's model (a real model's comes from its config.json)."""
        m = self.cfg.model
        return ModelConfig(
            vocab_size=len(self.tokenizer), hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size, num_layers=m.num_layers,
            num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
            tie_word_embeddings=True, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype],
            remat=m.remat, attention_impl=m.attention_impl,
        )

    @functools.cached_property
    def stop_ids(self) -> tuple:
        # A chat model ends its turn with the template's end-of-turn token, not always EOS.
        return tuple(sorted({self.tokenizer.eos_token_id, end_of_turn_id(self.tokenizer)} - {None}))

    # -- which stage outputs are current (experiments/ledger.py) ---------------------------

    def settings(self, stage: str) -> dict:
        """The settings ``stage``'s output depends on: its own config keys and its
        upstream stages' settings. Stages: "reference", "rollout", "weights",
        "train:<method>", "eval:<method>:<benchmark>"."""
        kind, *rest = stage.split(":")
        own = ledger.select(self._flat_cfg, ledger.OWN_KEYS.get(kind, ()))
        if kind == "reference":
            if self.parent is not None:  # round r: round r-1's DRIFT policy
                return {**self.parent.settings(f"train:{self.previous}"), "round": self.round_number}
            return ledger.select(self._flat_cfg, ("model",)) if self.checkpoint else own
        if kind == "rollout":
            return {**self.settings("reference"), **own}
        if kind == "weights":
            return {**self.settings("rollout"), **own, "min_group_size": self.min_group_size}
        if kind == "train":
            method = methods.get(rest[0])
            if method.round > 1:
                return self.round(method.round).settings("train:drift")
            if method.trainer == "online_rl":
                own = ledger.select(self._flat_cfg, ledger.OWN_KEYS["online_rl"])
                return {**self.settings("rollout"), **own, "method": method.name}
            upstream = self.settings("weights") if method.weighted else {
                **self.settings("rollout"), "min_group_size": self.min_group_size}
            return {**upstream, **own, "method": method.name}
        if kind == "eval":
            name, bench = rest
            upstream = self.settings("reference" if name == "reference" else f"train:{name}")
            bench_keys = ledger.select(self._flat_cfg, (f"eval.benchmarks.{bench}", "rollout.num_prompts"))
            return {**upstream, **own, **bench_keys, "benchmark": bench}
        raise ValueError(f"unknown stage {stage!r}")

    def outputs(self, stage: str) -> list[str]:
        """The files and folders ``stage`` writes (a multi-process job's part files too:
        stale parts must move aside with the rest, not be resumed under new settings)."""
        kind, *rest = stage.split(":")
        if kind == "eval":
            name, bench = rest
            records = self.path("eval", f"{bench}_{name}.jsonl")
            return [self.path("eval", f"{bench}_{name}.json"), records, f"{records}.parts"]
        if kind == "train":
            return [self.policy_dir(rest[0])]
        return {"reference": [self.path("reference")],
                "rollout": [self.path("rollouts.jsonl"), self.path("rollout_stats.json"),
                            self.path("rollouts.jsonl.parts")],
                "weights": [self.path("weights.json")]}[kind]

    def begin(self, stage: str) -> bool:
        """True when ``stage``'s output is current (skip it); else its stale output
        moves aside and the stage is recorded as started (``ledger.Ledger.begin``)."""
        return self.ledger.begin(stage, self.settings(stage), self.outputs(stage))

    def finish(self, stage: str) -> None:
        self.ledger.finish(stage)

    @property
    def offline(self) -> bool:
        """Whether a method of the run trains on the rollouts (every trainer but online RL)."""
        return any(m.trainer == "sft" for m in methods.parse(self.cfg.methods))

    @property
    def min_group_size(self) -> int:
        """A weighted method needs >= 2 trajectories per prompt (one alone has weight 1)."""
        return 2 if any(m.weighted for m in methods.parse(self.cfg.methods)) else 1

    @functools.cached_property
    def env(self):
        return make_env(self.cfg.task.name, self.cfg.task)

    @functools.cached_property
    def train_questions(self) -> list:
        cfg = self.cfg
        if cfg.task.name == "secret":
            return self.env.make_questions(cfg.rollout.num_prompts, seed=cfg.seed * 1000 + 2, prefix="train-")
        n = cfg.rollout.num_prompts
        if cfg.data.selection == "release":  # every row, repeats kept, then the seed-42 shuffle
            from drift_jax.data.questions import select_prompts
            loaded = load_questions(cfg.data.train, split=cfg.data.train_split, layout=cfg.data.layout,
                                    on_bad_record=cfg.data.on_bad_record, duplicates="keep",
                                    protocol=cfg.task.protocol)
            return select_prompts(loaded, n, "release")
        return load_questions(cfg.data.train, split=cfg.data.train_split, layout=cfg.data.layout,
                              limit=n, on_bad_record=cfg.data.on_bad_record, protocol=cfg.task.protocol)

    @functools.cached_property
    def benchmarks(self) -> dict:
        """{name: (environment, questions)} to evaluate on; the embedded task holds out
        prompts never used for rollouts."""
        cfg = self.cfg
        if cfg.task.name == "secret":
            questions = self.env.make_questions(
                cfg.eval.num_prompts, seed=cfg.seed * 1000 + 3, prefix="eval-",
                exclude={q.text for q in self.train_questions})
            return {"secret": (self.env, questions)}
        out = {}
        for name, b in cfg.eval.benchmarks.items():
            try:
                questions = load_questions(b.source, split=b.split, layout=b.layout, limit=cfg.eval.num_prompts,
                                           on_bad_record=cfg.data.on_bad_record, protocol=cfg.task.protocol)
            except (ValueError, ImportError) as e:  # DatasetError is a ValueError
                raise type(e)(f"benchmark {name!r}: {e} (set --config.eval.benchmarks.{name}.layout, "
                              "or its .source / .split)") from e
            out[name] = (make_env(b.task, cfg.task, "eval", benchmark=name), questions)
        return out

    @functools.cache
    def examples(self, supervise: str = "last") -> list:
        """The rollouts tokenised once (the last assistant turn, or every one, supervised);
        the methods trained on them differ only in the weights."""
        records = self.rollout_records()
        max_len = self.cfg.train.max_len
        examples = [encode_dialogue(self.tokenizer, r["messages"], supervise=supervise, max_len=max_len)
                    for r in records]
        truncated = sum(e.truncated for e in examples)
        if truncated:
            logging.warning("left-truncated %d of %d dialogues to train.max_len=%d",
                            truncated, len(examples), max_len)
        return examples

    @functools.cache
    def rollout_records(self) -> list:
        """Every usable record of the rollout files, with the group checks of
        ``records.read_rollouts``; skipped ones are counted in ``skipped_records``."""
        max_len = self.cfg.train.max_len
        records, skipped = records_io.read_rollouts(
            self.rollout_files(), on_bad_record=self.cfg.data.on_bad_record,
            min_group_size=self.min_group_size,
            check=context_check(self.tokenizer, max_len) if max_len else None)
        self.skipped_records.update(skipped)
        return records

    def rollout_files(self) -> list:
        return self.given_rollouts or [self.path("rollouts.jsonl")]

    @functools.cached_property
    def mesh(self):
        """The (data, fsdp, tensor) training mesh of ``cfg.mesh``; None for one device."""
        m = self.cfg.mesh
        size = m.data * m.fsdp * m.tensor
        if distributed.process_count() > 1 and size != jax.device_count():
            # A mesh of some processes' devices only would leave the others training alone,
            # and their checkpoints colliding in one folder.
            raise ValueError(
                f"mesh {m.data}x{m.fsdp}x{m.tensor} covers {size} devices, but this job of "
                f"{distributed.process_count()} processes has {jax.device_count()}: multi-process "
                f"training needs a mesh over every device (e.g. --config.mesh.data={jax.device_count()})")
        if size == 1:
            return None
        return sharding.make_mesh(m.data, m.fsdp, m.tensor)

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def engine(self) -> EngineOptions:
        """The sampler every stage plays episodes with (``rollout.engine`` and its knobs;
        the slots are each stage's batch size)."""
        rc = self.cfg.rollout
        return EngineOptions(kind=rc.engine, page_size=rc.page_size, num_pages=rc.num_pages,
                             steps_per_visit=rc.steps_per_visit, refill_after=rc.refill_after,
                             row_buckets=rc.row_buckets)

    def sampling(self, temperature: float, top_p: float = 1.0, max_new_tokens: int | None = None) -> SamplingParams:
        """Sampling with the run's stop ids; ``max_new_tokens`` per turn defaults to
        ``rollout.max_new_tokens``."""
        return SamplingParams(temperature=temperature, top_p=top_p, stop_ids=self.stop_ids,
                              max_new_tokens=max_new_tokens or self.cfg.rollout.max_new_tokens)

    def new_model(self) -> Transformer:
        return Transformer(self.model_cfg, rngs=nnx.Rngs(self.cfg.seed))

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
        param_dtype = _DTYPES[m.dtype if for_sampling else m.param_dtype]
        if self.checkpoint is not None:
            if where is not None and not os.path.isdir(os.path.join(where, "hf")):
                # LoRA saved unmerged: the reference plus the adapter, merged once here.
                base = self.load_policy("reference", for_sampling)
                return merge_lora(load_adapter(base, os.path.join(where, "adapter"), param_dtype=param_dtype))
            return from_pretrained(self.checkpoint if where is None else os.path.join(where, "hf"),
                                   dtype=_DTYPES[m.dtype], param_dtype=param_dtype,
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

    @functools.cache
    def round(self, r: int) -> "Experiment":
        """Round r >= 2 of iterative DRIFT, in ``<workdir>/round<r>``: the same stages with
        round r-1's DRIFT policy as the reference."""
        return Experiment(self.cfg, self.path(f"round{r}"), parent=self, round_number=r)

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
