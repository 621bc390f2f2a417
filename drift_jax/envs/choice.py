"""Multiple-choice questions (GPQA, MMLU-Redux, MMLU-Pro): the answer is one letter A-J.

A question's text carries its options as lines "A. ...", "B. ..." after the stem
(``render_choice_question``, used by the dataset loader), as in the reference release;
the prompt is the release's simple prompt with its multiple-choice instruction.

The letter rule (``choice_letter``), applied to the extracted answer:
1. drop wrappers: ``\\boxed{}`` / ``\\text{}``-style macros, ``$``, ``**``;
2. drop one leading phrase such as "The answer is", "Final answer:", "Answer:",
   "Option", "Choice";
3. the rest must START with the letter, bare or bracketed ("B", "(B)", "[B]", "b"), and
   the letter must be followed by nothing, by its closing bracket, or by ")", "." or ":"
   (then anything, e.g. the option's text: "B) 42", "B. 42");
4. an answer that names a second option right after that ("A) or B)", "A. and C") is
   ambiguous, and anything else ("A or B", "A, B", "I think B") has no letter: both are
   wrong answers, never a guess.
The gold goes through the same rule, so "B" and "(B)" golds work alike.
"""

from __future__ import annotations

import dataclasses
import re

from drift_jax.envs.base import AnswerTagEnv, Question
from drift_jax.envs.math import SIMPLE_PROMPT, SYSTEM_PROMPT, extract_math_answer

LETTERS = "ABCDEFGHIJ"

_MACRO_RE = re.compile(r"\\(?:boxed|fbox|text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_PREFIX_RE = re.compile(
    r"^(?:(?:the\s+|my\s+)?(?:final\s+|correct\s+)?answer\s*(?:is\b|:)?\s*)?"
    r"(?:(?:option|choice|letter)\b\s*)?[:\-]?\s*",
    re.IGNORECASE,
)
_LETTER_RE = re.compile(
    r"(?P<open>[(\[])?\s*(?P<letter>[A-Ja-j])\s*"
    r"(?(open)[)\]]|(?:[).:]|$))(?P<rest>.*)",
    re.DOTALL,
)
_SECOND_OPTION_RE = re.compile(r"\s*(?:or|and|,|/|&)\s*[(\[]?[A-Ja-j]\b", re.IGNORECASE)
_OPTION_LINE_RE = re.compile(r"^([A-J])\. ", re.MULTILINE)


def choice_letter(answer: str) -> str | None:
    """The upper-case option letter an answer names, or None (see the module docstring)."""
    text = answer.strip()
    for _ in range(3):  # nested wrappers, e.g. \boxed{\text{B}}
        text = _MACRO_RE.sub(r"\1", text)
    text = text.replace("**", "").strip().strip("$").strip()
    text = _PREFIX_RE.sub("", text, count=1)
    match = _LETTER_RE.fullmatch(text)
    if match is None or _SECOND_OPTION_RE.match(match["rest"]):
        return None
    return match["letter"].upper()


def render_choice_question(stem: str, options: list[str]) -> str:
    """``stem`` followed by one "A. option" line per option (2 to 10 options)."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
    return "\n".join([stem.strip(), *lines])


def option_letters(text: str) -> str:
    """The letters of the options rendered in ``text`` ("ABCD"); all of A-J if none are."""
    found = _OPTION_LINE_RE.findall(text)
    n = 0
    while n < len(found) and n < len(LETTERS) and LETTERS[n] in found:
        n += 1
    return LETTERS[:n] if n >= 2 else LETTERS


def choice_instruction(text: str) -> str:
    """The release's multiple-choice instruction, with the letter range of this question."""
    letters = option_letters(text)
    return (
        "You are solving multiple-choice questions. Only give the final answer letter "
        f"({letters[0]}-{letters[-1]}) between <answer> and </answer>."
    )


@dataclasses.dataclass
class MultipleChoiceEnv(AnswerTagEnv):
    """``AnswerTagEnv`` for lettered options: the answer is canonicalised to its letter."""

    system_prompt: str | None = SYSTEM_PROMPT

    def initial_messages(self, question: Question) -> list[dict]:
        content = SIMPLE_PROMPT.format(instruction=choice_instruction(question.text), question=question.text)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": content}]

    def extract_answer(self, reply: str) -> str | None:
        """The letter when the tagged (or boxed) answer names one, else the raw answer (a
        wrong answer, not a format error). Letters make "B" and "(B)" one repeated answer."""
        answer = extract_math_answer(reply)
        if answer is None:
            return None
        return choice_letter(answer) or answer

    def is_correct(self, answer: str, gold: str) -> bool:
        letter = choice_letter(answer)
        return letter is not None and letter == choice_letter(gold)
