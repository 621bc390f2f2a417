"""Dataset layouts: which fields of a benchmark's record hold the question and the gold
answer, and how each becomes a question's text and gold.

A layout is detected from a record's field names (``detect_layout``; matched by
``name_key``, ignoring case, spaces and punctuation, so "Correct Answer" ==
"correct_answer") unless named:

| layout         | fields                                     | gold                                   |
| metamathqa     | query, response, type                      | after the last "The answer is: "; only types "MATH_*" are kept |
| math500        | problem, solution, answer (unique_id)      | answer                                 |
| hendrycks_math | problem, solution (level, type)            | last \\boxed{} of the solution          |
| gsm8k          | question, answer                           | after the last "####"                  |
| theoremqa      | Question, Answer (Answer_type, id)         | Answer as text (numbers, lists, bools) |
| gpqa           | Question, Correct Answer, Incorrect Answer 1-3 (Record ID) | letter of the correct option, options shuffled per question |
| mmlu_redux     | question, choices, answer (index)          | letter                                 |
| mmlu_pro       | question, options (<= 10), answer (letter), answer_index | letter                   |
| mtu_bench      | question, answer ({tool: parameters}) (id) | the expected tool calls as JSON (``tool_calls``) |
| native         | text, gold (prompt_id)                     | gold                                   |

That table is drift-jax's reading; under ``protocol="release"`` each layout but native
reads its records as the release does (``data.release_layouts``; ``docs/reproducing.md``
lists the differences), and the prompt ids stay ours.

Multiple-choice layouts render their options into the text as lines "A. ...", "B. ..."
after the stem (``render_choice_question``); the gold is the correct option's letter.
A field a layout cannot read raises ``BadField`` (field, reason); the loader
(``data.questions``) turns it into a bad record naming where it was.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from drift_jax.data.latex import extract_boxed
from drift_jax.data.release_layouts import RELEASE_READERS
from drift_jax.data.tool_calls import calls_json, mtu_bench_row

# drift-jax's protocol and the reference release's (``envs.protocol`` says what each sets);
# under "release" every layout but native reads its records as the release does.
PROTOCOLS = ("drift-jax", "release")
LETTERS = "ABCDEFGHIJ"


def render_choice_question(stem: str, options: list[str]) -> str:
    """``stem`` followed by one "A. option" line per option (2 to 10 options)."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
    return "\n".join([stem.strip(), *lines])


class BadField(Exception):
    """A record's ``field`` that a layout cannot read, and why (``reason``)."""

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field, self.reason = field, reason


