"""The multi-turn "wrong, try again" protocol shared by every environment.

An environment says how a question is asked, how an answer is read from a reply and how
it is checked. ``Episode`` runs the protocol for one trajectory: answers inside
``<answer>...</answer>``, the fixed feedback after a wrong (or unparsable) reply, a
format penalty for an unparsable reply (which consumes a turn but no answer attempt),
and a stop at the first correct answer or when the turn / answer budget is spent.

Optional environment hooks (``Environment`` lists them; ``Episode`` falls back when an
environment lacks them, so the embedded secret task is unchanged):
- ``prefill``: text the generation prompt ends with (the release's ``<think>`` / ``<answer>``);
  the player prepends it to the sampled continuation before ``Episode.step``;
- ``parse_reply(reply) -> (stored_reply, answer)``: the text stored in the dialogue (the
  release rewrites each reply as ``<think>...</think><answer>...</answer>``) and the answer;
- ``feedback_message(episode) -> str``: the user message after a wrong or unparsable reply
  (the release's "full" prompt mode sends a reward line plus the next turn block);
- ``counts_as_attempt(answer) -> bool``: whether an answer uses one of the ``max_answers``
  attempts (default: every answer does; the release's TheoremQA counts only answers that
  hold a number);
- ``skip_special_tokens``: the player decodes replies without special tokens, as vLLM
  does for the release (``episodes.decode_reply``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol

from drift_jax.data.questions import Question
from drift_jax.data.records import normalize_answer

FEEDBACK = "Incorrect. Please think again."
# The content may not contain another "<answer>": an unclosed earlier tag must not swallow
# the next one.
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def extract_tagged_answer(reply: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` in a reply, or None if absent/empty."""
    found = _ANSWER_RE.findall(reply)
    if not found or not found[-1].strip():
        return None
    return found[-1].strip()


def env_prefill(env) -> str:
    """The text an environment's generation prompt is prefilled with ("" if none)."""
    return getattr(env, "prefill", "") or ""


class Environment(Protocol):
    """What an environment provides; ``Episode`` does the rest (the optional hooks
    ``prefill``, ``parse_reply`` and ``feedback_message`` are in the module docstring)."""

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
        self.attempts = 0  # answers that used an attempt (``counts_as_attempt``)
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

    @property
    def answers_left(self) -> int:
        """Answer attempts left (the release's "actions left")."""
        return max(self.env.max_answers - self.attempts, 0)

    def step(self, reply: str) -> None:
        """Record the assistant's reply, verify it, and add feedback if the episode goes on.

        ``reply`` is everything the assistant said this turn, the environment's prefill
        included. The dialogue stores it as the environment's ``parse_reply`` returns it
        (unchanged when the environment has no such hook)."""
        if self.done:
            raise RuntimeError("step() on a finished episode")
        env = self.env
        t = self.turn + 1
        parse = getattr(env, "parse_reply", None)
        stored, answer = parse(reply) if parse is not None else (reply, env.extract_answer(reply))
        self.messages.append({"role": "assistant", "content": stored})
        correct = answer is not None and env.is_correct(answer, self.question.gold)
        if answer is None:
            self.format_penalty -= env.format_penalty
        else:
            self.answer_norms.append(normalize_answer(answer))
            counts = getattr(env, "counts_as_attempt", None)
            self.attempts += 1 if counts is None or counts(answer) else 0
        self.turn_rewards[f"t{t}"] = float(correct)
        self.verifier[f"t{t}"] = int(correct)
        self.details.append({"turn": t, "answer": answer, "parsed": answer is not None, "correct": correct})
        if correct:
            self.t_star = t
        self.done = correct or t >= env.max_turns or self.attempts >= env.max_answers
        if not self.done:
            make = getattr(env, "feedback_message", None)
            content = make(self) if make is not None else env.feedback
            self.messages.append({"role": "user", "content": content})

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


# -- the reference release's prompt protocol (its prompting.py), as switches ---------------

# Tokens the release deletes from the think and answer texts it parses out of a reply.
RELEASE_SPECIAL_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>")
# The release's answer separator; it keeps the first answer of a turn (1 action per turn).
RELEASE_ACTION_SEP = "||"
_RELEASE_THINK_RE = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_RELEASE_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
PROMPT_MODES = ("simple", "full")
PARSINGS = ("drift-jax", "release")


def output_format(think: bool) -> str:
    """The format the prompt asks for (the release's ``format_prompt``)."""
    if think:
        return "<think> [Your thoughts] </think> <answer> [your answer] </answer>"
    return "<answer> [your answer] </answer>"


def turn_block(turn: int, state: str, actions_left: int, max_tokens: int, think: bool) -> str:
    """One turn of the release's "full" (RAGEN/UFO-style) prompt: the turn number, the state
    (the question, later the feedback sentence), the actions left and the output format."""
    return (f"Turn {turn}:\nState:\n{state}\nYou have {actions_left} actions left. "
            f"Always output: {output_format(think)} with no extra text. Strictly follow this format. "
            f"Max response length: {max_tokens} words (tokens).\n")


