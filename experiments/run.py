"""DRIFT end to end: reference -> rollout -> weights -> train -> eval -> report.

    python experiments/run.py                                   # the embedded default
    python experiments/run.py --config=experiments/configs/tiny.py --workdir=/tmp/run
    python experiments/run.py --config.seed=1 --config.drift.beta=0.3

Every stage writes its output into the workdir (default ``runs/<config name>``) and is
skipped when that output is already there, so a rerun only does unfinished work and a
killed training resumes from its last checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs import each other as experiments.configs.*

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from drift_jax import checkpoint, diagnostics, distributed, evaluate, online_rl, report, rollouts, sharding, train  # noqa: E402
from drift_jax.chat import encode_dialogue, end_of_turn_id  # noqa: E402
from drift_jax.data import make_batch_fn  # noqa: E402
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer, scripted_episode  # noqa: E402
from drift_jax.models import ModelConfig, Transformer, from_pretrained, load_tokenizer, save_pretrained  # noqa: E402
from drift_jax.rollout import append_rollouts, play_episodes  # noqa: E402
from drift_jax.sampling import SamplingParams  # noqa: E402
from drift_jax.weights import trajectory_returns, trajectory_weights  # noqa: E402


def check_config_keys(argv: list[str], default_config: str) -> None:
    """Exit with a clear message when a ``--config.<key>`` override names no config field.

    ml_collections would die inside flag parsing (at import when ``--config`` is not
    given) with a bare AttributeError, so this runs before the config flag is defined.
    """
    import difflib
    import importlib.util
    import re

    spec, keys = default_config, []
    for i, arg in enumerate(argv[1:], start=1):
        m = re.match(r"--?config(?:=(?P<spec>.*)|\.(?P<key>[^=]+)(?:=.*)?)?$", arg)
        if m and m["key"]:
            keys.append((m["key"], arg))
        elif m:
            spec = m["spec"] if m["spec"] is not None else (argv[i + 1] if i + 1 < len(argv) else spec)
    path, _, config_arg = spec.partition(":")
    if not keys or not os.path.isfile(path):
        return  # nothing to check, or a bad path ml_collections reports itself
    module_spec = importlib.util.spec_from_file_location("_config_for_key_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(config_arg) if config_arg else module.get_config()

    def names(tree: dict, prefix: str = ""):
        for name, value in tree.items():
            yield prefix + name
            if isinstance(value, dict):
                yield from names(value, f"{prefix}{name}.")

    known = sorted(names(cfg.to_dict()))
    for key, arg in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            parts = key.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()  # the deepest section that exists
            depth = len(parts) + 1
            prefix = "".join(f"{p}." for p in parts)
            section = [k for k in known if k.count(".") + 1 == depth and k.startswith(prefix)]
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            sys.exit(f"unknown config key {key!r} in {arg} (config {path}).{hint} "
                     f"Keys {'under ' + repr('.'.join(parts)) if parts else 'at the top'}: "
                     f"{', '.join(section)}")


if __name__ == "__main__":
    check_config_keys(sys.argv, os.path.join(REPO, "experiments/configs/default.py"))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "experiments/configs/default.py"), "Experiment config file."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>).")


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
    from drift_jax.datasets import load_questions as load  # lazy: pulls pyarrow / tfds
    return load(source, **kwargs)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)  # atomic: a stage's output exists only once complete


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


METHODS = ("sft_single", "sft", "rft", "drift", "drift_all_turns", "online_rl")


def unknown_methods(methods) -> list:
    """Names in ``methods`` that the runner cannot train, in order; ``drift_round<r>``
    needs drift and every earlier round before it."""
    bad, seen = [], set()
    for m in methods:
        match = re.fullmatch(r"drift_round(\d+)", m)
        if match:
            r = int(match.group(1))
            ok = r >= 2 and "drift" in seen and all(f"drift_round{q}" in seen for q in range(2, r))
        else:
            ok = m in METHODS
        if not ok:
            bad.append(m)
        seen.add(m)
    return bad


def check_config(cfg, workdir: str) -> None:
    """Reject impossible values, and a workdir that holds a run of another config."""
    checks = [
        (cfg.drift.beta > 0, f"drift.beta must be > 0, got {cfg.drift.beta}"),
        (0 < cfg.drift.gamma <= 1, f"drift.gamma must be in (0, 1], got {cfg.drift.gamma}"),
        (cfg.rollout.num_samples >= 1, f"rollout.num_samples (K) must be >= 1, got {cfg.rollout.num_samples}"),
        (cfg.task.max_turns >= 1, f"task.max_turns (T) must be >= 1, got {cfg.task.max_turns}"),
        (cfg.rollout.num_prompts >= 1, f"rollout.num_prompts must be >= 1, got {cfg.rollout.num_prompts}"),
        # A prompt with one trajectory has DRIFT weight 1 whatever its return.
        (not unknown_methods(cfg.methods), f"unknown methods {unknown_methods(cfg.methods)}: expected some "
         f"of {', '.join(METHODS)} or drift_round<r> (iterative DRIFT, after drift and rounds < r)"),
        ("drift" not in cfg.methods or cfg.get("rollouts") or cfg.rollout.num_samples >= 2,
         f"rollout.num_samples (K) must be >= 2 to train 'drift', got {cfg.rollout.num_samples}"),
        (cfg.data.on_bad_record in ("error", "skip"),
         f"data.on_bad_record must be 'error' or 'skip', got {cfg.data.on_bad_record!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid config: {message}")
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as stored
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        saved = _flatten(read_json(path))
        diff = sorted(k for k in set(saved) | set(_flatten(current))
                      if saved.get(k) != _flatten(current).get(k))
        if diff:
            raise ValueError(
                f"{workdir} holds a run of a different config (differs in {', '.join(diff)}); "
                "use another --workdir or delete that one")
    else:
        os.makedirs(workdir, exist_ok=True)
        write_json(path, current)


class Experiment:
    """The config, the task, the policy's source and the workdir paths shared by all stages.

    Two kinds of run share the stages:
    - the embedded task (``cfg.model`` is a ConfigDict of sizes): a random-init policy is
      first trained into a reference from synthetic transcripts;
    - a real model (``cfg.model`` is a Hugging Face folder or hub id): that checkpoint is
      the reference, and trained policies are also saved in HF format under
      ``<workdir>/<method>/hf`` (servable by vLLM, loadable by transformers).
    ``cfg.rollouts`` (comma-separated JSONL files, e.g. from the authors' vLLM scripts)
    replaces the rollout stage.
    """

    def __init__(self, cfg, workdir: str, reference: str | None = None):
        self.cfg = cfg
        self.workdir = workdir
        self.reference = reference  # iterative DRIFT: the previous round's policy directory
        os.makedirs(workdir, exist_ok=True)
        self.checkpoint = cfg.model if isinstance(cfg.model, str) else None
        self.given_rollouts = [p for p in cfg.get("rollouts", "").split(",") if p]
        self.skipped_records = collections.Counter()
        if self.checkpoint == "":
            raise ValueError("set --config.model to a Hugging Face folder or hub id")
        if "rollouts" in cfg and not self.given_rollouts:
            raise ValueError("set --config.rollouts to one or more comma-separated JSONL files")
        for path in self.given_rollouts:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--config.rollouts: no such file {path}")
        t = cfg.task
        if self.checkpoint is None:
            self.tokenizer = build_tokenizer(t.num_values)
            m = cfg.model
            self.model_cfg = ModelConfig(
                vocab_size=len(self.tokenizer), hidden_size=m.hidden_size,
                intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                tie_word_embeddings=True, remat=m.get("remat", "none"), attention_impl=m.get("attention_impl"),
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
        return load_questions(cfg.data.train, split=cfg.data.get("train_split"), layout=cfg.data.get("layout"),
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
        for name, b in cfg.eval.get("benchmarks", {}).items():
            env = make_env(b.task, cfg.task)
            out[name] = (env, load_questions(b.source, split=b.get("split"), layout=b.get("layout"),
                                             limit=cfg.eval.num_prompts, on_bad_record=cfg.data.on_bad_record))
        return out

    @functools.cache
    def examples(self, supervise: str = "last") -> list:
        """The rollouts tokenised once (the last assistant turn, or every one, supervised);
        the methods trained on them differ only in the weights."""
        records = self.rollout_records()
        max_len = self.cfg.train.get("max_len")
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
        ``rollouts.read_rollouts``; skipped ones are counted in ``skipped_records``."""
        max_len = self.cfg.train.get("max_len")
        weighted = {"drift", "drift_all_turns"} & set(self.cfg.methods)
        records, skipped = rollouts.read_rollouts(
            self.rollout_files(), on_bad_record=self.cfg.data.on_bad_record,
            min_group_size=2 if weighted else 1,
            check=rollouts.context_check(self.tokenizer, max_len) if max_len else None)
        self.skipped_records.update(skipped)
        return records

    def rollout_files(self) -> list:
        return self.given_rollouts or [self.path("rollouts.jsonl")]

    @functools.cached_property
    def mesh(self):
        """The (data, fsdp, tensor) training mesh of ``cfg.mesh``; None for one device."""
        m = self.cfg.get("mesh")
        if m is None or m.data * m.fsdp * m.tensor == 1:
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
        match = re.fullmatch(r"drift_round(\d+)", name)
        return self.path(f"round{match.group(1)}", "drift") if match else self.path(name)

    def load_policy(self, name: str) -> Transformer:
        """The reference (``name="reference"``) or a trained method's final policy."""
        where = self.policy_dir(name)
        if self.checkpoint is not None:
            source = self.checkpoint if where is None else os.path.join(where, "hf")
            return from_pretrained(source, dtype=_DTYPES[self.cfg.get("dtype", "bfloat16")],
                                   param_dtype=_DTYPES[self.cfg.get("param_dtype", "float32")],
                                   remat=self.cfg.get("remat", "none"), attention_impl=self.cfg.get("attention_impl"))
        model = self.new_model()
        nnx.update(model, checkpoint.load_params(os.path.join(where, "params"), nnx.state(model, nnx.Param)))
        return model

    def round(self, r: int) -> "Experiment":
        """Round r >= 2 of iterative DRIFT, in ``<workdir>/round<r>``: the same stages with
        round r-1's DRIFT policy as the reference."""
        return Experiment(self.cfg, self.path(f"round{r}"), reference=self.policy_dir(
            "drift" if r == 2 else f"drift_round{r - 1}"))


def fit(exp: Experiment, name: str, examples, init_model: Transformer, tcfg, steps: int) -> dict:
    """Train ``init_model`` on ``examples`` under ``<workdir>/<name>``; resumable."""
    tx, schedule = train.make_optimizer(
        tcfg.learning_rate, steps, warmup_ratio=tcfg.warmup_ratio, schedule=tcfg.schedule,
        weight_decay=tcfg.weight_decay, grad_clip=tcfg.get("grad_clip", 1.0))
    graphdef, state = train.create_train_state(init_model, tx, seed=exp.cfg.seed)
    mesh = exp.mesh
    if mesh is not None:  # params + optimizer state by their logical axes, batch rows over data x fsdp
        state = sharding.shard_train_state(state, tx, mesh)
    step_fn = train.make_train_step(graphdef, tx, tcfg.get("num_micro_batches", 1),
                                    tcfg.get("loss_normalize", "batch"), schedule,
                                    loss_chunk_size=tcfg.get("loss_chunk_size", "auto"))
    batch_fn, _ = make_batch_fn(examples, tcfg.batch_size, exp.cfg.seed, exp.tokenizer.pad_token_id,
                                bucket_window=tcfg.get("bucket_window", 0))
    if mesh is not None:
        batch_fn = (lambda make: lambda step: sharding.shard_batch(make(step), mesh))(batch_fn)
    ckpt = checkpoint.Checkpointer(exp.path(name, "checkpoints"),
                                   save_every=tcfg.get("checkpoint_every", 100), keep=2)
    t0 = time.time()
    state = train.train_loop(graphdef, state, step_fn, batch_fn, steps, checkpointer=ckpt,
                             metrics_path=exp.path(name, "metrics.jsonl"), desc=f"train {name}")
    ckpt.close()
    save_policy(exp, name, nnx.merge(graphdef, state.params))
    epochs = steps * tcfg.batch_size / len(examples)
    stats = {
        "steps": steps,
        "examples": len(examples),
        "truncated_examples": sum(e.truncated for e in examples),
        # Tokens through forward+backward (real tokens) and the supervised ones among them.
        "trained_tokens": int(round(epochs * sum(len(e.tokens) for e in examples))),
        "supervised_tokens": int(round(epochs * sum(int(e.loss_mask.sum()) for e in examples))),
        "wall_s": time.time() - t0,
    }
    write_json(exp.path(name, "train_stats.json"), stats)
    return stats


def _hf_extra(source: str) -> dict:
    """Token ids and other generation keys of the source config.json, kept on save."""
    from drift_jax.models.hf import _resolve
    with open(os.path.join(_resolve(source), "config.json")) as f:
        hf = json.load(f)
    return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}


