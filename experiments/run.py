"""DRIFT end to end: reference -> rollout -> weights -> train -> eval -> report.

    python experiments/run.py                                   # the embedded default
    python experiments/run.py --config=experiments/configs/tiny.py --workdir=/tmp/run
    python experiments/run.py --config.seed=1 --config.drift.beta=0.3

Every stage writes its output into the workdir (default ``runs/<config name>``) and is
skipped when that output is already there, so a rerun only does unfinished work and a
killed training resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs import each other as experiments.configs.*

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from drift_jax import checkpoint, evaluate, report, rollouts, train  # noqa: E402
from drift_jax.chat import encode_dialogue  # noqa: E402
from drift_jax.data import make_batch_fn  # noqa: E402
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer, scripted_episode  # noqa: E402
from drift_jax.models import ModelConfig, Transformer  # noqa: E402
from drift_jax.rollout import play_episodes  # noqa: E402
from drift_jax.sampling import SamplingParams  # noqa: E402
from drift_jax.weights import trajectory_returns, trajectory_weights  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "experiments/configs/default.py"), "Experiment config file."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>).")


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


def check_config(cfg, workdir: str) -> None:
    """Reject impossible values, and a workdir that holds a run of another config."""
    checks = [
        (cfg.drift.beta > 0, f"drift.beta must be > 0, got {cfg.drift.beta}"),
        (0 < cfg.drift.gamma <= 1, f"drift.gamma must be in (0, 1], got {cfg.drift.gamma}"),
        (cfg.rollout.num_samples >= 1, f"rollout.num_samples (K) must be >= 1, got {cfg.rollout.num_samples}"),
        (cfg.task.max_turns >= 1, f"task.max_turns (T) must be >= 1, got {cfg.task.max_turns}"),
        (cfg.rollout.num_prompts >= 1, f"rollout.num_prompts must be >= 1, got {cfg.rollout.num_prompts}"),
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
    """The config, the task and the workdir paths shared by all stages."""

    def __init__(self, cfg, workdir: str):
        self.cfg = cfg
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        t = cfg.task
        self.env = SecretGuessEnv(max_turns=t.max_turns, max_answers=t.max_answers,
                                  format_penalty=t.format_penalty,
                                  num_candidates=t.num_candidates, num_values=t.num_values)
        self.tokenizer = build_tokenizer(t.num_values)
        m = cfg.model
        self.model_cfg = ModelConfig(
            vocab_size=len(self.tokenizer), hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size, num_layers=m.num_layers,
            num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
            tie_word_embeddings=True,
        )
        self.train_questions = self.env.make_questions(
            cfg.rollout.num_prompts, seed=cfg.seed * 1000 + 2, prefix="train-")
        self.eval_questions = self.env.make_questions(
            cfg.eval.num_prompts, seed=cfg.seed * 1000 + 3, prefix="eval-",
            exclude={q.text for q in self.train_questions})

    @functools.cache
    def last_turn_examples(self) -> list:
        """The rollouts tokenised once, last assistant turn supervised; every method
        trained on them only changes the weights."""
        records, _ = rollouts.read_jsonl(self.path("rollouts.jsonl"))
        return [encode_dialogue(self.tokenizer, r["messages"], supervise="last") for r in records]

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def new_model(self) -> Transformer:
        return Transformer(self.model_cfg, rngs=nnx.Rngs(self.cfg.seed))

    def load_policy(self, name: str) -> Transformer:
        model = self.new_model()
        nnx.update(model, checkpoint.load_params(self.path(name, "params"), nnx.state(model, nnx.Param)))
        return model


def fit(exp: Experiment, name: str, examples, init_model: Transformer, tcfg, steps: int) -> dict:
    """Train ``init_model`` on ``examples`` under ``<workdir>/<name>``; resumable."""
    tx, schedule = train.make_optimizer(
        tcfg.learning_rate, steps, warmup_ratio=tcfg.warmup_ratio, schedule=tcfg.schedule,
        weight_decay=tcfg.weight_decay, grad_clip=tcfg.get("grad_clip", 1.0))
    graphdef, state = train.create_train_state(init_model, tx, seed=exp.cfg.seed)
    step_fn = train.make_train_step(graphdef, tx, tcfg.get("num_micro_batches", 1),
                                    tcfg.get("loss_normalize", "batch"), schedule)
    batch_fn, _ = make_batch_fn(examples, tcfg.batch_size, exp.cfg.seed, exp.tokenizer.pad_token_id)
    ckpt = checkpoint.Checkpointer(exp.path(name, "checkpoints"),
                                   save_every=tcfg.get("checkpoint_every", 100), keep=2)
    t0 = time.time()
    state = train.train_loop(graphdef, state, step_fn, batch_fn, steps, checkpointer=ckpt,
                             metrics_path=exp.path(name, "metrics.jsonl"), desc=f"train {name}")
    ckpt.close()
    checkpoint.save_params(exp.path(name, "params"), state.params, force=True)
    epochs = steps * tcfg.batch_size / len(examples)
    stats = {
        "steps": steps,
        "examples": len(examples),
        # Tokens through forward+backward (real tokens) and the supervised ones among them.
        "trained_tokens": int(round(epochs * sum(len(e.tokens) for e in examples))),
        "supervised_tokens": int(round(epochs * sum(int(e.loss_mask.sum()) for e in examples))),
        "wall_s": time.time() - t0,
    }
    write_json(exp.path(name, "train_stats.json"), stats)
    return stats


def stage_reference(exp: Experiment) -> None:
    """Train the base policy from scratch on synthetic transcripts of the base habit."""
    if os.path.exists(exp.path("reference", "train_stats.json")):
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
    """K trajectories per training prompt from the frozen reference, as JSONL records."""
    if os.path.exists(exp.path("rollout_stats.json")):
        return
    rc = exp.cfg.rollout
    t0 = time.time()
    episodes, generated = play_episodes(
        exp.load_policy("reference"), exp.tokenizer, exp.env, exp.train_questions,
        num_samples=rc.num_samples, seed=exp.cfg.seed,
        sampling=SamplingParams(temperature=rc.temperature, top_p=rc.top_p,
                                max_new_tokens=rc.max_new_tokens, stop_ids=(exp.tokenizer.eos_token_id,)),
        batch_size=rc.batch_size, desc="rollout")
    rollouts.write_jsonl(exp.path("rollouts.jsonl"), (e.to_record() for e in episodes))
    summary = evaluate.summarize([e.t_star for e in episodes], exp.env.max_turns)
    write_json(exp.path("rollout_stats.json"), {
        "trajectories": len(episodes), "generated_tokens": generated,
        "wall_s": time.time() - t0, "sampled_reference": summary})


def stage_weights(exp: Experiment) -> None:
    """Returns and importance weights of every trajectory (uniform ones for ``sft``)."""
    if os.path.exists(exp.path("weights.json")):
        return
    d = exp.cfg.drift
    t0 = time.time()
    records, skipped = rollouts.read_jsonl(exp.path("rollouts.jsonl"))
    weights = trajectory_weights(records, d.gamma, d.beta, d.lam, normalize=d.normalize)
    returns = [trajectory_returns(r, d.gamma, d.lam) for r in records]
    write_json(exp.path("weights.json"), {
        "drift": weights.tolist(), "returns": returns, "skipped_records": sum(skipped.values()),
        "wall_s": time.time() - t0})


def stage_train(exp: Experiment, method: str) -> None:
    """Weighted SFT on the last assistant turn of every trajectory, from the reference."""
    if os.path.exists(exp.path(method, "train_stats.json")):
        return
    base = exp.last_turn_examples()
    w = read_json(exp.path("weights.json"))["drift"] if method == "drift" else [1.0] * len(base)
    examples = [dataclasses.replace(e, weight=wi) for e, wi in zip(base, w)]
    tc = exp.cfg.train
    steps = tc.epochs * -(-len(examples) // tc.batch_size)
    fit(exp, method, examples, exp.load_policy("reference"), tc, steps)


def stage_eval(exp: Experiment, method: str) -> None:
    """Greedy multi@k and correction rates on the held-out prompts."""
    out = exp.path(f"eval_{method}.json")
    if os.path.exists(out):
        return
    ec = exp.cfg.eval
    episodes, generated = play_episodes(
        exp.load_policy(method), exp.tokenizer, exp.env, exp.eval_questions, num_samples=1,
        seed=exp.cfg.seed,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=exp.cfg.rollout.max_new_tokens,
                                stop_ids=(exp.tokenizer.eos_token_id,)),
        batch_size=ec.batch_size, desc=f"eval {method}")
    rollouts.write_jsonl(exp.path(f"eval_{method}.jsonl"), (e.to_record() for e in episodes))
    write_json(out, evaluate.summarize([e.t_star for e in episodes], exp.env.max_turns))


def stage_report(exp: Experiment, methods) -> dict:
    rollout = read_json(exp.path("rollout_stats.json"))
    weights = read_json(exp.path("weights.json"))
    results = {"methods": {}, "config": exp.cfg.to_dict(), "sampled_reference": rollout["sampled_reference"],
               "skipped_records": weights["skipped_records"]}
    for method in ["reference", *methods]:
        summary = read_json(exp.path(f"eval_{method}.json"))
        if method == "reference":
            cost = {"generated_tokens": 0, "trained_tokens": 0, "wall_s": 0.0}
        else:
            ts = read_json(exp.path(method, "train_stats.json"))
            cost = {"generated_tokens": rollout["generated_tokens"],
                    "trained_tokens": ts["trained_tokens"],
                    "supervised_tokens": ts["supervised_tokens"],
                    "wall_s": rollout["wall_s"] + weights["wall_s"] + ts["wall_s"]}
        results["methods"][method] = {**summary, "cost": cost}
    write_json(exp.path("results.json"), results)
    table = report.results_table(results, exp.env.max_turns)
    with open(exp.path("report.md"), "w") as f:
        f.write(f"# DRIFT on the embedded task ({exp.workdir})\n\n"
                "Greedy multi@k on held-out prompts; cost = rollout + weights + training.\n\n"
                f"{table}\n")
    report.plot_multi_at_k(results, exp.env.max_turns, exp.path("multi_at_k.png"))
    return results


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
    cfg = _CONFIG.value
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    check_config(cfg, workdir)
    exp = Experiment(cfg, workdir)
    t0 = time.time()
    methods = list(cfg.methods)
    stage_reference(exp)
    stage_rollout(exp)
    stage_weights(exp)
    for method in methods:
        stage_train(exp, method)
    for method in ["reference", *methods]:
        stage_eval(exp, method)
    results = stage_report(exp, methods)
    print(report.results_table(results, exp.env.max_turns))
    print(f"\nwrote {exp.path('results.json')}, report.md, multi_at_k.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
