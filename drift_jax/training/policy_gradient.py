"""Online multi-turn RL, the baseline DRIFT is measured against (in the spirit of UFO).

UFO (``docs/method.md``, "The online-RL baseline") runs PPO over whole multi-turn episodes. Here,
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

The loss is on the token ids actually sampled (``episodes.play_episodes(...,
return_ids=True)``), never on re-tokenised text (``encode_dialogue(..., supervise="all")``). A reply cut at ``max_new_tokens`` has no
sampled end-of-turn token, yet the template renders one; training on it is off-policy,
and on the toy task it let the policy drift into never ending a turn (k3 ~ 80 per token).
One row per episode: the context of its last turn + its last reply; a turn whose sampled
ids are not where that context has them (decode -> encode does not round-trip; never on
the toy task) is left out of the loss and counted (``left_out_turns``).

The library holds the pieces: advantages, the k3 estimate, the loss (``pg_loss_fn`` plugs
into ``train.make_train_step``) and ``make_batch_fn``, which plays an update's episodes
with the current policy for ``train.train_loop``. The stage that wires them into a run
is ``experiments/online_rl.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drift_jax.data.batching import SFTExample, bucket_length, collate
from drift_jax.rollout.episodes import play_episodes
from drift_jax.rollout.sampling import SamplingParams
from drift_jax.training.losses import reduce_masked, token_cross_entropy
from drift_jax.training.objective import LossFn, next_token_ce, target_mask
from drift_jax.weights import trajectory_returns

NORMALIZE_MODES = ("token", "sequence")
_LOG_RATIO_CLIP = 20.0


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
    _check_normalize(normalize)
    logp_bt = jnp.asarray(logp_bt, jnp.float32)
    ref_logp_bt = jax.lax.stop_gradient(jnp.asarray(ref_logp_bt, jnp.float32))
    adv_b = jax.lax.stop_gradient(jnp.asarray(advantages_b, jnp.float32))
    per_token_bt = -adv_b[:, None] * logp_bt + kl_coef * kl_k3(logp_bt, ref_logp_bt)
    return reduce_masked(per_token_bt, loss_mask_bt, None, normalize)


def pg_loss(logits_btv: jax.Array, targets_bt: jax.Array, loss_mask_bt: jax.Array,
            advantages_b: jax.Array, ref_logp_bt: jax.Array, kl_coef: float = 1e-3,
            normalize: str = "token") -> tuple[jax.Array, jax.Array]:
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


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")


def pg_loss_fn(kl_coef: float = 1e-3, normalize: str = "token",
               loss_chunk_size: int | str | None = "auto") -> LossFn:
    """``pg_token_loss`` as a ``train.make_train_step`` loss; ``aux`` = the reference
    params (same graphdef). Batch: tokens, valid, loss_mask [B, T]; advantages [B].
    Stats: kl_sum (k3 summed over supervised tokens) and num_tokens."""
    _check_normalize(normalize)

    def loss_fn(graphdef, params, mb, ref_params):
        mask_bt = target_mask(mb)
        logp_bt = -next_token_ce(nnx.merge(graphdef, params), mb, loss_chunk_size)
        ref_logp_bt = jax.lax.stop_gradient(-next_token_ce(nnx.merge(graphdef, ref_params), mb,
                                                           loss_chunk_size))
        loss_sum, denom = pg_token_loss(logp_bt, mask_bt, mb["advantages"], ref_logp_bt, kl_coef, normalize)
        kl_bt = kl_k3(jax.lax.stop_gradient(logp_bt), ref_logp_bt)
        return loss_sum, denom, {"kl_sum": jnp.sum(jnp.where(mask_bt, kl_bt, 0.0)),
                                 "num_tokens": jnp.sum(mask_bt).astype(jnp.float32)}

    return loss_fn


def check_on_policy(sampling: SamplingParams) -> None:
    """Online RL needs samples from the policy itself: a tempered or truncated sampler
    makes the policy gradient biased."""
    if sampling.temperature != 1.0 or sampling.top_p < 1.0 or sampling.top_k:
        raise ValueError(
            f"online RL needs samples from the policy itself (temperature 1, top_p 1, top_k 0), "
            f"got {sampling}; a tempered sampler makes the policy gradient biased")


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


def episode_example(turns: Sequence[tuple[list[int], list[int]]]):
    """One training row of an episode: last context + last reply, loss on sampled ids.

    Returns (SFTExample of the row's tokens and loss mask, number of turns left out because
    their sampled ids are not where the later context has them). The row's advantage goes
    into the batch beside it (``collate(..., row_scalars={"advantages": ...})``).
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
    return SFTExample(tokens, mask), left_out


