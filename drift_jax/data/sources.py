"""Where questions come from: local ``.jsonl`` / ``.json`` / ``.parquet`` files, TensorFlow
Datasets (``tfds:<name>``) and Hugging Face Hub datasets read through tfds
(``huggingface:<org>/<name>[/<config>]``).

``read_records`` yields ``(where, record)`` pairs: ``where`` is ``file:N`` (for ``.jsonl``
the line number, for ``.json`` and ``.parquet`` the 1-based record number) or
``source[split]:N`` for tfds, N 1-based too.

tfds sources need tensorflow-datasets, imported only when one is read. A Hub id is handed
to tfds as ``huggingface:<tfds's own name for it>[/<config>]`` (``tfds_names``; the
conversion is tfds's ``to_tfds_name``); ``/*`` reads every config in ``HUB_CONFIGS``, one
after the other, as the release loops over MATH's, MMLU's and MMLU-Redux-2.0's subjects.
With TensorFlow installed a split is read with ``tfds.load``; without it, with
``tfds.data_source`` (tfds's TensorFlow-free reader of array_record files, which it
prepares in that format). ``TFDS_DATA_DIR``, read at each load, is the data directory
(tfds's default otherwise). A failed load raises ``DatasetError`` naming the dataset,
config and split, and what to do (offline: a local .jsonl/.parquet file).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from drift_jax.data.records import BadLines, BadRecord, json_lines


class DatasetError(BadRecord):
    """A source or record that cannot be read as questions; the message says where."""


# -- files: each yields (where, record); ``where`` is "<source>:<1-based number>" --------

def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(records).__name__}"
                           " (use .jsonl for one record a line)")
    for i, record in enumerate(records, 1):
        yield f"{path}:{i}", record


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from e
    batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    records = (record for batch in batches for record in batch.to_pylist())
    for i, record in enumerate(records, 1):
        yield f"{path}:{i}", record


def _to_python(value: Any) -> Any:
    """tfds's numpy values as plain Python: bytes -> str, arrays -> lists, scalars -> items."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _to_python(value.item()) if value.ndim == 0 else [_to_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


# setup.py's "data" extra installs these (tfds, its TensorFlow, and the Hugging Face
# datasets library its "huggingface:" builder reads the Hub with).
TFDS_PACKAGES = ("tensorflow-datasets>=4.9", "tensorflow>=2.15", "datasets>=2.14")


# -- Hugging Face Hub datasets through tensorflow-datasets -----------------------------------

HUB_PREFIX = "huggingface:"
ALL_CONFIGS = "*"

# The 57 MMLU subjects: MMLU-Redux-2.0's configs, and cais/mmlu's besides "all" and
# "auxiliary_train".
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")

# The configs the release loops over for its multi-config benchmarks, in the order its
# ``datasets.get_dataset_config_names`` returns them (src/benchmark.py): ``"*"`` loads them
# all, one after the other. Hendrycks MATH: the release's own fallback list; MMLU-Redux-2.0:
# its 57 MMLU subjects; cais/mmlu (the release's "mmlu"): its configs in the Hub's order,
# "all" (every subject's test questions) among them, so each question is read twice, less
# "auxiliary_train", which has no test split (the release's load of it fails and is skipped).
HUB_CONFIGS: dict[str, tuple[str, ...]] = {
    "EleutherAI/hendrycks_math": (
        "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
        "prealgebra", "precalculus"),
    "edinburgh-dawg/mmlu-redux-2.0": MMLU_SUBJECTS,
    "cais/mmlu": tuple(sorted((*MMLU_SUBJECTS, "all"))),
}
# A config as tfds's name parser accepts it (tensorflow_datasets/core/naming.py).
_TFDS_CONFIG_RE = re.compile(r"[\w\-.]+")
_INVALID_NAME_CHARACTER = re.compile(r"[^a-zA-Z0-9_]")


def _vendored_to_tfds_name(name: str) -> str:
    # tfds's rule (conversion_utils.to_tfds_name, tensorflow-datasets 4.9.4 and later; earlier
    # huggingface_utils.convert_hf_name): lower-case, "/" -> "__", then every character
    # outside [a-zA-Z0-9_] -> "_" (py_utils.make_valid_name).
    return _INVALID_NAME_CHARACTER.sub("_", name.lower().replace("/", "__"))


