"""A seconds-scale version of the default, for the integration test (not for results)."""

from experiments.configs import default


def get_config():
    c = default.get_config()
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.num_layers = 1
    c.model.head_dim = 8
    c.model.num_heads = 4
    c.reference.num_transcripts = 200
    c.reference.train.steps = 60  # enough for tagged answers, so some first answers are right
    c.reference.train.batch_size = 16
    c.rollout.num_prompts = 6
    c.rollout.num_samples = 4
    c.rollout.batch_size = 32
    c.train.epochs = 1
    c.train.batch_size = 8
    c.train.checkpoint_every = 2
    c.eval.num_prompts = 8
    c.eval.batch_size = 8
    c.online_rl.steps = 3  # --config.methods=...,online_rl: a few updates, as in comparison_tiny
    c.online_rl.prompts_per_step = 2
    c.online_rl.checkpoint_every = 2
    c.online_rl.seq_len = None  # replies of barely trained models can be long
    return c
