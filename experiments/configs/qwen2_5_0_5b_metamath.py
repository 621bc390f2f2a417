"""The paper's setting on Qwen2.5-0.5B-Instruct: a single-GPU (or Colab) sized check."""

from experiments.configs import qwen2_5_3b_metamath


def get_config():
    c = qwen2_5_3b_metamath.get_config()
    c.model.checkpoint = "Qwen/Qwen2.5-0.5B-Instruct"
    c.train.num_micro_batches = 8
    return c
