"""Rollout files: one JSON record per line, in the reference release's format.

Keys: prompt_id, gold, messages, turn_rewards, verifier, t_star, answer_norms,
format_penalty, reward_details (see ``../shared/docs/drift-method.md``). Files written
here are read by the authors' scripts and theirs by ours.

Three layers:
- ``validate_record`` / ``read_jsonl``: one file, line by line; a bad line is an error
  naming ``file:line`` and the field, or (``on_bad_record="skip"``) a counted skip;
- ``read_rollouts``: the training set, one or more files, checked group by group (a prompt
  id in two files, a prompt group of one);
- ``resume_point`` / ``append_group``: the crash-safe writer ``rollout.append_rollouts``
  builds on (whole prompt groups appended with one write + fsync; a torn tail cut back).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from typing import Callable, Iterable, Sequence

import numpy as np

from drift_jax.chat import encode_dialogue

REQUIRED_FIELDS = ("prompt_id", "messages", "turn_rewards", "answer_norms")
ROLES = ("system", "user", "assistant")
_TURN_KEY = re.compile(r"t[1-9][0-9]*")


class BadRecord(ValueError):
    """A record that cannot be used; the message names the file, line and field."""


# Returns and weights are float32: a larger reward would turn into inf, then NaN weights.
_F32_MAX = float(np.finfo(np.float32).max)


def _is_finite_number(value) -> bool:
    """A JSON number usable as a float32: not a bool, NaN, inf, or beyond float32's range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and abs(value) <= _F32_MAX
    except OverflowError:  # an int too big for a float
        return False


def validate_record(record, where: str) -> None:
    """Raise ``BadRecord`` if ``record`` cannot be trained on.

    A record that passes is one ``weights.trajectory_weights`` and
    ``chat.encode_dialogue`` accept.
    """
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: record is a {type(record).__name__}, not a JSON object")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise BadRecord(f"{where}: missing required field {field!r}")
    if not isinstance(record["prompt_id"], str) or not record["prompt_id"]:
        raise BadRecord(f"{where}: field 'prompt_id' is {record['prompt_id']!r}, not a non-empty string")
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
    rewards = record["turn_rewards"]
    if not isinstance(rewards, dict):
        raise BadRecord(f"{where}: field 'turn_rewards' must be an object {{'t1': float, ...}}")
    for key, value in rewards.items():
        if not _TURN_KEY.fullmatch(key):
            raise BadRecord(f"{where}: field 'turn_rewards' has key {key!r}, expected 't1', 't2', ...")
        if not _is_finite_number(value):
            raise BadRecord(f"{where}: field 'turn_rewards.{key}' is {value!r}, not a finite number")
    answers = record["answer_norms"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise BadRecord(f"{where}: field 'answer_norms' must be a list of strings")
    penalty = record.get("format_penalty", 0.0)
    if not _is_finite_number(penalty) or penalty > 0:
        raise BadRecord(f"{where}: field 'format_penalty' is {penalty!r}, not a finite number <= 0")
    if sum(abs(v) for v in rewards.values()) + abs(penalty) > _F32_MAX:
        raise BadRecord(f"{where}: field 'turn_rewards' sums beyond float32's range")


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
    numbered, skipped = _read_numbered(path, on_bad_record)
    return [record for _, record in numbered], skipped


def _read_numbered(path: str, on_bad_record: str) -> tuple[list[tuple[int, dict]], Counter]:
    """``read_jsonl`` keeping each record's line number."""
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    numbered, skipped = [], Counter()
    # Bytes, decoded line by line: a corrupt line is a BadRecord naming its line, not a
    # UnicodeDecodeError for the whole file.
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
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRecord(f"{where}: malformed JSON ({e.msg})") from None
                except (ValueError, RecursionError):  # over Python's int digit limit; deep nesting
                    raise BadRecord(f"{where}: unreadable JSON (number or nesting too large)") from None
                validate_record(record, where)
            except BadRecord as e:
                if on_bad_record == "error":
                    raise
                _skip(skipped, e)
                continue
            numbered.append((line_no, record))
    if not numbered and not skipped:
        raise BadRecord(f"{path}: file holds no records")
    return numbered, skipped


def _skip(skipped: Counter, error: BadRecord) -> None:
    """Count a skipped record under its reason (the message without ``file:line: ``)."""
    skipped[str(error).split(": ", 1)[1]] += 1
    logging.warning("skipping %s", error)


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
    kept, skipped = [], Counter()  # kept: (record, "path:line")
    earlier: dict[str, str] = {}  # prompt id -> "path:line" of its first record in an earlier file
    for path in paths:
        numbered, file_skipped = _read_numbered(path, on_bad_record)
        skipped.update(file_skipped)
        in_file: dict[str, str] = {}
        for line_no, record in numbered:
            where, pid = f"{path}:{line_no}", record["prompt_id"]
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
                if on_bad_record == "error":
                    raise
                _skip(skipped, e)
                continue
            in_file.setdefault(pid, where)
            kept.append((record, where))
        earlier.update(in_file)
    sizes = Counter(record["prompt_id"] for record, _ in kept)
    out = []
    for record, where in kept:
        n = sizes[record["prompt_id"]]
        if n < min_group_size:
            e = BadRecord(
                f"{where}: field 'prompt_id': prompt group {record['prompt_id']!r} has "
                f"{n} trajectories, fewer than {min_group_size}; a lone trajectory's DRIFT "
                "weight is 1 whatever its return. Sample K >= 2 per prompt, or skip it "
                "(--config.data.on_bad_record=skip)")
            if on_bad_record == "error":
                raise e
            _skip(skipped, BadRecord(f"{where}: prompt group smaller than {min_group_size}"))
            continue
        out.append(record)
    if not out:
        raise BadRecord(f"{', '.join(paths)}: no usable records ({summarize_skipped(skipped)})")
    return out, skipped


def summarize_skipped(skipped: Counter) -> dict:
    """``{"total": n, "reasons": {reason: count}}``, most frequent reason first (JSON-ready)."""
    return {"total": sum(skipped.values()), "reasons": dict(skipped.most_common())}


def context_check(tokenizer, max_len: int) -> Callable[[dict], None]:
    """A ``read_rollouts`` check: the record's last assistant message (what DRIFT
    supervises) must fit in ``max_len`` tokens; a longer prompt is left-truncated at
    training time and is fine."""
    def check(record: dict) -> None:
        try:
            encode_dialogue(tokenizer, record["messages"], supervise="last", max_len=max_len)
        except ValueError as e:
            raise ValueError(f"field 'messages': {e}") from None

    return check


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write records atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


# -- crash-safe appending, one prompt group at a time ----------------------------------

def append_group(path: str, records: Sequence[dict]) -> None:
    """Append one prompt group's records with a single write, then fsync.

    A kill at any moment leaves the file a prefix of its complete form: whole groups,
    then maybe a partial line or a partial group, which ``resume_point`` cuts back.
    """
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
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
