"""The embedded toy task: find a secret letter, with "try again" feedback.

The secret is one of ``num_candidates`` letters (A, B, C, ...), drawn uniformly per
question; the prompt gives no clue (by default every question has the same text; with
``id_length`` > 0 it carries a puzzle id of random numbers). So no policy can beat
1/num_candidates on the first try, and everything above that must come from *using the
feedback*: never repeating a rejected answer and moving to an untried letter. That is
exactly the skill DRIFT is meant to teach (``docs/embedded-task.md``: a task whose
first answer can be learned would let plain last-turn SFT look as good as DRIFT).

The reference policy is made to behave like the paper's base models by its synthetic
transcripts (``scripted_episode``): it has a prior over the letters (A most likely, each
next one ``preference_decay`` times less), like an LLM's ranking of candidate answers;
after "Incorrect" it repeats its previous answer with probability ``p_repeat`` (so greedy
decoding collapses into repetition) and otherwise moves to an untried letter drawn from
its prior (so temperature-1 sampling still corrects sometimes, mostly to the next most
likely letter); a small share of replies forget the ``<answer>`` tags.

The tokenizer is word-level with whole-phrase tokens (the feedback sentence, a tagged
answer ``<answer>B</answer>``, role markers), so a five-turn dialogue is ~35 tokens and
the previous answer sits a few positions back: a ~100k-parameter model learns the habit
in about a minute of CPU time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from drift_jax.envs.base import FEEDBACK, AnswerTagEnv, Episode, Question

LETTERS = "ABCDEFGHIJ"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ["guess", "the", "secret", "puzzle", "maybe"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(num_values: int = 100) -> PreTrainedTokenizerFast:
    """A word-level Hugging Face tokenizer with a chat template for the toy task."""
    words = (SPECIAL_TOKENS + WORDS + [FEEDBACK] + list(LETTERS)
             + [f"<answer>{c}</answer>" for c in LETTERS] + [str(i) for i in range(num_values)])
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Matched before whitespace splitting, so the feedback sentence is one token.
    backend.add_tokens([AddedToken(FEEDBACK, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclasses.dataclass
class SecretGuessEnv(AnswerTagEnv):
    """The protocol of ``AnswerTagEnv`` on secret-letter questions."""

    num_candidates: int = 5
    num_values: int = 100
    id_length: int = 3

    @property
    def candidates(self) -> list[str]:
        return list(LETTERS[: self.num_candidates])

    def make_questions(self, n: int, seed: int, prefix: str, exclude=frozenset()) -> list[Question]:
        """``n`` questions with distinct puzzle ids, none of whose text is in ``exclude``
        (with ``id_length`` 0 every question has the same text and only its secret differs)."""
        rng = np.random.default_rng(seed)
        questions, seen = [], set(exclude)
        while len(questions) < n:
            puzzle = rng.integers(self.num_values, size=self.id_length)
            text = " ".join(["guess the secret puzzle", *map(str, puzzle)])
            if self.id_length:  # ids distinct (and unseen); without one, one text for all
                if text in seen:
                    continue
                seen.add(text)
            gold = self.candidates[rng.integers(self.num_candidates)]
            questions.append(Question(f"{prefix}{len(questions)}", text, gold))
        return questions


def scripted_episode(env: SecretGuessEnv, question: Question, rng: np.random.Generator,
                     p_repeat: float, p_format_error: float, preference_decay: float = 1.0) -> Episode:
    """One synthetic transcript of the base-model habit (see the module docstring)."""
    episode = Episode(env, question)
    candidates = env.candidates
    prior = preference_decay ** np.arange(len(candidates))
    previous = None
    while not episode.done:
        tried = {a.upper() for a in episode.answer_norms}
        if rng.random() < p_format_error:
            reply = f"maybe {candidates[rng.choice(len(candidates), p=prior / prior.sum())]}"
        else:
            untried = np.asarray([c not in tried for c in candidates]) | (len(tried) == len(candidates))
            if previous is not None and rng.random() < p_repeat:
                answer = previous
            else:
                p = prior * untried
                answer = candidates[rng.choice(len(candidates), p=p / p.sum())]
            previous = answer
            reply = f"<answer>{answer}</answer>"
        episode.step(reply)
    return episode


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
    import itertools

    import jax
    import jax.numpy as jnp

    from drift_jax.data.chat import encode_prompt

    letters = env.candidates
    answer_ids = np.asarray([tokenizer.convert_tokens_to_ids(f"<answer>{c}</answer>") for c in letters])
    if tokenizer.unk_token_id in answer_ids:
        raise ValueError("answer_check needs a tokenizer with one token per tagged answer "
                         "(envs.secret.build_tokenizer)")
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
