"""Dataset layouts: every benchmark's fields to the expected questions, detection, and the
options of multiple-choice layouts (through ``load_questions``, which applies them)."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from drift_jax.data.layouts import LAYOUTS, detect_layout, layout_parsers, name_key, render_choice_question
from drift_jax.data.questions import Question, load_questions

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def hashed(layout, text):
    return f"{layout}/{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def option(text, letter):
    """The text of option ``letter`` in a rendered question."""
    return next(line[3:] for line in text.splitlines() if line.startswith(f"{letter}. "))


MMLU_Q1 = "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3"
MMLU_Q2 = ("Which of the following is the body cavity that contains the pituitary gland?\n"
           "A. Abdominal\nB. Cranial\nC. Pleural\nD. Spinal")
HALF_Q = r"What is the value of $\frac{1}{2} + \frac{1}{4}$?"
FOBAR_Q = "If $x + X = 7$ and the answer to the question is $x = 4$, what is the value of the unknown variable X?"
CUBE_Q = "What is the smallest positive perfect cube that can be written as the sum of three consecutive integers?"
ROBE_Q = "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?"

# (fixture, layout, expected (prompt_id, text start, gold) per question)
EXPECTED = {
    "metamathqa.jsonl": ("metamathqa", [
        Question(hashed("metamathqa", HALF_Q), HALF_Q, r"\frac{3}{4}"),
        Question(hashed("metamathqa", FOBAR_Q), FOBAR_Q, "3")]),
    "math500.jsonl": ("math500", [
        ("math500/test/precalculus/807.json", "Convert the point $(0,3)$", r"\left( 3, \frac{\pi}{2} \right)"),
        Question("math500/test/number_theory/515.json", CUBE_Q, "27")]),
    "hendrycks_math.jsonl": ("hendrycks_math", [
        (None, r"Let \[f(x) = \left\{", "0"),
        Question(hashed("hendrycks_math", r"What is $\frac{1}{2}$ of $\frac{2}{3}$?"),
                 r"What is $\frac{1}{2}$ of $\frac{2}{3}$?", r"\frac{1}{3}")]),
    "gsm8k.jsonl": ("gsm8k", [
        (None, "Janet's ducks lay 16 eggs per day.", "18"),
        Question(hashed("gsm8k", ROBE_Q), ROBE_Q, "3")]),
    "theoremqa.json": ("theoremqa", [
        ("theoremqa/jianyu_xu/Lah_number_2.json", "How many ways", "540"),
        ("theoremqa/wenhuchen/determinant1.json", "What is the determinant", "1"),
        ("theoremqa/mingyin/subspace1.json", "Is the set", "False"),
        ("theoremqa/wenhuchen/eigen1.json", "What are the eigenvalues", "[2, 3]"),
        ("theoremqa/xueguangma/photon1.json", "What is the wavelength", "0.00001")]),
    "gpqa_diamond.jsonl": ("gpqa", [
        Question("gpqa/recA1b2C3d4E5f6G7", "Which of these particles is its own antiparticle?\n"
                 "A. The neutron\nB. The electron\nC. The photon\nD. The proton", "C"),
        Question("gpqa/recZ9y8X7w6V5u4T3", "What is the hybridisation of the carbon atom in methane?\n"
                 "A. sp2\nB. dsp2\nC. sp3\nD. sp", "C")]),
    "mmlu_redux.jsonl": ("mmlu_redux", [
        Question(hashed("mmlu_redux", MMLU_Q1), MMLU_Q1, "B"),
        Question(hashed("mmlu_redux", MMLU_Q2), MMLU_Q2, "B")]),
    "mmlu_pro.jsonl": ("mmlu_pro", [
        ("mmlu_pro/70", "Typical advertising regulatory bodies suggest", "I"),
        Question("mmlu_pro/71", "What is 2 + 2?\nA. 3\nB. 4\nC. 5", "B")]),
    "mtu_bench.jsonl": ("mtu_bench", [
        ("mtu_bench/S-S_0", "Please reply to the user", json.dumps([{"name": "FindRestaurants", "parameters": {
            "city": "San Francisco", "cuisine": "Brazilian", "price_range": "moderate"}}])),
        ("mtu_bench/S-S_3", "Please reply to the user", json.dumps([{"name": "BookRestaurant", "parameters": {
            "day": "Saturday", "name": "The Slug and Lettuce", "people": 5}}])),
        ("mtu_bench/S-M_7", "Please reply to the user", json.dumps([{"name": "GetWeather", "parameters": {
            "city": "Paris"}}, {"name": "FindAttractions", "parameters": {"location": "Paris"}}])),
        ("mtu_bench/M-M_0_0", "Please reply to the user", "[]")]),
    "native.jsonl": ("native", [
        Question("native/toy-0", "What is 6 times 7?", "42"),
        Question(hashed("native", "What is the square root of 2, squared?"),
                 "What is the square root of 2, squared?", "2")]),
}


def assert_matches(questions, expected):
    assert len(questions) == len(expected)
    for q, e in zip(questions, expected):
        assert isinstance(q, Question)
        if isinstance(e, Question):
            assert q == e
        else:
            prompt_id, start, gold = e
            assert q.text.startswith(start) and q.gold == gold
            assert q.prompt_id == (prompt_id or hashed(q.prompt_id.split("/")[0], q.text))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_layout_loads_to_the_expected_questions(name):
    layout, expected = EXPECTED[name]
    detected = load_questions(str(FIXTURES / name))
    assert detected.layout == layout
    assert_matches(detected, expected)
    assert load_questions(str(FIXTURES / name), layout=layout) == detected  # explicit == detected
    assert detected.skipped == Counter()


def test_every_layout_has_a_fixture():
    assert {layout for layout, _ in EXPECTED.values()} == set(LAYOUTS)


def test_metamathqa_keeps_math_types_and_drops_repeated_prompts():
    questions = load_questions(str(FIXTURES / "metamathqa.jsonl"))
    assert (questions.filtered, questions.duplicates) == (1, 1)  # one GSM_ record, one AnsAug repeat


def test_mmlu_pro_renders_up_to_ten_options_with_the_gold_letter_on_the_right_one():
    question = load_questions(str(FIXTURES / "mmlu_pro.jsonl"))[0]
    assert option(question.text, question.gold) == "Unsafe practices, Distress, Fear, Serious"
    assert question.text.splitlines()[-1].startswith("I. ")


def test_gpqa_options_are_shuffled_deterministically_with_the_gold_on_the_correct_answer(tmp_path):
    path = tmp_path / "gpqa.jsonl"
    records = [{"Question": f"Question number {i}?", "Correct Answer": f"right {i}", "Incorrect Answer 1": f"w1 {i}",
                "Incorrect Answer 2": f"w2 {i}", "Incorrect Answer 3": f"w3 {i}", "Record ID": f"rec{i}"}
               for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    questions = load_questions(str(path))
    assert questions == load_questions(str(path))
    for i, q in enumerate(questions):
        assert option(q.text, q.gold) == f"right {i}"
        assert sorted(option(q.text, letter) for letter in "ABCD") == sorted(
            f"{p} {i}" for p in ("right", "w1", "w2", "w3"))
    assert {q.gold for q in questions} == set("ABCD")  # shuffled, not always in one place


def test_detection_tells_theoremqa_from_gsm8k_by_its_fields():
    assert detect_layout({"Question": "q", "Answer": 3}) == "theoremqa"
    assert detect_layout({"question": "q", "answer": "#### 3"}) == "gsm8k"
    assert detect_layout({"question": "q", "Answer_type": "float", "answer": "3"}) == "theoremqa"
    assert detect_layout({"correct_answer": "x", "incorrect_answer_1": "y", "question": "q"}) == "gpqa"


def test_release_gpqa_option_order(tmp_path):
    import random
    record = {"Question": "Which particle is its own antiparticle?", "Correct Answer": "photon",
              "Incorrect Answer 1": "neutron", "Incorrect Answer 2": "electron", "Incorrect Answer 3": "proton",
              "Record ID": "rec1"}
    path = tmp_path / "gpqa.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (question,) = load_questions(str(path), protocol="release")
    # benchmark.build_gpqa_qa: random.Random(int(md5(question)[:8], 16)).shuffle of the indices.
    order = list(range(4))
    random.Random(int(hashlib.md5(record["Question"].encode()).hexdigest()[:8], 16)).shuffle(order)
    options = ["photon", "neutron", "electron", "proton"]
    assert question.text.splitlines()[1:] == [f"{'ABCD'[k]}. {options[i]}" for k, i in enumerate(order)]
    assert option(question.text, question.gold) == "photon"
    with pytest.raises(ValueError, match="protocol"):
        load_questions(str(path), protocol="paper")


def test_field_names_match_ignoring_case_spaces_and_punctuation():
    assert name_key("Correct Answer") == name_key("correct_answer") == name_key("correct-answer") == "correctanswer"
    assert name_key("MMLU-Pro") == "mmlupro"


def test_choice_questions_need_two_to_ten_options():
    assert render_choice_question(" Stem? ", ["x", "y"]) == "Stem?\nA. x\nB. y"
    with pytest.raises(ValueError, match="2 to 10 options"):
        render_choice_question("Stem?", ["x"])
    with pytest.raises(ValueError, match="protocol"):
        layout_parsers("paper")
