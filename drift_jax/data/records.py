"""The rollout record: its one parser, the bad-line policy, and the JSONL reader and writer.

One JSON object per line, in the reference release's format (``docs/record-format.md``):
prompt_id, gold, messages, turn_rewards, verifier, t_star, answer_norms, format_penalty,
reward_details. Files written here are read by the authors' scripts and theirs by ours.

``parse_record`` is the only place that decides what a usable record is; weights,
diagnostics, the reader and the writer all go through it. ``BadLines`` is the bad-line
policy shared by rollout files and dataset files: ``on_bad_record="error"`` raises a
``BadRecord`` naming ``file:line: field``, ``"skip"`` logs it and counts it by reason.

Layers:
- ``read_jsonl``: one file, line by line;
- ``read_rollouts``: the training set, one or more files, checked group by group (a prompt
  id in two files, a prompt group of one);
- ``append_group`` / ``resume_point``: the crash-safe writer ``episodes.append_rollouts``
  builds on (whole prompt groups appended with one write + fsync; a torn tail cut back).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

REQUIRED_FIELDS = ("prompt_id", "messages", "turn_rewards", "answer_norms")
ROLES = ("system", "user", "assistant")
ON_BAD_RECORD = ("error", "skip")
_TURN_KEY = re.compile(r"t([1-9][0-9]*)")
# Returns and weights are float32: a larger reward would turn into inf, then NaN weights.
_F32_MAX = float(np.finfo(np.float32).max)


def normalize_answer(text: str) -> str:
    """Lower-case and remove ALL whitespace, so "X = 2" and "x=2" count as one answer."""
    return "".join(text.lower().split())


class BadRecord(ValueError):
    """A record that cannot be used; the message is ``where: field 'x' ...``."""


@dataclasses.dataclass(frozen=True)
class Record:
    """A parsed rollout record: what returns, weights and training read from it.

    ``turn_rewards`` is dense, r_1..r_T (a turn missing from the file's ``{"t1": ...}``
    counts 0); ``messages`` is None when parsed with ``messages=False``.
    """

    prompt_id: str
    turn_rewards: tuple[float, ...]
    answer_norms: tuple[str, ...]
    format_penalty: float
    t_star: int | None
    messages: tuple[dict, ...] | None


def _is_finite_number(value) -> bool:
    """A JSON number usable as a float32: not a bool, NaN, inf, or beyond float32's range."""
    # bool is an int; a reward of True is almost certainly a mix-up with `verifier`.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and abs(value) <= _F32_MAX
    except OverflowError:  # an int too big for a float
        return False


