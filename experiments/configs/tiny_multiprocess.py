"""The tiny config as a two-process job on one machine (README, "Multi-host and speed";
tests/test_multihost.py runs exactly the README's command):

    experiments/local_multiprocess.sh 2 --config=experiments/configs/tiny_multiprocess.py

Rollout and eval chunks are small enough that each process gets some (6 prompts in
chunks of 2, 8 eval prompts in chunks of 4), and training runs data-parallel over both
processes' devices (mesh data=2: one CPU device per process)."""

from experiments.configs import tiny


def get_config():
    c = tiny.get_config()
    c.methods = ("drift",)
    c.task.max_turns = 3  # fewer sampler shapes to compile: seconds off every process
    c.rollout.row_buckets = 1  # one row shape per engine program: the fewest compiles, in every process
    c.rollout.batch_size = 8  # chunks of 8 // K=4 = 2 prompts
    c.eval.batch_size = 4  # chunks of 4 prompts
    c.mesh.data = 2
    return c
