"""The embedded toy task: find a secret letter, with "try again" feedback.

The secret is one of ``num_candidates`` letters (A, B, C, ...), uniform over a set of
questions (each letter equally often, in random order); the prompt gives no clue (by default every question has the same text; with
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

from drift_jax.data.questions import Question
from drift_jax.envs.base import FEEDBACK, AnswerTagEnv, Episode

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
        # Balanced secrets: each letter is the secret of n / num_candidates questions (the
        # remainder to randomly chosen letters), in random order. A deterministic policy
        # names the same letters whatever the secret, so its multi@k on these questions is
        # exactly its expectation over uniform secrets; drawn secrets would add the letters'
        # sampling noise (sd ~0.013 at n = 1,000), enough to rank two policies that differ
        # only in WHICH untried letter they name, a choice the prompt gives no reason for.
        gold_q = rng.permutation(np.resize(rng.permutation(self.num_candidates), n))
        questions, seen = [], set(exclude)
        while len(questions) < n:
            puzzle = rng.integers(self.num_values, size=self.id_length)
            text = " ".join(["guess the secret puzzle", *map(str, puzzle)])
            if self.id_length:  # ids distinct (and unseen); without one, one text for all
                if text in seen:
                    continue
                seen.add(text)
            gold = self.candidates[gold_q[len(questions)]]
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
