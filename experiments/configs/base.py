"""Every config section with its defaults; the other configs override this one.

The defaults are the embedded task (``docs/embedded-task.md``): DRIFT on the
secret-guessing toy task, sized for a laptop CPU (``default.py`` is this config).
Any method runs from any config: ``--config.methods=sft,drift,online_rl``.
"""

import ml_collections
from ml_collections import config_dict


def train_section(**overrides) -> ml_collections.ConfigDict:
    """The settings of one weighted-SFT fit (``train`` and ``reference.train``)."""
    t = ml_collections.ConfigDict()
    t.epochs = 1  # train: passes over the data (reference.train uses steps)
    t.steps = 0  # reference.train: updates (train derives them from epochs)
    t.batch_size = 64
    t.num_micro_batches = 1  # gradient accumulation: same update, less memory
    t.learning_rate = 2e-3
    t.warmup_ratio = 0.1
    t.schedule = "cosine"  # or "constant" (after warm-up)
    t.weight_decay = 0.1
    t.grad_clip = 1.0
    t.loss_normalize = "batch"  # or "weight_sum" (docs/method.md)
    t.loss_chunk_size = "auto"  # LM head + loss over sequence chunks for large vocabularies
    t.bucket_window = 0  # > 0: batches of similar length, each padded to its own bucket
    # None: the protocol's (task.protocol), True under both: the release's scripts pass
    # --disable_shuffle but it never takes effect (docs/reproducing.md), so its run trained
    # on shuffled batches. False: file order.
    t.shuffle = config_dict.placeholder(bool)
    # True: examples packed into rows of pack_length tokens (None: max_len, else the longest
    # example), attention kept within each; batch_size then counts ROWS. Same per-example
    # loss, far less padding (docs/scaling.md#packed-batches).
    t.pack = False
    t.pack_length = config_dict.placeholder(int)
    t.max_len = config_dict.placeholder(int)  # left-truncate longer dialogues (None: never)
    t.checkpoint_every = 100  # one train-state checkpoint is kept, plus the final policy
    t.update(overrides)
    return t


