"""Probes of a trained policy (drift_jax/evaluation/probes.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drift_jax.envs.base import FEEDBACK
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer
from drift_jax.evaluation.probes import answer_check

# -- answer_check -------------------------------------------------------------------------

def _letter_policy(tokenizer, env, untried_score, last_score=0.0, prior=None):
    """A stand-in model (traceable, as answer_check jits it): after a row's answers, each
    letter's tagged answer gets ``prior[letter]`` plus ``untried_score`` if the row has not
    named it yet, plus ``last_score`` if it is the row's last answer; other tokens -10."""
    ids = jnp.asarray([tokenizer.convert_tokens_to_ids(f"<answer>{c}</answer>") for c in env.candidates])
    prior = jnp.zeros(len(ids)) if prior is None else jnp.asarray(prior, jnp.float32)

    def model(tokens_bt):
        b, t = tokens_bt.shape
        is_answer_btc = tokens_bt[:, :, None] == ids
        tried_bc = is_answer_btc.any(axis=1)
        last_t = t - 1 - jnp.argmax(is_answer_btc.any(-1)[:, ::-1], axis=1)  # a row's last answer
        last_bc = is_answer_btc[jnp.arange(b), last_t] & tried_bc.any(-1, keepdims=True)
        scores_bc = prior + untried_score * ~tried_bc + last_score * last_bc
        logits_bv = jnp.full((b, len(tokenizer)), -10.0).at[:, ids].set(scores_bc)
        return jnp.broadcast_to(logits_bv[:, None], (b, t, len(tokenizer)))

    return model


def test_answer_check_counts_histories_and_reads_margins():
    env = SecretGuessEnv(id_length=0)
    tokenizer = build_tokenizer()
    question = env.make_questions(1, seed=0, prefix="q")[0]
    # Untried letters 2 nats above tried ones, E preferred by 0.5 among the untried.
    untried = _letter_policy(tokenizer, env, 2.0, prior=[0, 0, 0, 0, 0.5])
    check = answer_check(untried, tokenizer, env, question)
    assert [t["histories"] for t in check["turns"]] == [1, 5, 20, 60, 120]
    assert all(t["greedy_untried"] == t["histories"] for t in check["turns"])
    # The best untried letter against the best tried one (turn 1 has none: against -10).
    assert check["turns"][0]["min_margin"] == pytest.approx(12.5)
    assert all(t["min_margin"] == pytest.approx(1.5) for t in check["turns"][1:])
    assert [g["answer"] for g in check["greedy"]] == ["E", "A", "B", "C", "D"]

    # Repeating the last answer: greedy stops at turn 2, the repeat winning by 1 nat.
    repeat = _letter_policy(tokenizer, env, 0.0, last_score=1.0, prior=[0.5, 0, 0, 0, 0])
    check = answer_check(repeat, tokenizer, env, question)
    assert [t["greedy_untried"] for t in check["turns"]] == [1, 0, 0, 0, 0]
    assert [g["answer"] for g in check["greedy"]] == ["A", "B"]
    assert check["greedy"][1]["margin"] == pytest.approx(-1.5)
    probs = np.exp([0.5, 0, 0, 0, 0]) / (np.exp([0.5, 0, 0, 0, 0]).sum() + (len(tokenizer) - 5) * np.exp(-10))
    assert check["turns"][0]["mean_p_untried"] == pytest.approx(probs.sum(), rel=1e-5)


def test_answer_check_on_a_transformer_reads_each_prompt_as_if_alone():
    """The histories run as one right-padded batch: each one's margin is what the model
    gives that prompt on its own."""
    from flax import nnx

    from drift_jax.data.chat import encode_prompt
    from drift_jax.models import ModelConfig, Transformer

    env = SecretGuessEnv(id_length=0)
    tokenizer = build_tokenizer()
    question = env.make_questions(1, seed=0, prefix="q")[0]
    model = Transformer(ModelConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_layers=1,
                                    num_heads=2, num_kv_heads=1, head_dim=8), rngs=nnx.Rngs(0))
    check = answer_check(model, tokenizer, env, question)
    ids = [tokenizer.convert_tokens_to_ids(f"<answer>{c}</answer>") for c in env.candidates]
    forward = jax.jit(lambda tokens_bt: jax.nn.log_softmax(model(tokens_bt)[0, -1]))
    history, messages = [], env.initial_messages(question)
    for step in check["greedy"]:  # each greedy answer's margin, recomputed from its prompt alone
        logp = np.asarray(forward(jnp.asarray([encode_prompt(tokenizer, messages)])))
        untried = [ids[i] for i, c in enumerate(env.candidates) if c not in history]
        assert step["answer"] == env.candidates[ids.index(max(untried, key=lambda i: logp[i]))]
        assert step["margin"] == pytest.approx(logp[untried].max() - np.delete(logp, untried).max(), abs=1e-5)
        history.append(step["answer"])
        messages = messages + [{"role": "assistant", "content": f"<answer>{step['answer']}</answer>"},
                               {"role": "user", "content": FEEDBACK}]
