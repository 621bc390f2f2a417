"""experiments/notebooks/quickstart.ipynb: its code cells run top to bottom (as Colab would,
from a checkout) on seconds-scale configs, and produce the results they display."""

import json
import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "quickstart.ipynb")


def test_quickstart_code_cells_run(tmp_path, monkeypatch, tiny_run, comparison_run):
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells, "the notebook has no code"
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DRIFT_QUICKSTART_DEFAULT", "experiments/configs/tiny.py")
    monkeypatch.setenv("DRIFT_QUICKSTART_COMPARISON", "experiments/configs/comparison_tiny.py")
    monkeypatch.setenv("DRIFT_QUICKSTART_WORKDIR", str(tmp_path))
    # The cells rerun the shared tiny runs (only their reports are redone).
    shutil.copytree(tiny_run[0], tmp_path / "default")
    shutil.copytree(comparison_run[0], tmp_path / "comparison")
    namespace: dict = {}
    for source in cells:
        exec(compile(source, NOTEBOOK, "exec"), namespace)  # noqa: S102 - our own notebook
    assert set(namespace["default"]["methods"]) == {"reference", "sft", "drift"}
    assert "online_rl" in namespace["comparison"]["methods"]
    for plot in ("multi_at_k.png", "cost.png", "correction_rate.png"):
        assert (tmp_path / "comparison" / plot).stat().st_size > 0


QWEN_NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "qwen_0_5b.ipynb")


def test_qwen_notebook_code_cells_run_offline_on_the_tiny_checkpoint(tmp_path, monkeypatch, capsys, tiny_math_run):
    """qwen_0_5b.ipynb, top to bottom, with the paper config swapped for tests/configs/tiny_math.py
    (release protocol, fixture datasets) and Qwen for a random-init checkpoint. The cells
    continue the session's release-protocol tiny-math run (copied): the same config, so the
    workdir ledger finds every stage current, as it does for a Colab user re-running a cell."""
    finished, checkpoint, _ = tiny_math_run("release")
    with open(QWEN_NOTEBOOK) as f:
        nb = json.load(f)
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DRIFT_NOTEBOOK_MODEL", checkpoint)
    monkeypatch.setenv("DRIFT_NOTEBOOK_CONFIG", os.path.join(REPO, "tests", "configs", "tiny_math.py"))
    monkeypatch.setenv("DRIFT_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("DRIFT_NOTEBOOK_SIZE", "{}")
    shutil.copytree(finished, tmp_path / "run")
    namespace: dict = {}
    for source in cells:
        exec(compile(source, QWEN_NOTEBOOK, "exec"), namespace)  # noqa: S102 - our own notebook
    assert namespace["cfg"].task.protocol == "release"
    results = namespace["results"]
    assert set(results["methods"]) == {"reference", "drift"}
    assert set(results["benchmarks"]) == {"math500", "mmlu_pro"}
    assert "stages run: none" in capsys.readouterr().out
