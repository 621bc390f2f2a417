"""One run's workdir: its config, task, data, policies and paths (shared by every stage)."""

from __future__ import annotations

import collections
import functools
import json
import logging
import os

import jax.numpy as jnp
from flax import nnx

from drift_jax import checkpoint, methods, sharding
from drift_jax import records as records_io
from drift_jax.chat import encode_dialogue, end_of_turn_id
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer
from drift_jax.models import ModelConfig, Transformer, from_pretrained, load_tokenizer, save_pretrained
from drift_jax.models.hf import token_ids
from drift_jax.sampling import SamplingParams


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make_env(name: str, task):
    """The environment named by ``task.name`` with the turn/answer budgets of ``task``."""
    budget = dict(max_turns=task.max_turns, max_answers=task.max_answers, format_penalty=task.format_penalty)
    if name == "secret":
        return SecretGuessEnv(**budget, num_candidates=task.num_candidates, num_values=task.num_values)
    if name == "math":
        from drift_jax.envs.math import MathEnv
        return MathEnv(**budget)
    if name == "choice":
        from drift_jax.envs.choice import MultipleChoiceEnv
        return MultipleChoiceEnv(**budget)
    raise ValueError(f"unknown task.name {name!r}; expected 'secret', 'math' or 'choice'")


def load_questions(source: str, **kwargs) -> list:
    from drift_jax.questions import load_questions as load  # lazy: pulls pyarrow / tfds
    return load(source, **kwargs)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)  # atomic: a stage's output exists only once complete


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


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

    def __init__(self, cfg, workdir: str, reference: str | None = None):
        self.cfg = cfg
        self.workdir = workdir
        self.reference = reference  # iterative DRIFT: the previous round's policy directory
        os.makedirs(workdir, exist_ok=True)
        t, m = cfg.task, cfg.model
        self.checkpoint = m.checkpoint or None
        self.given_rollouts = [p for p in cfg.rollouts.split(",") if p]
        self.skipped_records = collections.Counter()
        if self.checkpoint is None and t.name != "secret":
            raise ValueError(f"task {t.name!r} needs a model: set --config.model.checkpoint to a "
                             "Hugging Face folder or hub id")
        if not self.given_rollouts and t.name != "secret" and not cfg.data.train:
            raise ValueError("nothing to train on: set --config.rollouts to one or more comma-separated "
                             "JSONL files, or --config.data.train to a question set to roll out")
        for path in self.given_rollouts:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--config.rollouts: no such file {path}")
        if self.checkpoint is None:
            self.tokenizer = build_tokenizer(t.num_values)
            self.model_cfg = ModelConfig(
                vocab_size=len(self.tokenizer), hidden_size=m.hidden_size,
                intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                tie_word_embeddings=True, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype],
                remat=m.remat, attention_impl=m.attention_impl,
            )
        else:
            self.tokenizer = load_tokenizer(self.checkpoint)
        # A chat model ends its turn with the template's end-of-turn token, not always EOS.
        self.stop_ids = tuple(sorted({self.tokenizer.eos_token_id, end_of_turn_id(self.tokenizer)}
                                     - {None}))

    @functools.cached_property
    def env(self):
        return make_env(self.cfg.task.name, self.cfg.task)

    @functools.cached_property
    def train_questions(self) -> list:
        cfg = self.cfg
        if cfg.task.name == "secret":
            return self.env.make_questions(cfg.rollout.num_prompts, seed=cfg.seed * 1000 + 2, prefix="train-")
        return load_questions(cfg.data.train, split=cfg.data.train_split, layout=cfg.data.layout,
                              limit=cfg.rollout.num_prompts, on_bad_record=cfg.data.on_bad_record)

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
            env = make_env(b.task, cfg.task)
            out[name] = (env, load_questions(b.source, split=b.split, layout=b.layout,
                                             limit=cfg.eval.num_prompts, on_bad_record=cfg.data.on_bad_record))
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
        weighted = any(m.weighted for m in methods.parse(self.cfg.methods))
        records, skipped = records_io.read_rollouts(
            self.rollout_files(), on_bad_record=self.cfg.data.on_bad_record,
            min_group_size=2 if weighted else 1,
            check=records_io.context_check(self.tokenizer, max_len) if max_len else None)
        self.skipped_records.update(skipped)
        return records

    def rollout_files(self) -> list:
        return self.given_rollouts or [self.path("rollouts.jsonl")]

    @functools.cached_property
    def mesh(self):
        """The (data, fsdp, tensor) training mesh of ``cfg.mesh``; None for one device."""
        m = self.cfg.mesh
        if m.data * m.fsdp * m.tensor == 1:
            return None
        return sharding.make_mesh(m.data, m.fsdp, m.tensor)

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def sampling(self, temperature: float, top_p: float = 1.0) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_p=top_p,
                              max_new_tokens=self.cfg.rollout.max_new_tokens, stop_ids=self.stop_ids)

    def new_model(self) -> Transformer:
        return Transformer(self.model_cfg, rngs=nnx.Rngs(self.cfg.seed))

    def policy_dir(self, name: str) -> str | None:
        """Where a policy lives: "reference" (None: the HF checkpoint itself), a method,
        or ``drift_round<r>``, round r of iterative DRIFT."""
        if name == "reference":
            return self.reference or (None if self.checkpoint else self.path("reference"))
        method = methods.get(name)
        return self.path(f"round{method.round}", "drift") if method.round > 1 else self.path(name)

    def load_policy(self, name: str) -> Transformer:
        """The reference (``name="reference"``) or a trained method's final policy."""
        where = self.policy_dir(name)
        m = self.cfg.model
        if self.checkpoint is not None:
            return from_pretrained(self.checkpoint if where is None else os.path.join(where, "hf"),
                                   dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype],
                                   remat=m.remat, attention_impl=m.attention_impl)
        model = self.new_model()
        nnx.update(model, checkpoint.load_params(os.path.join(where, "params"), nnx.state(model, nnx.Param)))
        return model

    def policy_path(self, name: str) -> str:
        """The saved final policy of ``name``: an HF folder (real model) or Orbax params."""
        return self.path(name, "hf" if self.checkpoint else "params")

    def round(self, r: int) -> "Experiment":
        """Round r >= 2 of iterative DRIFT, in ``<workdir>/round<r>``: the same stages with
        round r-1's DRIFT policy as the reference."""
        return Experiment(self.cfg, self.path(f"round{r}"),
                          reference=self.policy_dir(methods.get(f"drift_round{r}").previous))

    def save_policy(self, name: str, model: Transformer) -> None:
        """A trained policy: Orbax params (embedded task) or, for a real model, an HF
        folder vLLM can serve and ``load_policy`` reads back."""
        if self.checkpoint is None:
            checkpoint.save_params(self.policy_path(name), nnx.state(model, nnx.Param), force=True)
            return
        save_pretrained(model, self.policy_path(name), hf_config_extra=token_ids(self.checkpoint))
        self.tokenizer.save_pretrained(self.policy_path(name))

    def checkpointer(self, name: str, save_every: int) -> checkpoint.Checkpointer:
        """The train-state checkpoints of ``name``'s training: the newest one is kept."""
        return checkpoint.Checkpointer(self.path(name, "checkpoints"), save_every=save_every, keep=1)
