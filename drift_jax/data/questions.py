"""Benchmark questions as ``Question`` lists, from local files or TensorFlow Datasets.

``load_questions(source, layout=..., split=..., limit=..., on_bad_record=...)`` reads
- a local ``.jsonl`` (one record a line), ``.json`` (a list of records) or ``.parquet``;
- ``tfds:<name>`` (a tfds catalog name, passed as is), or a Hugging Face Hub dataset
  ``huggingface:<org>/<name>[/<config>]`` (``/*``: every config in ``HUB_CONFIGS``, read
  one after the other, as the release loops over MATH's and MMLU-Redux-2.0's subjects).
  Both need tensorflow-datasets, imported only here. A Hub id is handed to ``tfds.load`` as
  ``huggingface:<tfds's own name for it>[/<config>]`` (``tfds_names``; the conversion is
  tfds's ``to_tfds_name``); a failed load raises ``DatasetError`` naming the dataset,
  config and split, and what to do (offline: a local .jsonl/.parquet file).

A *layout* says which fields hold the question and the gold answer. It is detected from
the first record's field names (matched ignoring case, spaces and punctuation, so
"Correct Answer" == "correct_answer") unless named:

| layout         | fields                                     | gold                                   |
| metamathqa     | query, response, type                      | after the last "The answer is: "; only types "MATH_*" are kept |
| math500        | problem, solution, answer (unique_id)      | answer                                 |
| hendrycks_math | problem, solution (level, type)            | last \\boxed{} of the solution          |
| gsm8k          | question, answer                           | after the last "####"                  |
| theoremqa      | Question, Answer (Answer_type, id)         | Answer as text (numbers, lists, bools) |
| gpqa           | Question, Correct Answer, Incorrect Answer 1-3 (Record ID) | letter of the correct option, options shuffled per question |
| mmlu_redux     | question, choices, answer (index)          | letter                                 |
| mmlu_pro       | question, options (<= 10), answer (letter), answer_index | letter                   |
| native         | text, gold (prompt_id)                     | gold                                   |

``prompt_id`` is ``"<layout>/<id>"`` from the record's id field when the layout has one,
else ``"<layout>/<sha256 of the question text, 16 hex>"``: stable across runs and files.
A record repeating an earlier prompt_id with the same text (MetaMathQA's answer
augmentations) is dropped; with a different text it is a bad record.

Bad records (an undecodable line, a missing or malformed field, no gold answer) follow
the bad-line policy that rollout files follow (``records.BadLines``; see
``docs/record-format.md``): ``on_bad_record="error"`` raises ``DatasetError`` (a
``records.BadRecord``) as ``where: field 'x' ...``, ``"skip"`` logs it and counts it by
reason. ``where`` is ``file:N``: for ``.jsonl`` N is the line number, for ``.json`` and
``.parquet`` the 1-based record number; for tfds it is ``source[split]:N``, N 1-based too.
The result is a ``LoadedQuestions``: a plain ``list`` of ``Question`` whose attributes
``layout``, ``skipped`` (a ``Counter`` of reasons), ``filtered`` and ``duplicates``
(counts) say what was left out.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from drift_jax.envs.base import Question
from drift_jax.envs.choice import LETTERS, render_choice_question
from drift_jax.envs.math import extract_boxed
from drift_jax.data.records import BadLines, BadRecord, json_lines


class DatasetError(BadRecord):
    """A source or record that cannot be read as questions; the message says where."""


class LoadedQuestions(list):
    """``list[Question]`` plus what was left out: ``skipped`` (bad records, a ``Counter``
    by reason, as ``records.read_jsonl`` returns), ``filtered`` (records outside the
    layout's subset) and ``duplicates`` (counts)."""

    def __init__(self, questions=(), *, layout: str, skipped: Counter, filtered: int, duplicates: int):
        super().__init__(questions)
        self.layout = layout
        self.skipped = skipped
        self.filtered = filtered
        self.duplicates = duplicates


class _BadField(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field, self.reason = field, reason


class _Policy(BadLines):
    """``BadLines`` whose strict mode raises ``DatasetError`` with a hint to skip."""

    def __call__(self, error: BadRecord, reason: str | None = None) -> None:
        if self.strict:
            raise DatasetError(f"{error} (on_bad_record='skip' drops such records)") from None
        super().__call__(error, reason)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


class _Row:
    """A record's fields by normalised name; accessors raise ``_BadField``."""

    def __init__(self, record: Mapping):
        self.names = {_key(k): k for k in record}
        self.record = record
        self.id_field = "id"  # the field ``ident`` found the id in

    def get(self, field: str) -> Any:
        name = self.names.get(_key(field))
        return None if name is None else self.record[name]

    def value(self, field: str) -> Any:
        value = self.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _BadField(field, "missing or empty")
        return value

    def text(self, field: str) -> str:
        value = self.value(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. MATH-500 answers stored as numbers
        if not isinstance(value, str):
            raise _BadField(field, f"expected text, got {type(value).__name__}")
        return value.strip()

    def strings(self, field: str) -> list[str]:
        value = self.value(field)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _BadField(field, "expected a list of strings")
        return [v.strip() for v in value]

    def index(self, field: str, n: int) -> int:
        value = self.value(field)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
            value = LETTERS.index(value.strip().upper())
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            raise _BadField(field, f"expected an option index in [0, {n}), got {value!r}")
        return value

    def ident(self, *fields: str) -> str | None:
        for field in fields:
            value = self.get(field)
            if value is not None and str(value).strip():
                self.id_field = self.names[_key(field)]
                return str(value).strip()
        return None


# Each layout: row -> (id or None, question text, gold), or None to filter the record out.
def _metamathqa(row: _Row):
    if not row.text("type").startswith("MATH_"):
        return None
    response = row.text("response")
    marker = "The answer is: "
    if marker not in response:
        raise _BadField("response", f"no {marker!r} in the response")
    gold = response.rsplit(marker, 1)[1].strip()
    if not gold:
        raise _BadField("response", f"nothing after {marker!r}")
    return row.ident("id"), row.text("query"), gold


def _math500(row: _Row):
    return row.ident("unique_id", "id"), row.text("problem"), row.text("answer")


def _hendrycks_math(row: _Row):
    gold = extract_boxed(row.text("solution"))
    if gold is None:
        raise _BadField("solution", "no complete \\boxed{...} answer")
    return row.ident("unique_id", "id"), row.text("problem"), gold


def _gsm8k(row: _Row):
    answer = row.text("answer")
    if "####" not in answer:
        raise _BadField("answer", "no '#### <answer>' line")
    gold = answer.rsplit("####", 1)[1].strip()
    if not gold:
        raise _BadField("answer", "nothing after '####'")
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
    raise _BadField(field, f"unsupported answer {value!r}")


def _theoremqa(row: _Row):
    gold = _answer_text(row.value("Answer"), "Answer")
    if not gold:
        raise _BadField("Answer", "missing or empty")
    return row.ident("id"), row.text("Question"), gold


def _gpqa_release(row: _Row):
    """GPQA with the release's option order (src/benchmark.py ``build_gpqa_qa``): the
    options [correct, incorrect 1-3] shuffled by ``random.Random`` seeded with the first 8
    hex digits of the MD5 of the question text."""
    correct = row.text("Correct Answer")
    options = [correct] + [row.text(f"Incorrect Answer {i}") for i in (1, 2, 3)]
    stem = row.text("Question")
    order = list(range(len(options)))
    random.Random(int(hashlib.md5(stem.encode("utf-8")).hexdigest()[:8], 16)).shuffle(order)
    shuffled = [options[i] for i in order]
    return row.ident("Record ID", "id"), render_choice_question(stem, shuffled), LETTERS[order.index(0)]


def _gpqa(row: _Row):
    correct = row.text("Correct Answer")
    options = [correct] + [row.text(f"Incorrect Answer {i}") for i in (1, 2, 3)]
    stem = row.text("Question")
    ident = row.ident("Record ID", "id")
    # The same order every run and on every machine: a seed from the question's id.
    seed = int(hashlib.sha256((ident or stem).encode()).hexdigest()[:16], 16)
    order = random.Random(seed).sample(range(4), 4)
    shuffled = [options[i] for i in order]
    return ident, render_choice_question(stem, shuffled), LETTERS[order.index(0)]


def _mmlu_redux(row: _Row):
    choices = row.strings("choices")
    answer = row.index("answer", len(choices))
    return row.ident("id"), render_choice_question(row.text("question"), choices), LETTERS[answer]


def _mmlu_pro(row: _Row):
    options = row.strings("options")
    if not 2 <= len(options) <= len(LETTERS):
        raise _BadField("options", f"expected 2 to {len(LETTERS)} options, got {len(options)}")
    letter = row.text("answer").upper()
    if letter not in LETTERS[: len(options)]:
        raise _BadField("answer", f"expected a letter A-{LETTERS[len(options) - 1]}, got {letter!r}")
    if row.get("answer_index") is not None and row.index("answer_index", len(options)) != LETTERS.index(letter):
        raise _BadField("answer_index", f"disagrees with answer {letter!r}")
    return row.ident("question_id", "id"), render_choice_question(row.text("question"), options), letter


def _native(row: _Row):
    return row.ident("prompt_id"), row.text("text"), row.text("gold")


_LAYOUTS: dict[str, Callable] = {
    "metamathqa": _metamathqa, "math500": _math500, "hendrycks_math": _hendrycks_math,
    "gsm8k": _gsm8k, "theoremqa": _theoremqa, "gpqa": _gpqa, "mmlu_redux": _mmlu_redux,
    "mmlu_pro": _mmlu_pro, "native": _native,
}
LAYOUTS = tuple(_LAYOUTS)

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
    keys = {_key(k) for k in record}
    if {"Question", "Answer"} <= set(record) and "correctanswer" not in keys:
        return "theoremqa"  # TheoremQA capitalises its fields; GSM8K does not
    return next((name for name, fields in _SIGNATURES if fields <= keys), None)


# -- sources: each yields (where, record); ``where`` is "<source>:<1-based number>" --------

def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(records).__name__}"
                           " (use .jsonl for one record a line)")
    for i, record in enumerate(records, 1):
        yield f"{path}:{i}", record


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from e
    batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    records = (record for batch in batches for record in batch.to_pylist())
    for i, record in enumerate(records, 1):
        yield f"{path}:{i}", record


def _to_python(value: Any) -> Any:
    """tfds's numpy values as plain Python: bytes -> str, arrays -> lists, scalars -> items."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _to_python(value.item()) if value.ndim == 0 else [_to_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


# setup.py's "data" extra installs these (tfds, its TensorFlow, and the Hugging Face
# datasets library its "huggingface:" builder reads the Hub with).
TFDS_PACKAGES = ("tensorflow-datasets>=4.9", "tensorflow>=2.15", "datasets>=2.14")


# -- Hugging Face Hub datasets through tensorflow-datasets -----------------------------------

HUB_PREFIX = "huggingface:"
ALL_CONFIGS = "*"

# The configs the release loops over for its multi-config benchmarks, in the order its
# ``datasets.get_dataset_config_names`` returns them (src/benchmark.py): ``"*"`` loads them
# all, one after the other. Hendrycks MATH: the release's own fallback list; MMLU-Redux-2.0:
# its 57 MMLU subjects.
HUB_CONFIGS: dict[str, tuple[str, ...]] = {
    "EleutherAI/hendrycks_math": (
        "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
        "prealgebra", "precalculus"),
    "edinburgh-dawg/mmlu-redux-2.0": (
        "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
        "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
        "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
        "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
        "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
        "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
        "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
        "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
        "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
        "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
        "world_religions"),
}
# A config as tfds's name parser accepts it (tensorflow_datasets/core/naming.py).
_TFDS_CONFIG_RE = re.compile(r"[\w\-.]+")
_INVALID_NAME_CHARACTER = re.compile(r"[^a-zA-Z0-9_]")


def _vendored_to_tfds_name(name: str) -> str:
    # tfds's rule (conversion_utils.to_tfds_name, tensorflow-datasets 4.9.4 and later; earlier
    # huggingface_utils.convert_hf_name): lower-case, "/" -> "__", then every character
    # outside [a-zA-Z0-9_] -> "_" (py_utils.make_valid_name).
    return _INVALID_NAME_CHARACTER.sub("_", name.lower().replace("/", "__"))


def _tfds_conversion() -> Callable[[str], str] | None:
    """tfds's own Hub-name conversion, or None when tensorflow-datasets is not installed."""
    try:
        from tensorflow_datasets.core.utils.conversion_utils import to_tfds_name
        return to_tfds_name
    except ImportError:
        pass
    try:
        from tensorflow_datasets.core.utils.huggingface_utils import convert_hf_name
        return convert_hf_name
    except ImportError:
        return None


def tfds_dataset_name(hub_id: str) -> str:
    """The name tensorflow-datasets gives the Hugging Face dataset ``hub_id`` ("org/name"):
    tfds's own ``to_tfds_name`` (``convert_hf_name`` before 4.9.4) when tfds is installed,
    else the same rule vendored here (tests/test_questions.py checks both against a table).
    E.g. "meta-math/MetaMathQA" -> "meta_math__metamathqa"."""
    convert = _tfds_conversion()
    return convert(hub_id) if convert is not None else _vendored_to_tfds_name(hub_id)


def parse_hub_source(source: str, config: str | list | tuple | None = None) -> tuple[str, list[str | None]]:
    """``(hub_id, configs)`` of ``huggingface:<org>/<name>[/<config>]``; ``config`` (a name,
    a list of names or ``"*"``) may be given instead of the third part. ``"*"`` means every
    config in ``HUB_CONFIGS``. ``[None]`` when no config is given."""
    parts = source[len(HUB_PREFIX):].split("/")
    if len(parts) > 3 or not all(parts):
        raise DatasetError(f"{source}: expected 'huggingface:<org>/<name>' or 'huggingface:<org>/<name>/<config>' "
                           "(the Hub id as on huggingface.co/datasets/<org>/<name>)")
    hub_id = "/".join(parts[:2])
    if len(parts) == 3:
        if config is not None:
            raise DatasetError(f"{source}: the config is given twice (in the source and as config={config!r})")
        config = parts[2]
    if config == ALL_CONFIGS:
        if hub_id not in HUB_CONFIGS:
            raise DatasetError(f"{source}: config '*' needs the list of configs, known only for "
                               f"{sorted(HUB_CONFIGS)}; pass config=[...] with this dataset's configs")
        return hub_id, list(HUB_CONFIGS[hub_id])
    configs = [config] if config is None or isinstance(config, str) else list(config)
    for c in configs:
        if c is not None and not _TFDS_CONFIG_RE.fullmatch(c):
            raise DatasetError(f"{source}: config {c!r} is not a name tfds accepts (letters, digits, '_', '-', '.')")
    if not configs:
        raise DatasetError(f"{source}: config=[] names no config")
    return hub_id, configs


def tfds_names(source: str, config: str | list | tuple | None = None) -> list[str]:
    """The names ``load_questions`` hands to ``tfds.load`` for ``source``, one per config:
    ``huggingface:<tfds's name of the Hub id>[/<config>]``. The config is passed verbatim:
    tfds's Hugging Face builder hands it to the Hub as written. ``tfds:<name>`` sources
    are passed as they are (``/<config>`` appended when ``config`` is given)."""
    if source.startswith("tfds:"):
        name = source[len("tfds:"):]
        if config is None:
            return [name]
        return [f"{name}/{c}" for c in ([config] if isinstance(config, str) else config)]
    hub_id, configs = parse_hub_source(source, config)
    base = HUB_PREFIX + tfds_dataset_name(hub_id)
    return [base if c is None else f"{base}/{c}" for c in configs]


_OFFLINE_HINTS = ("connection", "connect", "timeout", "timed out", "offline", "network", "resolve",
                  "name or service not known", "temporary failure", "unreachable", "max retries")
_NOT_FOUND_HINTS = ("datasetnotfound", "not listed", "repositorynotfound", "doesn't exist", "does not exist",
                    "not found", "404", "gated", "401", "403")
_CONFIG_HINTS = ("config name is missing", "builderconfig", "unknown config", "config")


def _failure_text(error: BaseException) -> str:
    seen, parts = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts += [cls.__name__ for cls in type(error).__mro__] + [str(error)]
        error = error.__cause__ or error.__context__
    return " ".join(parts).lower()


def _tfds_failure(source: str, name: str, config: str | None, split: str, error: Exception) -> DatasetError:
    """A ``DatasetError`` naming the dataset, config and split, with what to do."""
    text = _failure_text(error)
    what = f"{source!r}" + ("" if config is None else f", config {config!r}") + f", split {split!r}"
    local = ("Offline, or to skip the Hub: export the data once to a local .jsonl or .parquet file "
             "(e.g. datasets.load_dataset(...).to_json('data.jsonl')) and pass its path as the source.")
    if any(h in text for h in _OFFLINE_HINTS):
        hint = ("The Hugging Face Hub could not be reached: tfds's 'huggingface:' namespace needs it even for "
                "data already downloaded (it lists the Hub's datasets to resolve the name).")
    elif any(h in text for h in _NOT_FOUND_HINTS):
        hint = ("No such dataset or config on the Hub, or no access: check the Hub id as spelled on "
                "huggingface.co/datasets/<org>/<name> (source 'huggingface:<org>/<name>'), the config, and for "
                "a gated dataset (GPQA) that its terms are accepted and you are logged in (huggingface-cli login).")
    elif any(h in text for h in _CONFIG_HINTS):
        hub_id = source[len(HUB_PREFIX):].split("/", 2)
        known = HUB_CONFIGS.get("/".join(hub_id[:2]))
        hint = ("The dataset needs a config: pass 'huggingface:<org>/<name>/<config>' or config=..."
                + (f" (known: '*' for all, or one of {list(known)})" if known else ""))
    else:
        hint = "Check the source, config and split."
    return DatasetError(f"{source}: tensorflow-datasets could not load {what} as {name!r}: "
                        f"{type(error).__name__}: {error}. {hint} {local}")


def _read_tfds(source: str, split: str | None, config=None) -> Iterator[tuple[str, Any]]:
    """Checks the source, split and tfds's presence now; reads lazily."""
    names = tfds_names(source, config)
    if split is None:
        raise ValueError(f"a tfds source needs a split (e.g. split='test'), none given for {source!r}")
    configs = [n.split("/", 1)[1] if "/" in n else None for n in names]
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"loading {source!r} needs TensorFlow Datasets: pip install {' '.join(TFDS_PACKAGES)} (the "
            "'data' extra of drift-jax), or export the data to a local .jsonl/.json/.parquet file") from e
    return _iter_tfds(tfds, source, split, names, configs)