def benchmark(task: str, source: str, split: str | None = None,
              layout: str | None = None) -> ml_collections.ConfigDict:
    """One ``eval.benchmarks`` entry: its environment, question source, split and layout."""
    # Placeholders: None by default, and still settable from the command line.
    return ml_collections.ConfigDict({
        "task": task, "source": source,
        "split": config_dict.placeholder(str) if split is None else split,
        "layout": config_dict.placeholder(str) if layout is None else layout})


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.methods = ("sft", "drift")  # drift_jax/methods.py lists them all
    # Comma-separated seeds (e.g. "0,1,2"): the whole run once per seed, in
    # <workdir>/seed<N>, then mean, sd and bootstrap intervals in <workdir>/sweep.{json,md,png}.
    c.seeds = ""
    # Comma-separated rollout JSONL files (e.g. from the authors' vLLM scripts) to train
    # on instead of running the rollout stage.
    c.rollouts = ""
    # Preflight refuses a training of <= 1 update or none at learning rate > 0 (the
    # policy would come out unchanged); True lets such a run through (smoke tests).
    c.allow_tiny = False
    # JAX's persistent compilation cache: "auto" = ~/.cache/drift-jax/xla for a real model
    # (tens of programs, minutes of compiling) and off for the embedded task; a path; or "".
    c.compilation_cache = "auto"

    # Training mesh: params and optimizer state sharded by logical axes (FSDP over fsdp,
    # heads/MLP over tensor), batch rows over data x fsdp. The product must equal the
    # device count; all 1 = one device.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})

    c.task = ml_collections.ConfigDict()
    c.task.name = "secret"  # or "math", "choice"
    c.task.num_candidates = 5  # secret only
    c.task.num_values = 100  # secret only: puzzle-id tokens (they carry no information)
    # secret only: puzzle-id tokens per prompt. 0: every question has the same text, so a
    # policy cannot memorise a rollout prompt's secret (docs/embedded-task.md, pitfall 4).
    c.task.id_length = 0
    c.task.max_turns = 5
    c.task.max_answers = 5
    c.task.format_penalty = 0.1
    # "drift-jax" (ours) or "release" (the authors' scripts point by point; the paper
    # configs): prompts, parsing, grading, and every setting below left at None
    # (data.selection, train.shuffle, train.eval_fraction, eval.max_new_tokens).
    # docs/reproducing.md lists each point.
    c.task.protocol = "drift-jax"

    # The policy. checkpoint: a Hugging Face folder or hub id, the reference of the run;
    # empty: a random-init model of the sizes below, trained into a reference first.
    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""
    c.model.hidden_size = 64
    c.model.intermediate_size = 128
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 16
    c.model.dtype = "float32"  # compute
    c.model.param_dtype = "float32"  # master weights and optimizer state
    c.model.remat = "none"  # "full": recompute each layer's activations in the backward pass
    c.model.attention_impl = config_dict.placeholder(str)  # None: cuDNN flash on GPU, splash on TPU, XLA elsewhere
    # Dtype of the Hugging Face folders written (real models): "" = the checkpoint's own
    # (its config.json's torch_dtype), or "float32" / "bfloat16" / "float16".
    c.model.save_dtype = ""

    c.data = ml_collections.ConfigDict()
    # Training questions (not for the secret task): a tfds name or a local
    # .jsonl/.json/.parquet file; the field layout is detected unless given.
    c.data.train = ""
    c.data.train_split = config_dict.placeholder(str)
    c.data.layout = config_dict.placeholder(str)
    c.data.on_bad_record = "error"  # or "skip": bad records dropped, counted in results.json
    # Which rollout.num_prompts questions: "first" (source order, repeats dropped) or
    # "release" (repeats kept, shuffled with seed 42, then the first n); None: the protocol's.
    c.data.selection = config_dict.placeholder(str)

    # Stage "reference" (embedded task only): SFT from scratch on synthetic transcripts
    # of the base habit.
    c.reference = ml_collections.ConfigDict()
    c.reference.num_transcripts = 8000
    # After "Incorrect": repeat the last answer (else an untried letter). Above 0.5, so at
    # turn 5 (one letter left) the transcripts still repeat more often than they switch:
    # data that implies a clear choice there, not a coin flip (docs/embedded-task.md).
    c.reference.p_repeat = 0.6
    c.reference.p_format_error = 0.05
    c.reference.preference_decay = 0.7  # prior over letters: A, then B (x0.7), C (x0.49)...
    # 1,600 steps: the late turns, rare in the transcripts, are learned too (at 400 the
    # reference switched at turn 5 half as often as its transcripts).
    c.reference.train = train_section(steps=1600, learning_rate=3e-3, warmup_ratio=0.05,
                                      weight_decay=0.01)

    # Stage "rollout": K trajectories per prompt from the frozen reference.
    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_prompts = 1024  # enough four-distinct-wrong-answer paths to learn turn 5 from
    c.rollout.num_samples = 16
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.max_new_tokens = 4
    c.rollout.batch_size = 512
    # The sampler of rollouts, evaluation and online RL: "continuous" (drift_jax/rollout/engine.py:
    # batch_size decode slots refilled as rows stop, KV pages kept across turns and shared
    # by a prompt's samples) or "static" (one padded batch per turn: the reference).
    c.rollout.engine = "continuous"
    c.rollout.page_size = 16
    # KV pages (None: sized from the device's memory, drift_jax/rollout/pool_size.py): the
    # pool takes what memory_fraction of the memory XLA's allocator holds leaves after the
    # weights and the engine's workspace, at most every slot's longest request of the
    # protocol (prompt + turns x (max_new_tokens + feedback)); on a CPU 2,048 tokens a slot.
    c.rollout.num_pages = config_dict.placeholder(int)
    c.rollout.memory_fraction = 0.9
    # Decode steps per compiled call between host visits, at most, and how many stopped rows
    # end a visit early while requests wait. None: 8 and 1 on a CPU (host and device share
    # the cores), 32 and batch_size // 16 on an accelerator (docs/scaling.md).
    c.rollout.steps_per_visit = config_dict.placeholder(int)
    c.rollout.refill_after = config_dict.placeholder(int)
    # Row shapes per program (each a compile): rows computed are a multiple of
    # batch_size // row_buckets. A stage of many prompts drains its queue once, so few
    # shapes cost fewer compiles than the idle rows they add (engine's own default: 8).
    c.rollout.row_buckets = 4

    # Stage "weights". The paper released gamma=0.9, beta=0.1. On this task the skill is
    # a late correction (turn 3, 4 or 5), which gamma<1 discounts and beta=0.1 then
    # turns into ~e^-1 less weight per turn, so the toy uses gamma=1, beta=0.25: every
    # success counts the same, and a failure weighs e^-4 of one (less with repeats), so
    # the rare turn-5 successes outweigh the reference's many turn-5 repeats.
    c.drift = ml_collections.ConfigDict()
    c.drift.gamma = 1.0
    c.drift.beta = 0.25
    c.drift.lam = 0.5
    c.drift.normalize = "mean"
    # > 0: beta chosen so that the mean ESS / K of the weights hits this (overrides beta).
    c.drift.target_ess_fraction = 0.0

    # Stage "train": weighted SFT on the last assistant turn, from the reference. 8 epochs:
    # after 4 the policies had not yet moved to what their data implies at turns 4 and 5,
    # so greedy choices there were near-ties that rounding decided (seed 1: DRIFT's turn-5
    # margin +0.32 after 4 epochs, +3.5 after 8; docs/embedded-task.md, pitfall 5).
    c.train = train_section(epochs=8, checkpoint_every=50)
    # The last fraction of the rollout rows (file order) held out of training, its weighted
    # loss logged every eval_every updates (the release: 0.05, every 20); None: the protocol's.
    c.train.eval_fraction = config_dict.placeholder(float)
    c.train.eval_every = 20

    # LoRA (docs/lora.md): rank > 0 trains adapters on lora.targets instead of every weight,
    # for every trained method; the release's optional LoRA is rank 16, alpha 32, dropout
    # 0.05 on q, k, v, o. Real models: the PEFT adapter goes to <method>/adapter and, with
    # merged, the full checkpoint with the adapters folded in to <method>/hf.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = "q_proj,k_proj,v_proj,o_proj"  # also: gate_proj, up_proj, down_proj
    c.lora.merged = True

    # Online multi-turn RL (drift_jax/training/policy_gradient.py): the current policy plays fresh
    # episodes every update; DRIFT's return (drift.gamma, drift.lam), GRPO advantages,
    # k3 KL to the reference with UFO's coefficient.
    c.online_rl = ml_collections.ConfigDict()
    c.online_rl.steps = 384  # x 8 prompts x K=16: three times the rollouts' 1,024 x 16 episodes
    c.online_rl.prompts_per_step = 8
    # 3e-4 after a short sweep on seed 0's reference (200 updates): 1e-3 gave greedy
    # multi@5 0.40 (the policy learned to emit several <answer> tags), 3e-4 gave 0.58.
    c.online_rl.learning_rate = 3e-4
    c.online_rl.warmup_ratio = 0.05
    c.online_rl.schedule = "constant"
    c.online_rl.weight_decay = 0.0
    c.online_rl.grad_clip = 1.0
    c.online_rl.kl_coef = 1e-3
    c.online_rl.loss_normalize = "token"  # or "sequence"
    c.online_rl.num_micro_batches = 1
    c.online_rl.checkpoint_every = 25
    c.online_rl.seq_len = config_dict.placeholder(int)  # fixed padded length (one compile); None: bucketed

    # Stage "eval": greedy multi@k. The embedded task holds out prompts never used for
    # rollouts; other tasks evaluate on eval.benchmarks.
    c.eval = ml_collections.ConfigDict()
    c.eval.num_prompts = 1000  # each letter the secret of 200 (envs/secret.py): multi@k is exact
    c.eval.batch_size = 512
    # Per turn; None: the protocol's (rollout.max_new_tokens; "release": 1,024).
    c.eval.max_new_tokens = config_dict.placeholder(int)
    # {name: {"task": "math" | "choice", "source": ..., "split": ..., "layout": ...}}
    c.eval.benchmarks = ml_collections.ConfigDict()
    return c
