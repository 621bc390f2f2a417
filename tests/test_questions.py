"""The question loader: every benchmark layout, parquet/json/jsonl, tfds, bad records."""

import hashlib
import json
import logging
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import drift_jax.data.questions
from drift_jax.data.questions import LAYOUTS, DatasetError, detect_layout, load_questions
from drift_jax.data.records import BadRecord
from drift_jax.envs.base import Question
from drift_jax.envs.choice import choice_letter

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


def test_parquet_json_and_jsonl_give_the_same_questions(tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "mmlu_pro.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "mmlu_pro.parquet")
    (tmp_path / "mmlu_pro.json").write_text(json.dumps(records))
    expected = load_questions(str(FIXTURES / "mmlu_pro.jsonl"))
    assert load_questions(str(tmp_path / "mmlu_pro.parquet")) == expected
    assert load_questions(str(tmp_path / "mmlu_pro.json")) == expected


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


def test_detection_tells_theoremqa_from_gsm8k_by_its_fields():
    assert detect_layout({"Question": "q", "Answer": 3}) == "theoremqa"
    assert detect_layout({"question": "q", "answer": "#### 3"}) == "gsm8k"
    assert detect_layout({"question": "q", "Answer_type": "float", "answer": "3"}) == "theoremqa"
    assert detect_layout({"correct_answer": "x", "incorrect_answer_1": "y", "question": "q"}) == "gpqa"


# -- TensorFlow Datasets -----------------------------------------------------------------------

def fake_tfds(records, calls):
    module = types.ModuleType("tensorflow_datasets")

    def load(name, split):
        calls.append((name, split))
        return records

    module.load = load
    module.as_numpy = lambda ds: iter(ds)
    return module


def test_tfds_sources_are_loaded_and_decoded(monkeypatch):
    calls = []
    records = [  # as tfds.as_numpy yields them: bytes, numpy arrays and scalars
        {"question": b"What is 2 + 2?", "options": np.array([b"3", b"4", b"5"], dtype=object),
         "answer": b"B", "answer_index": np.int64(1), "question_id": np.int64(71)},
        {"question": "Caf\u00e9 count?".encode(), "options": np.array([b"1", b"2"], dtype=object),
         "answer": b"A", "answer_index": np.int64(0), "question_id": np.int64(72)},
    ]
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(records, calls))
    questions = load_questions("tfds:mmlu_pro/default", split="test")
    assert calls == [("mmlu_pro/default", "test")]
    assert questions == [Question("mmlu_pro/71", "What is 2 + 2?\nA. 3\nB. 4\nC. 5", "B"),
                         Question("mmlu_pro/72", "Caf\u00e9 count?\nA. 1\nB. 2", "A")]
    assert choice_letter(questions[0].gold) == "B"

    load_questions("huggingface:TIGER-Lab/MMLU-Pro", split="validation[:2]", layout="mmlu_pro")
    assert calls[-1] == ("huggingface:tiger_lab__mmlu_pro", "validation[:2]")  # tfds's name of the Hub id

    records.append({"question": b"bad", "options": np.array([b"1"], dtype=object), "answer": b"A"})
    with pytest.raises(DatasetError, match=r"tfds:mmlu_pro/default\[test\]:3: field 'options' \(mmlu_pro layout\)"):
        load_questions("tfds:mmlu_pro/default", split="test")
    with pytest.raises(ValueError, match="needs a split"):
        load_questions("tfds:mmlu_pro/default")


def test_a_missing_tfds_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        load_questions("tfds:gsm8k", split="test")



# -- Hub names through tensorflow-datasets ----------------------------------------------------

# Expectation table: tensorflow-datasets' name for each Hub id the paper configs read,
# written by hand from tfds's rule (tensorflow_datasets/core/utils/conversion_utils.py
# ``to_tfds_name``, 4.9.4 and later; ``huggingface_utils.convert_hf_name`` before):
# lower-case, "/" -> "__", every other character outside [a-zA-Z0-9_] -> "_".
TFDS_NAME_TABLE = {
    "meta-math/MetaMathQA": "meta_math__metamathqa",
    "HuggingFaceH4/MATH-500": "huggingfaceh4__math_500",
    "EleutherAI/hendrycks_math": "eleutherai__hendrycks_math",
    "TIGER-Lab/TheoremQA": "tiger_lab__theoremqa",
    "Idavidrein/gpqa": "idavidrein__gpqa",
    "edinburgh-dawg/mmlu-redux-2.0": "edinburgh_dawg__mmlu_redux_2_0",
    "TIGER-Lab/MMLU-Pro": "tiger_lab__mmlu_pro",
    "codeparrot/github-code": "codeparrot__github_code",  # tfds's own docstring example
}
HENDRYCKS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
             "prealgebra", "precalculus"]
# Subject configs a "/*" source loops over, as the release does (MMLU-Redux-2.0's 57 are
# checked by name below).
SUBJECTS = {"EleutherAI/hendrycks_math": HENDRYCKS}
PAPER_CONFIGS = ("qwen2_5_3b_metamath", "qwen2_5_0_5b_metamath", "eval")


