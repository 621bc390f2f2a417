"""The question loader: limits, bad records (error and skip), repeated questions and
prompt selection."""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from drift_jax.data.questions import DatasetError, load_questions, select_prompts
from drift_jax.data.records import BadRecord

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def test_limit_stops_early():
    questions = load_questions(str(FIXTURES / "theoremqa.json"), limit=2)
    assert [q.gold for q in questions] == ["540", "1"]
    assert load_questions(str(FIXTURES / "theoremqa.json"), limit=0) == []


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD = json.dumps({"question": "1+1?", "answer": "2 #### 2"})
BAD_LINES = [  # (line, field named in the error)
    ('{"question": "2+2?", "answer": "4"}', "'answer'"),  # no ####
    ('{"question": "broken", ', "malformed JSON"),
    ('{"answer": "#### 5"}', "'question'"),
    ('["a", "list"]', "not a JSON object"),
    ('{"question": "", "answer": "#### 1"}', "'question'"),
]


@pytest.mark.parametrize("line,field", BAD_LINES)
def test_a_bad_record_names_file_line_and_field(tmp_path, line, field):
    path = write_lines(tmp_path / "gsm.jsonl", [GOOD, "", line, GOOD.replace("1+1", "1+2")])
    with pytest.raises(DatasetError) as error:
        load_questions(path, layout="gsm8k")
    assert isinstance(error.value, BadRecord)  # the rollout files' bad-line policy
    message = str(error.value)
    assert message.startswith(f"{path}:3: ") and field in message
    assert "on_bad_record='skip'" in message


def test_skip_mode_keeps_the_good_records_and_reports_the_bad(tmp_path, caplog):
    lines = [GOOD] + [line for line, _ in BAD_LINES] + [GOOD.replace("1+1", "1+2")]
    path = write_lines(tmp_path / "gsm.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        questions = load_questions(path, layout="gsm8k", on_bad_record="skip")
    assert [q.text for q in questions] == ["1+1?", "1+2?"]
    assert isinstance(questions.skipped, Counter) and sum(questions.skipped.values()) == len(BAD_LINES)
    assert questions.skipped["field 'question' (gsm8k layout): missing or empty"] == 2  # counted by reason
    assert not any(path in reason for reason in questions.skipped)  # reasons, without "file:line: "
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(BAD_LINES)
    assert all(f"{path}:{n}: " in m for m, n in zip(logged, range(2, 7)))  # each names its line


def test_row_errors_in_json_and_index_errors_in_choice_layouts(tmp_path):
    path = tmp_path / "redux.json"
    path.write_text(json.dumps([{"question": "q", "choices": ["a", "b"], "answer": 1},
                                {"question": "q2", "choices": ["a", "b"], "answer": 5}]))
    with pytest.raises(DatasetError, match=r"redux.json:2: field 'answer' \(mmlu_redux layout\).*\[0, 2\)"):
        load_questions(str(path))
    path = write_lines(tmp_path / "pro.jsonl", [json.dumps(
        {"question_id": 1, "question": "q", "options": ["a", "b", "c"], "answer": "C", "answer_index": 1})])
    with pytest.raises(DatasetError, match=r"pro.jsonl:1: field 'answer_index' \(mmlu_pro layout\): disagrees"):
        load_questions(path)


def test_the_same_id_for_another_question_is_a_bad_record(tmp_path):
    path = write_lines(tmp_path / "pro.jsonl", [
        json.dumps({"question_id": 7, "question": q, "options": ["x", "y"], "answer": "A"}) for q in ("one", "two")])
    with pytest.raises(DatasetError, match=r"pro.jsonl:2: field 'question_id' \(mmlu_pro layout\): an id already "
                       r"used for another question: 'mmlu_pro/7', first at .*pro.jsonl:1 "):
        load_questions(path)


def test_source_and_argument_errors(tmp_path):
    with pytest.raises(DatasetError, match="cannot tell the layout"):
        load_questions(write_lines(tmp_path / "x.jsonl", ['{"foo": 1}']))
    with pytest.raises(DatasetError, match="expected a .jsonl, .json or .parquet"):
        load_questions(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError):
        load_questions(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="tfds sources only"):
        load_questions(str(FIXTURES / "gsm8k.jsonl"), split="test")
    with pytest.raises(ValueError, match="unknown layout"):
        load_questions(str(FIXTURES / "gsm8k.jsonl"), layout="gsm9k")
    with pytest.raises(ValueError, match="on_bad_record"):
        load_questions(str(FIXTURES / "gsm8k.jsonl"), on_bad_record="ignore")
    (tmp_path / "obj.json").write_text('{"data": []}')
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_questions(str(tmp_path / "obj.json"))


def test_release_selection_keeps_repeats_and_shuffles_as_datasets_does(tmp_path):
    path = tmp_path / "mm.jsonl"
    rows = [{"query": f"Q{i % 7}?", "response": f"... The answer is: {i}", "type": "MATH_AnsAug"}
            for i in range(12)] + [{"query": "GSM?", "response": "The answer is: 1", "type": "GSM_AnsAug"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dropped = load_questions(str(path))
    kept = load_questions(str(path), repeats="keep")
    assert len(dropped) == 7 and dropped.duplicates == 5
    assert len(kept) == 12 and kept.filtered == 1 and len({q.prompt_id for q in kept}) == 12
    assert kept[7].prompt_id == kept[0].prompt_id + "#2" and kept[7].gold == "7"
    # datasets.Dataset.shuffle(seed=42) permutes by np.random.default_rng(42).permutation(n).
    order = np.random.default_rng(42).permutation(12)
    chosen = select_prompts(kept, 5, "release")
    assert chosen == [kept[i] for i in order[:5]] and chosen != kept[:5]
    assert select_prompts(kept, 5, "first") == kept[:5]
    with pytest.raises(ValueError, match="selection"):
        select_prompts(kept, 5, "random")
    with pytest.raises(ValueError, match="repeats"):
        load_questions(str(path), repeats="twice")
