"""The multi-turn "wrong, try again" protocol shared by every environment.

An environment says how a question is asked, how an answer is read from a reply and how
it is checked. ``Episode`` runs the protocol for one trajectory: answers inside
``<answer>...</answer>``, the fixed feedback after a wrong (or unparsable) reply, a
format penalty for an unparsable reply (which consumes a turn but no answer attempt),
and a stop at the first correct answer or when the turn / answer budget is spent.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol

from drift_jax.weights import normalize_answer

FEEDBACK = "Incorrect. Please think again."
# The content may not contain another "<answer>": an unclosed earlier tag must not swallow
# the next one.
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Question:
    """One prompt: an id that groups its K trajectories, the text and the gold answer."""

    prompt_id: str
    text: str
    gold: str


def extract_tagged_answer(reply: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` in a reply, or None if absent/empty."""
    found = _ANSWER_RE.findall(reply)
    if not found or not found[-1].strip():
        return None
    return found[-1].strip()


class Environment(Protocol):
    """What an environment provides; ``Episode`` does the rest."""

    max_turns: int
    max_answers: int
    format_penalty: float
    feedback: str

    def initial_messages(self, question: Question) -> list[dict]:
        """The dialogue before the first assistant turn (system and/or user messages)."""

    def extract_answer(self, reply: str) -> str | None:
        """The answer in a reply, or None when it has no parsable answer."""

    def is_correct(self, answer: str, gold: str) -> bool:
        """The verifier."""


class Episode:
    """State of one multi-turn trajectory; ``to_record`` gives the release's JSONL record."""

    def __init__(self, env: Environment, question: Question):
        self.env = env
        self.question = question
        self.messages = env.initial_messages(question)
        self.answer_norms: list[str] = []
        self.turn_rewards: dict[str, float] = {}
        self.verifier: dict[str, int] = {}
        self.details: list[dict] = []
        self.format_penalty = 0.0
        self.t_star: int | None = None
        self.done = False

    @property
    def turn(self) -> int:
        """Number of assistant turns taken so far."""
        return len(self.turn_rewards)

    def step(self, reply: str) -> None:
        """Record the assistant's reply, verify it, and add feedback if the episode goes on."""
        if self.done:
            raise RuntimeError("step() on a finished episode")
        env = self.env
        t = self.turn + 1
        self.messages.append({"role": "assistant", "content": reply})
        answer = env.extract_answer(reply)
        correct = answer is not None and env.is_correct(answer, self.question.gold)
        if answer is None:
            self.format_penalty -= env.format_penalty
        else:
            self.answer_norms.append(normalize_answer(answer))
        self.turn_rewards[f"t{t}"] = float(correct)
        self.verifier[f"t{t}"] = int(correct)
        self.details.append({"turn": t, "answer": answer, "parsed": answer is not None, "correct": correct})
        if correct:
            self.t_star = t
        self.done = correct or t >= env.max_turns or len(self.answer_norms) >= env.max_answers
        if not self.done:
            self.messages.append({"role": "user", "content": env.feedback})

    def to_record(self) -> dict:
        return {
            "prompt_id": self.question.prompt_id,
            "gold": self.question.gold,
            "messages": self.messages,
            "turn_rewards": self.turn_rewards,
            "verifier": self.verifier,
            "t_star": self.t_star,
            "answer_norms": self.answer_norms,
            "format_penalty": round(self.format_penalty, 10),
            "reward_details": self.details,
        }


@dataclasses.dataclass
class AnswerTagEnv:
    """Base for environments that read ``<answer>...</answer>`` and compare normalised text."""

    max_turns: int = 5
    max_answers: int = 5
    format_penalty: float = 0.1
    feedback: str = FEEDBACK
    system_prompt: str | None = None

    def initial_messages(self, question: Question) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": question.text}]

    def extract_answer(self, reply: str) -> str | None:
        return extract_tagged_answer(reply)

    def is_correct(self, answer: str, gold: str) -> bool:
        return normalize_answer(answer) == normalize_answer(gold)
