"""Multi-host rollouts, training and evaluation: two JAX processes on this machine (CPU,
one device each, joined over localhost by ``jax.distributed``; CPU collectives through
gloo, JAX's default) run the README's two-process command
(``experiments/local_multiprocess.sh 2 --config=experiments/configs/tiny_multiprocess.py``)
and write what ONE process with the same two devices (``--xla_force_host_platform_device_count=2``,
the same mesh data=2) writes: the same rollout and eval files byte for byte, the same
training losses, the same results.json metrics. A job whose process 1 is SIGKILLed
mid-rollout (after one prompt group of its part) and whose peer is then killed too,
rerun with the same command, resumes each process's part and ends with the same file;
that command also sets eval batches of 8, so the rerun's evaluations have more processes
than eval chunks (a process with nothing to play), and the job writes what one process
writes with those settings too.

Every subprocess has a timeout, and the barriers one (``DRIFT_BARRIER_TIMEOUT_S``), so a
dead or hung peer fails the test instead of hanging it. Also: the pure sharding helpers."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from drift_jax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "experiments", "run.py")
CONFIG = "--config=experiments/configs/tiny_multiprocess.py"
TIMEOUT_S = 300  # per job; a healthy one takes seconds
# What must match a single process's: records byte for byte, and these outputs' numbers.
SAME_BYTES = ["rollouts.jsonl", "eval/secret_reference.jsonl", "eval/secret_drift.jsonl",
              "eval/secret_reference.json", "eval/secret_drift.json"]


# -- the pure helpers --------------------------------------------------------------------

def test_shard_range_covers_every_item_once_in_whole_aligned_blocks():
    for n in range(0, 30):
        for count in (1, 2, 3, 5):
            for align in (1, 2, 4, 7):
                shards = [distributed.shard_range(n, count, i, align) for i in range(count)]
                assert shards[0][0] == 0 and shards[-1][1] == n
                assert all(a <= b for a, b in shards)
                assert all(shards[i][1] == shards[i + 1][0] for i in range(count - 1))  # contiguous
                assert all(a % align == 0 or a == b == n for a, b in shards)  # starts on a chunk boundary
    assert distributed.shard_range(6, 2, 0, align=2) == (0, 2)
    assert distributed.shard_range(6, 2, 1, align=2) == (2, 6)
    assert distributed.shard_range(3, 4, 0, align=8) == (0, 0)  # an empty shard: earlier ones take fewer
    assert distributed.shard_range(3, 4, 3, align=8) == (0, 3)
    with pytest.raises(ValueError, match="index"):
        distributed.shard_range(4, 2, 2)


def test_part_paths_name_the_process_count_and_single_process_helpers_are_no_ops():
    assert distributed.part_path("/w/rollouts.jsonl", 1, 2) == "/w/rollouts.jsonl.parts/00001-of-00002.jsonl"
    assert distributed.part_path("/w/a.jsonl", 1, 3) != distributed.part_path("/w/a.jsonl", 1, 2)
    assert distributed.process_count() == 1 and distributed.is_main()
    distributed.barrier("nothing to wait for")
    assert distributed.agree("x", lambda: {"skip": True}) == {"skip": True}
    assert distributed.gather("y", 3) == [3]
    assert distributed.timeout_s({"DRIFT_BARRIER_TIMEOUT_S": "2.5"}) == 2.5
    with pytest.raises(ValueError, match="DRIFT_BARRIER_TIMEOUT_S"):
        distributed.timeout_s({"DRIFT_BARRIER_TIMEOUT_S": "soon"})


# -- two processes -----------------------------------------------------------------------

def readme_command(workdir) -> list[str]:
    """The README's two-process command line, its ``--workdir`` pointed at ``workdir``."""
    with open(os.path.join(REPO, "README.md")) as f:
        lines = [line.strip() for line in f if line.strip().startswith("experiments/local_multiprocess.sh 2 ")]
    assert len(lines) == 1, lines
    args = shlex.split(lines[0])
    assert CONFIG in args, args
    return ["bash", *[f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in args]]


@pytest.fixture(scope="module")
def env(run_env):
    """The runs' environment (tests/conftest.py: the repo importable, one compilation
    cache), CPU only, short barrier timeouts, no inherited job variables."""
    out = {k: v for k, v in run_env.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                  "JAX_PROCESS_ID", "SLURM_", "OMPI_"))}
    return {**out, "JAX_PLATFORMS": "cpu", "DRIFT_BARRIER_TIMEOUT_S": "60", "PYTHON": sys.executable,
            "XLA_FLAGS": ""}


def start(command, env) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """``proc``'s stdout once it has exited 0 (killed after ``TIMEOUT_S``)."""
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, (proc.args, stdout[-2000:], stderr[-4000:])
    return stdout