def release_parse(reply: str, think: bool, action_sep: str = RELEASE_ACTION_SEP) -> tuple[str, str | None]:
    """The release's reading of a reply (prefill included): ``(stored reply, answer)``.

    With ``think`` the first ``<think>...</think>`` directly followed (whitespace aside)
    by ``<answer>...</answer>`` is required, else the first ``<answer>...</answer>``. On a
    match the stored reply is rewritten as ``<think>T</think><answer>A</answer>`` (or
    ``<answer>A</answer>``), T and A with the special tokens deleted and stripped, A cut to
    its first ``action_sep``-separated answer when it holds several; the answer is that
    first non-empty piece, or None (a format error, the rewrite still stored) when there
    is none. Without a match the reply is stored unchanged and is a format error.
    """
    match = (_RELEASE_THINK_RE if think else _RELEASE_ANSWER_RE).search(reply)
    if match is None:
        return reply, None
    thought, action = (match.group(1), match.group(2)) if think else ("", match.group(1))
    for token in RELEASE_SPECIAL_TOKENS:
        thought = thought.replace(token, "").strip()
        action = action.replace(token, "").strip()
    actions = [a.strip() for a in action.split(action_sep) if a.strip()]
    if len(actions) > 1:
        action = actions[0]
    stored = f"<think>{thought}</think><answer>{action}</answer>" if think else f"<answer>{action}</answer>"
    return stored, (actions[0] if actions else None)


@dataclasses.dataclass
class ProtocolEnv(AnswerTagEnv):
    """``AnswerTagEnv`` with the release's prompt switches (all off by default, which is
    drift-jax's protocol; ``drift_jax.envs.protocol`` has the release's settings).

    - ``prompt_mode``: "simple" (instruction, problem, output format; the fixed feedback
      sentence after a miss) or "full" (instruction + the turn block; after a miss
      ``Reward:\\n0.0\\n`` + the next turn block, whose state is the feedback sentence once
      an answer was given, the question before);
    - ``think``: the output format asks for ``<think> ... </think> <answer> ... </answer>``;
    - ``use_prefill``: the generation prompt ends with ``<think>`` (think) or ``<answer>``;
      None (the default) prefills exactly when ``think`` is on, as the release does, so
      ``MathEnv(think=True)`` starts the reply inside the think block;
    - ``parsing``: "drift-jax" (the subclass's ``extract_answer``, reply stored as said) or
      "release" (``release_parse``: first tag after the think block, reply rewritten);
    - ``instruction_max_tokens``: the turn block's "Max response length" (full mode only);
    - ``skip_special_tokens``: replies decoded without special tokens (vLLM's default, so
      the release's); False keeps them, so a stray ``<|im_start|>`` stays in the reply.
    Subclasses give ``instruction_for(question)`` and ``answer_from(action)``.
    """

    prompt_mode: str = "simple"
    think: bool = False
    use_prefill: bool | None = None
    parsing: str = "drift-jax"
    instruction_max_tokens: int = 400
    skip_special_tokens: bool = False

    def __post_init__(self):
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        if self.parsing not in PARSINGS:
            raise ValueError(f"parsing must be one of {PARSINGS}, got {self.parsing!r}")

    @property
    def prefill(self) -> str:
        if not (self.think if self.use_prefill is None else self.use_prefill):
            return ""
        return "<think>" if self.think else "<answer>"

    def instruction_for(self, question: Question) -> str:
        raise NotImplementedError

    def answer_from(self, action: str) -> str:
        """The answer recorded for the release parser's answer text (default: as is)."""
        return action

    def user_prompt(self, question: Question) -> str:
        instruction = self.instruction_for(question)
        if self.prompt_mode == "simple":
            return (f"{instruction}\n\nProblem:\n{question.text}\n\n"
                    f"Always output: {output_format(self.think)} with no extra text. Strictly follow this format.")
        return instruction + "\n" + turn_block(1, question.text, self.max_answers, self.instruction_max_tokens,
                                               self.think)

    def initial_messages(self, question: Question) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": self.user_prompt(question)}]

    def parse_reply(self, reply: str) -> tuple[str, str | None]:
        if self.parsing == "drift-jax":
            return reply, self.extract_answer(reply)
        stored, action = release_parse(reply, self.think)
        return stored, (None if action is None else self.answer_from(action))

    def feedback_message(self, episode: Episode) -> str:
        if self.prompt_mode == "simple":
            return self.feedback
        # The release's state: the question until an answer was given, then the feedback.
        state = self.feedback if episode.answer_norms else episode.question.text
        reward = episode.turn_rewards[f"t{episode.turn}"]
        return f"Reward:\n{reward}\n" + turn_block(episode.turn + 1, state, episode.answers_left,
                                                   self.instruction_max_tokens, self.think)
