"""The release's reading of the datasets (``protocol="release"``) against drift-jax's, on
rows written here in each dataset's format.

Every "release" value below was worked out by hand from the release's code (GitHub
2020-qqtcg/DRIFT); each comment names the function. drift-jax's values are ours
(``drift_jax/data/layouts.py``); docs/reproducing.md says why they differ.
"""

import json

import pytest

from drift_jax.data.questions import DatasetError, load_questions


def rows_file(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def golds(path, protocol, **kwargs):
    return [q.gold for q in load_questions(path, protocol=protocol, **kwargs)]


def test_metamathqa_gold_runs_from_the_first_answer_phrase_under_release(tmp_path):
    twice = "So it is $\\{1,2\\}$. The answer is: \\{1,2\\}\nRecheck.\nThe answer is: 3\\sqrt{2}"
    path = rows_file(tmp_path, [
        {"query": "Q1?", "response": twice, "type": "MATH_Rephrased"},
        {"query": "Q2?", "response": "no phrase at all", "type": "MATH_AnsAug"},
        {"query": "  ", "response": "The answer is: 1", "type": "MATH_AnsAug"},
    ])
    # generate_weighted_data_vllm_metamathqa.ANSWER_RE = "The answer is: (.*?)$" with DOTALL
    # and no MULTILINE: "$" is the end of the text, so the gold is everything after the
    # FIRST phrase, stripped; no phrase gives "" (extract_answer), and the row is kept;
    # an empty query is skipped (main: "Skipping empty question").
    release = load_questions(path, protocol="release")
    assert [q.gold for q in release] == ["\\{1,2\\}\nRecheck.\nThe answer is: 3\\sqrt{2}", ""]
    assert release.filtered == 1
    # drift-jax: after the last phrase; a row without one is a bad record.
    assert golds(path, "drift-jax", on_bad_record="skip") == ["3\\sqrt{2}"]


MATH_ROWS = [  # (solution, the release's gold, drift-jax's gold or None for a bad record)
    # benchmark.extract_ground_truth_answer: no box, no "####": the last non-empty line.
    ("We add the two.\nSo the sum is 5.\n\n", "So the sum is 5.", None),
    # an empty box is falsy for the release: the last line again.
    ("Thus $\\boxed{}$.", "Thus $\\boxed{}$.", None),
    # extract_boxed_answer takes the LAST "\boxed{" opening: the inner one.
    ("so $\\boxed{\\boxed{2}}$", "2", "\\boxed{2}"),
    # extract_braced_content counts "\{" as an opening brace: the box never closes, so
    # the last line; ours skips escaped braces and reads the box.
    ("x = \\boxed{\\left\\{ x \\right.}", "x = \\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
    # no box: the last "#### x".
    ("Half of 14.\n#### 7\nDone.", "7", None),
]


def test_hendrycks_math_gold_follows_the_release_and_keeps_every_row(tmp_path):
    path = rows_file(tmp_path, [{"problem": f"Problem {i}?", "solution": s, "level": "Level 1", "type": "Algebra"}
                                for i, (s, _, _) in enumerate(MATH_ROWS)])
    # The release keeps every row: the default on_bad_record="error" does not stop the load.
    assert golds(path, "release") == [r for _, r, _ in MATH_ROWS]
    ours = load_questions(path, on_bad_record="skip")
    assert [q.gold for q in ours] == [o for _, _, o in MATH_ROWS if o is not None]
    assert sum(ours.skipped.values()) == 3
    with pytest.raises(DatasetError, match=r"rows.jsonl:1: field 'solution'"):
        load_questions(path)


def test_math500_gold_is_the_answer_field_read_as_the_release_reads_it(tmp_path):
    # extract_ground_truth_answer: a truthy "answer" field, its last box when non-empty.
    path = rows_file(tmp_path, [{"problem": "P?", "solution": "... \\boxed{4}", "answer": "\\boxed{3}",
                                 "unique_id": "test/a/1.json"}])
    assert golds(path, "release") == ["3"] and golds(path, "drift-jax") == ["\\boxed{3}"]


def test_repeated_questions_are_kept_under_release(tmp_path):
    """The release appends every row of every subject (load_hendrycks_math_dataset) and of
    every MMLU-Redux config; drift-jax drops a question it has already read."""
    row = {"problem": "What is $1+1$?", "solution": "$\\boxed{2}$", "level": "Level 1"}
    path = rows_file(tmp_path, [{**row, "type": "Algebra"}, {**row, "type": "Prealgebra"},
                                {"problem": "Other?", "solution": "\\boxed{3}"}])
    release = load_questions(path, protocol="release")
    assert [q.gold for q in release] == ["2", "2", "3"] and release.duplicates == 1
    assert release[1].prompt_id == release[0].prompt_id + "#2"
    ours = load_questions(path)
    assert [q.gold for q in ours] == ["2", "3"] and ours.duplicates == 1
    # An id the release does not read (ours) given to two texts is a repeat under release.
    path = rows_file(tmp_path, [{"question_id": 7, "question": q, "options": ["x", "y"], "answer": "A"}
                                for q in ("one", "two")], "pro.jsonl")
    assert [q.prompt_id for q in load_questions(path, protocol="release")] == ["mmlu_pro/7", "mmlu_pro/7#2"]
    with pytest.raises(DatasetError, match="an id already used for another question"):
        load_questions(path)


def test_choice_options_keep_their_spaces_under_release(tmp_path):
    redux = rows_file(tmp_path, [{"question": " Which one? ", "choices": [" a ", "b  ", "c", "d "], "answer": 1},
                                 {"question": "Out of range?", "choices": ["a", "b", "c", "d"], "answer": 5}], "r.jsonl")
    # benchmark.extract_mmlu_question: f"{letter}. {option}" with the option as given, the
    # whole text stripped (the last option loses its trailing space); extract_mmlu_answer:
    # an index outside 0-3 gives "" (the row kept, never answered right).
    release = load_questions(redux, protocol="release")
    assert [(q.text, q.gold) for q in release] == [("Which one?\nA.  a \nB. b  \nC. c\nD. d", "B"),
                                                   ("Out of range?\nA. a\nB. b\nC. c\nD. d", "")]
    ours = load_questions(redux, on_bad_record="skip")
    assert [(q.text, q.gold) for q in ours] == [("Which one?\nA. a\nB. b\nC. c\nD. d", "B")]
    pro = rows_file(tmp_path, [{"question": "Q?", "options": ["x ", " y", "z"], "answer": "C", "answer_index": 2,
                                "question_id": 1}], "p.jsonl")
    # extract_mmlu_pro_question / extract_mmlu_pro_answer (the first standalone letter).
    assert [(q.text, q.gold) for q in load_questions(pro, protocol="release")] == [("Q?\nA. x \nB.  y\nC. z", "C")]
    assert load_questions(pro)[0].text == "Q?\nA. x\nB. y\nC. z"


def test_theoremqa_picture_marker_and_answers_as_the_release_formats_them(tmp_path):
    path = tmp_path / "theorem.json"
    path.write_text(json.dumps([
        {"Question": "What is shown?", "Answer": [1, 2], "Answer_type": "list of integer", "Picture": "fig1.png",
         "id": "a"},
        {"Question": "Mass?", "Answer": 3.0, "Answer_type": "float", "Picture": None, "id": "b"},
        {"Question": "Wavelength?", "Answer": 1e-05, "Answer_type": "float", "Picture": "", "id": "c"},
        {"Question": "Is it?", "Answer": False, "Answer_type": "bool", "Picture": "None", "id": "d"},
    ]))
    # benchmark.extract_theoremqa_question: "<image>\n" before a question whose Picture is
    # not None, "" or "None"; extract_theoremqa_answer: a list's first element, else
    # str(answer) (3.0 -> "3.0", 1e-05 -> "1e-05", False -> "False").
    release = load_questions(str(path), protocol="release")
    assert [(q.text, q.gold) for q in release] == [("<image>\nWhat is shown?", "1"), ("Mass?", "3.0"),
                                                   ("Wavelength?", "1e-05"), ("Is it?", "False")]
    ours = load_questions(str(path))
    assert [(q.text, q.gold) for q in ours] == [("What is shown?", "[1, 2]"), ("Mass?", "3"),
                                                ("Wavelength?", "0.00001"), ("Is it?", "False")]