def stage_reference(exp: Experiment) -> None:
    """Train the base policy from scratch on synthetic transcripts of the base habit
    (embedded task only: a real model's checkpoint is its own reference)."""
    if exp.checkpoint is not None or os.path.exists(exp.path("reference", "train_stats.json")):
        return
    rc = exp.cfg.reference
    rng = np.random.default_rng(exp.cfg.seed * 1000 + 1)
    questions = exp.env.make_questions(rc.num_transcripts, seed=exp.cfg.seed * 1000 + 1, prefix="ref-")
    examples = [
        encode_dialogue(exp.tokenizer, scripted_episode(exp.env, q, rng, rc.p_repeat, rc.p_format_error,
                                         rc.preference_decay).messages,
                        supervise="all")
        for q in questions
    ]
    fit(exp, "reference", examples, exp.new_model(), rc.train, rc.train.steps)


def stage_rollout(exp: Experiment) -> None:
    """K trajectories per training prompt from the frozen reference, as JSONL records.

    Appended one prompt group at a time: a killed run resumes where it stopped and ends
    with the same file (``rollout.append_rollouts``)."""
    if os.path.exists(exp.path("rollout_stats.json")):
        return
    rc = exp.cfg.rollout
    t0 = time.time()
    stats = append_rollouts(
        exp.path("rollouts.jsonl"), exp.load_policy("reference"), exp.tokenizer, exp.env,
        exp.train_questions, num_samples=rc.num_samples, seed=exp.cfg.seed,
        sampling=exp.sampling(temperature=rc.temperature, top_p=rc.top_p),
        batch_size=rc.batch_size, desc="rollout")
    summary = evaluate.summarize(stats["t_star"], exp.env.max_turns)
    write_json(exp.path("rollout_stats.json"), {
        "trajectories": stats["trajectories"], "generated_tokens": stats["generated_tokens"],
        "resumed_groups": stats["resumed_groups"],  # > 0: this run finished an interrupted one
        "wall_s": time.time() - t0, "sampled_reference": summary})