def name_key(name) -> str:
    """``name`` lower-cased without anything but a-z and 0-9: "Correct Answer" and
    "correct_answer" give one key."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


class Row:
    """A record's fields by normalised name; accessors raise ``BadField``."""

    def __init__(self, record: Mapping):
        self.names = {name_key(k): k for k in record}
        self.record = record
        self.id_field = "id"  # the field ``ident`` found the id in

    def get(self, field: str) -> Any:
        name = self.names.get(name_key(field))
        return None if name is None else self.record[name]

    def value(self, field: str) -> Any:
        value = self.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise BadField(field, "missing or empty")
        return value

    def text(self, field: str) -> str:
        value = self.value(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. MATH-500 answers stored as numbers
        if not isinstance(value, str):
            raise BadField(field, f"expected text, got {type(value).__name__}")
        return value.strip()

    def strings(self, field: str) -> list[str]:
        value = self.value(field)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise BadField(field, "expected a list of strings")
        return [v.strip() for v in value]

    def index(self, field: str, n: int) -> int:
        value = self.value(field)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
            value = LETTERS.index(value.strip().upper())
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            raise BadField(field, f"expected an option index in [0, {n}), got {value!r}")
        return value

    def ident(self, *fields: str) -> str | None:
        for field in fields:
            value = self.get(field)
            if value is not None and str(value).strip():
                self.id_field = self.names[name_key(field)]
                return str(value).strip()
        return None


# Each layout: row -> (id or None, question text, gold), or None to filter the record out.
def _metamathqa(row: Row):
    if not row.text("type").startswith("MATH_"):
        return None
    response = row.text("response")
    marker = "The answer is: "
    if marker not in response:
        raise BadField("response", f"no {marker!r} in the response")
    gold = response.rsplit(marker, 1)[1].strip()
    if not gold:
        raise BadField("response", f"nothing after {marker!r}")
    return row.ident("id"), row.text("query"), gold


def _math500(row: Row):
    return row.ident("unique_id", "id"), row.text("problem"), row.text("answer")


def _hendrycks_math(row: Row):
    gold = extract_boxed(row.text("solution"))
    if gold is None:
        raise BadField("solution", "no complete \\boxed{...} answer")
    return row.ident("unique_id", "id"), row.text("problem"), gold


def _gsm8k(row: Row):
    answer = row.text("answer")
    if "####" not in answer:
        raise BadField("answer", "no '#### <answer>' line")
    gold = answer.rsplit("####", 1)[1].strip()
    if not gold:
        raise BadField("answer", "nothing after '####'")
    return row.ident("id"), row.text("question"), gold


def _answer_text(value: Any, field: str) -> str:
    """TheoremQA answers: bools, ints, floats (positional notation, never "1e-05"), lists."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return np.format_float_positional(value, trim="-")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)) and value:
        return "[" + ", ".join(_answer_text(v, field) for v in value) + "]"
    raise BadField(field, f"unsupported answer {value!r}")


def _theoremqa(row: Row):
    gold = _answer_text(row.value("Answer"), "Answer")
    if not gold:
        raise BadField("Answer", "missing or empty")
    return row.ident("id"), row.text("Question"), gold


def _gpqa(row: Row):
    correct = row.text("Correct Answer")
    options = [correct] + [row.text(f"Incorrect Answer {i}") for i in (1, 2, 3)]
    stem = row.text("Question")
    ident = row.ident("Record ID", "id")
    # The same order every run and on every machine: a seed from the question's id.
    seed = int(hashlib.sha256((ident or stem).encode()).hexdigest()[:16], 16)
    order = random.Random(seed).sample(range(4), 4)
    shuffled = [options[i] for i in order]
    return ident, render_choice_question(stem, shuffled), LETTERS[order.index(0)]


def _mmlu_redux(row: Row):
    choices = row.strings("choices")
    answer = row.index("answer", len(choices))
    return row.ident("id"), render_choice_question(row.text("question"), choices), LETTERS[answer]


def _mmlu_pro(row: Row):
    options = row.strings("options")
    if not 2 <= len(options) <= len(LETTERS):
        raise BadField("options", f"expected 2 to {len(LETTERS)} options, got {len(options)}")
    letter = row.text("answer").upper()
    if letter not in LETTERS[: len(options)]:
        raise BadField("answer", f"expected a letter A-{LETTERS[len(options) - 1]}, got {letter!r}")
    if row.get("answer_index") is not None and row.index("answer_index", len(options)) != LETTERS.index(letter):
        raise BadField("answer_index", f"disagrees with answer {letter!r}")
    return row.ident("question_id", "id"), render_choice_question(row.text("question"), options), letter


def _mtu_bench(row: Row):
    """MTU-Bench: the row's question; the gold is its expected tool calls as JSON
    (``tool_calls``: read as the release reads them, under either protocol)."""
    parsed = mtu_bench_row(row.record)
    if parsed is None:
        raise BadField("question", "missing or empty")
    question, calls = parsed
    return row.ident("id"), question, calls_json(calls)


def _native(row: Row):
    return row.ident("prompt_id"), row.text("text"), row.text("gold")


_LAYOUTS: dict[str, Callable] = {
    "metamathqa": _metamathqa, "math500": _math500, "hendrycks_math": _hendrycks_math,
    "gsm8k": _gsm8k, "theoremqa": _theoremqa, "gpqa": _gpqa, "mmlu_redux": _mmlu_redux,
    "mmlu_pro": _mmlu_pro, "mtu_bench": _mtu_bench, "native": _native,
}
LAYOUTS = tuple(_LAYOUTS)


# Each layout's id fields: the prompt id (``questions``) under either protocol.
_ID_FIELDS = {
    "metamathqa": ("id",), "math500": ("unique_id", "id"), "hendrycks_math": ("unique_id", "id"),
    "gsm8k": ("id",), "theoremqa": ("id",), "gpqa": ("Record ID", "id"), "mmlu_redux": ("id",),
    "mmlu_pro": ("question_id", "id"), "mtu_bench": ("id",),
}


def _release_parser(layout: str) -> Callable:
    read = RELEASE_READERS[layout]

    def parse(row: Row):
        out = read(row.record)
        if out is None or not out[0]:  # the release skips a record with no question text
            return None
        return (row.ident(*_ID_FIELDS[layout]), *out)

    return parse


def layout_parsers(protocol: str = "drift-jax") -> dict[str, Callable]:
    """Each layout's ``row -> (id or None, text, gold) | None``. Under "release" the text and
    gold are the release's (``data.release_layouts``: first "The answer is: ", the
    release's boxed reading with its last-line fallback, options as given, TheoremQA's
    picture marker and first list element, GPQA's MD5-seeded order) and a record is
    never a bad record: the release keeps it with gold "" when it finds no answer."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if protocol == "drift-jax":
        return dict(_LAYOUTS)
    return {**_LAYOUTS, **{layout: _release_parser(layout) for layout in RELEASE_READERS}}


# Detection: the first layout whose fields the record has (most specific first).
_SIGNATURES = [
    ("gpqa", {"question", "correctanswer", "incorrectanswer1"}),
    ("metamathqa", {"query", "response", "type"}),
    ("mmlu_pro", {"question", "options", "answer"}),
    ("mmlu_redux", {"question", "choices", "answer"}),
    ("math500", {"problem", "solution", "answer"}),
    ("hendrycks_math", {"problem", "solution"}),
    ("theoremqa", {"question", "answer", "answertype"}),
    ("gsm8k", {"question", "answer"}),
    ("native", {"text", "gold"}),
]


def detect_layout(record: Mapping) -> str | None:
    """The layout a record's field names fit, or None."""
    keys = {name_key(k) for k in record}
    if {"Question", "Answer"} <= set(record) and "correctanswer" not in keys:
        return "theoremqa"  # TheoremQA capitalises its fields; GSM8K does not
    if "question" in keys and isinstance(Row(record).get("answer"), Mapping):
        return "mtu_bench"  # MTU-Bench's answer is an object {tool: parameters}; GSM8K's a text
    return next((name for name, fields in _SIGNATURES if fields <= keys), None)
