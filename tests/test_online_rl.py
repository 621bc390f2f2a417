"""Properties of drift_jax.training.policy_gradient: GRPO advantages, the policy-gradient loss against the
REINFORCE and k3 formulas, its loss function through the shared train step (== a direct
jax.grad of ``pg_loss``; K micro-batches == one batch), the episode rows on sampled ids,
and ``make_batch_fn`` in ``loop.train_loop`` on the secret task (compiles once, counts
its cost, resumes to the same result as a straight run)."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.data.chat import encode_dialogue, encode_prompt, end_of_turn_id
from drift_jax.envs.base import FEEDBACK
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer
from drift_jax.models import ModelConfig, Transformer
from drift_jax.rollout.episodes import decode_reply, play_episodes
from drift_jax.rollout.interface import ENGINES, EngineOptions
from drift_jax.rollout.sampling import SamplingParams
from drift_jax.training import policy_gradient
from drift_jax.training.checkpoint import Checkpointer
from drift_jax.training.loop import train_loop
from drift_jax.training.losses import mean_loss
from drift_jax.training.policy_gradient import episode_example, group_advantages, kl_k3, pg_loss
from drift_jax.training.step import make_train_step
from drift_jax.training.train_state import TrainState, create_train_state, make_optimizer

from helpers import spy_samplers

try:  # the stage's run totals (conftest puts the repo root on sys.path)
    from experiments.online_rl import run_stats
except ImportError:  # pragma: no cover
    run_stats = None

SETTINGS = settings(max_examples=30, deadline=None)

# ---------------------------------------------------------------- advantages


@st.composite
def grouped_returns(draw, n=12, max_groups=4):
    """(returns_n, group_ids_n, G) on a grid of 0.25 (exact in float32), N fixed so that
    the jitted function compiles once per G."""
    g = draw(st.integers(1, max_groups))
    ids = np.asarray(draw(st.lists(st.integers(0, g - 1), min_size=n, max_size=n)), np.int32)
    ids[:g] = np.arange(g)  # every group non-empty
    r = np.asarray(draw(st.lists(st.integers(-8, 8), min_size=n, max_size=n)), np.float32) / 4
    return r, ids, g


@SETTINGS
@given(grouped_returns())
def test_advantages_sum_to_zero_per_group_with_unit_std(data):
    r, ids, g = data
    adv = np.asarray(group_advantages(r, ids, g, eps=0.0), np.float64)
    for k in range(g):
        a = adv[ids == k]
        assert abs(a.sum()) < 1e-4
        if np.ptp(r[ids == k]) == 0:
            np.testing.assert_array_equal(a, 0.0)  # equal returns: no preference
        else:
            assert np.std(a) == pytest.approx(1.0, rel=1e-4)  # population std


@SETTINGS
@given(grouped_returns(), st.floats(0.25, 8.0), st.floats(-4.0, 4.0))
def test_advantages_are_shift_and_scale_invariant(data, scale, shift):
    r, ids, g = data
    base = group_advantages(r, ids, g, eps=0.0)
    moved = group_advantages(scale * r + shift, ids, g, eps=0.0)
    chex.assert_trees_all_close(moved, base, atol=1e-4)


# ---------------------------------------------------------------- the loss against hand formulas


def loss_inputs(seed, b=3, t=4, v=7):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.7
    mask[0] = True
    mask[-1] = False  # a row without trained tokens
    adv = rng.normal(size=b).astype(np.float32)
    ref_logp = np.log(rng.dirichlet(np.ones(v), (b, t))).astype(np.float32)
    ref_logp = np.take_along_axis(ref_logp, targets[..., None], -1)[..., 0]
    return logits, targets, mask, adv, ref_logp


def np_logp_and_dlogp(logits, targets):
    """log pi(target) and d log pi(target) / d logits = onehot - softmax, float64."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(x.shape[-1])[targets]
    return np.log((p * onehot).sum(-1)), onehot - p


