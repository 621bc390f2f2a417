"""The workdir ledger (experiments/ledger.py): stale outputs and the cost of interrupted attempts."""

import json
import os
import time

from experiments.ledger import Ledger, change_label


def test_a_resumed_stage_is_charged_its_interrupted_attempts(tmp_path):
    ledger = Ledger(str(tmp_path))
    out = tmp_path / "rollouts.jsonl"
    assert ledger.begin("rollout", {"seed": 0}, [str(out)]) is False
    started = json.loads((tmp_path / "stages.json").read_text())["rollout"]["started"]
    out.write_text("{}\n")
    os.utime(out, (started + 40.0, started + 40.0))  # the killed attempt's last write, 40 s in
    assert ledger.earlier_s("rollout") == 0.0
    # Killed: the next run resumes the stage and counts the 40 s it had already spent.
    again = Ledger(str(tmp_path))
    assert again.begin("rollout", {"seed": 0}, [str(out)]) is False
    assert abs(again.earlier_s("rollout") - 40.0) < 1e-6
    os.utime(out, (time.time() + 5.0, time.time() + 5.0))
    third = Ledger(str(tmp_path))
    third.begin("rollout", {"seed": 0}, [str(out)])
    assert third.earlier_s("rollout") > 40.0  # accumulated over every interruption
    third.finish("rollout")
    assert Ledger(str(tmp_path)).begin("rollout", {"seed": 0}, [str(out)]) is True


def test_new_and_stale_stages_start_with_no_earlier_cost(tmp_path):
    ledger = Ledger(str(tmp_path))
    out = tmp_path / "weights.json"
    ledger.begin("weights", {"drift.beta": 0.25}, [str(out)])
    out.write_text("{}")
    ledger.finish("weights")
    again = Ledger(str(tmp_path))
    assert again.begin("weights", {"drift.beta": 0.3}, [str(out)]) is False  # stale: runs again
    assert again.earlier_s("weights") == 0.0
    moved = list((tmp_path / "stale").glob("*/drift.beta=0.3/weights.json"))
    assert len(moved) == 1 and not out.exists()


def test_change_label_names_the_first_change_and_counts_the_rest():
    assert change_label({"a": 1, "b": 2}, {"a": 1, "b": 3}) == "b=3"
    assert change_label({"a": 1, "b": 2}, {"a": 0, "b": 3, "c": "x y"}) == "a=0+2more"
    assert change_label({}, {}) == "unrecorded"
    assert "/" not in change_label({"data.train": "a"}, {"data.train": "/some/path"})
