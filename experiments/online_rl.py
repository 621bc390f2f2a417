"""The online multi-turn RL stage: the baseline DRIFT is measured against.

The current policy plays fresh episodes at every update (``policy_gradient.make_batch_fn``),
trained by the shared training (``experiments/fitting.py``, with
``policy_gradient.pg_loss_fn``) against the frozen reference: DRIFT's
return, GRPO advantages, k3 KL to the reference (``docs/method.md``).
"""

from __future__ import annotations

import numpy as np

from drift_jax.training import policy_gradient
from experiments.fitting import train_policy
from experiments.workdir import Experiment, warn_if_unchanged, write_json


def stage_online_rl(exp: Experiment) -> None:
    """Train ``online_rl`` from the reference (``fitting.train_policy`` with online RL's
    batches and loss); resumable (prompts and sampling keys depend only on (seed,
    update), so a resumed run replays the same data)."""
    if exp.begin("train:online_rl"):
        return
    oc, d = exp.cfg.online_rl, exp.cfg.drift
    num_samples = exp.cfg.rollout.num_samples

    def make_batches(graphdef):
        return policy_gradient.make_batch_fn(
            graphdef, exp.tokenizer, exp.env, exp.train_questions, prompts_per_step=oc.prompts_per_step,
            num_samples=num_samples, sampling=exp.sampling(temperature=1.0), gamma=d.gamma, lam=d.lam,
            seq_len=oc.seq_len, batch_size=oc.prompts_per_step * num_samples, seed=exp.cfg.seed,
            engine=exp.engine(), sample_dtype=exp.model_cfg.dtype)

    # The frozen reference is a separate copy (the train state is donated), with the same
    # fresh adapters under LoRA: the same graphdef, and exactly the reference. It is only
    # run forward, so it is stored in the compute dtype: the same log-probs as the float32
    # master weights cast at every matmul, at half the bytes (5.75 GiB at Qwen2.5-3B).
    history, updates, _ = train_policy(
        exp, "online_rl", exp.adapt(exp.load_policy("reference")), oc, oc.steps, make_batches,
        loss_fn=policy_gradient.pg_loss_fn(oc.kl_coef, oc.loss_normalize),
        aux_model=exp.adapt(exp.load_policy("reference", for_sampling=True)), desc="online RL")
    stats = run_stats(history, episodes=updates * oc.prompts_per_step * num_samples)
    write_json(exp.path("online_rl", "train_stats.json"),
               {**stats, "unchanged_policy": warn_if_unchanged("online_rl", history),
                "sampler": history[-1].get("sampler") if history else None})  # the kind that played
    exp.finish("train:online_rl")


def run_stats(history: list[dict], episodes: int) -> dict:
    """Totals of an online-RL run from its metrics lines: steps, episodes,
    generated_tokens, trained_tokens, supervised_tokens, left_out_turns, wall_s =
    rollout_s (playing, scoring, tokenising) + train_s (the jitted update), and
    mean_return_first_last / success_rate_first_last (means over the first and last
    tenth of the updates: the curve's ends)."""
    def total(key):
        return sum(r[key] for r in history)

    def ends(key):
        tenth = max(1, len(history) // 10)
        return [float(np.mean([r[key] for r in part])) for part in (history[:tenth], history[-tenth:])]

    rollout_s, train_s = total("batch_s"), total("step_time_s")
    return {
        "steps": len(history),
        "episodes": episodes,
        **{k: int(total(k)) for k in ("generated_tokens", "trained_tokens", "supervised_tokens",
                                      "left_out_turns")},
        "rollout_s": rollout_s,
        "train_s": train_s,
        "wall_s": rollout_s + train_s,
        "mean_return_first_last": ends("mean_return") if history else None,
        "success_rate_first_last": ends("success_rate") if history else None,
    }