def loss_sum_grad(logits, *args, **kwargs):
    fn = jax.jit(lambda x: pg_loss(x, *args, **kwargs)[0])
    return jax.grad(fn)(jnp.asarray(logits))


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_gradient_without_kl_is_the_reinforce_formula(normalize):
    logits, targets, mask, adv, ref_logp = loss_inputs(0)
    logp, dlogp = np_logp_and_dlogp(logits, targets)
    per_token = mask / (1.0 if normalize == "token" else np.maximum(mask.sum(1, keepdims=True), 1))
    # d/dlogits of sum_t -A_b log pi(y_bt) (times 1/n_b for "sequence"): REINFORCE.
    expected = -(adv[:, None] * per_token)[..., None] * dlogp
    grad = loss_sum_grad(logits, targets, mask, adv, ref_logp, kl_coef=0.0, normalize=normalize)
    np.testing.assert_allclose(grad, expected, atol=1e-5)
    loss_sum, denom = pg_loss(logits, targets, mask, adv, ref_logp, 0.0, normalize)
    np.testing.assert_allclose(loss_sum, np.sum(-adv[:, None] * per_token * logp), rtol=1e-5)
    assert denom == (mask.sum() if normalize == "token" else 2)


def test_gradient_with_zero_advantages_is_the_k3_gradient():
    logits, targets, mask, adv, ref_logp = loss_inputs(1)
    coef = 0.3
    logp, dlogp = np_logp_and_dlogp(logits, targets)
    # d/dlogp of k3 = exp(ref - logp) - (ref - logp) - 1 is 1 - exp(ref - logp).
    expected = (coef * mask * (1.0 - np.exp(ref_logp - logp)))[..., None] * dlogp
    grad = loss_sum_grad(logits, targets, mask, np.zeros_like(adv), ref_logp, kl_coef=coef)
    np.testing.assert_allclose(grad, expected, atol=1e-5)
    loss_sum, _ = pg_loss(logits, targets, mask, np.zeros_like(adv), ref_logp, coef)
    d = ref_logp - logp
    np.testing.assert_allclose(loss_sum, coef * np.sum(mask * (np.exp(d) - d - 1)), rtol=1e-5)


def test_kl_term_vanishes_with_its_gradient_when_policy_is_the_reference():
    logits, targets, mask, adv, _ = loss_inputs(2)
    ref_logp, _ = np_logp_and_dlogp(logits, targets)
    loss_sum, _ = pg_loss(logits, targets, mask, np.zeros_like(adv), ref_logp.astype(np.float32), 1.0)
    assert abs(float(loss_sum)) < 1e-5
    grad = loss_sum_grad(logits, targets, mask, np.zeros_like(adv), ref_logp.astype(np.float32), kl_coef=1.0)
    np.testing.assert_allclose(grad, 0.0, atol=1e-5)


@SETTINGS
@given(st.floats(-30.0, 30.0), st.floats(-30.0, 30.0))
def test_k3_is_non_negative_and_zero_only_at_equality(logp, ref_logp):
    k3 = float(kl_k3(jnp.float32(logp), jnp.float32(ref_logp)))
    # exp(d) - d - 1 in float32 rounds to about -6e-8 for |d| ~ 1e-7.
    assert np.isfinite(k3) and k3 >= -1e-6
    if abs(logp - ref_logp) > 1e-2:
        assert k3 > 0.0


def test_masked_garbage_does_not_leak():
    logits, targets, mask, adv, ref_logp = loss_inputs(3)
    logits[~mask] = np.inf
    ref_logp[~mask] = -np.inf
    loss_sum, denom = pg_loss(logits, targets, mask, adv, ref_logp, 0.1)
    assert np.isfinite(loss_sum) and np.isfinite(denom)


# ---------------------------------------------------------------- the train step

CFG = ModelConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_dim=8)
TX, _ = make_optimizer(1e-2, total_steps=10, warmup_steps=0)


