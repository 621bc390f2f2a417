"""drift-jax: DRIFT (Decoupled Rollouts and Importance-Weighted Fine-Tuning) in JAX.

The stable API, loaded on first use so that ``import drift_jax`` stays light::

    import drift_jax as dj
    records, skipped = dj.read_rollouts(["rollouts.jsonl"])
    w = dj.trajectory_weights(records, gamma=0.9, beta=0.1)

The subpackages hold the rest: ``data`` (records, chat rendering, batches, question
sources), ``envs`` (tasks and verifiers), ``models`` (the transformer, HF and PEFT I/O),
``rollout`` (samplers and the episode player), ``training``, ``evaluation``, ``parallel``.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_API = {
    # the paper's math
    "trajectory_returns": "drift_jax.weights",
    "trajectory_weights": "drift_jax.weights",
    "importance_weights": "drift_jax.weights",
    "discounted_returns": "drift_jax.weights",
    "repetition_penalty": "drift_jax.weights",
    "effective_sample_size": "drift_jax.diagnostics",
    "weighted_sft_loss": "drift_jax.training.losses",
    # data
    "read_rollouts": "drift_jax.data.records",
    "read_jsonl": "drift_jax.data.records",
    "write_jsonl": "drift_jax.data.records",
    "parse_record": "drift_jax.data.records",
    "BadRecord": "drift_jax.data.records",
    "encode_dialogue": "drift_jax.data.chat",
    "load_questions": "drift_jax.data.questions",
    "Question": "drift_jax.data.questions",
    # environments
    "Episode": "drift_jax.envs.base",
    "MathEnv": "drift_jax.envs.math",
    "MultipleChoiceEnv": "drift_jax.envs.choice",
    "SecretGuessEnv": "drift_jax.envs.secret",
    # models
    "ModelConfig": "drift_jax.models",
    "Transformer": "drift_jax.models",
    "from_pretrained": "drift_jax.models",
    "save_pretrained": "drift_jax.models",
    "load_tokenizer": "drift_jax.models",
    # rollouts and evaluation
    "SamplingParams": "drift_jax.rollout.sampling",
    "EngineOptions": "drift_jax.rollout.interface",
    "play_episodes": "drift_jax.rollout.episodes",
    "append_rollouts": "drift_jax.rollout.episodes",
    "multi_at_k": "drift_jax.evaluation.multi_at_k",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'drift_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
