"""Train a given model on a given rollout file (e.g. the authors' vLLM rollouts).

    python experiments/run.py --config=experiments/configs/from_rollouts.py \
        --config.model.checkpoint=Qwen/Qwen2.5-3B-Instruct --config.rollouts=rollouts.jsonl

``rollouts`` takes comma-separated JSONL files in the reference release's record format
(``docs/record-format.md``); weights are recomputed from them (a stored "weight" is
ignored). The trained policy is written in Hugging Face format to ``<workdir>/drift/hf``.
Evaluation runs only when ``eval.benchmarks`` names some (none by default); the other
settings are the paper's, its protocol included: shuffled batches and the last 5% of the
records held out for an eval loss, as the release's ``weight_sft.py`` runs (its
``--disable_shuffle`` never takes effect; ``--config.train.eval_fraction=0`` trains on every
record).
"""

import ml_collections

from experiments.configs import qwen2_5_3b_metamath


def get_config():
    c = qwen2_5_3b_metamath.get_config()
    c.model.checkpoint = ""  # required: HF folder or hub id
    c.rollouts = ""  # required
    c.methods = ("drift",)
    c.data.train = ""  # unused: no rollout stage
    c.data.train_split = None
    c.eval.benchmarks = ml_collections.ConfigDict()
    return c