def _tfds_conversion() -> Callable[[str], str] | None:
    """tfds's own Hub-name conversion, or None when tensorflow-datasets is not installed."""
    try:
        from tensorflow_datasets.core.utils.conversion_utils import to_tfds_name
        return to_tfds_name
    except ImportError:
        pass
    try:
        from tensorflow_datasets.core.utils.huggingface_utils import convert_hf_name
        return convert_hf_name
    except ImportError:
        return None


def tfds_dataset_name(hub_id: str) -> str:
    """The name tensorflow-datasets gives the Hugging Face dataset ``hub_id`` ("org/name"):
    tfds's own ``to_tfds_name`` (``convert_hf_name`` before 4.9.4) when tfds is installed,
    else the same rule vendored here (tests/test_questions.py checks both against a table).
    E.g. "meta-math/MetaMathQA" -> "meta_math__metamathqa"."""
    convert = _tfds_conversion()
    return convert(hub_id) if convert is not None else _vendored_to_tfds_name(hub_id)


def parse_hub_source(source: str, config: str | list | tuple | None = None) -> tuple[str, list[str | None]]:
    """``(hub_id, configs)`` of ``huggingface:<org>/<name>[/<config>]``; ``config`` (a name,
    a list of names or ``"*"``) may be given instead of the third part. ``"*"`` means every
    config in ``HUB_CONFIGS``. ``[None]`` when no config is given."""
    parts = source[len(HUB_PREFIX):].split("/")
    if len(parts) > 3 or not all(parts):
        raise DatasetError(f"{source}: expected 'huggingface:<org>/<name>' or 'huggingface:<org>/<name>/<config>' "
                           "(the Hub id as on huggingface.co/datasets/<org>/<name>)")
    hub_id = "/".join(parts[:2])
    if len(parts) == 3:
        if config is not None:
            raise DatasetError(f"{source}: the config is given twice (in the source and as config={config!r})")
        config = parts[2]
    if config == ALL_CONFIGS:
        if hub_id not in HUB_CONFIGS:
            raise DatasetError(f"{source}: config '*' needs the list of configs, known only for "
                               f"{sorted(HUB_CONFIGS)}; pass config=[...] with this dataset's configs")
        return hub_id, list(HUB_CONFIGS[hub_id])
    configs = [config] if config is None or isinstance(config, str) else list(config)
    for c in configs:
        if c is not None and not _TFDS_CONFIG_RE.fullmatch(c):
            raise DatasetError(f"{source}: config {c!r} is not a name tfds accepts (letters, digits, '_', '-', '.')")
    if not configs:
        raise DatasetError(f"{source}: config=[] names no config")
    return hub_id, configs


def tfds_names(source: str, config: str | list | tuple | None = None) -> list[str]:
    """The names ``load_questions`` hands to ``tfds.load`` for ``source``, one per config:
    ``huggingface:<tfds's name of the Hub id>[/<config>]``. The config is passed verbatim:
    tfds's Hugging Face builder hands it to the Hub as written. ``tfds:<name>`` sources
    are passed as they are (``/<config>`` appended when ``config`` is given)."""
    if source.startswith("tfds:"):
        name = source[len("tfds:"):]
        if config is None:
            return [name]
        return [f"{name}/{c}" for c in ([config] if isinstance(config, str) else config)]
    hub_id, configs = parse_hub_source(source, config)
    base = HUB_PREFIX + tfds_dataset_name(hub_id)
    return [base if c is None else f"{base}/{c}" for c in configs]


_OFFLINE_HINTS = ("connection", "connect", "timeout", "timed out", "offline", "network", "resolve",
                  "name or service not known", "temporary failure", "unreachable", "max retries")
_NOT_FOUND_HINTS = ("datasetnotfound", "not listed", "repositorynotfound", "doesn't exist", "does not exist",
                    "not found", "404", "gated", "401", "403")
_CONFIG_HINTS = ("config name is missing", "builderconfig", "unknown config", "config")


def _failure_text(error: BaseException) -> str:
    seen, parts = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts += [cls.__name__ for cls in type(error).__mro__] + [str(error)]
        error = error.__cause__ or error.__context__
    return " ".join(parts).lower()


