"""Multiple-choice questions (GPQA, MMLU-Redux, MMLU-Pro): the answer is one letter A-J.

A question's text carries its options as lines "A. ...", "B. ..." after the stem
(``data.layouts.render_choice_question``), as in the reference release;
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

Under the release's protocol (``grader="last-letter"``, set by ``drift_jax.envs.protocol``)
an answer instead reads as its LAST standalone letter A-J, any case ("I think A or B" is
B), else as its whitespace-free lower-cased text, and is right when that equals the gold's
(the release's ``normalize_choice_answer``); its instruction names a fixed letter range
(``letter_range``: "A-D" for GPQA and MMLU-Redux, "A-J" for MMLU-Pro).
"""

from __future__ import annotations

import dataclasses
import re

from drift_jax.data.layouts import LETTERS
from drift_jax.data.questions import Question
from drift_jax.data.records import normalize_answer
from drift_jax.envs.base import ProtocolEnv
from drift_jax.envs.math import SYSTEM_PROMPT, extract_math_answer

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


def option_letters(text: str) -> str:
    """The letters of the options rendered in ``text`` ("ABCD"); all of A-J if none are."""
    found = _OPTION_LINE_RE.findall(text)
    n = 0
    while n < len(found) and n < len(LETTERS) and LETTERS[n] in found:
        n += 1
    return LETTERS[:n] if n >= 2 else LETTERS


def choice_instruction(text: str, letter_range: str | None = None) -> str:
    """The release's multiple-choice instruction, with the letter range of this question
    (or ``letter_range``, e.g. "A-J", when given)."""
    if letter_range is None:
        letters = option_letters(text)
        letter_range = f"{letters[0]}-{letters[-1]}"
    return (
        "You are solving multiple-choice questions. Only give the final answer letter "
        f"({letter_range}) between <answer> and </answer>."
    )


_STANDALONE_LETTER_RE = re.compile(r"\b([A-J])\b", re.IGNORECASE)


def release_choice_key(text: str) -> str:
    """The release's multiple-choice normaliser: the last standalone letter A-J (any case),
    lower-cased, else the lower-cased text without whitespace."""
    found = _STANDALONE_LETTER_RE.findall(text.strip())
    return found[-1].lower() if found else normalize_answer(text)


CHOICE_GRADERS = ("letter", "last-letter")


@dataclasses.dataclass
class MultipleChoiceEnv(ProtocolEnv):
    """``ProtocolEnv`` for lettered options: the answer is canonicalised to its letter.

    ``grader``: "letter" (ours, ``choice_letter``) or "last-letter" (the release's
    ``release_choice_key``); ``letter_range``: the instruction's fixed range, None to
    derive it from the question's options."""

    system_prompt: str | None = SYSTEM_PROMPT
    grader: str = "letter"
    letter_range: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.grader not in CHOICE_GRADERS:
            raise ValueError(f"grader must be one of {CHOICE_GRADERS}, got {self.grader!r}")

    def instruction_for(self, question: Question) -> str:
        return choice_instruction(question.text, self.letter_range)

    def _canonical(self, answer: str) -> str:
        if self.grader == "last-letter":
            key = release_choice_key(answer)
            return key.upper() if len(key) == 1 and key.upper() in LETTERS else answer
        return choice_letter(answer) or answer

    def extract_answer(self, reply: str) -> str | None:
        """The letter when the tagged (or boxed) answer names one, else the raw answer (a
        wrong answer, not a format error). Letters make "B" and "(B)" one repeated answer."""
        answer = extract_math_answer(reply)
        return None if answer is None else self._canonical(answer)

    def answer_from(self, action: str) -> str:
        return self._canonical(action)

    def is_correct(self, answer: str, gold: str) -> bool:
        if self.grader == "last-letter":  # the release: no gold letter, no correct answer
            return bool(gold) and release_choice_key(answer) == release_choice_key(gold)
        letter = choice_letter(answer)
        return letter is not None and letter == choice_letter(gold)
