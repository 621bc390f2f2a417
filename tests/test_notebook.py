"""The notebooks in experiments/notebooks: their code cells run top to bottom from where
Jupyter starts their kernel (the notebook's own folder) on seconds-scale configs, find the
checkout from there, and produce the results they display."""

import json
import os
import re
import shutil

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "experiments", "notebooks")
NOTEBOOK = os.path.join(NOTEBOOKS, "quickstart.ipynb")
QWEN_NOTEBOOK = os.path.join(NOTEBOOKS, "qwen_0_5b.ipynb")


def code_cells(path: str) -> list[str]:
    with open(path) as f:
        nb = json.load(f)
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells, f"{path} has no code"
    return cells


def run_cells(path: str, cells: list[str]) -> dict:
    namespace: dict = {}
    for source in cells:
        exec(compile(source, path, "exec"), namespace)  # noqa: S102 - our own notebook
    return namespace


@pytest.mark.parametrize("path", [NOTEBOOK, QWEN_NOTEBOOK], ids=os.path.basename)
def test_the_first_cell_finds_the_checkout_from_the_notebooks_folder(path, tmp_path, monkeypatch):
    """From experiments/notebooks (Jupyter's working directory for the notebook) the first
    cell walks up to the checkout; outside any checkout and without REPO_URL it stops with
    a message that says what to set, cloning nothing."""
    setup = code_cells(path)[0]
    monkeypatch.delenv("DRIFT_REPO_URL", raising=False)
    monkeypatch.chdir(os.path.join(REPO, "experiments", "notebooks"))
    namespace = run_cells(path, [setup])
    assert os.getcwd() == REPO and str(namespace["repo"]) == REPO
    assert namespace["find_checkout"](os.path.join(REPO, "drift_jax", "envs")) == namespace["repo"]
    monkeypatch.chdir(tmp_path)  # no checkout above a temporary folder
    with pytest.raises(SystemExit, match="set REPO_URL"):
        run_cells(path, [setup])
    assert os.listdir(tmp_path) == []


def test_quickstart_code_cells_run(tmp_path, monkeypatch, capfd, comparison_run):
    """The quickstart, as Jupyter runs it (from experiments/notebooks), on the tiny configs.
    The default and the comparison share one workdir, so the comparison reuses the
    default's reference and rollouts: in a workdir that already holds the finished
    comparison (the session's shared run, copied), neither cell runs a stage."""
    cells = code_cells(NOTEBOOK)
    monkeypatch.chdir(NOTEBOOKS)
    monkeypatch.setenv("DRIFT_QUICKSTART_DEFAULT", "experiments/configs/tiny.py")
    monkeypatch.setenv("DRIFT_QUICKSTART_COMPARISON", "experiments/configs/comparison_tiny.py")
    workdir = tmp_path / "quickstart"
    monkeypatch.setenv("DRIFT_QUICKSTART_WORKDIR", str(workdir))
    shutil.copytree(comparison_run[0], workdir)
    namespace = run_cells(NOTEBOOK, cells)
    assert set(namespace["default"]["methods"]) == {"reference", "sft", "drift"}
    assert "online_rl" in namespace["comparison"]["methods"]
    for plot in ("multi_at_k.png", "cost.png", "correction_rate.png"):
        assert (workdir / plot).stat().st_size > 0
    out = capfd.readouterr().out
    assert out.count("stages run: none") == 2, out[-3000:]
    # The runs print their results tables; the notebook does not print them again.
    assert out.count("| method | multi@1 |") == 2


def test_qwen_notebook_code_cells_run_offline_on_the_tiny_checkpoint(tmp_path, monkeypatch, capsys, tiny_math_run):
    """qwen_0_5b.ipynb, top to bottom from experiments/notebooks, with the paper config
    swapped for tests/configs/tiny_math.py (release protocol, fixture datasets) and Qwen for
    a random-init checkpoint. The cells continue the session's release-protocol tiny-math
    run (copied): the same config, so the workdir ledger finds every stage current, as it
    does for a Colab user re-running a cell."""
    finished, checkpoint, _ = tiny_math_run("release")
    cells = code_cells(QWEN_NOTEBOOK)
    monkeypatch.chdir(NOTEBOOKS)
    monkeypatch.setenv("DRIFT_NOTEBOOK_MODEL", checkpoint)
    monkeypatch.setenv("DRIFT_NOTEBOOK_CONFIG", os.path.join(REPO, "tests", "configs", "tiny_math.py"))
    monkeypatch.setenv("DRIFT_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("DRIFT_NOTEBOOK_SIZE", "{}")
    shutil.copytree(finished, tmp_path / "run")
    namespace = run_cells(QWEN_NOTEBOOK, cells)
    assert namespace["cfg"].task.protocol == "release"
    results = namespace["results"]
    assert set(results["methods"]) == {"reference", "drift"}
    assert set(results["benchmarks"]) == {"math500", "mmlu_pro"}
    assert "stages run: none" in capsys.readouterr().out


def test_the_notebooks_install_jax_for_cuda13_as_readme_does():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert '"jax[cuda13]"' in readme
    for path in (NOTEBOOK, QWEN_NOTEBOOK):
        with open(path) as f:
            text = f.read()
        assert "cuda12" not in text
    with open(QWEN_NOTEBOOK) as f:
        text = f.read()
    # The version the accelerator extras pin (setup.py), which the compile checks cover.
    with open(os.path.join(REPO, "setup.py")) as f:
        pinned = re.search(r'ACCELERATOR_JAX = "([^"]+)"', f.read()).group(1)
    assert f"jax[cuda13]=={pinned}" in text and f"jax[tpu]=={pinned}" in text