def paper_sources():
    """Every Hub source the paper configs read: training data and each eval benchmark."""
    import importlib

    sources = set()
    for name in PAPER_CONFIGS:
        c = importlib.import_module(f"experiments.configs.{name}").get_config()
        sources |= {c.data.train} | {b.source for b in c.eval.benchmarks.values()}
    return sorted(s for s in sources if s.startswith("huggingface:"))


def expected_tfds_names(source):
    """The names tfds.load should get for a source, from the table above."""
    org, dataset, *config = source.removeprefix("huggingface:").split("/")
    hub_id, config = f"{org}/{dataset}", "/".join(config)
    name = f"huggingface:{TFDS_NAME_TABLE[hub_id]}"
    if config == "*":
        return [f"{name}/{c}" for c in SUBJECTS[hub_id]]
    return [f"{name}/{config}" if config else name]


def test_paper_configs_read_every_benchmark_from_the_hub():
    sources = paper_sources()
    hub_ids = {"/".join(s.removeprefix("huggingface:").split("/")[:2]) for s in sources}
    assert hub_ids == set(TFDS_NAME_TABLE) - {"codeparrot/github-code"}, sources


def vendored_rule(name):
    import re
    return re.sub(r"[^a-zA-Z0-9_]", "_", name.lower().replace("/", "__"))


@pytest.mark.parametrize("hub_id,tfds_name", sorted(TFDS_NAME_TABLE.items()))
def test_hub_ids_get_tfds_own_names(hub_id, tfds_name):
    assert drift_jax.data.questions.tfds_dataset_name(hub_id) == tfds_name
    assert vendored_rule(hub_id) == tfds_name  # the table is tfds's rule


def test_tfds_own_conversion_matches_the_table_when_installed():
    convert = drift_jax.data.questions._tfds_conversion()
    if convert is None:
        pytest.skip("tensorflow-datasets is not installed (the vendored rule is checked above)")
    for hub_id, tfds_name in TFDS_NAME_TABLE.items():
        assert convert(hub_id) == tfds_name


def test_tfds_own_function_is_called_when_tfds_is_installed(monkeypatch):
    calls = []
    package = types.ModuleType("tensorflow_datasets")
    package.__path__ = []
    conversion = types.ModuleType("tensorflow_datasets.core.utils.conversion_utils")
    conversion.to_tfds_name = lambda name: calls.append(name) or "from_tfds"
    for name in ("tensorflow_datasets.core", "tensorflow_datasets.core.utils"):
        sub = types.ModuleType(name)
        sub.__path__ = []
        monkeypatch.setitem(sys.modules, name, sub)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", package)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets.core.utils.conversion_utils", conversion)
    assert drift_jax.data.questions.tfds_dataset_name("Idavidrein/gpqa") == "from_tfds"
    assert calls == ["Idavidrein/gpqa"]


@pytest.mark.parametrize("source", [s for s in paper_sources() if "mmlu-redux" not in s])
def test_every_paper_source_hands_tfds_its_own_names_configs_included(source):
    assert drift_jax.data.questions.tfds_names(source) == expected_tfds_names(source)


def test_mmlu_redux_2_loads_its_57_subjects():
    names = drift_jax.data.questions.tfds_names("huggingface:edinburgh-dawg/mmlu-redux-2.0/*")
    assert len(names) == 57 == len(set(names))
    assert names[0] == "huggingface:edinburgh_dawg__mmlu_redux_2_0/abstract_algebra"
    assert names[-1] == "huggingface:edinburgh_dawg__mmlu_redux_2_0/world_religions"
    # tfds passes a config to the Hub verbatim; every paper config is already a tfds name.
    configs = [n.split("/", 1)[1] for n in names] + HENDRYCKS + ["gpqa_diamond"]
    assert all(vendored_rule(c) == c for c in configs)
    assert names == drift_jax.data.questions.tfds_names("huggingface:edinburgh-dawg/mmlu-redux-2.0", config="*")


