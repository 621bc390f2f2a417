"""The embedded default: DRIFT on the secret-guessing toy task, sized for a laptop CPU.

An ~80k-parameter transformer learns the task's "base model" habit (answer some
candidate, then mostly repeat it after "Incorrect") from synthetic transcripts; DRIFT
then has to teach it to use the feedback. See README.md for what the run shows.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.methods = ("sft", "drift")  # trained from the reference's rollouts

    # Training mesh: params and optimizer state sharded by logical axes (FSDP over fsdp,
    # heads/MLP over tensor), batch rows over data x fsdp. The product must equal the
    # device count; all 1 = one device.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})

    c.task = ml_collections.ConfigDict()
    c.task.name = "secret"
    c.task.num_candidates = 5
    c.task.num_values = 100  # puzzle-id tokens (they carry no information)
    c.task.max_turns = 5
    c.task.max_answers = 5
    c.task.format_penalty = 0.1

    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 64
    c.model.intermediate_size = 128
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 16

    c.data = ml_collections.ConfigDict()
    c.data.on_bad_record = "error"  # or "skip": drop bad rollout records, counted in results.json

    # Stage "reference": SFT from scratch on synthetic transcripts of the base habit.
    c.reference = ml_collections.ConfigDict()
    c.reference.num_transcripts = 8000
    c.reference.p_repeat = 0.65
    c.reference.p_format_error = 0.05
    c.reference.preference_decay = 0.7  # prior over letters: A, then B (x0.7), C (x0.49)...
    c.reference.train = ml_collections.ConfigDict()
    c.reference.train.steps = 400
    c.reference.train.batch_size = 64
    c.reference.train.learning_rate = 3e-3
    c.reference.train.warmup_ratio = 0.05
    c.reference.train.schedule = "cosine"
    c.reference.train.weight_decay = 0.01

    # Stage "rollout": K trajectories per prompt from the frozen reference.
    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_prompts = 512
    c.rollout.num_samples = 16
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.max_new_tokens = 4
    c.rollout.batch_size = 512

    # Stage "weights". The paper released gamma=0.9, beta=0.1. On this task the skill is
    # a late correction (turn 3, 4 or 5), which gamma<1 discounts and beta=0.1 then
    # turns into ~e^-1 less weight per turn, so the toy uses gamma=1, beta=0.5: every
    # success counts the same, failures and repeated answers are down-weighted. README
    # shows the sweep that chose this, including the released values.
    c.drift = ml_collections.ConfigDict()
    c.drift.gamma = 1.0
    c.drift.beta = 0.5
    c.drift.lam = 0.5
    c.drift.normalize = "mean"

    # Stage "train": weighted SFT on the last assistant turn, from the reference.
    c.train = ml_collections.ConfigDict()
    c.train.epochs = 4
    c.train.batch_size = 64
    c.train.num_micro_batches = 1
    c.train.learning_rate = 2e-3
    c.train.warmup_ratio = 0.1
    c.train.schedule = "cosine"
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0
    c.train.loss_normalize = "batch"
    c.train.checkpoint_every = 50

    # Stage "eval": greedy multi@k on held-out prompts never used for rollouts.
    c.eval = ml_collections.ConfigDict()
    c.eval.num_prompts = 400
    c.eval.batch_size = 512
    return c