def step_batch(seed, b=4, t=8):
    rng = np.random.default_rng(seed)
    valid = np.ones((b, t), bool)
    valid[-1, 5:] = False  # right padding, as collate writes it
    loss_mask = valid & (np.arange(t) >= 3)
    return {"tokens": rng.integers(1, CFG.vocab_size, (b, t)).astype(np.int32), "valid": valid,
            "loss_mask": loss_mask, "advantages": rng.normal(size=b).astype(np.float32)}


def pg_step(graphdef, m=1, **kwargs):
    return make_train_step(graphdef, TX, num_micro_batches=m, loss_fn=policy_gradient.pg_loss_fn(**kwargs))


def assert_close_on_tensor_scale(got, want, rtol=1e-5):
    """Sums in another order differ by rounding relative to a tensor's scale, not to each
    (possibly ~0) element."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max(initial=0.0) <= rtol * np.abs(want).max(initial=0.0)


@pytest.mark.parametrize("normalize, chunk", [("token", 0), ("sequence", 4)])
def test_pg_step_is_one_optimizer_update_of_the_direct_pg_loss_gradient(normalize, chunk):
    """Through the shared step, ``pg_loss_fn`` is AdamW applied to jax.grad of
    ``pg_loss``'s mean on the same batch, written out here from the policy's and the
    reference's logits; also with the LM head + loss in chunks (T - 1 = 7, chunk 4)."""
    graphdef, state = create_train_state(Transformer(CFG, rngs=nnx.Rngs(0)), TX)
    ref_params = nnx.state(Transformer(CFG, rngs=nnx.Rngs(1)), nnx.Param)  # KL is not 0
    batch = step_batch(1)
    tokens, valid = batch["tokens"], batch["valid"]
    inputs, in_valid, targets = tokens[:, :-1], valid[:, :-1], tokens[:, 1:]
    mask = batch["loss_mask"][:, 1:] & valid[:, 1:] & in_valid
    kl_coef = 0.1

    @jax.jit  # jitted only for speed: op by op, the model is slow
    def logp_of(params):
        logits = nnx.merge(graphdef, params)(inputs, in_valid)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]

    ref_logp = logp_of(ref_params)

    @jax.jit
    def mean_pg_and_grad(params):
        def mean_pg(p):
            logits = nnx.merge(graphdef, p)(inputs, in_valid)
            return mean_loss(*pg_loss(logits, targets, mask, batch["advantages"], ref_logp, kl_coef, normalize))

        return jax.value_and_grad(mean_pg)(params)

    loss, grads = mean_pg_and_grad(state.params)
    updates, opt_state = jax.jit(TX.update)(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    kl_sum = jnp.sum(jnp.where(mask, kl_k3(logp_of(state.params), ref_logp), 0.0))

    step_fn = pg_step(graphdef, kl_coef=kl_coef, normalize=normalize, loss_chunk_size=chunk)
    new, metrics = step_fn(state, batch, ref_params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_sum"], kl_sum, rtol=1e-5)
    assert float(kl_sum) > 0
    assert metrics["num_tokens"] == mask.sum() and metrics["num_input_tokens"] == valid.sum()
    assert metrics["denominator"] == (mask.sum() if normalize == "token" else (mask.sum(1) > 0).sum())
    jax.tree.map(assert_close_on_tensor_scale, new.opt_state, opt_state)
    chex.assert_trees_all_close(new.params, params, rtol=1e-5, atol=1e-6)


def test_pg_update_at_qwen_vocab_compiles_without_full_logits():
    """The whole online-RL update (policy and reference forward, backward, AdamW) at
    vocabulary 151,936 and 4,096 tokens: with the default chunked LM head + loss, the
    compiled program's scratch memory stays far below one float32 [B, T, V] array (the
    policy's or the reference's), so neither set of full logits exists."""
    b, t, v = 1, 4096, 151_936
    cfg = ModelConfig(vocab_size=v, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    state = jax.eval_shape(lambda p: TrainState(
        params=p, opt_state=TX.init(p), step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(0))),
        params)
    batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32), "valid": jax.ShapeDtypeStruct((b, t), bool),
             "loss_mask": jax.ShapeDtypeStruct((b, t), bool), "advantages": jax.ShapeDtypeStruct((b,), jnp.float32)}
    step_fn = pg_step(graphdef)  # loss_chunk_size "auto": chunks at a 152k vocabulary
    compiled = step_fn.lower(state, batch, params).compile()
    full_logits_bytes = b * t * v * 4
    # Below half of it: not even a bfloat16 [B, T, V] array fits (the compiled step holds
    # about a third: a few 512-position chunks' float32 logits and gradients at once).
    assert compiled.memory_analysis().temp_size_in_bytes < full_logits_bytes / 2
    unchunked = pg_step(graphdef, loss_chunk_size=0).lower(state, batch, params).compile()
    assert unchunked.memory_analysis().temp_size_in_bytes > full_logits_bytes  # the check can fail


