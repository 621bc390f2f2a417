"""Evaluate a checkpoint on the paper's benchmarks, with no training: greedy multi@1..5
and the correction rates per turn, per benchmark and their mean (what a user measures
first, and how any trained policy is compared with the paper).

    python experiments/run.py --config=experiments/configs/eval.py \\
        --config.model.checkpoint=Qwen/Qwen2.5-3B-Instruct --workdir=runs/eval_q3b
    python experiments/run.py --config=experiments/configs/eval.py \\
        --config.model.checkpoint=runs/q3b/drift/hf --workdir=runs/eval_q3b_drift

``model.checkpoint`` is any Hugging Face folder or hub id (a trained policy's ``hf``
folder included); it is the run's "reference" in ``results.json`` and ``report.md``. The
benchmarks, their sources and the evaluation protocol are the paper config's
(``qwen2_5_3b_metamath.py``, seed 42). The release's tool-use evaluation, MTU-Bench, is a
benchmark of task "tool" (docs/reproducing.md#mtu-bench), added from the command line:

    python experiments/run.py --config=experiments/configs/eval.py \\
        --config.model.checkpoint=Qwen/Qwen2.5-3B-Instruct --workdir=runs/eval_q3b_tools \\
        --config.eval.benchmarks.mtu_bench.task=tool \\
        --config.eval.benchmarks.mtu_bench.source=huggingface:wpei/MTU-Bench \\
        --config.eval.benchmarks.mtu_bench.split=test --config.eval.benchmarks=mtu_bench
"""

from experiments.configs import qwen2_5_3b_metamath


def get_config():
    c = qwen2_5_3b_metamath.get_config()
    c.model.checkpoint = ""  # required: the checkpoint to evaluate
    c.methods = ()  # nothing trained: no rollouts, no weights
    c.data.train = ""
    c.data.train_split = None
    return c
