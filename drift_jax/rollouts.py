"""Rollout files: one JSON record per line, in the reference release's format.

Keys: prompt_id, gold, messages, turn_rewards, verifier, t_star, answer_norms,
format_penalty, reward_details (see ``../shared/docs/drift-method.md``). Files written
here are read by the authors' scripts and theirs by ours.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from typing import Iterable

REQUIRED_FIELDS = ("prompt_id", "messages", "turn_rewards")
ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A record that cannot be used; the message names the file, line and field."""


def _is_finite_number(value) -> bool:
    """A JSON number usable as a float: not a bool, NaN, inf, or an int too big for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def validate_record(record, where: str) -> None:
    """Raise ``BadRecord`` if ``record`` cannot be trained on."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: record is a {type(record).__name__}, not a JSON object")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise BadRecord(f"{where}: missing required field {field!r}")
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
        if not _is_finite_number(value):
            raise BadRecord(f"{where}: field 'turn_rewards.{key}' is {value!r}, not a finite number")
    penalty = record.get("format_penalty", 0.0)
    if not _is_finite_number(penalty):
        raise BadRecord(f"{where}: field 'format_penalty' is {penalty!r}, not a finite number")


def read_jsonl(path: str, on_bad_record: str = "error") -> tuple[list[dict], Counter]:
    """Read a rollout file.

    Args:
      on_bad_record: "error" raises ``BadRecord`` at the first bad line (naming the file,
        line and field); "skip" keeps the good records and counts the skipped ones.
    Returns:
      (records, skipped) where ``skipped`` counts skipped lines by reason.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    records, skipped = [], Counter()
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
                reason = str(e).split(": ", 1)[1]
                skipped[reason] += 1
                logging.warning("skipping %s", e)
                continue
            records.append(record)
    if not records and not skipped:
        raise BadRecord(f"{path}: file holds no records")
    return records, skipped


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write records atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