def test_multi_config_sources_are_concatenated_in_config_order(monkeypatch):
    calls = []
    module = types.ModuleType("tensorflow_datasets")

    def load(name, split):
        calls.append((name, split))
        subject = name.rsplit("/", 1)[1]
        return [{"question": f"{subject} question {i}?".encode(), "choices": np.array([b"x", b"y"], dtype=object),
                 "answer": np.int64(i % 2)} for i in range(2)]

    module.load = load
    module.as_numpy = lambda ds: iter(ds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    questions = load_questions("huggingface:edinburgh-dawg/mmlu-redux-2.0", config=["anatomy", "virology"],
                               split="test")
    assert calls == [("huggingface:edinburgh_dawg__mmlu_redux_2_0/anatomy", "test"),
                     ("huggingface:edinburgh_dawg__mmlu_redux_2_0/virology", "test")]
    assert [q.text.splitlines()[0] for q in questions] == [
        "anatomy question 0?", "anatomy question 1?", "virology question 0?", "virology question 1?"]
    assert [q.gold for q in questions] == ["A", "B", "A", "B"] and questions.layout == "mmlu_redux"

    calls.clear()
    assert len(load_questions("huggingface:EleutherAI/hendrycks_math/*", split="test", layout="mmlu_redux")) == 14
    assert [c[0].rsplit("/", 1)[1] for c in calls] == HENDRYCKS
    # a bad record names its config
    module.load = lambda name, split: [{"question": b"q", "choices": np.array([b"x"], dtype=object),
                                        "answer": np.int64(3)}]
    with pytest.raises(DatasetError, match=r"mmlu-redux-2.0/anatomy\[test\]:1: field 'answer'"):
        load_questions("huggingface:edinburgh-dawg/mmlu-redux-2.0", config=["anatomy"], split="test")


class ConnectError(OSError):
    pass


class DatasetNotFoundError(ValueError):
    pass


def failing_tfds(monkeypatch, error):
    module = types.ModuleType("tensorflow_datasets")

    def load(name, split):
        raise error

    module.load = load
    module.as_numpy = lambda ds: iter(ds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)


def test_offline_error_names_dataset_config_split_and_the_local_route(monkeypatch):
    failing_tfds(monkeypatch, ConnectError("Failed to resolve 'huggingface.co' (Name or service not known)"))
    with pytest.raises(DatasetError) as info:
        load_questions("huggingface:Idavidrein/gpqa/gpqa_diamond", split="train")
    message = str(info.value)
    for part in ("'huggingface:Idavidrein/gpqa/gpqa_diamond'", "config 'gpqa_diamond'", "split 'train'",
                 "'huggingface:idavidrein__gpqa/gpqa_diamond'", "could not be reached", ".jsonl", ".parquet",
                 "pass its path as the source"):
        assert part in message, part


def test_a_wrong_name_or_a_missing_config_says_what_to_pass(monkeypatch):
    failing_tfds(monkeypatch, DatasetNotFoundError('"idavidrein__gpqb" is not listed in Huggingface datasets.'))
    with pytest.raises(DatasetError, match=r"(?s)No such dataset.*huggingface.co/datasets/<org>/<name>.*\.jsonl"):
        load_questions("huggingface:Idavidrein/gpqb", split="train")
    try:
        raise RuntimeError("Failed to load Huggingface dataset builder") from ValueError(
            "Config name is missing. Please pick one among the available configs: ['algebra', ...]")
    except RuntimeError as e:
        failing_tfds(monkeypatch, e)
    with pytest.raises(DatasetError, match=r"(?s)needs a config.*'\*' for all.*'algebra'"):
        load_questions("huggingface:EleutherAI/hendrycks_math", split="test")
    with pytest.raises(DatasetError, match="needs the list of configs"):
        load_questions("huggingface:Idavidrein/gpqa/*", split="train")
    with pytest.raises(DatasetError, match="given twice"):
        load_questions("huggingface:Idavidrein/gpqa/gpqa_diamond", config="gpqa_main", split="train")
    with pytest.raises(DatasetError, match="not a name tfds accepts"):
        load_questions("huggingface:Idavidrein/gpqa", config="gpqa diamond", split="train")
    with pytest.raises(DatasetError, match="expected 'huggingface:<org>/<name>'"):
        load_questions("huggingface:a/b/c/d", split="train")
    with pytest.raises(ValueError, match="config=.*applies to tfds"):
        load_questions(str(FIXTURES / "gsm8k.jsonl"), config="main")


def test_release_selection_keeps_duplicates_and_shuffles_as_datasets_does(tmp_path):
    path = tmp_path / "mm.jsonl"
    rows = [{"query": f"Q{i % 7}?", "response": f"... The answer is: {i}", "type": "MATH_AnsAug"}
            for i in range(12)] + [{"query": "GSM?", "response": "The answer is: 1", "type": "GSM_AnsAug"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dropped = load_questions(str(path))
    kept = load_questions(str(path), duplicates="keep")
    assert len(dropped) == 7 and dropped.duplicates == 5
    assert len(kept) == 12 and kept.filtered == 1 and len({q.prompt_id for q in kept}) == 12
    assert kept[7].prompt_id == kept[0].prompt_id + "#2" and kept[7].gold == "7"
    # datasets.Dataset.shuffle(seed=42) permutes by np.random.default_rng(42).permutation(n).
    order = np.random.default_rng(42).permutation(12)
    chosen = drift_jax.data.questions.select_prompts(kept, 5, "release")
    assert chosen == [kept[i] for i in order[:5]] and chosen != kept[:5]
    assert drift_jax.data.questions.select_prompts(kept, 5, "first") == kept[:5]
    with pytest.raises(ValueError, match="selection"):
        drift_jax.data.questions.select_prompts(kept, 5, "random")


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