def test_step_two_micro_batches_equal_one_batch_and_zero_advantage_at_reference_is_still():
    graphdef, state = create_train_state(Transformer(CFG, rngs=nnx.Rngs(0)), TX)
    ref = jax.tree.map(jnp.copy, state.params)
    batch = step_batch(0)
    results = {}
    for m in (1, 2):
        step_fn = pg_step(graphdef, m, kl_coef=0.1)
        new, metrics = step_fn(jax.tree.map(jnp.copy, state), batch, ref)
        results[m] = (new.params, metrics)
    chex.assert_trees_all_close(results[1], results[2], rtol=1e-5, atol=1e-6)
    # Zero advantages and policy == reference: the loss, the KL and the gradient are 0.
    _, metrics = step_fn(jax.tree.map(jnp.copy, state), {**batch, "advantages": np.zeros(4, np.float32)}, ref)
    assert float(metrics["loss"]) == 0.0 and float(metrics["kl_sum"]) == 0.0
    assert float(metrics["grad_norm"]) < 1e-6
    # The reference params are a jit argument: other values, the same program.
    other_ref = jax.tree.map(lambda x: 1.5 * x, ref)
    _, metrics = step_fn(jax.tree.map(jnp.copy, state), batch, other_ref)
    assert float(metrics["kl_sum"]) > 0 and step_fn._cache_size() == 1


def test_reference_stored_in_the_compute_dtype_gives_the_same_update():
    """The online-RL stage keeps its frozen reference in the compute dtype (bf16): every
    matmul casts the float32 master weights to it anyway, so the update (loss, KL,
    parameters) is the same as with a float32 reference."""
    cfg = CFG.replace(dtype=jnp.bfloat16)
    graphdef, state = create_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), TX)
    ref_f32 = nnx.state(Transformer(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    ref_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ref_f32)
    step_fn = pg_step(graphdef, kl_coef=0.1)
    results = [step_fn(jax.tree.map(jnp.copy, state), step_batch(2), ref) for ref in (ref_f32, ref_bf16)]
    assert float(results[0][1]["kl_sum"]) > 0
    chex.assert_trees_all_equal(results[0], results[1])


def test_pg_loss_fn_and_on_policy_check_reject_bad_settings():
    with pytest.raises(ValueError, match="normalize"):
        policy_gradient.pg_loss_fn(normalize="weight_sum")
    policy_gradient.check_on_policy(SamplingParams(temperature=1.0, max_new_tokens=3))
    for tempered in (SamplingParams(temperature=0.7), SamplingParams(top_p=0.9), SamplingParams(top_k=5)):
        with pytest.raises(ValueError, match="temperature 1"):
            policy_gradient.check_on_policy(tempered)


# ---------------------------------------------------------------- prompts per step


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 10), st.integers(0, 3))
def test_step_prompts_are_deterministic_and_never_repeat_within_an_epoch(n, p, seed):
    if p > n:
        with pytest.raises(ValueError, match="prompts_per_step"):
            policy_gradient.step_prompts(n, p, seed, 0)
        return
    per_epoch = n // p
    epoch = np.concatenate([policy_gradient.step_prompts(n, p, seed, s) for s in range(per_epoch)])
    assert len(epoch) == per_epoch * p and len(set(epoch.tolist())) == len(epoch)
    np.testing.assert_array_equal(policy_gradient.step_prompts(n, p, seed, per_epoch + 1),
                                  policy_gradient.step_prompts(n, p, seed, per_epoch + 1))