def _tfds_failure(source: str, name: str, config: str | None, split: str, error: Exception) -> DatasetError:
    """A ``DatasetError`` naming the dataset, config and split, with what to do."""
    text = _failure_text(error)
    what = f"{source!r}" + ("" if config is None else f", config {config!r}") + f", split {split!r}"
    local = ("Offline, or to skip the Hub: export the data once to a local .jsonl or .parquet file "
             "(e.g. datasets.load_dataset(...).to_json('data.jsonl')) and pass its path as the source.")
    if any(h in text for h in _OFFLINE_HINTS):
        hint = ("The Hugging Face Hub could not be reached: tfds's 'huggingface:' namespace needs it even for "
                "data already downloaded (it lists the Hub's datasets to resolve the name).")
    elif any(h in text for h in _NOT_FOUND_HINTS):
        hint = ("No such dataset or config on the Hub, or no access: check the Hub id as spelled on "
                "huggingface.co/datasets/<org>/<name> (source 'huggingface:<org>/<name>'), the config, and for "
                "a gated dataset (GPQA) that its terms are accepted and you are logged in (huggingface-cli login).")
    elif any(h in text for h in _CONFIG_HINTS):
        hub_id = source[len(HUB_PREFIX):].split("/", 2)
        known = HUB_CONFIGS.get("/".join(hub_id[:2]))
        hint = ("The dataset needs a config: pass 'huggingface:<org>/<name>/<config>' or config=..."
                + (f" (known: '*' for all, or one of {list(known)})" if known else ""))
    else:
        hint = "Check the source, config and split."
    return DatasetError(f"{source}: tensorflow-datasets could not load {what} as {name!r}: "
                        f"{type(error).__name__}: {error}. {hint} {local}")


def _read_tfds(source: str, split: str | None, config=None) -> Iterator[tuple[str, Any]]:
    """Checks the source, split and tfds's presence now; reads lazily."""
    names = tfds_names(source, config)
    if split is None:
        raise ValueError(f"a tfds source needs a split (e.g. split='test'), none given for {source!r}")
    configs = [n.split("/", 1)[1] if "/" in n else None for n in names]
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"loading {source!r} needs TensorFlow Datasets: pip install {' '.join(TFDS_PACKAGES)} (the "
            "'data' extra of drift-jax), or export the data to a local .jsonl/.json/.parquet file") from e
    return _iter_tfds(tfds, source, split, names, configs)


def _tfds_split(tfds, name: str, split: str):
    """The records of one split: ``tfds.load`` with TensorFlow, else ``tfds.data_source``
    (no TensorFlow needed: array_record files, prepared in that format when missing)."""
    data_dir = os.environ.get("TFDS_DATA_DIR") or None
    if importlib.util.find_spec("tensorflow") is not None:
        return tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir))
    return iter(tfds.data_source(name, split=split, data_dir=data_dir, builder_kwargs={"file_format": "array_record"}))


def _iter_tfds(tfds, source, split, names, configs) -> Iterator[tuple[str, Any]]:
    # Several configs are read one after the other, in order (the release's loop).
    for name, cfg in zip(names, configs):
        base = source[:-2] if source.endswith("/" + ALL_CONFIGS) else source
        where = base if cfg is None or base.endswith("/" + cfg) else f"{base}/{cfg}"
        try:
            records = _tfds_split(tfds, name, split)
            for i, record in enumerate(records, 1):
                yield f"{where}[{split}]:{i}", _to_python(record)
        except DatasetError:
            raise
        except Exception as e:  # tfds, the Hub client and TensorFlow raise many kinds
            raise _tfds_failure(source, name, cfg, split, e) from e


def read_records(source: str, split: str | None, policy: BadLines, config=None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` of every record of ``source`` (a file, ``tfds:<name>`` or
    ``huggingface:<org>/<name>``), in order, read lazily; the source, split and config are
    checked now. ``policy`` handles a ``.jsonl`` line that is not JSON."""
    if source.startswith(("tfds:", HUB_PREFIX)):
        return _read_tfds(source, split, config)
    if config is not None:
        raise ValueError(f"config={config!r} applies to tfds / Hugging Face sources only, not to the file {source}")
    path = Path(source)
    readers = {".jsonl": lambda p: json_lines(str(p), policy), ".json": _read_json, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DatasetError(f"{source}: unknown source; expected a .jsonl, .json or .parquet file, "
                           "'tfds:<name>' or 'huggingface:<org>/<name>'")
    if split is not None:
        raise ValueError(f"split={split!r} applies to tfds sources only, not to the file {source}")
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    return readers[path.suffix](path)