def _messages(record: Mapping, where: str) -> tuple[dict, ...]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRecord(f"{where}: field 'messages[{i}]' needs a string 'content'")
        if m.get("role") not in ROLES:
            raise BadRecord(f"{where}: field 'messages[{i}].role' is {m.get('role')!r}, not one of {ROLES}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"{where}: field 'messages' has no assistant message")
    return tuple(messages)


def _turn_rewards(rewards: Any, where: str) -> tuple[float, ...]:
    if not isinstance(rewards, Mapping):
        raise BadRecord(f"{where}: field 'turn_rewards' must be an object {{'t1': float, ...}}")
    by_turn = {}
    for key, value in rewards.items():
        match = _TURN_KEY.fullmatch(str(key))
        if match is None:
            raise BadRecord(f"{where}: field 'turn_rewards' has key {key!r}, expected 't1', 't2', ...")
        if not _is_finite_number(value):
            raise BadRecord(f"{where}: field 'turn_rewards.{key}' is {value!r}, not a finite number")
        by_turn[int(match.group(1))] = float(value)
    return tuple(by_turn.get(t, 0.0) for t in range(1, max(by_turn, default=0) + 1))


def parse_record(record: Any, where: str = "record", messages: bool = True) -> Record:
    """Check a release record and return its typed form; ``BadRecord`` names the field.

    ``messages=False`` skips the dialogue (returns and weights need only the rewards).
    """
    if not isinstance(record, Mapping):
        raise BadRecord(f"{where}: record is a {type(record).__name__}, not a JSON object")
    for field in REQUIRED_FIELDS if messages else REQUIRED_FIELDS[:1] + REQUIRED_FIELDS[2:]:
        if field not in record:
            raise BadRecord(f"{where}: missing required field {field!r}")
    prompt_id = record["prompt_id"]
    if not isinstance(prompt_id, str) or not prompt_id:
        raise BadRecord(f"{where}: field 'prompt_id' is {prompt_id!r}, not a non-empty string")
    rewards = _turn_rewards(record["turn_rewards"], where)
    answers = record["answer_norms"]
    if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
        raise BadRecord(f"{where}: field 'answer_norms' must be a list of strings")
    penalty = record.get("format_penalty", 0.0)
    if not _is_finite_number(penalty) or penalty > 0:
        raise BadRecord(f"{where}: field 'format_penalty' is {penalty!r}, not a finite number <= 0")
    if sum(map(abs, rewards)) + abs(penalty) > _F32_MAX:
        raise BadRecord(f"{where}: field 'turn_rewards' sums beyond float32's range")
    t_star = record.get("t_star")
    if t_star is not None and (isinstance(t_star, bool) or not isinstance(t_star, int) or t_star < 1):
        raise BadRecord(f"{where}: field 't_star' is {t_star!r}, not null or a turn number >= 1")
    return Record(prompt_id=prompt_id, turn_rewards=rewards, answer_norms=tuple(answers),
                  format_penalty=float(penalty), t_star=t_star,
                  messages=_messages(record, where) if messages else None)


def validate_record(record: Any, where: str) -> None:
    """Raise ``BadRecord`` if ``record`` cannot be trained on (``parse_record``'s checks)."""
    parse_record(record, where)


class BadLines:
    """The bad-line policy: ``"error"`` raises, ``"skip"`` logs and counts by reason.

    ``skipped`` counts skipped lines by their reason: the message without ``where: ``.
    """

    def __init__(self, on_bad_record: str = "error"):
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
        self.strict = on_bad_record == "error"
        self.skipped: Counter = Counter()

    def __call__(self, error: BadRecord, reason: str | None = None) -> None:
        """Raise ``error``, or count it under ``reason`` (default: its message after ``where: ``)."""
        if self.strict:
            raise error
        self.skipped[reason or str(error).split(": ", 1)[-1]] += 1
        logging.warning("skipping %s", error)


def summarize_skipped(skipped: Counter) -> dict:
    """``{"total": n, "reasons": {reason: count}}``, most frequent reason first (JSON-ready)."""
    return {"total": sum(skipped.values()), "reasons": dict(skipped.most_common())}


def json_lines(path: str, policy: BadLines) -> Iterator[tuple[str, Any]]:
    """``("path:line", object)`` for every non-blank line of a JSONL file.

    Read as bytes and decoded line by line: a corrupt line is a ``BadRecord`` naming its
    line (raised or skipped by ``policy``), not a UnicodeDecodeError for the whole file.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadRecord(f"{where}: line is not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRecord(f"{where}: malformed JSON ({e.msg})") from None
                except (ValueError, RecursionError):  # over Python's int digit limit; deep nesting
                    raise BadRecord(f"{where}: unreadable JSON (number or nesting too large)") from None
            except BadRecord as e:
                policy(e)
                continue
            yield where, obj


def _read_numbered(path: str, policy: BadLines) -> list[tuple[str, dict]]:
    """``("path:line", record)`` of every usable record of one rollout file."""
    numbered, skipped_before = [], sum(policy.skipped.values())
    for where, obj in json_lines(path, policy):
        try:
            validate_record(obj, where)
        except BadRecord as e:
            policy(e)
            continue
        numbered.append((where, obj))
    if not numbered and sum(policy.skipped.values()) == skipped_before:
        raise BadRecord(f"{path}: file holds no records")
    return numbered


def read_jsonl(path: str, on_bad_record: str = "error") -> tuple[list[dict], Counter]:
    """Read a rollout file.

    Args:
      on_bad_record: "error" raises ``BadRecord`` at the first bad line (naming the file,
        line and field); "skip" keeps the good records and counts the skipped ones.
    Returns:
      (records, skipped) where ``skipped`` counts skipped lines by reason.
    Raises:
      BadRecord for a file without any non-blank line, in either mode.
    """
    policy = BadLines(on_bad_record)
    return [record for _, record in _read_numbered(path, policy)], policy.skipped


def read_rollouts(
    paths: Sequence[str],
    on_bad_record: str = "error",
    min_group_size: int = 2,
    check: Callable[[dict], None] | None = None,
) -> tuple[list[dict], Counter]:
    """The training set: every usable record of ``paths``, in file order.

    On top of ``read_jsonl``'s line checks:
    - a prompt id in two files is an error (the files would be two rollout runs of one
      prompt, silently merged into one group of 2K), or, skipping, the later file's
      records of it are dropped;
    - a prompt group smaller than ``min_group_size`` is an error, or dropped when
      skipping: with one trajectory the DRIFT weight exp(R/beta) / mean is always 1,
      whatever the return, so a group of one carries no importance weighting. Pass 1
      to keep them (plain SFT);
    - ``check(record)`` (optional) may raise ValueError, e.g. an answer longer than the
      context (``context_check``); its message is reported after ``file:line: ``.

    Returns:
      (records, skipped) with ``skipped`` counting dropped records by reason.
    Raises:
      BadRecord naming file, line and field (strict mode), or when nothing usable is left.
    """
    if len(set(paths)) != len(paths):
        raise ValueError(f"a rollout file is listed twice: {list(paths)}")
    policy = BadLines(on_bad_record)
    kept = []  # (record, "path:line")
    earlier: dict[str, str] = {}  # prompt id -> "path:line" of its first record in an earlier file
    for path in paths:
        in_file: dict[str, str] = {}
        for where, record in _read_numbered(path, policy):
            pid = record["prompt_id"]
            try:
                if pid in earlier:
                    raise BadRecord(
                        f"{where}: field 'prompt_id' {pid!r} is also in {earlier[pid]}; one "
                        "prompt's trajectories must come from one file (two rollout runs of it?)")
                if check is not None:
                    try:
                        check(record)
                    except ValueError as e:
                        raise BadRecord(f"{where}: {e}") from None
            except BadRecord as e:
                policy(e)
                continue
            in_file.setdefault(pid, where)
            kept.append((record, where))
        earlier.update(in_file)
    sizes = Counter(record["prompt_id"] for record, _ in kept)
    out = []
    for record, where in kept:
        n = sizes[record["prompt_id"]]
        if n < min_group_size:
            policy(BadRecord(
                f"{where}: field 'prompt_id': prompt group {record['prompt_id']!r} has "
                f"{n} trajectories, fewer than {min_group_size}; a lone trajectory's DRIFT "
                "weight is 1 whatever its return. Sample K >= 2 per prompt, or skip it "
                "(--config.data.on_bad_record=skip)"), reason=f"prompt group smaller than {min_group_size}")
            continue
        out.append(record)
    if not out:
        raise BadRecord(f"{', '.join(paths)}: no usable records ({summarize_skipped(policy.skipped)})")
    return out, policy.skipped



def _encode(records: Iterable[dict], where: str) -> bytes:
    """JSONL bytes of ``records``, each checked first: a bad record is never written."""
    lines = []
    for i, record in enumerate(records):
        validate_record(record, f"{where} (record {i})")
        lines.append(json.dumps(record).encode() + b"\n")
    return b"".join(lines)


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write records atomically (temporary file, then rename)."""
    data = _encode(records, path)  # checked before anything is written
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def concat_files(path: str, parts: Sequence[str]) -> None:
    """Write the bytes of ``parts``, in order, to ``path`` atomically (temporary file,
    then rename): a multi-process job's shards, each a whole JSONL file, make the file
    a single process writes, byte for byte."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


# -- crash-safe appending, one prompt group at a time ----------------------------------

def append_group(path: str, records: Sequence[dict]) -> None:
    """Append one prompt group's records with a single write, then fsync.

    A kill at any moment leaves the file a prefix of its complete form: whole groups,
    then maybe a partial line or a partial group, which ``resume_point`` cuts back.
    """
    data = _encode(records, path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def resume_point(path: str, prompt_ids: Sequence[str], group_size: int) -> int:
    """Cut ``path`` back to its last complete prompt group; return how many it holds.

    The file must be what ``append_group`` wrote for ``prompt_ids`` in order,
    ``group_size`` records each, possibly interrupted: a torn last line or an incomplete
    last group is truncated away. Anything else (another prompt id, a malformed complete
    line, more groups than prompts) means the file belongs to another run: BadRecord
    naming the line. A missing file holds 0 groups.
    """
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        data = f.read()
    groups = in_group = offset = keep = 0
    *complete, _torn = data.split(b"\n")  # the text after the last newline is never whole
    for line_no, raw in enumerate(complete, start=1):
        where = f"{path}:{line_no}"
        try:
            pid = json.loads(raw).get("prompt_id")
        except (ValueError, AttributeError, RecursionError):
            raise BadRecord(f"{where}: not a rollout record; {path} was not written by "
                            "this run: delete it or use another workdir") from None
        expected = prompt_ids[groups] if groups < len(prompt_ids) else None
        if pid != expected:
            raise BadRecord(
                f"{where}: field 'prompt_id' is {pid!r}, expected {expected!r}; {path} holds "
                "rollouts of another config or seed: delete it or use another workdir")
        offset += len(raw) + 1
        in_group += 1
        if in_group == group_size:
            groups, in_group, keep = groups + 1, 0, offset
    if keep < len(data):
        logging.warning("%s: dropping %d bytes after the last complete prompt group "
                        "(an interrupted append)", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return groups
