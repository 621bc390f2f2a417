"""Everything a run needs, checked before any stage writes anything.

A config error found after hours of rollouts wastes them, and a start that fails must
not leave a workdir behind. So before the first stage, ``preflight`` checks the values,
every path, the model and its tokenizer, every question source and benchmark (their
first records and layout), each method's needs, and the sizes of every training: a
fit of zero or one update, or one that never leaves the warm-up's learning rate 0, is
refused unless ``--config.allow_tiny=True``. Problems are ``ConfigError``: one or two
lines naming the key or file and what to pass.
"""

from __future__ import annotations

import json
import math
import os

import ml_collections
import numpy as np

from drift_jax import methods
from drift_jax.data.batching import held_out_count
from drift_jax.data.records import BadRecord
from drift_jax.training.train_state import make_optimizer

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config, path or data problem found before any work is done."""


def resolve(cfg) -> ml_collections.FrozenConfigDict:
    """The config every stage reads: a frozen copy of ``cfg`` whose settings left at None
    are filled in with ``task.protocol``'s values (a value set explicitly is kept), so the
    stages and the ledger see concrete ones. ``cfg`` itself is left as it is, and
    resolving a resolved config gives an equal one."""
    from drift_jax.envs.protocol import PROTOCOLS, RELEASE_EVAL_MAX_NEW_TOKENS

    protocol = cfg.task.protocol
    if protocol not in PROTOCOLS:
        raise ConfigError(f"invalid config: task.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    release = protocol == "release"
    if release and cfg.task.name == "secret":
        raise ConfigError("invalid config: task.protocol='release' is the authors' math/multiple-choice "
                          "protocol; the embedded secret task has only 'drift-jax'")
    out = (cfg.as_configdict() if isinstance(cfg, ml_collections.FrozenConfigDict)
           else cfg.copy_and_resolve_references())
    defaults = {
        ("data", "selection"): "release" if release else "first",
        # Shuffled under both: the release's --disable_shuffle never takes effect (its
        # trainer overrides get_train_sampler; transformers' Trainer calls _get_train_sampler).
        ("train", "shuffle"): True,
        ("reference.train", "shuffle"): True,
        ("train", "eval_fraction"): 0.05 if release else 0.0,
        ("eval", "max_new_tokens"): RELEASE_EVAL_MAX_NEW_TOKENS if release else out.rollout.max_new_tokens,
    }
    for (section, key), value in defaults.items():
        node = out.reference.train if section == "reference.train" else out[section]
        if node[key] is None:
            node[key] = value
    return ml_collections.FrozenConfigDict(out)


def check_values(cfg) -> ml_collections.FrozenConfigDict:
    """Values that cannot work, whatever the data; returns the resolved config
    (``resolve``: the protocol's settings filled in first)."""
    cfg = resolve(cfg)
    try:
        run_methods = methods.parse(cfg.methods)
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from None
    names = [m.name for m in run_methods]
    checks = [
        (cfg.drift.beta > 0, f"drift.beta must be > 0, got {cfg.drift.beta}"),
        (0 < cfg.drift.gamma <= 1, f"drift.gamma must be in (0, 1], got {cfg.drift.gamma}"),
        (cfg.rollout.num_samples >= 1, f"rollout.num_samples (K) must be >= 1, got {cfg.rollout.num_samples}"),
        (cfg.task.max_turns >= 1, f"task.max_turns (T) must be >= 1, got {cfg.task.max_turns}"),
        (cfg.rollout.num_prompts >= 1, f"rollout.num_prompts must be >= 1, got {cfg.rollout.num_prompts}"),
        # A prompt with one trajectory has DRIFT weight 1 whatever its return.
        ("drift" not in names or cfg.rollouts or cfg.rollout.num_samples >= 2,
         f"rollout.num_samples (K) must be >= 2 to train 'drift', got {cfg.rollout.num_samples}"),
        (cfg.data.on_bad_record in ("error", "skip"),
         f"data.on_bad_record must be 'error' or 'skip', got {cfg.data.on_bad_record!r}"),
        (cfg.model.dtype in DTYPES and cfg.model.param_dtype in DTYPES,
         f"model.dtype and model.param_dtype must be one of {DTYPES}, got "
         f"{cfg.model.dtype!r} and {cfg.model.param_dtype!r}"),
        (cfg.model.save_dtype in ("", *DTYPES),
         f"model.save_dtype must be '' (the checkpoint's) or one of {DTYPES}, got {cfg.model.save_dtype!r}"),
        (cfg.data.selection in ("first", "release"),
         f"data.selection must be 'first' or 'release', got {cfg.data.selection!r}"),
        (0.0 <= cfg.train.eval_fraction < 1.0,
         f"train.eval_fraction must be in [0, 1), got {cfg.train.eval_fraction}"),
        (cfg.train.eval_every >= 1, f"train.eval_every must be >= 1, got {cfg.train.eval_every}"),
        (cfg.task.name in ("secret", "math", "choice"),
         f"task.name must be 'secret', 'math' or 'choice', got {cfg.task.name!r}"),
    ]
    if cfg.lora.rank > 0:
        from drift_jax.models.lora import LoRAConfig
        try:
            LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=cfg.lora.targets)
        except ValueError as e:
            raise ConfigError(f"invalid config: lora: {e}") from None
    for section in ("train", "reference.train"):
        t = cfg.train if section == "train" else cfg.reference.train
        checks += [
            (t.shuffle in (True, False), f"{section}.shuffle must be True or False, got {t.shuffle!r}"),
            (t.shuffle or not t.bucket_window, f"{section}.bucket_window > 0 reorders batches: it needs "
                                               f"{section}.shuffle=True"),
            (not (t.pack and t.bucket_window), f"{section}.pack fills fixed-length rows; it replaces "
                                               f"{section}.bucket_window (set it to 0)"),
            (not t.pack or t.pack_length is None or t.max_len is None or t.pack_length >= t.max_len,
             f"{section}.pack_length ({t.pack_length}) must be >= {section}.max_len ({t.max_len}): "
             "a row must hold the longest example"),
            (t.schedule in ("constant", "cosine"), f"{section}.schedule must be 'constant' or 'cosine', got {t.schedule!r}"),
            (t.loss_normalize in ("batch", "weight_sum"),
             f"{section}.loss_normalize must be 'batch' or 'weight_sum', got {t.loss_normalize!r}"),
            (t.batch_size >= 1 and t.num_micro_batches >= 1 and t.batch_size % t.num_micro_batches == 0,
             f"{section}.batch_size ({t.batch_size}) must be a positive multiple of "
             f"{section}.num_micro_batches ({t.num_micro_batches})"),
        ]
    if any(m.trainer == "online_rl" for m in run_methods):  # a section no method runs is not checked
        rows = cfg.online_rl.prompts_per_step * cfg.rollout.num_samples
        checks.append((cfg.online_rl.num_micro_batches >= 1 and rows % cfg.online_rl.num_micro_batches == 0,
                       f"online_rl.prompts_per_step x rollout.num_samples ({rows} rows per update) must be a "
                       f"multiple of online_rl.num_micro_batches ({cfg.online_rl.num_micro_batches})"))
    checks += sampling_checks(cfg)
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config: {message}")
    return cfg