def _iter_tfds(tfds, source, split, names, configs) -> Iterator[tuple[str, Any]]:
    # Several configs are read one after the other, in order (the release's loop).
    for name, cfg in zip(names, configs):
        base = source[:-2] if source.endswith("/" + ALL_CONFIGS) else source
        where = base if cfg is None or base.endswith("/" + cfg) else f"{base}/{cfg}"
        try:
            records = tfds.as_numpy(tfds.load(name, split=split))
            for i, record in enumerate(records, 1):
                yield f"{where}[{split}]:{i}", _to_python(record)
        except DatasetError:
            raise
        except Exception as e:  # tfds, the Hub client and TensorFlow raise many kinds
            raise _tfds_failure(source, name, cfg, split, e) from e


def _records(source: str, split: str | None, policy: BadLines, config=None) -> Iterator[tuple[str, Any]]:
    if source.startswith(("tfds:", HUB_PREFIX)):
        return _read_tfds(source, split, config)
    if config is not None:
        raise ValueError(f"config={config!r} applies to tfds / Hugging Face sources only, not to the file {source}")
    path = Path(source)
    readers = {".jsonl": lambda p: json_lines(str(p), policy), ".json": _read_json, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DatasetError(f"{source}: unknown source; expected a .jsonl, .json or .parquet file, "
                           "'tfds:<name>' or 'huggingface:<org>/<name>'")
    if split is not None:
        raise ValueError(f"split={split!r} applies to tfds sources only, not to the file {source}")
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    return readers[path.suffix](path)


PROTOCOLS = ("drift-jax", "release")


def load_questions(source: str, *, layout: str | None = None, split: str | None = None,
                   limit: int | None = None, on_bad_record: str = "error", config=None,
                   duplicates: str = "drop", protocol: str = "drift-jax") -> LoadedQuestions:
    """Questions from ``source`` (see the module docstring), in the source's order.

    Args:
      source: a .jsonl/.json/.parquet path, ``tfds:<name>`` or ``huggingface:<org>/<name>``.
      layout: one of ``LAYOUTS``; None detects it from the first record's fields.
      split: the tfds split ("test", "train[:100]", ...); must be None for files.
      limit: stop after this many questions (records are read lazily, so a large file
        is not read past them).
      on_bad_record: "error" raises ``DatasetError`` at the first bad record; "skip" drops
        it, logs it and counts it by reason in the result's ``skipped``.
      config: the Hub config(s) of a ``huggingface:`` source (a name, a list read one after
        the other, or "*" for every config in ``HUB_CONFIGS``), instead of a third part of
        the source (``huggingface:<org>/<name>/<config>``).
      duplicates: "drop" (a record repeating an earlier question is dropped, counted in
        ``duplicates``) or "keep" (kept, as the release does, under the prompt id
        ``<id>#<n>`` for its n-th repeat, n = 2, 3, ...).
      protocol: "release" orders GPQA's options as the release does (``_gpqa_release``);
        other layouts are the same under both.
    """
    policy = _Policy(on_bad_record)
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if duplicates not in ("drop", "keep"):
        raise ValueError(f"duplicates must be 'drop' or 'keep', got {duplicates!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    layouts = {**_LAYOUTS, "gpqa": _gpqa_release} if protocol == "release" else _LAYOUTS
    repeats: Counter = Counter()
    duplicates_mode_keep = duplicates == "keep"
    questions: list[Question] = []
    filtered = duplicates = 0
    seen: dict[str, tuple[str, str]] = {}  # prompt_id -> (where, text)

    records = _records(source, split, policy, config)  # checks the source before any limit applies
    if limit is not None and limit <= 0:
        return LoadedQuestions([], layout=layout or "", skipped=policy.skipped, filtered=0, duplicates=0)
    for where, record in records:
        if not isinstance(record, Mapping):
            policy(DatasetError(f"{where}: record is a {type(record).__name__}, not a JSON object"))
            continue
        if layout is None:
            layout = detect_layout(record)
            if layout is None:
                raise DatasetError(f"{where}: cannot tell the layout from the fields {sorted(record)}; "
                                   f"pass layout= one of {LAYOUTS}")
        row = _Row(record)
        try:
            parsed = layouts[layout](row)
        except _BadField as e:
            policy(DatasetError(f"{where}: field {e.field!r} ({layout} layout): {e.reason}"))
            continue
        if parsed is None:
            filtered += 1
            continue
        ident, text, gold = parsed
        prompt_id = f"{layout}/{ident or hashlib.sha256(text.encode()).hexdigest()[:16]}"
        if prompt_id in seen:
            first_where, first_text = seen[prompt_id]
            if first_text == text:
                duplicates += 1
                if duplicates_mode_keep:
                    repeats[prompt_id] += 1
                    questions.append(Question(f"{prompt_id}#{repeats[prompt_id] + 1}", text, gold))
                    if limit is not None and len(questions) >= limit:
                        break
            else:
                reason = f"field {row.id_field!r} ({layout} layout): an id already used for another question"
                policy(DatasetError(f"{where}: {reason}: {prompt_id!r}, first at {first_where}"), reason)
            continue
        seen[prompt_id] = (where, text)
        questions.append(Question(prompt_id, text, gold))
        if limit is not None and len(questions) >= limit:
            break
    return LoadedQuestions(questions, layout=layout or "", skipped=policy.skipped, filtered=filtered,
                           duplicates=duplicates)


def select_prompts(questions: list, n: int | None, selection: str = "first", seed: int = 42) -> list:
    """The ``n`` prompts a run uses (all when ``n`` is None).

    "first": the first ``n`` in source order. "release": the release's choice for its
    rollouts (``load_metamathqa_dataset`` then ``--max_prompts``): the rows shuffled as
    ``datasets.Dataset.shuffle(seed=seed)`` does, by ``np.random.default_rng(seed)
    .permutation(len(questions))``, then the first ``n``. To match the release row for row,
    ``questions`` must be every kept row in file order: load with ``duplicates="keep"``, no
    ``limit``, and no skipped records."""
    if selection == "first":
        return list(questions if n is None else questions[:n])
    if selection != "release":
        raise ValueError(f"selection must be 'first' or 'release', got {selection!r}")
    order = np.random.default_rng(seed).permutation(len(questions))
    return [questions[i] for i in (order if n is None else order[:n])]
