"""Math questions: the final answer in ``<answer>`` tags (else the last ``\\boxed{}``),
checked for mathematical equivalence with math-verify.

By default (drift-jax's protocol) the prompt is the reference release's "simple" prompt
(system message plus one user message that states the task, the problem and the required
output format) for rollouts and evaluation alike. The release's own protocol (its "full"
turn-block prompt for rollouts, think mode with a ``<think>`` prefill, rewritten replies,
first-tag parsing, normalised string equality) is a set of switches (``base.ProtocolEnv``,
``grader``, ``boxed_fallback``), set together by ``drift_jax.envs.protocol``. The
multi-turn protocol, the feedback sentence and the format penalty are ``base.AnswerTagEnv``'s.

Graders (``MathEnv.grader``): "math-verify" (ours, below), "string" (the release's
MetaMathQA rollouts and MATH / MATH-500 eval: equal after lower-casing and removing all
whitespace, ``string_equal``), "numeric" (the release's TheoremQA check,
``release_numeric_equal``).

Equivalence: two answers match when their normalised text is equal (lower-case, no
whitespace: covers "True"/"true" and word answers) or when math-verify finds the parsed
expressions equal (1/2 == 0.5 == \\frac{1}{2}, 3 == 3.0, a+b == b+a, sets, intervals,
tuples; note math-verify also accepts an equation ``x=3`` for gold ``3``). Any parse
failure, exception or timeout counts as *incorrect*: the verifier never crashes a rollout.
math-verify times out with ``signal.alarm``, which works only on the main thread; off the
main thread we call it without a timeout (see ``math_equal``).
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import re
import string
import threading

from drift_jax.data.latex import extract_boxed
from drift_jax.data.questions import Question
from drift_jax.data.records import normalize_answer
from drift_jax.envs.base import ProtocolEnv, extract_tagged_answer

# The reference release's prompt (prompting.py, prompt_mode="simple"). The system message
# keeps its trailing space on purpose: it is part of the released prompt's tokens.
SYSTEM_PROMPT = "You're a helpful assistant. "
SIMPLE_PROMPT = (
    "{instruction}\n\nProblem:\n{question}\n\n"
    "Always output: <answer> [your answer] </answer> with no extra text. Strictly follow this format."
)
MATH_INSTRUCTION = "You are solving Math problems. Only give the final answer between <answer> and </answer>."

# A plain float in scientific notation: LaTeX parsing would read "1e-05" as e - 5.
_SCIENTIFIC_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _unwrap(answer: str) -> str:
    """The answer without a surrounding ``\\boxed{}`` or ``$...$``, so "\\boxed{3}" and "3"
    count as the same answer for the repetition penalty."""
    boxed = extract_boxed(answer)
    if boxed is not None:
        answer = boxed
    if len(answer) > 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip() or answer
    return answer


def extract_math_answer(reply: str) -> str | None:
    """The answer in a reply: the last non-empty ``<answer>...</answer>``, else the last
    ``\\boxed{...}``; unwrapped from a ``\\boxed{}`` / ``$...$`` inside it. None if neither."""
    answer = extract_tagged_answer(reply)
    if answer is None:
        answer = extract_boxed(reply)
    return None if answer is None else _unwrap(answer)


def _parse(text: str, timeout_seconds: int | None) -> list:
    """math-verify's parse of one bare answer (wrapped in ``\\boxed{}`` so that LaTeX and
    plain expressions both parse), falling back to parsing the raw text."""
    from math_verify import parse  # the import is slow (sympy); only the math task needs it

    text = text.strip()
    if _SCIENTIFIC_RE.fullmatch(text):
        text = format(decimal.Decimal(text), "f")
    parsed = parse("\\boxed{" + text + "}", parsing_timeout=timeout_seconds)
    return parsed or parse(text, parsing_timeout=timeout_seconds)


# Gold answers recur for every turn of every trajectory of a prompt: parse each once.
_parse_gold = functools.lru_cache(maxsize=65536)(_parse)


def math_equal(answer: str, gold: str, timeout_seconds: int = 5) -> bool:
    """True when ``answer`` is mathematically equivalent to ``gold``; False on any failure.

    ``timeout_seconds`` bounds each math-verify parse / comparison (signal-based, so only
    on the main thread; elsewhere it runs unbounded, which is math-verify's only option).
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException

    if not answer.strip() or not gold.strip():
        return False
    if normalize_answer(answer) == normalize_answer(gold):
        return True
    timeout = timeout_seconds if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = _parse_gold(gold, timeout)
        if not gold_parsed:
            return False
        return bool(verify(gold_parsed, _parse(answer, timeout), timeout_seconds=timeout))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return False


def string_equal(answer: str, gold: str) -> bool:
    """The release's default check: equal after lower-casing and removing all whitespace
    (an empty gold matches nothing)."""
    return bool(gold.strip()) and normalize_answer(answer) == normalize_answer(gold)


_FIRST_NUMBER_RE = re.compile(r"(\d+(?:\.\d+)?)")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _first_number(text: str) -> float | None:
    match = _FIRST_NUMBER_RE.search(text)
    return None if match is None else float(match.group(1))


def _plain_text(text: str) -> str:
    return re.sub(r"\s+", "", text.lower()).translate(_PUNCTUATION)


def release_numeric_equal(answer: str, gold: str) -> bool:
    """The release's TheoremQA check: the first unsigned decimal number of each is equal,
    or the texts are equal once lower-cased and stripped of whitespace and punctuation.
    (Signs and exponents are not read: "-3" and "3" are equal here, as in the release.)"""
    a, g = _first_number(answer), _first_number(gold)
    if a is not None and g is not None and a == g:
        return True
    return _plain_text(answer) == _plain_text(gold)


GRADERS = ("math-verify", "string", "numeric")


@dataclasses.dataclass
class MathEnv(ProtocolEnv):
    """``ProtocolEnv`` with the release's math instruction and a choice of grader.

    ``boxed_fallback`` (drift-jax parsing only): a reply without answer tags is read by its
    last ``\\boxed{}``; the release's parsing has no fallback (such a reply is a format error).
    """

    system_prompt: str | None = SYSTEM_PROMPT
    instruction: str = MATH_INSTRUCTION
    timeout_seconds: int = 5
    grader: str = "math-verify"
    boxed_fallback: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.grader not in GRADERS:
            raise ValueError(f"grader must be one of {GRADERS}, got {self.grader!r}")

    def instruction_for(self, question: Question) -> str:
        return self.instruction

    def extract_answer(self, reply: str) -> str | None:
        if self.boxed_fallback:
            return extract_math_answer(reply)
        answer = extract_tagged_answer(reply)
        return None if answer is None else _unwrap(answer)

    def counts_as_attempt(self, answer: str) -> bool:
        """The release's TheoremQA check (``check_numeric_answer``) calls an answer valid,
        so an action, only when it holds a number; every other grader counts every answer."""
        return self.grader != "numeric" or _first_number(answer) is not None

    def is_correct(self, answer: str, gold: str) -> bool:
        if self.grader == "string":
            return string_equal(answer, gold)
        if self.grader == "numeric":
            return release_numeric_equal(answer, gold)
        return math_equal(answer, gold, self.timeout_seconds)
