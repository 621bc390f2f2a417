"""The paper's setting: Qwen2.5-3B-Instruct on MetaMathQA (MATH_ types), every released
hyper-parameter (../shared/docs/drift-method.md), evaluated on the paper's benchmarks.

    python experiments/run.py --config=experiments/configs/qwen2_5_3b_metamath.py

Needs internet for the first run (the checkpoint from the Hugging Face hub; the datasets
through tensorflow-datasets' ``huggingface:`` namespace), or point ``model`` and the
``source`` fields at local folders / JSONL / Parquet files. See README "The paper's setup".
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.methods = ("sft", "drift")
    c.model = "Qwen/Qwen2.5-3B-Instruct"  # HF hub id or a local folder
    c.dtype = "bfloat16"  # compute
    c.param_dtype = "float32"  # master weights and optimizer state
    c.remat = "full"  # recompute each layer's activations in the backward pass
    c.attention_impl = None  # auto: cuDNN flash attention on GPU, XLA elsewhere

    # Training mesh: params and optimizer state sharded by logical axes (FSDP over fsdp,
    # heads/MLP over tensor), batch rows over data x fsdp. The product must equal the
    # device count; all 1 = one device.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})

    c.task = ml_collections.ConfigDict()
    c.task.name = "math"
    c.task.max_turns = 5
    c.task.max_answers = 5
    c.task.format_penalty = 0.1

    c.data = ml_collections.ConfigDict()
    # A tfds name (its huggingface: namespace included) or a local .jsonl/.json/.parquet file;
    # the field layout is detected (drift_jax/datasets.py), MetaMathQA keeps types MATH_*.
    c.data.train = "huggingface:meta-math/MetaMathQA"
    c.data.train_split = "train"  # None for a local file
    c.data.on_bad_record = "error"

    # Stage "rollout": 1,800 prompts x K=16 from the frozen reference, T=5 turns.
    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_prompts = 1800
    c.rollout.num_samples = 16
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.max_new_tokens = 512
    c.rollout.batch_size = 256

    c.drift = ml_collections.ConfigDict()
    c.drift.gamma = 0.9
    c.drift.beta = 0.1
    c.drift.lam = 0.5
    c.drift.normalize = "mean"

    # Stage "train": lr 5e-6, constant after 10% warm-up, 1 epoch, 128 sequences per step
    # (16 micro-batches of 8), weight decay 0.1, clip 1.0, prompts left-truncated to 8192
    # tokens + 512 for the answer.
    c.train = ml_collections.ConfigDict()
    c.train.epochs = 1
    c.train.batch_size = 128
    c.train.num_micro_batches = 16
    c.train.learning_rate = 5e-6
    c.train.warmup_ratio = 0.1
    c.train.schedule = "constant"
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0
    c.train.loss_normalize = "batch"
    c.train.max_len = 8192 + 512
    c.train.checkpoint_every = 50

    c.eval = ml_collections.ConfigDict()
    c.eval.num_prompts = 100000  # all of each benchmark
    c.eval.batch_size = 256
    c.eval.benchmarks = ml_collections.ConfigDict({
        "math500": {"task": "math", "source": "huggingface:HuggingFaceH4/MATH-500", "split": "test"},
        "math": {"task": "math", "source": "huggingface:EleutherAI/hendrycks_math", "split": "test"},
        "theoremqa": {"task": "math", "source": "huggingface:TIGER-Lab/TheoremQA", "split": "test"},
        "gpqa_diamond": {"task": "choice", "source": "huggingface:Idavidrein/gpqa", "split": "train"},
        "mmlu_redux": {"task": "choice", "source": "huggingface:edinburgh-dawg/mmlu-redux", "split": "test"},
        "mmlu_pro": {"task": "choice", "source": "huggingface:TIGER-Lab/MMLU-Pro", "split": "test"},
    })
    return c