def side_by_side(single_command, job_command, env) -> list[str]:
    """The stdouts of one process with two CPU devices (``single_command``) and of a
    two-process job (``job_command``), run at once: the cores idle while the job's two
    processes wait for each other."""
    procs = [start(single_command, {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
             start(job_command, env)]
    try:
        return [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def run_job(command, env) -> str:
    return finish(start(command, env))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
    """(single, (job, job stdout)): one process with two CPU devices on the same config
    (mesh data=2), and the README's two-process command, run side by side (the cores
    idle while the two processes wait for each other)."""
    single, job = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("job")
    _, job_stdout = side_by_side([sys.executable, RUN, CONFIG, f"--workdir={single}"], readme_command(job), env)
    return single, (job, job_stdout)


@pytest.fixture
def single(runs):
    return runs[0]


@pytest.fixture
def job(runs):
    return runs[1]


def losses(workdir, stage):
    lines = [json.loads(line) for line in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r.get("eval_loss")) for r in lines]


def assert_same_as_single(workdir, single):
    for name in SAME_BYTES:
        assert (workdir / name).read_bytes() == (single / name).read_bytes(), name
    for stage in ("reference", "drift"):
        assert losses(workdir, stage) == losses(single, stage), stage
    ours, theirs = (json.loads((w / "results.json").read_text()) for w in (workdir, single))
    for method in theirs["methods"]:
        metrics = [{k: v for k, v in r["methods"][method].items() if k != "cost"} for r in (ours, theirs)]
        assert metrics[0] == metrics[1], method  # the costs' wall times differ, their token counts not
        for key in ("generated_tokens", "trained_tokens", "supervised_tokens"):
            assert ours["methods"][method]["cost"][key] == theirs["methods"][method]["cost"][key]
    assert ours["sampled_reference"] == theirs["sampled_reference"]
    assert not (workdir / "rollouts.jsonl.parts").exists()  # merged, then removed


def test_two_processes_write_what_one_process_writes(job, single):
    workdir, stdout = job
    assert stdout.count("stages run: reference, rollout, weights, train:drift") == 2  # both processes
    assert_same_as_single(workdir, single)
    stats = json.loads((workdir / "rollout_stats.json").read_text())
    assert stats["resumed_groups"] == 0 and stats["trajectories"] == 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_a_job_killed_mid_rollout_resumes_each_part_and_a_process_with_nothing_to_play_waits(
        tmp_path, env, runs):
    """The finished job with its rollouts deleted (the ledger then plays them again, and
    nothing downstream: their settings did not change), killed mid-rollout, rerun with
    eval batches of 8: each process resumes its part of the rollouts, and the evaluations
    run again with more processes than eval chunks (the 8 eval prompts in one chunk, so
    process 0 plays nothing and merges process 1's part; rollouts share the same
    ``play_shards``). The job then writes what one process with the same settings writes
    (a copy of the finished single run, whose evaluations alone run again)."""
    from drift_jax.rollout.episodes import chunk_size

    (single_dir, (job_dir, _)), single, workdir = runs, tmp_path / "single", tmp_path / "job"
    shutil.copytree(single_dir, single)
    shutil.copytree(job_dir, workdir)
    for name in ("rollouts.jsonl", "rollout_stats.json"):
        (workdir / name).unlink()
    overrides = ["--config.eval.batch_size=8"]
    assert distributed.shard_range(8, 2, 0, align=chunk_size(8, 1)) == (0, 0)
    port, kill_part = free_port(), "rollouts.jsonl.parts/00001-of-00002.jsonl"
    args = [RUN, CONFIG, f"--workdir={workdir}", *overrides]
    # Process 1 dies of SIGKILL once its part holds one whole prompt group (4 lines): the
    # middle of its first chunk (its shard: prompts 2..5, chunks of 2).
    code = (f"import runpy, sys, helpers; helpers.install_kill('lines', 4, {kill_part!r}); "
            f"sys.argv = {args!r}; runpy.run_path({RUN!r}, run_name='__main__')")
    procs = []
    for i, command in enumerate([[sys.executable, *args], [sys.executable, "-c", code]]):
        job_env = {**env, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen(command, cwd=REPO, env=job_env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[1].communicate(timeout=TIMEOUT_S)
        assert procs[1].returncode == -signal.SIGKILL, err[-3000:]
    finally:
        for p in procs:  # the peer would wait for process 1 at the next barrier: end it
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=60)
    part = workdir / kill_part
    assert part.read_text().count("\n") == 4 and not (workdir / "rollouts.jsonl").exists()

    # Process 0 waits at the eval merge while process 1 plays (and compiles) every chunk.
    job_env = {**env, "DRIFT_BARRIER_TIMEOUT_S": "240"}
    single_stdout, stdout = side_by_side([sys.executable, RUN, CONFIG, f"--workdir={single}", *overrides],
                                         [*readme_command(workdir), *overrides], job_env)
    evals = "eval:reference:secret, eval:drift:secret\n"
    assert single_stdout.count(f"stages run: {evals}") == 1
    assert stdout.count(f"stages run: rollout, {evals}") == 2  # both processes, nothing else
    assert_same_as_single(workdir, single)
    records = [json.loads(line) for line in (workdir / "rollouts.jsonl").read_text().splitlines()]
    ids = [r["prompt_id"] for r in records]
    assert len(set(ids)) == 6 and all(ids.count(p) == 4 for p in set(ids))  # no group missing or doubled
    assert [ids[i] for i in range(0, 24, 4)] == list(dict.fromkeys(ids))  # groups contiguous, in order
    stats = json.loads((workdir / "rollout_stats.json").read_text())
    assert stats["resumed_groups"] >= 1  # process 1's group (and whatever process 0 had finished)
    assert not (workdir / "eval" / "secret_drift.jsonl.parts").exists()