# ---------------------------------------------------------------- the online loop


@pytest.fixture(scope="module")
def secret():
    tokenizer = build_tokenizer(num_values=10)
    env = SecretGuessEnv(num_values=10, id_length=1, max_turns=2, max_answers=2)
    questions = env.make_questions(6, seed=0, prefix="q")
    sampling = SamplingParams(temperature=1.0, max_new_tokens=3, stop_ids=(end_of_turn_id(tokenizer),))
    cfg = CFG.replace(vocab_size=len(tokenizer), tie_word_embeddings=True)
    return tokenizer, env, questions, sampling, cfg


def hand_turns(tokenizer, env, question, replies, render=None):
    """(prompt ids, reply ids) per turn for replies given as token lists, rendered into the
    dialogue the way ``play_episodes`` does (``decode_reply``; or ``render(reply_ids)``),
    plus the final messages."""
    eot = end_of_turn_id(tokenizer)
    render = render or (lambda ids: decode_reply(tokenizer, ids, (eot,)))
    messages, turns = env.initial_messages(question), []
    for k, words in enumerate(replies):
        prompt = encode_prompt(tokenizer, messages)
        reply = tokenizer.convert_tokens_to_ids(words)
        turns.append((prompt, reply))
        messages.append({"role": "assistant", "content": render(reply)})
        if k < len(replies) - 1:
            messages.append({"role": "user", "content": FEEDBACK})
    return turns, messages


def test_episode_example_trains_exactly_the_sampled_ids(secret):
    tokenizer, env, questions, _, _ = secret
    eot = "<|im_end|>"
    # Every reply ended by a sampled end-of-turn token: the same row and mask as
    # encode_dialogue(supervise="all").
    turns, messages = hand_turns(tokenizer, env, questions[0],
                                 [["<answer>A</answer>", eot], ["maybe", "B", eot]])
    example, left_out = episode_example(turns)
    expected = encode_dialogue(tokenizer, messages, supervise="all")
    np.testing.assert_array_equal(example.tokens, expected.tokens)
    np.testing.assert_array_equal(example.loss_mask, expected.loss_mask)
    assert left_out == 0

    # A reply cut at the token budget: the template's end-of-turn token after it was never
    # sampled, so it is context, not loss; everything else is as before.
    turns, messages = hand_turns(tokenizer, env, questions[0],
                                 [["<answer>A</answer>", "maybe", "C"], ["<answer>B</answer>", eot]])
    example, left_out = episode_example(turns)
    expected = encode_dialogue(tokenizer, messages, supervise="all")
    np.testing.assert_array_equal(example.tokens, expected.tokens)
    cut_eot = len(turns[0][0]) + 3
    assert example.tokens[cut_eot] == end_of_turn_id(tokenizer) and expected.loss_mask[cut_eot]
    assert not example.loss_mask[cut_eot] and left_out == 0
    np.testing.assert_array_equal(np.delete(example.loss_mask, cut_eot), np.delete(expected.loss_mask, cut_eot))

    # A sampled special token kept in the context (decode_reply) stays where it was sampled.
    turns, _ = hand_turns(tokenizer, env, questions[0], [["<|user|>", "<answer>A</answer>", eot], [eot]])
    example, left_out = episode_example(turns)
    assert left_out == 0 and example.loss_mask.sum() == 4

    # A context that does not hold a turn's sampled ids (here: a renderer that drops
    # special tokens): that turn is left out, the others stay.
    def drop_special(ids):
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    turns, _ = hand_turns(tokenizer, env, questions[0], [["<|user|>", "<answer>A</answer>", eot], [eot]],
                          render=drop_special)
    example, left_out = episode_example(turns)
    assert left_out == 1 and example.loss_mask.sum() == 1  # only the last reply's one id


