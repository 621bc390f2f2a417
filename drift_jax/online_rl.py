"""Online multi-turn RL, the baseline DRIFT is measured against (in the spirit of UFO).

UFO (drift-method.md, "The main baseline") runs PPO over whole multi-turn episodes. Here,
every update the CURRENT policy plays fresh episodes (temperature 1) of
``prompts_per_step`` prompts x K samples; each gets DRIFT's return
(``weights.trajectory_returns``: discounted success + format penalty - repetition
penalty); advantages are normalised over the K episodes of a prompt, as in GRPO:

    A_i = (R_i - mean_j R_j) / (std_j R_j + eps)   (population std; 0 if all R are equal)

and the loss over ALL assistant tokens of each episode is, per token,

    -A * log pi(y_t) + kl_coef * k3_t,   k3 = exp(d) - d - 1,  d = log pi_ref(y_t) - log pi(y_t)

k3 (>= 0, 0 iff pi = pi_ref on that token) is the low-variance KL estimator of GRPO and
verl's "low_var_kl"; kl_coef = 0.001 as in UFO; d is clipped to [-20, 20] as in verl.

Left out of PPO, and why: each batch of fresh episodes gets exactly ONE gradient step, so
the data are on-policy: the ratio pi / pi_old is 1, where PPO's clipped surrogate has the
gradient of -A log pi. Clipping only acts on later epochs over stale data, which this loop
never runs. The value network is replaced by the group baseline (GRPO): no extra model,
no GAE.

The loss is on the token ids actually sampled (``play_with_ids``), never on re-tokenised
text (``encode_dialogue(..., supervise="all")``). A reply cut at ``max_new_tokens`` has no
sampled end-of-turn token, yet the template renders one; training on it is off-policy,
and on the toy task it let the policy drift into never ending a turn (k3 ~ 80 per token).
One row per episode: the context of its last turn + its last reply; a turn whose sampled
ids are not where that context has them (decode -> encode does not round-trip; never on
the toy task) is left out of the loss and counted (``left_out_turns``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from drift_jax.chat import SFTExample, collate, encode_prompt
from drift_jax.checkpoint import Checkpointer
from drift_jax.envs.base import Episode
from drift_jax.losses import mean_loss, token_cross_entropy
from drift_jax.rollout import episode_keys
from drift_jax.sampling import SamplingParams, bucket_length, generate_batched
from drift_jax.train import TrainState, create_train_state, make_optimizer
from drift_jax.weights import trajectory_returns

_NORMALIZE_MODES = ("token", "sequence")
_LOG_RATIO_CLIP = 20.0
# Times the train step was traced, keyed by batch shape: tests check it compiles once.
TRACE_COUNTS: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnames=("num_groups",))
def group_advantages(returns_n: jax.Array, group_ids_n: jax.Array, num_groups: int,
                     eps: float = 1e-6) -> jax.Array:
    """GRPO advantages (R - group mean) / (group std + eps), float32.

    Args:
      returns_n: [N] episode returns.
      group_ids_n: [N] int group (prompt) ids in 0..num_groups-1.
      num_groups: G (static).
      eps: added to the population std; eps = 0 makes A exactly scale-invariant.
    Returns:
      [N] float32; sums to 0 over each group; 0 for every member of a group whose
      returns are all equal (no preference, no gradient).
    """
    r = jnp.asarray(returns_n, jnp.float32)
    ids = jnp.asarray(group_ids_n, jnp.int32)
    count_g = jnp.maximum(jax.ops.segment_sum(jnp.ones_like(r), ids, num_segments=num_groups), 1.0)
    # Centre on the group max first: equal returns then give exactly 0, not rounding noise
    # that eps = 0 would blow up to +-1.
    shifted = r - jax.ops.segment_max(r, ids, num_segments=num_groups)[ids]
    centred = shifted - (jax.ops.segment_sum(shifted, ids, num_segments=num_groups) / count_g)[ids]
    std_g = jnp.sqrt(jax.ops.segment_sum(centred * centred, ids, num_segments=num_groups) / count_g)
    std_n = std_g[ids]
    return jnp.where(std_n > 0, centred / (std_n + eps), 0.0)


def kl_k3(logp_bt: jax.Array, ref_logp_bt: jax.Array) -> jax.Array:
    """Per-token k3 = exp(d) - d - 1 with d = ref_logp - logp (clipped to +-20); >= 0."""
    d = jnp.clip(ref_logp_bt - logp_bt, -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP)
    return jnp.exp(d) - d - 1.0


def _reduce(per_token_bt, mask_bt, normalize: str):
    """(sum, denominator): over tokens ("token") or per-sequence means ("sequence")."""
    per_token_bt = jnp.where(mask_bt, per_token_bt, 0.0)
    num_b = jnp.sum(mask_bt, axis=-1).astype(jnp.float32)
    if normalize == "token":
        return jnp.sum(per_token_bt), jnp.sum(num_b)
    seq_b = jnp.sum(per_token_bt, axis=-1) / jnp.maximum(num_b, 1.0)
    return jnp.sum(seq_b), jnp.sum(num_b > 0, dtype=jnp.float32)


def pg_token_loss(
    logp_bt: jax.Array,
    loss_mask_bt: jax.Array,
    advantages_b: jax.Array,
    ref_logp_bt: jax.Array,
    kl_coef: float = 1e-3,
    normalize: str = "token",
) -> tuple[jax.Array, jax.Array]:
    """``pg_loss`` from per-token log-probs ``logp_bt`` [B, T] of the sampled tokens (e.g.
    minus ``losses.chunked_token_cross_entropy``) instead of logits. Same (sum, denominator)."""
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    mask_bt = jnp.asarray(loss_mask_bt).astype(bool)
    logp_bt = jnp.asarray(logp_bt, jnp.float32)
    ref_logp_bt = jax.lax.stop_gradient(jnp.asarray(ref_logp_bt, jnp.float32))
    adv_b = jax.lax.stop_gradient(jnp.asarray(advantages_b, jnp.float32))
    per_token_bt = -adv_b[:, None] * logp_bt + kl_coef * kl_k3(logp_bt, ref_logp_bt)
    return _reduce(per_token_bt, mask_bt, normalize)


def pg_loss(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    loss_mask_bt: jax.Array,
    advantages_b: jax.Array,
    ref_logp_bt: jax.Array,
    kl_coef: float = 1e-3,
    normalize: str = "token",
) -> tuple[jax.Array, jax.Array]:
    """On-policy policy-gradient loss with a k3 KL penalty, as (loss_sum, denominator).

    loss_sum = sum over supervised tokens of (-A_b * log pi(y_bt) + kl_coef * k3_bt); the
    denominator is the number of supervised tokens ("token", verl's default "token-mean")
    or, for "sequence", each row's sum is first divided by its token count and the
    denominator is the number of rows with a token (GRPO's per-sequence mean). Its
    gradient is the REINFORCE estimator sum_t A grad log pi(y_t) plus the KL term's.

    Args:
      logits_btv: [B, T, V] policy logits predicting targets_bt.
      targets_bt: [B, T] int sampled tokens.
      loss_mask_bt: [B, T] bool, true on assistant tokens to train.
      advantages_b: [B] advantages (constants: no gradient flows into them).
      ref_logp_bt: [B, T] log pi_ref(targets) (constants).
      kl_coef: weight of the KL penalty (0 switches it off).
      normalize: "token" or "sequence" (static).
    """
    logp_bt = -token_cross_entropy(logits_btv, targets_bt)
    return pg_token_loss(logp_bt, loss_mask_bt, advantages_b, ref_logp_bt, kl_coef, normalize)


def _micro_batch_loss(params, graphdef, ref_params, mb, kl_coef, normalize):
    """Loss SUM of one micro-batch (differentiated wrt ``params``) and its statistics."""
    tokens_bt, valid_bt = mb["tokens"], mb["valid"].astype(bool)
    inputs_bt, in_valid_bt, targets_bt = tokens_bt[:, :-1], valid_bt[:, :-1], tokens_bt[:, 1:]
    logp_bt = -token_cross_entropy(nnx.merge(graphdef, params)(inputs_bt, in_valid_bt), targets_bt)
    ref_logits_btv = nnx.merge(graphdef, ref_params)(inputs_bt, in_valid_bt)
    ref_logp_bt = jax.lax.stop_gradient(-token_cross_entropy(ref_logits_btv, targets_bt))
    mask_bt = mb["loss_mask"][:, 1:].astype(bool) & valid_bt[:, 1:] & in_valid_bt
    loss_sum, denom = pg_token_loss(logp_bt, mask_bt, mb["advantages"], ref_logp_bt, kl_coef, normalize)
    kl_bt = kl_k3(jax.lax.stop_gradient(logp_bt), ref_logp_bt)
    stats = {
        "kl_sum": jnp.sum(jnp.where(mask_bt, kl_bt, 0.0)),
        "num_tokens": jnp.sum(mask_bt).astype(jnp.float32),
    }
    return loss_sum, (denom, stats)


def make_pg_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    kl_coef: float = 1e-3,
    normalize: str = "token",
    num_micro_batches: int = 1,
    schedule_fn: Callable[[Any], jax.Array] | None = None,
) -> Callable[[TrainState, nnx.State, dict], tuple[TrainState, dict]]:
    """Jitted ``step_fn(state, ref_params, batch) -> (state, metrics)``; ``state`` is donated.

    batch: tokens, valid, loss_mask [B, T]; advantages [B]. The reference log-probs are
    computed inside the step from ``ref_params`` (a jit argument, never baked into the
    program). Micro-batches accumulate (sum, denominator) exactly, as in
    ``train.make_train_step``. metrics: loss, kl (mean k3 per supervised token),
    grad_norm (before clipping), num_tokens, lr (if ``schedule_fn``).
    """
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    m = num_micro_batches
    grad_fn = jax.value_and_grad(_micro_batch_loss, has_aux=True)

    def step_fn(state: TrainState, ref_params, batch):
        TRACE_COUNTS[tuple(batch["tokens"].shape)] += 1
        b = batch["tokens"].shape[0]
        if b % m:
            raise ValueError(f"batch size {b} is not divisible by num_micro_batches={m}")
        micro = jax.tree.map(lambda x: x.reshape(m, b // m, *x.shape[1:]), batch)

        def accumulate(carry, mb):
            (loss_sum, (denom, stats)), grads = grad_fn(state.params, graphdef, ref_params, mb,
                                                        kl_coef, normalize)
            return jax.tree.map(jnp.add, carry, (grads, loss_sum, denom, stats)), None

        zero = jnp.zeros((), jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, state.params), zero, zero,
                {"kl_sum": zero, "num_tokens": zero})
        (grads, loss_sum, denom, stats), _ = jax.lax.scan(accumulate, init, micro)
        inv_denom = mean_loss(jnp.float32(1.0), denom)  # 1 / denom, or 0 without tokens
        grads = jax.tree.map(lambda g: g * inv_denom.astype(g.dtype), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {
            "loss": mean_loss(loss_sum, denom),
            "kl": mean_loss(stats["kl_sum"], stats["num_tokens"]),
            "grad_norm": optax.tree.norm(grads),
            "num_tokens": stats["num_tokens"],
        }
        if schedule_fn is not None:
            metrics["lr"] = jnp.asarray(schedule_fn(state.step), jnp.float32)
        new_state = state.replace(params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=0)


def step_prompts(num_questions: int, prompts_per_step: int, seed: int, step: int) -> np.ndarray:
    """Question indices of update ``step``: consecutive slices of a per-epoch permutation
    (seed, epoch), the remainder of each epoch dropped, so no prompt repeats in a step and
    a resumed run sees the same prompts."""
    per_epoch = num_questions // prompts_per_step
    if per_epoch < 1:
        raise ValueError(f"prompts_per_step={prompts_per_step} > {num_questions} questions")
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_questions)
    return order[index * prompts_per_step : (index + 1) * prompts_per_step]


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of update ``step`` (independent streams per (seed, step))."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] & 0x7FFFFFFF)


@functools.lru_cache(maxsize=4)
def _optimizer_and_step(graphdef, optimizer_args: tuple, kl_coef, normalize, num_micro_batches):
    """(tx, jitted step) per configuration, so repeated or resumed ``train_online`` calls in
    one process (a notebook, a sweep, the tests) reuse one compiled step."""
    tx, schedule_fn = make_optimizer(**dict(optimizer_args))
    return tx, make_pg_train_step(graphdef, tx, kl_coef=kl_coef, normalize=normalize,
                                  num_micro_batches=num_micro_batches, schedule_fn=schedule_fn)


def play_with_ids(model, tokenizer, env, questions, *, num_samples: int,
                  sampling: SamplingParams, seed: int, batch_size: int = 64):
    """Multi-turn episodes as ``rollout.play_episodes`` plays them (same keys, so the same
    first turn), keeping per episode and turn the prompt ids the policy saw and the ids
    it sampled.

    One difference, so the next turn's context holds exactly the sampled ids: a reply
    enters the dialogue decoded WITH its special tokens and unstripped (only a final stop
    token is removed; the template closes the turn). ``play_episodes`` drops special
    tokens and strips, which would hide, and so never penalise, a stray ``<|user|>`` in a
    reply (on the toy task RL then learned to emit them).

    Returns (episodes, turns, generated): ``turns[i]`` is a list of (prompt_ids,
    reply_ids) per turn of episode i; ``generated`` counts every sampled token.
    """
    episodes = [Episode(env, q) for q in questions for _ in range(num_samples)]
    sample_idx = [j for _ in questions for j in range(num_samples)]
    turns: list[list[tuple[list[int], list[int]]]] = [[] for _ in episodes]
    generated = 0
    for turn in range(1, env.max_turns + 1):
        live = [i for i, e in enumerate(episodes) if not e.done]
        if not live:
            break
        prompts = [encode_prompt(tokenizer, episodes[i].messages) for i in live]
        keys = episode_keys(seed, [episodes[i].question.prompt_id for i in live],
                            [sample_idx[i] for i in live], turn)
        outputs = generate_batched(model, prompts, keys, sampling, batch_size=batch_size)
        for i, prompt, (reply, _) in zip(live, prompts, outputs):
            generated += len(reply)
            turns[i].append((list(prompt), list(reply)))
            body = reply[:-1] if reply and reply[-1] in sampling.stop_ids else reply
            episodes[i].step(tokenizer.decode(body, skip_special_tokens=False))
    return episodes, turns, generated


def episode_example(turns: Sequence[tuple[list[int], list[int]]], advantage: float = 0.0):
    """One training row of an episode: last context + last reply, loss on sampled ids.

    Returns (SFTExample with weight = advantage, number of turns left out because their
    sampled ids are not where the later context has them).
    """
    last_prompt, last_reply = turns[-1]
    tokens = np.asarray(list(last_prompt) + list(last_reply), np.int32)
    mask = np.zeros(len(tokens), bool)
    left_out = 0
    for prompt, reply in turns:
        start, end = len(prompt), len(prompt) + len(reply)
        if tokens[:end].tolist() == list(prompt) + list(reply):
            mask[start:end] = True
        else:
            left_out += 1
    return SFTExample(tokens, mask, float(advantage)), left_out


def _read_history(metrics_path: str | None, upto: int) -> list[dict]:
    """Metrics lines of updates 1..upto; later lines (past the restored checkpoint) are
    dropped from the file, since those updates will be redone."""
    if not metrics_path or not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in lines if r["step"] <= upto]
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    return kept


def train_online(
    model: nnx.Module,
    ref_model: nnx.Module,
    tokenizer,
    env,
    questions: Sequence,
    *,
    steps: int,
    prompts_per_step: int,
    num_samples: int,
    sampling: SamplingParams,
    learning_rate: float,
    warmup_ratio: float = 0.0,
    schedule: str = "constant",
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    kl_coef: float = 1e-3,
    gamma: float = 1.0,
    lam: float = 0.5,
    adv_eps: float = 1e-6,
    loss_normalize: str = "token",
    num_micro_batches: int = 1,
    seq_len: int | None = None,
    rollout_batch_size: int = 64,
    seed: int = 0,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 10,
    metrics_path: str | None = None,
    progress: bool = True,
) -> dict:
    """Train ``model`` (updated IN PLACE) by online RL for ``steps`` updates in total.

    Each update: ``prompts_per_step`` questions (``step_prompts``) x ``num_samples``
    episodes played by the current policy; GRPO advantages of the DRIFT return (gamma,
    lam, the env's format penalty); one ``make_pg_train_step`` update against
    ``ref_model`` (frozen; same architecture). ``seq_len`` fixes the padded training
    length (one compile); None pads each update to the bucket of its longest episode.

    With ``checkpoint_dir`` the run resumes from the newest checkpoint; prompts and
    sampling keys depend only on (seed, step), so a resumed run replays the same data.
    ``metrics_path`` gets one JSON line per update and carries the cost totals over a
    resume; lines past the restored update (all of them on a fresh start) are dropped.

    Returns stats: steps, episodes, generated_tokens (sum over updates), trained_tokens
    (real tokens through the policy's forward+backward; the reference's forward sees the
    same), supervised_tokens (sampled ids in the loss), left_out_turns, wall_s = rollout_s (sampling, scoring, tokenising) +
    train_s (the jitted update), mean_return_first_last and success_rate_first_last
    (means over the first and last tenth of the updates). Without ``metrics_path`` a resumed
    run counts only its own updates.
    """
    if sampling.temperature != 1.0 or sampling.top_p < 1.0 or sampling.top_k:
        raise ValueError(
            f"online RL needs samples from the policy itself (temperature 1, top_p 1, top_k 0), "
            f"got {sampling}; a tempered sampler makes the policy gradient biased")
    batch_rows = prompts_per_step * num_samples
    if batch_rows % num_micro_batches:
        raise ValueError(f"prompts_per_step * num_samples = {batch_rows} is not divisible by "
                         f"num_micro_batches={num_micro_batches}")
    step_prompts(len(questions), prompts_per_step, seed, 0)  # validates the sizes
    optimizer_args = (("learning_rate", learning_rate), ("total_steps", steps),
                      ("warmup_ratio", warmup_ratio), ("schedule", schedule),
                      ("weight_decay", weight_decay), ("grad_clip", grad_clip))
    tx, step_fn = _optimizer_and_step(nnx.split(model, nnx.Param, ...)[0], optimizer_args,
                                      kl_coef, loss_normalize, num_micro_batches)
    graphdef, state = create_train_state(model, tx, seed)
    # Own buffers: the step donates them, and the caller's model (or ref_model, if it is
    # the same object) must stay valid.
    state = state.replace(params=jax.tree.map(jnp.copy, state.params))
    ref_params = nnx.state(ref_model, nnx.Param)
    if jax.tree.structure(ref_params) != jax.tree.structure(state.params) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(state.params))):
        raise ValueError("ref_model must have the same architecture as model")
    ckpt = Checkpointer(checkpoint_dir, save_every=checkpoint_every, keep=2) if checkpoint_dir else None
    if ckpt is not None and (ckpt.latest_step() or 0) > 0:
        state = ckpt.restore(state)
    start = int(state.step)
    history = _read_history(metrics_path, start)
    group_ids_n = np.repeat(np.arange(prompts_per_step), num_samples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    log_cm = open(metrics_path, "a") if metrics_path else contextlib.nullcontext()
    bar_cm = tqdm(total=steps, initial=start, desc="online RL", disable=not progress, dynamic_ncols=True)
    with log_cm as log_file, bar_cm as bar:
        for step in range(start, steps):
            t0 = time.perf_counter()
            qs = [questions[i] for i in step_prompts(len(questions), prompts_per_step, seed, step)]
            episodes, turns, generated = play_with_ids(
                nnx.merge(graphdef, state.params), tokenizer, env, qs, num_samples=num_samples,
                sampling=sampling, seed=step_seed(seed, step), batch_size=rollout_batch_size)
            returns_n = np.asarray([trajectory_returns(e.to_record(), gamma, lam) for e in episodes])
            adv_n = np.asarray(group_advantages(returns_n, group_ids_n, prompts_per_step, adv_eps))
            examples, left_out = zip(*(episode_example(t, a) for t, a in zip(turns, adv_n)))
            longest = max(len(x.tokens) for x in examples)
            if seq_len is not None and longest > seq_len:
                raise ValueError(f"update {step + 1}: an episode of {longest} tokens does not fit "
                                 f"seq_len={seq_len}; raise seq_len (online RL never truncates: it "
                                 "would change the context the replies were sampled in)")
            batch = collate(list(examples), seq_len or bucket_length(longest), pad_id)
            batch["advantages"] = batch.pop("weights")
            t1 = time.perf_counter()
            state, metrics = step_fn(state, ref_params, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            t2 = time.perf_counter()
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise FloatingPointError(
                    f"non-finite loss {metrics['loss']} / grad_norm {metrics['grad_norm']} at update "
                    f"{step + 1}; last checkpoint: {ckpt.latest_step() if ckpt else None}. "
                    "Lower the learning rate.")
            record = {
                "step": step + 1, **metrics,
                "mean_return": float(returns_n.mean()),
                "success_rate": float(np.mean([e.t_star is not None for e in episodes])),
                "mean_turns": float(np.mean([e.turn for e in episodes])),
                "generated_tokens": int(generated),
                "trained_tokens": int(sum(len(x.tokens) for x in examples)),
                "supervised_tokens": int(sum(int(x.loss_mask.sum()) for x in examples)),
                "left_out_turns": int(sum(left_out)),
                "rollout_s": t1 - t0, "train_s": t2 - t1, "wall_time": time.time(),
            }
            history.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if ckpt is not None:
                ckpt.save(step + 1, state)
            bar.update(1)
            bar.set_postfix(ret=f"{record['mean_return']:.3f}", kl=f"{metrics['kl']:.4f}")
    if ckpt is not None:
        ckpt.save(int(state.step), state, force=True)
        ckpt.close()
    nnx.update(model, state.params)

    def total(key):
        return sum(r[key] for r in history)

    def ends(key):  # means over the first and last tenth of the updates: the curve's ends
        tenth = max(1, len(history) // 10)
        return [float(np.mean([r[key] for r in part])) for part in (history[:tenth], history[-tenth:])]

    return {
        "steps": int(state.step),
        "episodes": int(state.step) * batch_rows,
        **{k: int(total(k)) for k in ("generated_tokens", "trained_tokens", "supervised_tokens",
                                      "left_out_turns")},
        "rollout_s": total("rollout_s"),
        "train_s": total("train_s"),
        "wall_s": total("rollout_s") + total("train_s"),
        "mean_return_first_last": ends("mean_return") if history else None,
        "success_rate_first_last": ends("success_rate") if history else None,
    }
