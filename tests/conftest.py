"""Shared fixtures: a tiny model config covering GQA, q/k/v bias, q/k norm and llama3 RoPE,
and ONE run of ``experiments/run.py`` on the tiny config shared by every test that reads
a finished run (pipeline checks, the notebook), in both xdist workers; one persistent
compilation cache for every process of the pytest run."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The tests run on the CPU. With the CUDA plugin installed (requirements-aot.txt, for the
# compile-only H100 of tests/test_aot.py), JAX would otherwise try to open a GPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA without LLVM's optimizations, here and in the runs the tests start: the tests' tiny
# programs take longer to compile than to run, and the compile-bound test files take about
# a quarter less CPU time this way. Both sides of every comparison are compiled alike.
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 compiles as users' runs do.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402

from drift_jax.models import ModelConfig, RopeScaling  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "experiments", "run.py")
TINY = os.path.join(REPO, "experiments", "configs", "tiny.py")
sys.path.insert(0, REPO)  # tests read the experiments' configs and stages


# The slowest test files, longest first, started before the rest: under `-n 2 --dist
# loadfile` a worker takes the next whole file whenever it runs out, so when the long ones
# start first the two workers end together. (xdist would otherwise start the files with
# the most tests first, and the multi-process and kill-and-rerun files, few tests each,
# last.) Measured alone: `python -m pytest -q tests/<file> --durations=0`.
SLOW_FILES_FIRST = (
    "test_multihost.py", "test_engine.py", "test_readme.py", "test_lora.py", "test_aot.py",
    "test_packing.py", "test_sampling.py", "test_runner.py", "test_episodes.py", "test_online_rl.py",
    "test_reliability.py", "test_sharding.py", "test_pipeline.py", "test_records_interop.py",
    "test_train.py", "test_notebook.py", "test_models_transformer.py",
)


def pytest_configure(config):
    if getattr(config.option, "loadscopereorder", False):  # xdist >= 3.6 reorders by test count
        config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: files keep their order


@pytest.fixture
def tiny_cfg():
    return ModelConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=12, qkv_bias=True, qk_norm=True,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=8),
    )


def shared_root(tmp_path_factory) -> pathlib.Path:
    """A folder every process of this pytest run sees: the run's base temporary folder,
    whose subfolders are the xdist workers' own (``-n 2``: each worker has its own
    session, so a session fixture alone would be made once per worker)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory, name: str, make):
    """``make(folder) -> str`` run once per pytest run, whichever worker asks first, into
    ``<shared root>/<name>``; (folder, its result). A worker that asks while another makes
    it waits for that one. A failed ``make`` leaves nothing behind: the next to ask tries
    again (and fails the same way, with its own traceback)."""
    import fcntl

    root = shared_root(tmp_path_factory)
    folder, result = root / name, root / f"{name}.result"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            value = make(folder)
            result.write_text(value)
        return folder, result.read_text()


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory) -> str:
    """One persistent compilation cache for the whole pytest run: this process's jitted
    functions, the other xdist worker's and the runs in subprocesses (``run_env``) all
    read and fill it, so a program compiled once is loaded everywhere else (the same
    executables: the same numbers)."""
    path = shared_root(tmp_path_factory) / "jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def run_env(compilation_cache_dir):
    """The runs' environment: the repo importable, and the run's one persistent
    compilation cache, so later runs skip compiling."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
            "JAX_COMPILATION_CACHE_DIR": compilation_cache_dir,
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
def _compilation_cache(compilation_cache_dir):
    """In-process runs use the persistent compilation cache too (the runner's "auto"
    keeps a cache that is already set)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
    # In case jax was imported before this file set the variable.
    jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] != "0")
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
    """(workdir, stdout) of one finished run of the tiny config, made once per pytest run
    (``made_once``: both xdist workers read the same). Read it, do not change it: copy it
    first (``shutil.copytree``) to rerun or extend it."""
    return made_once(tmp_path_factory, "tiny_run", run_tiny)


@pytest.fixture(scope="session")
def comparison_run(tmp_path_factory, run_tiny):
    """(workdir, stdout) of one finished run of experiments/configs/comparison_tiny.py
    (every method), shared like ``tiny_run``."""
    config = os.path.join(REPO, "experiments", "configs", "comparison_tiny.py")
    return made_once(tmp_path_factory, "comparison_run", lambda workdir: run_tiny(workdir, config=config))


TINY_MATH = os.path.join(REPO, "tests", "configs", "tiny_math.py")


@pytest.fixture(scope="session")
def tiny_math_run(tmp_path_factory, run_tiny):
    """``tiny_math_run(protocol) -> (workdir, checkpoint, stdout)``: one finished run of
    tests/configs/tiny_math.py (the paper pipeline, shrunk) on a random-init HF checkpoint
    under ``task.protocol=protocol``, made once per pytest run per protocol
    (``made_once``); copy before changing."""
    from helpers import tiny_hf_checkpoint

    def make(root, protocol):
        tiny_hf_checkpoint(str(root / "init"))
        return run_tiny(root / "run", config=TINY_MATH,
                        extra=(f"--config.model.checkpoint={root / 'init'}", f"--config.task.protocol={protocol}"))

    def get(protocol: str):
        root, stdout = made_once(tmp_path_factory, f"tiny_math_{protocol}", lambda root: make(root, protocol))
        return root / "run", str(root / "init"), stdout

    return get
