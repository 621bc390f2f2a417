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


def run_in_process(args, cwd=None) -> subprocess.CompletedProcess:
    """``python experiments/run.py *args`` in this process, as a CompletedProcess
    (returncode, stdout, stderr). Same code path as the command line (override checks,
    absl flag parsing, ``main``), without a new interpreter's ~3 s of imports, and with
    this process's compiled programs reused. A run that must be killed needs a real
    subprocess (``run_tiny(kill=...)``)."""
    import contextlib
    import io

    from absl import flags

    from helpers import run_module

    run = run_module()
    argv = [RUN, *map(str, args)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    previous, previous_argv = os.getcwd(), sys.argv
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                argv, run._OVERRIDES[:] = run.check_overrides(argv, os.path.join(REPO, "experiments/configs/default.py"))
                sys.argv = argv  # the config flag reads its overrides from sys.argv
                for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                    delattr(flags.FLAGS, name)  # the previous run's override flags
                flags.FLAGS.unparse_flags()
                run.main(flags.FLAGS(argv))
            except SystemExit as e:  # sys.exit(message) prints it and exits 1, as Python does
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else 1
            except Exception:  # an uncaught error: its traceback on stderr, exit status 1
                import traceback
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(previous)
        sys.argv = previous_argv
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """In-process runs use a persistent compilation cache too (runs in a subprocess get
    one through ``run_env``): the runner's "auto" keeps a cache that is already set."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache_in_process")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def run_tiny(run_env):
    """``run_tiny(workdir, kill=None, config=TINY) -> stdout``: run.py in a subprocess;
    ``kill``: (kind, n, path suffix) of ``helpers.install_kill``, after which the run
    must have died of SIGKILL."""
    def run(workdir, kill=None, config=TINY, extra=()):
        args = [RUN, f"--config={config}", f"--workdir={workdir}", *extra]
        if kill is None:
            out = run_in_process(args[1:])
        else:
            code = (f"import runpy, sys, helpers; helpers.install_kill(*{kill!r}); "
                    f"sys.argv = {args!r}; runpy.run_path({RUN!r}, run_name='__main__')")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                                 env=run_env)
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


TINY_MATH = os.path.join(REPO, "tests", "configs", "tiny_math.py")


@pytest.fixture(scope="session")
def tiny_math_run(tmp_path_factory, run_tiny):
    """``tiny_math_run(protocol) -> (workdir, checkpoint, stdout)``: one finished run of
    tests/configs/tiny_math.py (the paper pipeline, shrunk) on a random-init HF checkpoint
    under ``task.protocol=protocol``, made once per session per protocol; copy before
    changing."""
    from helpers import tiny_hf_checkpoint

    runs: dict = {}

    def get(protocol: str):
        if protocol not in runs:
            root = tmp_path_factory.mktemp(f"tiny_math_{protocol}")
            checkpoint = str(root / "init")
            tiny_hf_checkpoint(checkpoint)
            stdout = run_tiny(root / "run", config=TINY_MATH,
                              extra=(f"--config.model.checkpoint={checkpoint}", f"--config.task.protocol={protocol}"))
            runs[protocol] = (root / "run", checkpoint, stdout)
        return runs[protocol]

    return get
