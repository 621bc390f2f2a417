"""The release's reading of each benchmark's records (GitHub 2020-qqtcg/DRIFT:
``src/generate_weighted_data_vllm_metamathqa.py`` for MetaMathQA, ``src/benchmark.py`` for
the evaluation sets), for ``task.protocol = "release"``.

Each reader takes a raw record (fields by their exact names, as the release's
``example.get(...)`` reads them) and returns ``(text, gold)``, or None for a record the
release skips (an empty question, a MetaMathQA type outside ``MATH_``). They never raise:
where the release finds no answer its gold is "", a question no answer matches (the
release keeps it, so it counts in multi@k's denominator). ``data.layouts`` adds the
prompt id and applies them under "release"; ``docs/reproducing.md`` lists where each
differs from drift-jax's reading.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping
from typing import Any

from drift_jax.data.latex import release_gold
from drift_jax.data.tool_calls import calls_json, mtu_bench_row

# The release's gold letter: the first standalone letter A-J of an upper-cased text.
_CHOICE_RE = re.compile(r"\b([A-J])\b", re.IGNORECASE)
# generate_weighted_data_vllm_metamathqa.ANSWER_RE: DOTALL without MULTILINE, so "$" is the
# end of the text and the gold runs from the FIRST "The answer is: " to the end.
_METAMATH_ANSWER_RE = re.compile(r"The answer is: (.*?)$", re.DOTALL)


def _text(value: Any) -> str:
    return str(value if value is not None else "").strip()


def _options_text(stem: str, options: Any) -> str:
    """``extract_mmlu_question`` / ``extract_mmlu_pro_question``: the stem, then one
    "A. option" line per option AS GIVEN (an option's own spaces kept), the whole
    stripped (so the last option loses its trailing spaces, the others keep theirs)."""
    if options is None:
        options = []
    elif isinstance(options, tuple):
        options = list(options)
    elif not isinstance(options, list):
        options = [str(options)]
    lines = [stem] if stem else []
    lines += [f"{chr(65 + i)}. {option}" for i, option in enumerate(options)]
    return "\n".join(lines).strip()


def _choice_gold(value: Any, n_letters: int) -> str:
    """``extract_mmlu_answer`` (n_letters 4) / ``extract_mmlu_pro_answer`` (10): a text's
    first standalone letter, else its integer index, an index in range as a letter, else ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        match = _CHOICE_RE.search(value.strip().upper())
        if match:
            return match.group(1)
    try:
        index = int(value)
    except (TypeError, ValueError):
        return ""
    return chr(65 + index) if 0 <= index < n_letters else ""


def metamathqa(record: Mapping):
    """``load_metamathqa_dataset`` (types ``MATH_*``), ``extract_question``, ``extract_answer``."""
    if not str(record.get("type", "")).startswith("MATH_"):
        return None
    match = _METAMATH_ANSWER_RE.search(str(record.get("response", "")))
    return _text(record.get("query", "")), (match.group(1).strip() if match else "")


def math500(record: Mapping):
    return _text(record.get("problem", "")), release_gold(record.get("answer"), record.get("solution", ""))


def hendrycks_math(record: Mapping):
    return _text(record.get("problem", "")), release_gold(record.get("answer"), record.get("solution", ""))


def gsm8k(record: Mapping):
    return _text(record.get("question", "")), release_gold(record.get("answer"), record.get("solution", ""))


def _present(picture: Any) -> bool:
    """The release's ``picture not in (None, "", "None")``; an empty array or byte string
    (what a tfds image feature may hold for a missing picture) counts as no picture."""
    if picture is None or (isinstance(picture, str) and picture in ("", "None")):
        return False
    size = getattr(picture, "size", None)
    if isinstance(size, int) and size == 0:
        return False
    return not (isinstance(picture, (bytes, list, tuple)) and len(picture) == 0)


def theoremqa(record: Mapping):
    """``extract_theoremqa_question``: ``<image>\\n`` before a question with a picture;
    ``extract_theoremqa_answer``: a list's first non-empty element, a dict's "answer",
    "value" or "text", else ``str(answer)`` (3.0 stays "3.0", 1e-05 "1e-05") after ``####``."""
    question = _text(record.get("Question", record.get("question", "")))
    if _present(record.get("Picture", record.get("picture"))):
        question = f"<image>\n{question}" if question else "<image>"
    answer = record.get("Answer", record.get("answer", ""))
    if isinstance(answer, (list, tuple)):
        gold = next((str(item).strip() for item in answer if str(item).strip()), "")
    elif isinstance(answer, Mapping):
        gold = next((str(answer[k]).strip() for k in ("answer", "value", "text")
                     if k in answer and str(answer[k]).strip()), str(answer).strip())
    else:
        text = str(answer).strip()
        gold = text.split("####")[-1].strip() if "####" in text else text
        gold = gold or text
    return question, gold


def gpqa(record: Mapping):
    """``build_gpqa_qa``: the options [correct, incorrect 1-3] (stripped, empty ones
    dropped) shuffled by ``random.Random`` seeded with the first 8 hex digits of the MD5 of
    the id, else the question text."""
    question = _text(record.get("Question", record.get("question", "")))
    seed_key = str(record.get("id") or record.get("uid") or record.get("question") or question)
    correct = record.get("Correct Answer", record.get("correct_answer"))
    if correct is None:
        return question, ""
    incorrect = record.get("Incorrect Answers", record.get("incorrect_answers"))
    incorrect = [] if incorrect is None else list(incorrect) if isinstance(incorrect, (list, tuple)) else [str(incorrect)]
    if not incorrect:
        for key in ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3",
                    "incorrect_answer_1", "incorrect_answer_2", "incorrect_answer_3"):
            if record.get(key):
                incorrect.append(record[key])
    options, correct_index = [], None
    for i, option in enumerate([str(correct)] + [str(o) for o in incorrect]):
        if str(option).strip():
            correct_index = len(options) if i == 0 else correct_index
            options.append(str(option).strip())
    if not options:
        return question, ""
    order = list(range(len(options)))
    random.Random(int(hashlib.md5(seed_key.encode("utf-8")).hexdigest()[:8], 16)).shuffle(order)
    text = _options_text(question, [options[i] for i in order])
    return text, ("" if correct_index is None else chr(65 + order.index(correct_index)))


def mmlu(record: Mapping):
    """MMLU and MMLU-Redux (``extract_mmlu_question``, ``extract_mmlu_answer``: A-D only)."""
    text = _options_text(_text(record.get("question", "")), record.get("choices"))
    return text, _choice_gold(record.get("answer", record.get("answer_index")), 4)


def mmlu_pro(record: Mapping):
    options = record.get("options", record.get("choices"))
    text = _options_text(_text(record.get("question", "")), options)
    return text, _choice_gold(record.get("answer", record.get("answer_index")), 10)


def mtu_bench(record: Mapping):
    """``load_mtu_bench_dataset``: the same reading as drift-jax's (``tool_calls``)."""
    parsed = mtu_bench_row(record)
    return None if parsed is None else (parsed[0], calls_json(parsed[1]))


RELEASE_READERS: dict[str, Callable[[Mapping], tuple[str, str] | None]] = {
    "metamathqa": metamathqa, "math500": math500, "hendrycks_math": hendrycks_math, "gsm8k": gsm8k,
    "theoremqa": theoremqa, "gpqa": gpqa, "mmlu_redux": mmlu, "mmlu_pro": mmlu_pro, "mtu_bench": mtu_bench,
}