def stage_weights(exp: Experiment) -> None:
    """Returns and importance weights of every trajectory (uniform ones for ``sft``)."""
    if os.path.exists(exp.path("weights.json")):
        return
    d = exp.cfg.drift
    t0 = time.time()
    records, skipped = exp.rollout_records(), exp.skipped_records
    beta = d.beta
    if d.get("target_ess_fraction"):  # beta chosen so the mean ESS / K hits the target
        beta = diagnostics.choose_beta(records, d.gamma, d.lam, d.target_ess_fraction)
    weights = trajectory_weights(records, d.gamma, beta, d.lam, normalize=d.normalize)
    returns = [trajectory_returns(r, d.gamma, d.lam) for r in records]
    diag = diagnostics.summary(records, weights)
    print(f"weights ({exp.workdir}): beta={beta:.4g}, mean ESS/K={diag['mean_ess_fraction']:.3f}, "
          f"groups where every trajectory failed: {diag['all_fail_share']:.1%}")
    write_json(exp.path("weights.json"), {
        "drift": weights.tolist(), "returns": returns, "beta": beta, "diagnostics": diag,
        "skipped_records": rollouts.summarize_skipped(skipped),  # {"total", "reasons"}
        "wall_s": time.time() - t0})


def method_examples(exp: Experiment, method: str) -> list:
    """The weighted SFT data of a method trained on the reference's rollouts.

    sft: every trajectory, last turn, weight 1.  drift: the same with importance weights.
    rft: successful trajectories only, weight 1.  drift_all_turns: every assistant turn
    weighted by its trajectory's weight (the paper's ablation).  sft_single: first-turn
    correct answers only (single-turn SFT).
    """
    records = exp.rollout_records()
    if method in ("drift", "drift_all_turns"):
        weights = read_json(exp.path("weights.json"))["drift"]
    else:
        weights = [1.0] * len(records)
    supervise = "all" if method == "drift_all_turns" else "last"
    keep = {
        "sft": lambda r: True, "drift": lambda r: True, "drift_all_turns": lambda r: True,
        "rft": lambda r: r.get("t_star") is not None,
        "sft_single": lambda r: r.get("t_star") == 1,
    }
    if method not in keep:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(keep)}")
    examples = exp.examples(supervise)
    if not len(examples) == len(weights) == len(records):
        raise RuntimeError(f"{exp.path('weights.json')} holds {len(weights)} weights for {len(records)} "
                           "records: delete it to recompute")
    examples = [dataclasses.replace(e, weight=w) for e, w, r in zip(examples, weights, records) if keep[method](r)]
    if not examples:
        raise ValueError(f"method {method!r} has no training examples in {exp.rollout_files()}")
    return examples


