"""The paper's pipeline (qwen2_5_3b_metamath) shrunk to seconds, on the test fixtures.

Its protocol is the paper config's ("release"); tests set ``task.protocol`` for ours.
tests/test_records_interop.py fills in ``model.checkpoint`` (a random-init HF folder it
writes) and runs every stage under both protocols: rollouts with the math environment,
weights, training, evaluation on a math and a multiple-choice benchmark, HF checkpoints out.
"""

import os

import ml_collections

from experiments.configs import base, qwen2_5_3b_metamath

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "datasets")


def get_config():
    c = qwen2_5_3b_metamath.get_config()
    c.model.checkpoint = ""  # set by the test
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.methods = ("drift",)
    c.task.max_turns = 2  # each turn's longer prompts compile new length buckets
    c.data.train = os.path.join(FIXTURES, "metamathqa.jsonl")
    c.data.train_split = None
    c.rollout.num_prompts = 2  # the fixture's MATH_ prompts
    c.rollout.num_samples = 2
    c.rollout.max_new_tokens = 6
    c.rollout.batch_size = 8
    c.train.batch_size = 2
    c.train.num_micro_batches = 2
    c.train.learning_rate = 1e-3
    c.train.max_len = 256
    c.train.checkpoint_every = 2
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 6  # the release's 1,024 would be minutes of random tokens here
    c.eval.benchmarks = ml_collections.ConfigDict({
        "math500": base.benchmark("math", os.path.join(FIXTURES, "math500.jsonl")),
        "mmlu_pro": base.benchmark("choice", os.path.join(FIXTURES, "mmlu_pro.jsonl")),
    })
    return c