def test_play_episodes_with_ids_keeps_every_sampled_id_in_the_context(secret):
    """A random policy samples special tokens mid-reply and runs out of budget: every turn
    still lands in the loss, and with or without ids the player plays the same episodes."""
    tokenizer, env, questions, sampling, cfg = secret
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    kwargs = {"num_samples": 4, "sampling": sampling, "seed": 3, "batch_size": 8, "progress": False}
    episodes, generated, turns = play_episodes(model, tokenizer, env, questions[:2], return_ids=True, **kwargs)
    reference, ref_generated = play_episodes(model, tokenizer, env, questions[:2], **kwargs)
    assert generated == ref_generated == sum(len(r) for t in turns for _, r in t) > 0
    assert any(tokenizer.convert_ids_to_tokens(r[0]) in tokenizer.all_special_tokens for t in turns
               for _, r in t if r)  # the case the ids exist for is exercised
    for e, ref, t in zip(episodes, reference, turns):
        assert e.messages == ref.messages and e.to_record() == ref.to_record()
        assert len(t) == e.turn and e.done
        assert t[0][0] == encode_prompt(tokenizer, env.initial_messages(e.question))
        for k, (prompt, reply) in enumerate(t):  # each reply enters the dialogue via decode_reply
            assert e.messages[len(env.initial_messages(e.question)) + 2 * k]["content"] == \
                decode_reply(tokenizer, reply, sampling.stop_ids)
        example, left_out = episode_example(t)
        assert left_out == 0
        assert example.loss_mask.sum() == sum(len(r) for _, r in t)


INFO_KEYS = ("mean_return", "success_rate", "mean_turns", "generated_tokens", "trained_tokens",
             "supervised_tokens", "left_out_turns")
TIMING_KEYS = ("batch_s", "step_time_s", "tokens_per_s", "wall_time")


def run_online(secret, steps, tmp, model_seed=0, sampling=None, **kwargs):
    """The online-RL stage's wiring, small: ``make_batch_fn`` + ``pg_loss_fn`` in
    ``train_loop``, checkpointing every 2 updates into ``tmp``. Returns (state, step_fn,
    metrics lines)."""
    tokenizer, env, questions, default_sampling, cfg = secret
    tx, schedule = make_optimizer(1e-2, total_steps=4, warmup_steps=0, weight_decay=0.01)
    # The reference is always seed 0; a resumed run's own init is replaced by the checkpoint.
    graphdef, state = create_train_state(Transformer(cfg, rngs=nnx.Rngs(model_seed)), tx)
    ref_params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    step_fn = kwargs.pop("step_fn", None) or make_train_step(
        graphdef, tx, schedule_fn=schedule, loss_fn=policy_gradient.pg_loss_fn(kl_coef=1e-3))
    batch_fn = policy_gradient.make_batch_fn(
        graphdef, tokenizer, env, questions, prompts_per_step=2, num_samples=4,
        sampling=sampling or default_sampling, gamma=1.0, lam=0.5, seq_len=32, batch_size=8, seed=0,
        **kwargs)
    metrics_path = tmp / "metrics.jsonl"
    with Checkpointer(tmp / "ckpt", save_every=2) as ckpt:
        state = train_loop(state, step_fn, batch_fn, steps, aux=ref_params, checkpointer=ckpt,
                                 metrics_path=str(metrics_path), desc="online RL", progress=False)
    return state, step_fn, [json.loads(x) for x in metrics_path.read_text().splitlines()]


