"""A seconds-scale comparison for tests and the notebook's smoke test (not for results)."""

from experiments.configs import comparison, tiny


def get_config():
    c = comparison.get_config()
    small = tiny.get_config()
    for section in ("model", "reference", "rollout", "train", "eval"):
        c[section] = small[section]
    c.online_rl.steps = 3
    c.online_rl.prompts_per_step = 2
    c.online_rl.checkpoint_every = 2
    c.online_rl.seq_len = None  # tiny: replies of random models can be long
    return c
