"""Shared fixtures: a tiny model config covering GQA, q/k/v bias, q/k norm and llama3 RoPE,
and ONE run of ``experiments/run.py`` on the tiny config shared by every test that reads
a finished run (pipeline checks, the notebook)."""

import os
import signal
import subprocess
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from drift_jax.models import ModelConfig, RopeScaling  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "experiments", "run.py")
TINY = os.path.join(REPO, "experiments", "configs", "tiny.py")
sys.path.insert(0, REPO)  # tests read the experiments' configs and stages


@pytest.fixture
def tiny_cfg():
    return ModelConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=12, qkv_bias=True, qk_norm=True,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=8),
    )


@pytest.fixture(scope="session")
def run_env(tmp_path_factory):
    """The runs' environment: the repo importable, and one persistent compilation cache,
    so later runs skip compiling (the same executables: the same numbers)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="session")
def run_tiny(run_env):
    """``run_tiny(workdir, kill=None, config=TINY) -> stdout``: run.py in a subprocess;
    ``kill``: (kind, n, path suffix) of ``helpers.install_kill``, after which the run
    must have died of SIGKILL."""
    def run(workdir, kill=None, config=TINY, extra=()):
        args = [RUN, f"--config={config}", f"--workdir={workdir}", *extra]
        if kill is None:
            cmd = [sys.executable, *args]
        else:
            code = (f"import runpy, sys, helpers; helpers.install_kill(*{kill!r}); "
                    f"sys.argv = {args!r}; runpy.run_path({RUN!r}, run_name='__main__')")
            cmd = [sys.executable, "-c", code]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=run_env)
        if kill is None:
            assert out.returncode == 0, out.stderr[-3000:]
        else:
            assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-3000:])
        return out.stdout

    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, run_tiny):
    """(workdir, stdout) of one finished run of the tiny config. Read it, do not change
    it: copy it first (``shutil.copytree``) to rerun or extend it."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    return workdir, run_tiny(workdir)


@pytest.fixture(scope="session")
def comparison_run(tmp_path_factory, run_tiny):
    """(workdir, stdout) of one finished run of experiments/configs/comparison_tiny.py
    (every method), shared like ``tiny_run``."""
    workdir = tmp_path_factory.mktemp("comparison_run")
    return workdir, run_tiny(workdir, config=os.path.join(REPO, "experiments", "configs", "comparison_tiny.py"))