def stage_train(exp: Experiment, method: str) -> None:
    """Weighted SFT from the reference on the method's examples."""
    if os.path.exists(exp.path(method, "train_stats.json")):
        return
    examples = method_examples(exp, method)
    tc = exp.cfg.train
    steps = tc.epochs * -(-len(examples) // tc.batch_size)
    fit(exp, method, examples, exp.load_policy("reference"), tc, steps)


def save_policy(exp: Experiment, name: str, model: Transformer) -> None:
    """A trained policy's final params (and, for a real model, an HF folder vLLM can serve)."""
    checkpoint.save_params(exp.path(name, "params"), nnx.state(model, nnx.Param), force=True)
    if exp.checkpoint is not None:
        save_pretrained(model, exp.path(name, "hf"), hf_config_extra=_hf_extra(exp.checkpoint))
        exp.tokenizer.save_pretrained(exp.path(name, "hf"))


def stage_online_rl(exp: Experiment) -> None:
    """The online multi-turn RL baseline: the current policy plays fresh episodes every
    update (drift_jax/online_rl.py); same return as DRIFT, GRPO advantages, KL to the reference."""
    if os.path.exists(exp.path("online_rl", "train_stats.json")):
        return
    oc, d = exp.cfg.online_rl, exp.cfg.drift
    model, ref = exp.load_policy("reference"), exp.load_policy("reference")
    stats = online_rl.train_online(
        model, ref, exp.tokenizer, exp.env, exp.train_questions, steps=oc.steps,
        prompts_per_step=oc.prompts_per_step, num_samples=exp.cfg.rollout.num_samples,
        sampling=exp.sampling(temperature=1.0), learning_rate=oc.learning_rate,
        warmup_ratio=oc.warmup_ratio, schedule=oc.schedule, weight_decay=oc.weight_decay,
        grad_clip=oc.grad_clip, kl_coef=oc.kl_coef, gamma=d.gamma, lam=d.lam,
        num_micro_batches=oc.num_micro_batches, seq_len=oc.get("seq_len"),
        rollout_batch_size=oc.prompts_per_step * exp.cfg.rollout.num_samples,
        seed=exp.cfg.seed, checkpoint_dir=exp.path("online_rl", "checkpoints"),
        checkpoint_every=oc.checkpoint_every, metrics_path=exp.path("online_rl", "metrics.jsonl"))
    save_policy(exp, "online_rl", model)
    write_json(exp.path("online_rl", "train_stats.json"), stats)


def stage_method(exp: Experiment, method: str) -> None:
    """Train one method: offline ones on the rollouts, online RL, or an iterative round."""
    match = re.fullmatch(r"drift_round(\d+)", method)
    if method == "online_rl":
        stage_online_rl(exp)
    elif match:
        child = exp.round(int(match.group(1)))
        stage_rollout(child)
        stage_weights(child)
        stage_train(child, "drift")
    else:
        stage_train(exp, method)


def stage_eval(exp: Experiment, method: str) -> None:
    """Greedy multi@k and correction rates on every benchmark's held-out prompts."""
    ec = exp.cfg.eval
    policy = None
    for bench, (env, questions) in exp.benchmarks.items():
        out = exp.path("eval", f"{bench}_{method}.json")
        if os.path.exists(out):
            continue
        policy = policy or exp.load_policy(method)
        episodes, generated = play_episodes(
            policy, exp.tokenizer, env, questions, num_samples=1, seed=exp.cfg.seed,
            sampling=exp.sampling(temperature=0.0), batch_size=ec.batch_size, desc=f"eval {method} {bench}")
        os.makedirs(exp.path("eval"), exist_ok=True)
        rollouts.write_jsonl(exp.path("eval", f"{bench}_{method}.jsonl"), (e.to_record() for e in episodes))
        write_json(out, {**evaluate.summarize([e.t_star for e in episodes], env.max_turns),
                         "questions": len(questions), "generated_tokens": generated})


def eval_summary(exp: Experiment, method: str) -> tuple[dict, dict]:
    """(mean over benchmarks of multi@k and correction rates, per-benchmark summaries)."""
    per_bench = {b: read_json(exp.path("eval", f"{b}_{method}.json")) for b in exp.benchmarks}
    if not per_bench:
        return {}, {}
    mean = {}
    for key, value in next(iter(per_bench.values())).items():
        if key.startswith("multi@"):
            mean[key] = float(np.mean([s[key] for s in per_bench.values()]))
    rates = np.array([[np.nan if r is None else r for r in s["correction_rate"]] for s in per_bench.values()])
    mean["correction_rate"] = [None if np.all(np.isnan(c)) else float(np.nanmean(c)) for c in rates.T]
    return mean, per_bench


def method_cost(exp: Experiment, method: str) -> dict:
    """Tokens generated (rollouts), tokens trained and wall-clock of everything the method
    needed after the reference existed. Rollouts made elsewhere (``cfg.rollouts``) have no
    generation cost here: None."""
    if method == "reference":
        return {"generated_tokens": 0, "trained_tokens": 0, "supervised_tokens": 0, "wall_s": 0.0}
    match = re.fullmatch(r"drift_round(\d+)", method)
    if match:  # the previous rounds plus this round's rollouts, weights and training
        r = int(match.group(1))
        before = method_cost(exp, "drift" if r == 2 else f"drift_round{r - 1}")
        this = method_cost(exp.round(r), "drift")
        return {k: None if before[k] is None or this[k] is None else before[k] + this[k]
                for k in ("generated_tokens", "trained_tokens", "supervised_tokens", "wall_s")}
    ts = read_json(exp.path(method, "train_stats.json"))
    if method == "online_rl":  # generates its own episodes at every update
        return {k: ts[k] for k in ("generated_tokens", "trained_tokens", "supervised_tokens")} | {
            "wall_s": ts["wall_s"], "stage_wall_s": {"rollout": ts["rollout_s"], "train": ts["train_s"]}}
    weights = read_json(exp.path("weights.json"))
    rollout = (read_json(exp.path("rollout_stats.json"))
               if os.path.exists(exp.path("rollout_stats.json")) else {"generated_tokens": None, "wall_s": 0.0})
    return {"generated_tokens": rollout["generated_tokens"], "trained_tokens": ts["trained_tokens"],
            "supervised_tokens": ts["supervised_tokens"],
            "wall_s": rollout["wall_s"] + weights["wall_s"] + ts["wall_s"],
            "stage_wall_s": {"rollout": rollout["wall_s"], "weights": weights["wall_s"], "train": ts["wall_s"]}}


def stage_report(exp: Experiment, methods) -> dict:
    weights = read_json(exp.path("weights.json"))
    results = {"methods": {}, "benchmarks": {}, "config": exp.cfg.to_dict(),
               "rollout_files": exp.rollout_files(), "skipped_records": weights["skipped_records"]}
    if os.path.exists(exp.path("rollout_stats.json")):
        results["sampled_reference"] = read_json(exp.path("rollout_stats.json"))["sampled_reference"]
    # Weight diagnostics (ESS, all-fail share, histogram) of each round's rollouts.
    results["weight_diagnostics"] = {"drift": {"beta": weights["beta"], **weights["diagnostics"]}}
    for method in methods:
        if re.fullmatch(r"drift_round\d+", method):
            w = read_json(exp.round(int(method.removeprefix("drift_round"))).path("weights.json"))
            results["weight_diagnostics"][method] = {"beta": w["beta"], **w["diagnostics"]}
    for method in ["reference", *methods]:
        summary, per_bench = eval_summary(exp, method)
        results["methods"][method] = {**summary, "cost": method_cost(exp, method)}
        for bench, s in per_bench.items():
            results["benchmarks"].setdefault(bench, {})[method] = s
    write_json(exp.path("results.json"), results)
    if not exp.benchmarks:
        return results
    with open(exp.path("report.md"), "w") as f:
        f.write(report.markdown(results, exp.env.max_turns, title=f"DRIFT: {', '.join(exp.benchmarks)} ({exp.workdir})"))
    for plot, file in ((report.plot_multi_at_k, "multi_at_k.png"), (report.plot_cost, "cost.png"),
                       (report.plot_correction_rate, "correction_rate.png")):
        plot(results, exp.env.max_turns, exp.path(file))
    return results


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
    distributed.initialize_from_env()  # multi-host: join the other processes before touching devices
    cfg = _CONFIG.value
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    check_config(cfg, workdir)
    exp = Experiment(cfg, workdir)
    t0 = time.time()
    methods = list(cfg.methods)
    stage_reference(exp)
    if not exp.given_rollouts:
        stage_rollout(exp)
    stage_weights(exp)
    for method in methods:
        stage_method(exp, method)
    if exp.benchmarks:
        for method in ["reference", *methods]:
            stage_eval(exp, method)
    results = stage_report(exp, methods)
    if exp.benchmarks:
        print(report.results_table(results, exp.env.max_turns))
    trained = ", ".join(exp.path(m, "hf" if exp.checkpoint else "params") for m in methods)
    print(f"\nwrote {exp.path('results.json')} and the trained policies ({trained}) "
          f"in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
