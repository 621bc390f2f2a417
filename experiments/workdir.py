"""One run's workdir: its config, task, data and paths, shared by every stage (the policies
in ``experiments/policies.py``, the stages in ``experiments/plan.py``)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import jax
from flax import nnx

from drift_jax import methods
from drift_jax.data import records as records_io
from drift_jax.data.chat import context_check, encode_dialogue, end_of_turn_id
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer
from drift_jax.models import ModelConfig, Transformer, load_tokenizer
from drift_jax.parallel import distributed, sharding
from drift_jax.rollout.interface import EngineOptions
from drift_jax.rollout.sampling import SamplingParams
from experiments import ledger
from experiments.plan import Stage, settings, stage_plan
from experiments.policies import DTYPES, Policies
from experiments.preflight import resolve


def make_env(name: str, task, stage: str = "rollout", benchmark: str | None = None):
    """The environment named ``name`` with the turn/answer budgets of ``task`` under
    ``task.protocol`` at ``stage`` ("rollout" or "eval"; ``benchmark`` picks the release's
    per-benchmark grader, see ``drift_jax.envs.protocol``)."""
    budget = dict(max_turns=task.max_turns, max_answers=task.max_answers, format_penalty=task.format_penalty)
    if name == "secret":
        return SecretGuessEnv(**budget, num_candidates=task.num_candidates,
                              num_values=task.num_values, id_length=task.id_length)
    if name in ("math", "choice", "tool"):
        from drift_jax.envs.protocol import make_env as protocol_env
        return protocol_env(name, task.protocol, stage, benchmark=benchmark, **budget)
    raise ValueError(f"unknown task.name {name!r}; expected 'secret', 'math', 'choice' or 'tool' (a benchmark's)")


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


class Experiment(Policies):
    """The config, the task, the data, the policies (``experiments.policies``) and the
    workdir paths shared by all stages, and the run's stages (``experiments.plan``).

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
        # Every stage and the ledger read one frozen config, the protocol's settings filled in.
        self.cfg = resolve(cfg)
        self.workdir = workdir
        # Iterative DRIFT: round r > 1 runs in <workdir>/round<r> of its parent, with
        # round r-1's DRIFT policy as its reference.
        self.parent, self.round_number = parent, round_number
        self.previous = methods.get(f"drift_round{round_number}").previous if parent else None
        self.checkpoint = self.cfg.model.checkpoint or None
        # Round r > 1 rolls out its own reference; only round 1 may train on given files.
        self.given_rollouts = [] if parent else [p for p in self.cfg.rollouts.split(",") if p]
        self.ledger = ledger.Ledger(workdir, ran=parent.ledger.ran if parent else None,
                                    label=f"{os.path.basename(workdir)}/" if parent else "")

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
            tie_word_embeddings=True, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
            remat=m.remat, attention_impl=m.attention_impl,
        )

    @functools.cached_property
    def stop_ids(self) -> tuple:
        # A chat model ends its turn with the template's end-of-turn token, not always EOS.
        return tuple(sorted({self.tokenizer.eos_token_id, end_of_turn_id(self.tokenizer)} - {None}))

    # -- the run's stages (experiments/plan.py) and which outputs are current (ledger.py) --

    @functools.cached_property
    def plan(self) -> list:
        """The run's stages in order (``plan.stage_plan``); a round's are its parent's."""
        return self.parent.plan if self.parent is not None else stage_plan(self)

    def stage(self, name: str) -> Stage:
        """This experiment's stage ``name`` ("rollout", "train:drift", ...) of the plan."""
        for stage in self.plan:
            if stage.exp is self and stage.name == name:
                return stage
        raise KeyError(f"stage {self.ledger.label}{name} is not one of this run's "
                       f"({', '.join(s.label for s in self.plan)})")

    def begin(self, name: str) -> bool:
        """True when stage ``name``'s output is current (skip it); else its stale output
        moves aside and the stage is recorded as started (``ledger.Ledger.begin``)."""
        stage = self.stage(name)
        return self.ledger.begin(name, settings(stage), list(stage.outputs))

    def finish(self, name: str) -> None:
        self.ledger.finish(name)

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
                                    on_bad_record=cfg.data.on_bad_record, repeats="keep",
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
    def read_rollouts(self) -> tuple[list, dict]:
        """(every usable record of the rollout files, with the group checks of
        ``records.read_rollouts``; {reason: count} of the records skipped)."""
        max_len = self.cfg.train.max_len
        return records_io.read_rollouts(
            self.rollout_files(), on_bad_record=self.cfg.data.on_bad_record,
            min_group_size=self.min_group_size,
            check=context_check(self.tokenizer, max_len) if max_len else None)

    def rollout_records(self) -> list:
        """The usable records of the rollout files (``read_rollouts``)."""
        return self.read_rollouts()[0]

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
                             memory_fraction=rc.memory_fraction, steps_per_visit=rc.steps_per_visit,
                             refill_after=rc.refill_after, row_buckets=rc.row_buckets)

    def sampling(self, temperature: float, top_p: float = 1.0, max_new_tokens: int | None = None) -> SamplingParams:
        """Sampling with the run's stop ids; ``max_new_tokens`` per turn defaults to
        ``rollout.max_new_tokens``."""
        return SamplingParams(temperature=temperature, top_p=top_p, stop_ids=self.stop_ids,
                              max_new_tokens=max_new_tokens or self.cfg.rollout.max_new_tokens)

    def new_model(self) -> Transformer:
        return Transformer(self.model_cfg, rngs=nnx.Rngs(self.cfg.seed))

    @functools.cache
    def round(self, r: int) -> "Experiment":
        """Round r >= 2 of iterative DRIFT, in ``<workdir>/round<r>``: the same stages with
        round r-1's DRIFT policy as the reference."""
        return Experiment(self.cfg, self.path(f"round{r}"), parent=self, round_number=r)
