"""experiments/compare_rollouts.py: the share of identical records of two rollout files."""

import copy
import json

import pytest

from experiments import compare_rollouts

from helpers import good_records, write_lines


def _replies_changed_from(record: dict, turn: int) -> dict:
    """``record`` with its assistant replies from ``turn`` (1-based) on changed."""
    record = copy.deepcopy(record)
    replies = [m for m in record["messages"] if m["role"] == "assistant"]
    for m in replies[turn - 1:]:
        m["content"] += " (changed)"
    return record


def test_counts_identical_records_and_names_the_first_different_turn(tmp_path, capsys):
    a = good_records(4)
    turns = sum(m["role"] == "assistant" for m in a[2]["messages"])
    b = [*a[:2], _replies_changed_from(a[2], turns), a[3]]
    paths = [write_lines(tmp_path / name, map(json.dumps, records)) for name, records in (("a.jsonl", a), ("b.jsonl", b))]

    assert compare_rollouts.main(paths) == 1  # 3 of 4 is below the default 0.99
    out = capsys.readouterr().out
    assert f"differs: {a[2]['prompt_id']} sample 0, from turn {turns}" in out
    assert "3 of 4 records identical (75.00%)" in out
    assert compare_rollouts.main([*paths, "--min-identical=0.75"]) == 0
    assert compare_rollouts.main([paths[0], paths[0]]) == 0


def test_files_of_other_prompts_are_an_error(tmp_path):
    a = good_records(3)
    paths = [write_lines(tmp_path / "a.jsonl", map(json.dumps, a)),
             write_lines(tmp_path / "b.jsonl", map(json.dumps, a[:2]))]
    with pytest.raises(SystemExit, match="do not hold the same prompts"):
        compare_rollouts.main(paths)