def test_online_loop_compiles_once_counts_cost_and_resumes_like_a_straight_run(secret, tmp_path):
    straight, step_fn, lines = run_online(secret, 4, tmp_path / "straight")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        assert set(INFO_KEYS) <= r.keys()
        assert r["generated_tokens"] > 0 and r["trained_tokens"] > r["supervised_tokens"] > 0
        # The loss covers exactly the sampled tokens: every one, nothing else.
        assert r["left_out_turns"] == 0 and r["supervised_tokens"] == r["generated_tokens"] == r["num_tokens"]
        assert r["trained_tokens"] == r["num_input_tokens"]
        assert r["sampler"] == "continuous" and 0 < r["slot_utilization"] <= 1 and r["prefill_tokens"] > 0
    untrained = nnx.state(Transformer(secret[4], rngs=nnx.Rngs(0)), nnx.Param)
    assert not jax.tree.all(jax.tree.map(np.array_equal, straight.params, untrained))

    # Half the updates, then a new "process" (new model, new checkpointer, same step)
    # resumes from the checkpoint of update 2 and goes on to 4.
    run_online(secret, 2, tmp_path / "resumed", step_fn=step_fn)
    resumed, _, resumed_lines = run_online(secret, 4, tmp_path / "resumed", model_seed=5, step_fn=step_fn)
    assert int(resumed.step) == int(straight.step) == 4
    chex.assert_trees_all_equal(resumed.params, straight.params)  # same prompts, keys, program
    chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING_KEYS}  # noqa: E731
    assert [strip(r) for r in resumed_lines] == [strip(r) for r in lines]
    assert step_fn._cache_size() == 1  # 8 updates over 3 calls, fixed seq_len: one compile

    if run_stats is not None:
        stats = run_stats(lines, episodes=4 * 2 * 4)
        assert stats["steps"] == 4 and stats["episodes"] == 32
        for key in ("generated_tokens", "trained_tokens", "supervised_tokens", "left_out_turns"):
            assert stats[key] == sum(r[key] for r in lines), key
        assert stats["rollout_s"] == pytest.approx(sum(r["batch_s"] for r in lines))
        assert stats["train_s"] == pytest.approx(sum(r["step_time_s"] for r in lines))
        assert stats["wall_s"] == pytest.approx(stats["rollout_s"] + stats["train_s"])
        assert len(stats["mean_return_first_last"]) == 2
        assert stats["mean_return_first_last"][0] == pytest.approx(lines[0]["mean_return"])


def test_online_batches_are_played_by_the_configured_sampler_and_agree(secret, monkeypatch):
    """Each kind (by name or ``EngineOptions``) runs its own sampler and says so in the
    update's info; sampling keys are per (seed, prompt, sample, turn), so both samplers
    play the same episodes at temperature 1 (as the rollout file test): the same batch."""
    tokenizer, env, questions, sampling, cfg = secret
    graphdef, state = create_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), TX)
    ran = spy_samplers(monkeypatch)
    played = {}
    for kind in ENGINES:
        for engine in (kind, EngineOptions(kind=kind, page_size=8)):
            ran.clear()
            batch_fn = policy_gradient.make_batch_fn(graphdef, tokenizer, env, questions, prompts_per_step=2,
                                               num_samples=4, sampling=sampling, gamma=1.0, lam=0.5,
                                               seq_len=32, batch_size=8, engine=engine)
            batch, info = batch_fn(1, state)
            assert ran == [kind] and info["sampler"] == kind
            assert 0 < info["slot_utilization"] <= 1 and info["prefill_tokens"] > 0
            played[kind] = batch, {k: info[k] for k in INFO_KEYS}
    (batch_c, info_c), (batch_s, info_s) = played["continuous"], played["static"]
    chex.assert_trees_all_equal(batch_c, batch_s)
    assert info_c == info_s and info_c["generated_tokens"] > 0


def test_online_batch_fn_rejects_a_tempered_sampler_and_a_short_seq_len(secret, tmp_path):
    tokenizer, env, questions, sampling, cfg = secret
    with pytest.raises(ValueError, match="temperature 1"):
        run_online(secret, 1, tmp_path, sampling=SamplingParams(temperature=0.7))
    graphdef, state = create_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), TX)
    batch_fn = policy_gradient.make_batch_fn(graphdef, tokenizer, env, questions, prompts_per_step=2,
                                       num_samples=4, sampling=sampling, gamma=1.0, lam=0.5,
                                       seq_len=8, batch_size=8)
    with pytest.raises(ValueError, match="does not fit seq_len=8"):
        batch_fn(0, state)
