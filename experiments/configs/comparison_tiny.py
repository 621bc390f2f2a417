"""A seconds-scale comparison for tests and the notebook's smoke test (not for results)."""

from experiments.configs import comparison, tiny


def get_config():
    c = comparison.get_config()
    small = tiny.get_config()
    for section in ("model", "reference", "rollout", "train", "eval", "online_rl"):
        c[section] = small[section]
    return c
