"""The paper's setting: Qwen2.5-3B-Instruct on MetaMathQA (MATH_ types), every released
hyper-parameter (``docs/method.md``) under the release's protocol (``task.protocol =
"release"``: ``docs/reproducing.md`` lists each point and what it sets), evaluated on the
paper's benchmarks.

    python experiments/run.py --config=experiments/configs/qwen2_5_3b_metamath.py

Needs internet for the first run (the checkpoint from the Hugging Face hub; the datasets
through tensorflow-datasets' ``huggingface:`` namespace), or point ``model.checkpoint``
and the ``source`` fields at local folders / JSONL / Parquet files.
"""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.model.checkpoint = "Qwen/Qwen2.5-3B-Instruct"  # HF hub id or a local folder
    c.model.dtype = "bfloat16"
    c.model.remat = "full"

    c.task.name = "math"
    # The authors' scripts point by point: full-mode rollout prompts with think prefill,
    # rewritten replies, first-tag parsing, string grading; the release's gold answers and
    # question texts, repeats kept; seed-42 prompt selection, shuffled batches (its
    # --disable_shuffle never takes effect), the last 5% held out for an eval loss; greedy
    # eval in simple mode with 1,024 new tokens per turn. "drift-jax" for ours.
    c.task.protocol = "release"
    # The release's scripts' --seed 42. Sampling keys differ in kind (docs/reproducing.md):
    # vLLM seeds request j of a prompt's turn 1 with 42 + j and every later turn with 42;
    # drift-jax keys each sample by (seed, prompt id, sample, turn).
    c.seed = 42
    # MetaMathQA keeps types MATH_* (drift_jax/data/layouts.py).
    c.data.train = "huggingface:meta-math/MetaMathQA"
    c.data.train_split = "train"

    # Stage "rollout": 1,800 prompts x K=16 from the frozen reference, T=5 turns.
    c.rollout.num_prompts = 1800
    c.rollout.max_new_tokens = 512
    c.rollout.batch_size = 256

    c.drift.gamma = 0.9
    c.drift.beta = 0.1

    # Stage "train": lr 5e-6, constant after 10% warm-up, 1 epoch, 128 sequences per step
    # (16 micro-batches of 8), weight decay 0.1, clip 1.0, prompts left-truncated to 8192
    # tokens + 512 for the answer.
    c.train.update(epochs=1, batch_size=128, num_micro_batches=16, learning_rate=5e-6,
                   schedule="constant", max_len=8192 + 512, checkpoint_every=50)

    # The online-RL baseline at UFO's budget: 200 updates x 8 prompts x K=16 episodes at
    # temperature 1, k3 KL 0.001 to the reference; the LM head and loss run in chunks
    # (train.loss_chunk_size "auto"), so no [B, T, 151k] logits. The learning rate is
    # verl's default actor rate, not tuned here.
    c.online_rl.steps = 200
    c.online_rl.prompts_per_step = 8
    c.online_rl.kl_coef = 1e-3
    c.online_rl.learning_rate = 1e-6
    c.online_rl.warmup_ratio = 0.0
    # 64 micro-batches of 2 rows: the update beside its bf16 reference then fits one
    # H100's default JAX pool (59.2 of 59.3 GiB; 60.0 at 32, 64.3 at 16). The update is
    # the same at any count. On a mesh of more than 2 devices a micro-batch's 2 rows
    # cannot spread over every device: there, use 16 (8 rows each).
    c.online_rl.num_micro_batches = 64
    c.online_rl.checkpoint_every = 25
    c.online_rl.seq_len = None

    c.eval.num_prompts = 100000  # all of each benchmark
    c.eval.batch_size = 256
    c.eval.benchmarks.math500 = base.benchmark("math", "huggingface:HuggingFaceH4/MATH-500", "test")
    # "/*": every subject config, one after the other (drift_jax.data.sources.HUB_CONFIGS).
    c.eval.benchmarks.math = base.benchmark("math", "huggingface:EleutherAI/hendrycks_math/*", "test")
    c.eval.benchmarks.theoremqa = base.benchmark("math", "huggingface:TIGER-Lab/TheoremQA", "test")
    c.eval.benchmarks.gpqa_diamond = base.benchmark("choice", "huggingface:Idavidrein/gpqa/gpqa_diamond", "train")
    c.eval.benchmarks.mmlu_redux = base.benchmark("choice", "huggingface:edinburgh-dawg/mmlu-redux-2.0/*", "test")
    c.eval.benchmarks.mmlu_pro = base.benchmark("choice", "huggingface:TIGER-Lab/MMLU-Pro", "test")
    return c
