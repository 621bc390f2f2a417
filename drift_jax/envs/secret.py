"""The embedded toy task: guess a secret among candidates, with "try again" feedback.

A question lists ``num_candidates`` distinct numbers; the secret is one of them, drawn
uniformly, and nothing in the prompt tells which. So no policy can beat
1/num_candidates on the first try, and everything above that must come from *using the
feedback*: never repeating a rejected answer and moving to an untried candidate. This is
exactly the skill DRIFT is meant to teach (see ``../shared/docs/toy-notes.md``: a task
whose first answer can be learned would let plain last-turn SFT look as good as DRIFT).

The reference policy is made to behave like the paper's base models by its synthetic
transcripts (``scripted_episode``): after "Incorrect" it repeats its previous answer with
probability ``p_repeat`` (so greedy decoding collapses into repetition) and otherwise
moves to an untried candidate (so temperature-1 sampling still corrects sometimes); a
small share of replies forget the ``<answer>`` tags.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from drift_jax.envs.base import FEEDBACK, AnswerTagEnv, Episode, Question

LETTERS = "ABCDEFGHIJ"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "<answer>", "</answer>", "guess", "the", "secret", ":", "maybe"]
# ChatML-like, one word per token, so a five-turn transcript stays around 70 tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }}"
    " <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_tokenizer(num_values: int = 100) -> PreTrainedTokenizerFast:
    """A word-level Hugging Face tokenizer with a chat template for the toy task."""
    words = SPECIAL_TOKENS + WORDS + FEEDBACK.split() + list(LETTERS) + [str(i) for i in range(num_values)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclasses.dataclass
class SecretGuessEnv(AnswerTagEnv):
    """The protocol of ``AnswerTagEnv`` on secret-guessing questions."""

    num_candidates: int = 5
    num_values: int = 100

    def make_questions(self, n: int, seed: int, prefix: str, exclude=frozenset()) -> list[Question]:
        """``n`` questions with distinct candidate lists, none of whose text is in ``exclude``."""
        rng = np.random.default_rng(seed)
        questions, seen = [], set(exclude)
        while len(questions) < n:
            values = rng.choice(self.num_values, self.num_candidates, replace=False)
            text = "guess the secret : " + " ".join(f"{l} {v}" for l, v in zip(LETTERS, values))
            if text in seen:
                continue
            seen.add(text)
            gold = LETTERS[rng.integers(self.num_candidates)]
            questions.append(Question(f"{prefix}{len(questions)}", text, gold))
        return questions


def candidates_of(question: Question) -> list[str]:
    return question.text.split(":", 1)[1].split()[0::2]


def scripted_episode(env: SecretGuessEnv, question: Question, rng: np.random.Generator,
                     p_repeat: float, p_format_error: float) -> Episode:
    """One synthetic transcript of the base-model habit (see the module docstring)."""
    episode = Episode(env, question)
    candidates = candidates_of(question)
    while not episode.done:
        tried = episode.answer_norms
        if rng.random() < p_format_error:
            reply = f"maybe {rng.choice(candidates)}"  # forgot the answer tags
        else:
            untried = [c for c in candidates if c.lower() not in tried] or candidates
            if tried and rng.random() < p_repeat:
                answer = tried[-1].upper()
            else:
                answer = untried[rng.integers(len(untried))]
            reply = f"<answer> {answer} </answer>"
        episode.step(reply)
    return episode