def compute_copy(params, dtype):
    """``params`` with their floating leaves in ``dtype`` (None: unchanged)."""
    if dtype is None:
        return params
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def make_batch_fn(graphdef: nnx.GraphDef, tokenizer, env, questions: Sequence, *,
                  prompts_per_step: int, num_samples: int, sampling: SamplingParams,
                  gamma: float, lam: float, adv_eps: float = 1e-6, seq_len: int | None = None,
                  batch_size: int = 64, max_len: int | None = None, seed: int = 0, engine="continuous",
                  sample_dtype=None):
    """``batch_fn(step, state) -> (batch, info)`` for ``train.train_loop``: update
    ``step``'s episodes played by the policy in ``state``.

    ``prompts_per_step`` questions (``step_prompts``) x ``num_samples`` episodes
    (sampling keys from ``step_seed``), so a resumed run replays the same data; GRPO
    advantages of the DRIFT return (gamma, lam, the env's format penalty); one row per
    episode (``episode_example``), padded to ``seq_len`` (one compile) or, if None, to
    the bucket of the update's longest episode. info: mean_return, success_rate,
    mean_turns, generated_tokens, trained_tokens (real tokens through the policy's
    forward+backward), supervised_tokens (sampled ids in the loss), left_out_turns, and
    the sampler's (``engine``: a kind or ``EngineOptions``, ``episodes.make_sampler``)
    kind as "sampler", its slot_utilization and prefill_tokens. ``sample_dtype`` (e.g.
    bf16): the episodes are played by a copy of the policy in this dtype, made once per
    update, rather than by float32 master weights cast at every token.
    """
    check_on_policy(sampling)
    step_prompts(len(questions), prompts_per_step, seed, 0)  # validates the sizes
    group_ids_n = np.repeat(np.arange(prompts_per_step), num_samples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batch_fn(step: int, state):
        qs = [questions[i] for i in step_prompts(len(questions), prompts_per_step, seed, step)]
        work: dict = {}
        episodes, generated, turns = play_episodes(
            nnx.merge(graphdef, compute_copy(state.params, sample_dtype)), tokenizer, env, qs, num_samples=num_samples,
            sampling=sampling, seed=step_seed(seed, step), batch_size=batch_size, max_len=max_len,
            progress=False, return_ids=True, engine=engine, stats=work)
        returns_n = np.asarray([trajectory_returns(e.to_record(), gamma, lam) for e in episodes])
        adv_n = np.asarray(group_advantages(returns_n, group_ids_n, prompts_per_step, adv_eps))
        examples, left_out = zip(*(episode_example(t) for t in turns))
        longest = max(len(x.tokens) for x in examples)
        if seq_len is not None and longest > seq_len:
            raise ValueError(f"update {step + 1}: an episode of {longest} tokens does not fit "
                             f"seq_len={seq_len}; raise seq_len (online RL never truncates: it "
                             "would change the context the replies were sampled in)")
        batch = collate(list(examples), seq_len or bucket_length(longest), pad_id,
                        row_scalars={"advantages": adv_n})
        info = {
            "mean_return": float(returns_n.mean()),
            "success_rate": float(np.mean([e.t_star is not None for e in episodes])),
            "mean_turns": float(np.mean([e.turn for e in episodes])),
            "generated_tokens": int(generated),
            "trained_tokens": int(sum(len(x.tokens) for x in examples)),
            "supervised_tokens": int(sum(int(x.loss_mask.sum()) for x in examples)),
            "left_out_turns": int(sum(left_out)),
            "sampler": work["kind"],
            "slot_utilization": float(work["slot_utilization"]),
            "prefill_tokens": int(work["prefill_tokens"]),
        }
        return batch, info

    return batch_fn