def sampling_checks(cfg) -> list[tuple[bool, str]]:
    """(ok, message) of the samplers' and optimizers' settings: a negative temperature or
    a top_p outside (0, 1] samples garbage to the end, and a learning rate <= 0 never
    moves the policy (whatever the number of updates)."""
    r, e, o = cfg.rollout, cfg.eval, cfg.online_rl
    checks = [
        (r.temperature >= 0, f"rollout.temperature must be >= 0 (0: greedy), got {r.temperature}"),
        (0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}"),
        (r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}"),
        (r.batch_size >= 1, f"rollout.batch_size must be >= 1, got {r.batch_size}"),
        (e.num_prompts >= 1, f"eval.num_prompts must be >= 1, got {e.num_prompts}"),
        (e.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {e.max_new_tokens}"),
        (e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}"),
        (o.prompts_per_step >= 1, f"online_rl.prompts_per_step must be >= 1, got {o.prompts_per_step}"),
        (o.seq_len is None or o.seq_len >= 1, f"online_rl.seq_len must be None or >= 1, got {o.seq_len}"),
    ]
    for section, t in (("reference.train", cfg.reference.train), ("train", cfg.train), ("online_rl", o)):
        checks += [
            (t.learning_rate > 0, f"{section}.learning_rate must be > 0, got {t.learning_rate}"),
            (0 <= t.warmup_ratio < 1, f"{section}.warmup_ratio must be in [0, 1), got {t.warmup_ratio}"),
        ]
    return checks


def check_inputs(cfg) -> None:
    """What the run is given: a model where the task needs one, rollout files that
    exist, question sets for every method that rolls out."""
    names = [m.name for m in methods.parse(cfg.methods)]
    given = [p for p in cfg.rollouts.split(",") if p]
    if cfg.task.name != "secret" and not cfg.model.checkpoint:
        raise ConfigError(f"task {cfg.task.name!r} needs a model: set --config.model.checkpoint to a "
                          "Hugging Face folder or hub id")
    for path in given:
        if not os.path.isfile(path):
            raise ConfigError(f"--config.rollouts: no such file {path}")
    has_questions = cfg.task.name == "secret" or bool(cfg.data.train)
    offline = any(methods.get(name).trainer == "sft" for name in names)
    if offline and not given and not has_questions:
        raise ConfigError("nothing to train on: set --config.rollouts to one or more comma-separated "
                          "JSONL files, or --config.data.train to a question set to roll out")
    for name in names:
        method = methods.get(name)
        if (method.round > 1 or method.trainer == "online_rl") and not has_questions:
            raise ConfigError(
                f"method {name!r} plays new episodes of its own policy, so it needs training questions: "
                "set --config.data.train (--config.rollouts only replaces the first round's rollouts)")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model(exp) -> None:
    """A real model: the folder (or hub id) resolves, holds a supported config.json,
    weights and tokenizer files, and the tokenizer fits the model's vocabulary."""
    if exp.checkpoint is None:
        return
    from drift_jax.models import config_from_hf
    from drift_jax.models.hf import resolve

    where = exp.checkpoint
    if not os.path.isdir(where) and (where.startswith((".", "/", "~")) or where.count("/") != 1):
        raise ConfigError(f"model.checkpoint {where!r} is neither a folder nor a hub id (org/name)")
    try:
        path = resolve(where)
    except Exception as e:  # offline, unknown repo, no access: all mean the same to the user
        raise ConfigError(f"model.checkpoint {where!r}: cannot download it from the Hugging Face hub "
                          f"({type(e).__name__}); pass a local folder instead") from None
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"model.checkpoint {where}: no config.json in {path}")
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise ConfigError(f"model.checkpoint {where}: no *.safetensors weights in {path}")
    if os.path.isdir(where) and not any(os.path.exists(os.path.join(where, f)) for f in _TOKENIZER_FILES):
        raise ConfigError(f"model.checkpoint {where}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                          "copy them from the base model's folder")
    with open(config_path) as f:
        try:
            vocab_size = config_from_hf(json.load(f)).vocab_size
        except ValueError as e:
            raise ConfigError(f"model.checkpoint {where}: {e}") from None
    try:
        tokenizer = exp.tokenizer
    except ValueError as e:
        raise ConfigError(f"model.checkpoint {where}: {e}") from None
    if len(tokenizer) > vocab_size or max(exp.stop_ids, default=0) >= vocab_size:
        raise ConfigError(f"model.checkpoint {where}: its tokenizer has {len(tokenizer)} tokens (stop ids "
                          f"{list(exp.stop_ids)}) but the model's embedding has {vocab_size} rows: "
                          "the tokenizer files belong to another model")


def check_questions(exp) -> list[str]:
    """Load the training questions and every benchmark now (their first records decide
    the layout); a source that gives fewer questions than asked is a warning."""
    cfg, warnings = exp.cfg, []

    def load(what: str, fn):
        try:
            return fn()
        except (BadRecord, ValueError, ImportError) as e:  # DatasetError is a BadRecord
            raise ConfigError(f"{what}{e}") from None

    def count(name: str, questions: list, asked: int, key: str) -> None:
        if not questions:
            raise ConfigError(f"{name}: no usable questions")
        if len(questions) < asked:
            warnings.append(f"{name} gave {len(questions)} questions; {key} asks for {asked}: "
                            f"using {len(questions)}")

    if (exp.offline and not exp.given_rollouts) or any(
            m.round > 1 or m.trainer == "online_rl" for m in methods.parse(cfg.methods)):
        questions = load("data.train: ", lambda: exp.train_questions)
        count(f"data.train {cfg.data.train}".strip(), questions, cfg.rollout.num_prompts, "rollout.num_prompts")
    for name, (env, questions) in load("", lambda: exp.benchmarks).items():
        count(f"eval.benchmarks.{name}", questions, cfg.eval.num_prompts, "eval.num_prompts")
        check_template(exp, env, questions[0])
    return warnings


def check_template(exp, env, question) -> None:
    """Render one prompt with the chat template now: a template that fails (or a missing
    jinja2, which transformers needs to render one) stops the run before anything is written."""
    from drift_jax.data.chat import encode_prompt
    from drift_jax.envs.base import env_prefill

    try:
        encode_prompt(exp.tokenizer, env.initial_messages(question), env_prefill(env))
    except ImportError as e:
        raise ConfigError(f"rendering the chat template failed: {e} (pip install -r requirements.txt)") from None


def _updates(steps: int, tcfg) -> tuple[int, int]:
    """(updates, updates at learning rate > 0) of a fit of ``steps`` under ``tcfg``."""
    if steps <= 0:
        return 0, 0
    _, schedule = make_optimizer(tcfg.learning_rate, steps, warmup_ratio=tcfg.warmup_ratio,
                                       schedule=tcfg.schedule)
    return steps, int(np.sum(np.asarray(schedule(np.arange(steps))) > 0))


def check_sizes(exp) -> None:
    """Refuse a training that would make zero or one update, or none at learning rate
    > 0 (the policy would come out unchanged), unless ``allow_tiny``."""
    cfg = exp.cfg
    if cfg.allow_tiny:
        return
    fits = []
    if exp.checkpoint is None:
        fits.append(("reference.train", cfg.reference.train.steps, cfg.reference.train, "raise reference.train.steps"))
    offline = [m for m in methods.parse(cfg.methods) if m.trainer == "sft" and m.round == 1]
    if offline:
        if exp.given_rollouts:
            records = exp.rollout_records()
            counts = {m.name: sum(m.keep(r) for r in map(_parse, records)) for m in offline}
            source = f"{len(records)} records of {', '.join(exp.given_rollouts)}"
        else:  # every trajectory is kept by all but rft, whose count is known after rollouts
            n = len(exp.train_questions) * cfg.rollout.num_samples
            counts = {m.name: n for m in offline if m.name != "rft"}
            source = f"{len(exp.train_questions)} prompts x {cfg.rollout.num_samples} samples"
        t = cfg.train
        for name, n in counts.items():
            n -= held_out_count(n, t.eval_fraction)
            steps = t.epochs * math.ceil(n / t.batch_size)
            fits.append((f"train ({name}: {n} examples from {source})", steps, t,
                         "lower train.batch_size or raise train.epochs"))
    if any(m.trainer == "online_rl" for m in methods.parse(cfg.methods)):
        fits.append(("online_rl", cfg.online_rl.steps, cfg.online_rl, "raise online_rl.steps"))
    for what, steps, tcfg, fix in fits:
        updates, live = _updates(steps, tcfg)
        if updates <= 1 or live == 0:
            raise ConfigError(
                f"{what}: {updates} update(s), {live} of them at learning rate > 0 (warm-up ratio "
                f"{tcfg.warmup_ratio}): the policy would hardly change or not at all. "
                f"To train, {fix}; to run it anyway, pass --config.allow_tiny=True")


def _parse(record: dict):
    from drift_jax.data.records import parse_record
    return parse_record(record, messages=False)


def check_mesh(exp) -> None:
    """The training mesh fits the job's devices (``Experiment.mesh``): refused here, before
    anything runs, rather than when the first training starts. A run that trains nothing
    (a checkpoint's evaluation alone) needs no mesh."""
    if exp.checkpoint is not None and not methods.parse(exp.cfg.methods):
        return
    try:
        _ = exp.mesh  # builds (or refuses) the mesh
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from None


def preflight(exp) -> list[str]:
    """Run every check on ``exp`` (an ``experiments.workdir.Experiment``); nothing is
    written. Returns the warnings (also logged); raises ``ConfigError``."""
    check_values(exp.cfg)  # exp.cfg is resolved already (``Experiment``)
    check_inputs(exp.cfg)
    if os.path.exists(exp.workdir) and not os.path.isdir(exp.workdir):
        raise ConfigError(f"--workdir {exp.workdir} is a file, not a folder")
    check_model(exp)
    if exp.given_rollouts:
        try:
            exp.rollout_records()
        except BadRecord as e:
            raise ConfigError(str(e)) from None
    warnings = check_questions(exp)
    check_sizes(exp)
    check_mesh(exp)
    return warnings
