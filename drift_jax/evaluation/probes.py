"""Probes of a trained policy: what it would answer where greedy decoding decides.

``answer_check`` reads the embedded task's policy after every history of distinct wrong
letters (``drift_jax.envs.secret``), so a result can be judged by its margins rather
than by one greedy dialogue.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from drift_jax.data.chat import encode_prompt
from drift_jax.data.questions import Question
from drift_jax.envs.base import FEEDBACK
from drift_jax.envs.secret import SecretGuessEnv


def answer_check(model, tokenizer, env: SecretGuessEnv, question: Question) -> dict:
    """How a policy answers after every history of distinct wrong letters.

    With one prompt text, greedy evaluation plays a single dialogue, so its outcome is
    decided by a few argmaxes. This reads them all: for turn t (t - 1 letters tried and
    rejected, every order of every choice of them), the next-token log-probabilities
    after ``question``'s prompt and that history. The margin of a history is the
    log-probability of its best untried letter minus that of the best other token
    (a tried letter, an untagged reply, a stop): > 0 means greedy decoding moves on to
    an untried letter there. A result that is a property of the data, not of float
    rounding, needs a clear margin along the greedy dialogue.

    Args:
      model: a ``Transformer`` (``model(tokens_bt) -> logits_btv``).
      env: the task (its candidates and turn budget).
      question: the prompt the histories follow.

    Returns:
      {"turns": one dict per turn t = 1 .. min(max_turns, num_candidates) with
      ``histories`` (how many), ``greedy_untried`` (after how many the margin is > 0),
      ``mean_p_untried`` (the untried letters' probability, mean over histories) and
      ``min_margin``; "greedy": the greedy dialogue while it names untried letters, as
      [{"answer", "margin"}] per turn (it ends at the first turn whose margin is <= 0,
      that turn included)}.
    """
    letters = env.candidates
    answer_ids = np.asarray([tokenizer.convert_tokens_to_ids(f"<answer>{c}</answer>") for c in letters])
    if tokenizer.unk_token_id in answer_ids:
        raise ValueError("answer_check needs a tokenizer with one token per tagged answer "
                         "(drift_jax.envs.secret.build_tokenizer)")
    histories = [h for turn in range(1, min(env.max_turns, len(letters)) + 1)
                 for h in itertools.permutations(range(len(letters)), turn - 1)]
    prompts = []
    for history in histories:
        messages = env.initial_messages(question)
        for i in history:
            messages += [{"role": "assistant", "content": f"<answer>{letters[i]}</answer>"},
                         {"role": "user", "content": FEEDBACK}]
        prompts.append(encode_prompt(tokenizer, messages))
    # One call for every history, right-padded: causal attention leaves each prompt's last
    # position as it is alone, and one compiled program costs far less than eager ops.
    last_b = np.asarray([len(p) - 1 for p in prompts])
    tokens_bt = np.zeros((len(prompts), last_b.max() + 1), np.int32)
    for b, p in enumerate(prompts):
        tokens_bt[b, : len(p)] = p
    logits_bv = jax.jit(lambda t: model(t)[jnp.arange(len(prompts)), last_b])(tokens_bt)
    logp_bv = np.asarray(jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1))
    untried_bc = np.ones((len(histories), len(letters)), bool)
    for b, history in enumerate(histories):
        untried_bc[b, list(history)] = False
    answer_logp_bc = logp_bv[:, answer_ids]
    untried_bv = np.zeros(logp_bv.shape, bool)
    untried_bv[:, answer_ids] = untried_bc
    untried_logp_bc = np.where(untried_bc, answer_logp_bc, -np.inf)
    margin_b = untried_logp_bc.max(axis=1) - np.where(untried_bv, -np.inf, logp_bv).max(axis=1)
    best_b = untried_logp_bc.argmax(axis=1)
    p_untried_b = np.where(untried_bc, np.exp(answer_logp_bc), 0).sum(axis=1)
    margins, best = dict(zip(histories, margin_b.tolist())), dict(zip(histories, best_b.tolist()))
    turn_b = np.asarray([len(h) + 1 for h in histories])
    turns = [{"turn": int(t), "histories": int((turn_b == t).sum()),
              "greedy_untried": int((margin_b[turn_b == t] > 0).sum()),
              "mean_p_untried": float(p_untried_b[turn_b == t].mean()),
              "min_margin": float(margin_b[turn_b == t].min())} for t in np.unique(turn_b)]
    greedy, history = [], ()
    while history in margins:
        greedy.append({"answer": letters[best[history]], "margin": margins[history]})
        if margins[history] <= 0:
            break
        history += (best[history],)
    return {"turns": turns, "greedy": greedy}
