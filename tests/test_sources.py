"""Question sources: parquet/json/jsonl files, tfds (faked), Hub names as tfds spells
them, and the errors of a failed load."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_jax.data import sources
from drift_jax.data.questions import Question, load_questions
from drift_jax.data.sources import DatasetError

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def test_parquet_json_and_jsonl_give_the_same_questions(tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "mmlu_pro.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "mmlu_pro.parquet")
    (tmp_path / "mmlu_pro.json").write_text(json.dumps(records))
    expected = load_questions(str(FIXTURES / "mmlu_pro.jsonl"))
    assert load_questions(str(tmp_path / "mmlu_pro.parquet")) == expected
    assert load_questions(str(tmp_path / "mmlu_pro.json")) == expected


# -- TensorFlow Datasets -----------------------------------------------------------------------

def tfds_module(load) -> types.ModuleType:
    """A stand-in for tensorflow_datasets whose every split is ``load(name, split)``,
    through ``tfds.load`` + ``as_numpy`` (with TensorFlow) and ``tfds.data_source`` (without)."""
    module = types.ModuleType("tensorflow_datasets")
    module.load = lambda name, split, data_dir=None: load(name, split)
    module.data_source = lambda name, split, data_dir=None, builder_kwargs=None: load(name, split)
    module.as_numpy = lambda ds: iter(ds)
    return module


def fake_tfds(records, calls):
    def load(name, split):
        calls.append((name, split))
        return records

    return tfds_module(load)


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
    assert sources.tfds_dataset_name(hub_id) == tfds_name
    assert vendored_rule(hub_id) == tfds_name  # the table is tfds's rule


def test_tfds_own_conversion_matches_the_table_when_installed():
    convert = sources._tfds_conversion()
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
    assert sources.tfds_dataset_name("Idavidrein/gpqa") == "from_tfds"
    assert calls == ["Idavidrein/gpqa"]


@pytest.mark.parametrize("source", [s for s in paper_sources() if "mmlu-redux" not in s])
def test_every_paper_source_hands_tfds_its_own_names_configs_included(source):
    assert sources.tfds_names(source) == expected_tfds_names(source)


def test_mmlu_redux_2_loads_its_57_subjects():
    names = sources.tfds_names("huggingface:edinburgh-dawg/mmlu-redux-2.0/*")
    assert len(names) == 57 == len(set(names))
    assert names[0] == "huggingface:edinburgh_dawg__mmlu_redux_2_0/abstract_algebra"
    assert names[-1] == "huggingface:edinburgh_dawg__mmlu_redux_2_0/world_religions"
    # tfds passes a config to the Hub verbatim; every paper config is already a tfds name.
    configs = [n.split("/", 1)[1] for n in names] + HENDRYCKS + ["gpqa_diamond"]
    assert all(vendored_rule(c) == c for c in configs)
    assert names == sources.tfds_names("huggingface:edinburgh-dawg/mmlu-redux-2.0", config="*")


def test_cais_mmlu_loads_the_releases_configs():
    """benchmark.load_mmlu_dataset loops over get_dataset_config_names("cais/mmlu"): the
    57 subjects and "all" in the Hub's (alphabetical) order, and "auxiliary_train", whose
    test split does not exist (the load fails, a warning, the loop goes on)."""
    names = sources.tfds_names("huggingface:cais/mmlu/*")
    configs = [n.split("/", 1)[1] for n in names]
    assert names[0] == "huggingface:cais__mmlu/abstract_algebra"
    assert configs[:3] == ["abstract_algebra", "all", "anatomy"] and len(configs) == 58
    redux = [n.split("/", 1)[1] for n in sources.tfds_names("huggingface:edinburgh-dawg/mmlu-redux-2.0/*")]
    assert sorted(set(configs) - {"all"}) == sorted(redux)  # the same 57 subjects
    assert configs == sorted(configs) and "auxiliary_train" not in configs


def test_a_dataset_built_with_tfds_is_read_through_tfds_offline(tmp_path, monkeypatch):
    """A two-config dataset built here in tensorflow-datasets' own format (a
    GeneratorBasedBuilder, prepared as array_record files under TFDS_DATA_DIR) and read by
    load_questions through tfds, without TensorFlow and without the network: the configs
    one after the other, the question in both kept under the release's protocol."""
    tfds = pytest.importorskip("tensorflow_datasets")
    rows = {"algebra": [("What is $1+1$?", "$\\boxed{2}$"), ("Solve $x+1=3$.", "$x=\\boxed{2}$")],
            "geometry": [("What is $1+1$?", "$\\boxed{2}$"), ("Angles of a triangle?", "$\\boxed{180}$")]}

    class DriftJaxTestMath(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = tuple(tfds.core.BuilderConfig(name=name) for name in rows)

        def _info(self):
            features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in ("problem", "solution", "type")})
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i, (problem, solution) in enumerate(rows[self.builder_config.name]):
                yield i, {"problem": problem, "solution": solution, "type": self.builder_config.name}

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    release = load_questions("tfds:drift_jax_test_math", config=["algebra", "geometry"], split="test",
                             protocol="release")
    assert [q.text for q in release] == [p for name in rows for p, _ in rows[name]]
    assert [q.gold for q in release] == ["2", "2", "2", "180"] and release.duplicates == 1
    assert release.layout == "hendrycks_math"
    ours = load_questions("tfds:drift_jax_test_math", config=["algebra", "geometry"], split="test[:2]")
    assert [q.text for q in ours] == ["What is $1+1$?", "Solve $x+1=3$.", "Angles of a triangle?"]
    for name in rows:  # prepared where TFDS_DATA_DIR says, in the format tfds reads without TensorFlow
        assert list((tmp_path / "drift_jax_test_math" / name / "1.0.0").glob("*.array_record-*"))


def test_multi_config_sources_are_concatenated_in_config_order(monkeypatch):
    calls = []

    def load(name, split):
        calls.append((name, split))
        subject = name.rsplit("/", 1)[1]
        return [{"question": f"{subject} question {i}?".encode(), "choices": np.array([b"x", b"y"], dtype=object),
                 "answer": np.int64(i % 2)} for i in range(2)]

    module = tfds_module(load)
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
    module.load = module.data_source = lambda name, split, data_dir=None, builder_kwargs=None: [
        {"question": b"q", "choices": np.array([b"x"], dtype=object), "answer": np.int64(3)}]
    with pytest.raises(DatasetError, match=r"mmlu-redux-2.0/anatomy\[test\]:1: field 'answer'"):
        load_questions("huggingface:edinburgh-dawg/mmlu-redux-2.0", config=["anatomy"], split="test")


class ConnectError(OSError):
    pass


class DatasetNotFoundError(ValueError):
    pass


def failing_tfds(monkeypatch, error):
    def load(name, split):
        raise error

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", tfds_module(load))


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
