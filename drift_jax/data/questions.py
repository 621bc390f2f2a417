"""Benchmark questions as ``Question`` lists: ``load_questions`` reads a source
(``data.sources``: a local file, ``tfds:<name>`` or ``huggingface:<org>/<name>``) in one of
the layouts of ``data.layouts``; ``select_prompts`` picks the ones a run uses.

``prompt_id`` is ``"<layout>/<id>"`` from the record's id field when the layout has one,
else ``"<layout>/<sha256 of the question text, 16 hex>"``: stable across runs and files.
A record repeating an earlier prompt_id with the same text (MetaMathQA's answer
augmentations, a question in two MATH subjects) is a repeat (``repeats``: dropped under
drift-jax's protocol, kept under the release's); with a different text it is a bad record
(under the release's protocol with repeats kept: a repeat, as the release keeps every row).

Bad records (an undecodable line, a missing or malformed field, no gold answer) follow
the bad-line policy that rollout files follow (``records.BadLines``; see
``docs/record-format.md``): ``on_bad_record="error"`` raises ``DatasetError`` (a
``records.BadRecord``) as ``where: field 'x' ...``, ``"skip"`` logs it and counts it by
reason (``where`` as ``sources.read_records`` numbers records).
The result is a ``LoadedQuestions``: a plain ``list`` of ``Question`` whose attributes
``layout``, ``skipped`` (a ``Counter`` of reasons), ``filtered`` and ``duplicates``
(counts) say what was left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Mapping

import numpy as np

from drift_jax.data.layouts import LAYOUTS, BadField, Row, detect_layout, layout_parsers
from drift_jax.data.records import BadLines, BadRecord
from drift_jax.data.sources import DatasetError, read_records

REPEATS = ("drop", "keep")


@dataclasses.dataclass(frozen=True)
class Question:
    """One prompt: an id that groups its K trajectories, the text and the gold answer."""

    prompt_id: str
    text: str
    gold: str


class LoadedQuestions(list):
    """``list[Question]`` plus what was left out: ``skipped`` (bad records, a ``Counter``
    by reason, as ``records.read_jsonl`` returns), ``filtered`` (records outside the
    layout's subset) and ``duplicates`` (records repeating an earlier question; counts)."""

    def __init__(self, questions=(), *, layout: str, skipped: Counter, filtered: int, duplicates: int):
        super().__init__(questions)
        self.layout = layout
        self.skipped = skipped
        self.filtered = filtered
        self.duplicates = duplicates


class _Policy(BadLines):
    """``BadLines`` whose strict mode raises ``DatasetError`` with a hint to skip."""

    def __call__(self, error: BadRecord, reason: str | None = None) -> None:
        if self.strict:
            raise DatasetError(f"{error} (on_bad_record='skip' drops such records)") from None
        super().__call__(error, reason)


def load_questions(source: str, *, layout: str | None = None, split: str | None = None,
                   limit: int | None = None, on_bad_record: str = "error", config=None,
                   repeats: str | None = None, protocol: str = "drift-jax") -> LoadedQuestions:
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
        the other, or "*" for every config in ``sources.HUB_CONFIGS``), instead of a third part of
        the source (``huggingface:<org>/<name>/<config>``).
      repeats: what becomes of a record repeating an earlier question: "drop" (dropped,
        counted in the result's ``duplicates``) or "keep" (kept, counted too, as the
        release does, under the prompt id ``<id>#<n>`` for its n-th repeat, n = 2, 3, ...);
        None: the protocol's ("keep" under "release", "drop" under "drift-jax").
      protocol: "release" reads every record as the release does
        (``layouts.layout_parsers``: its gold answers and question texts; a record it
        keeps with no gold is kept with gold "").
    """
    policy = _Policy(on_bad_record)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if repeats is None:
        repeats = "keep" if protocol == "release" else "drop"
    if repeats not in REPEATS:
        raise ValueError(f"repeats must be one of {REPEATS}, got {repeats!r}")
    parsers = layout_parsers(protocol)
    repeat_counts: Counter = Counter()  # prompt_id -> repeats seen so far
    questions: list[Question] = []
    filtered = duplicates = 0
    seen: dict[str, tuple[str, str]] = {}  # prompt_id -> (where, text)

    records = read_records(source, split, policy, config)  # checks the source before any limit applies
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
        row = Row(record)
        try:
            parsed = parsers[layout](row)
        except BadField as e:
            policy(DatasetError(f"{where}: field {e.field!r} ({layout} layout): {e.reason}"))
            continue
        if parsed is None:
            filtered += 1
            continue
        ident, text, gold = parsed
        prompt_id = f"{layout}/{ident or hashlib.sha256(text.encode()).hexdigest()[:16]}"
        if prompt_id in seen:
            first_where, first_text = seen[prompt_id]
            # The release keeps every row it reads; the ids are ours, so under its
            # protocol an id given to two texts is a repeat too.
            if first_text == text or (protocol == "release" and repeats == "keep"):
                duplicates += 1
                if repeats == "keep":
                    repeat_counts[prompt_id] += 1
                    questions.append(Question(f"{prompt_id}#{repeat_counts[prompt_id] + 1}", text, gold))
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
    ``questions`` must be every kept row in file order: load with ``repeats="keep"``, no
    ``limit``, and no skipped records."""
    if selection == "first":
        return list(questions if n is None else questions[:n])
    if selection != "release":
        raise ValueError(f"selection must be 'first' or 'release', got {selection!r}")
    order = np.random.default_rng(seed).permutation(len(questions))
    return [questions[i] for i in (order if n is None else order[:n])]
