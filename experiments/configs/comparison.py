"""The paper's comparison on the embedded task: every method from the same reference.

    python experiments/run.py --config=experiments/configs/comparison.py

Offline methods train on the SAME rollouts (1,024 prompts x K=16): sft_single, sft, rft,
drift, drift_all_turns. online_rl generates its own episodes at every update, with three
times DRIFT's rollout episodes in total (384 updates x 8 prompts x K=16), so the table's
generated-tokens column shows what each accuracy cost. drift_round2 is iterative DRIFT:
rollouts from the trained DRIFT policy, weighted, trained again from it.
"""

from experiments.configs import default


def get_config():
    c = default.get_config()
    c.methods = ("sft_single", "sft", "rft", "drift", "drift_all_turns", "online_rl", "drift_round2")

    c.online_rl.seq_len = 64  # every episode of the embedded task fits: one compile
    return c
