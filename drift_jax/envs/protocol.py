"""The two protocols as environment settings: ``"drift-jax"`` (ours, the default) and
``"release"`` (the authors' scripts, point by point). ``docs/reproducing.md`` lists every
point, the release's value, ours and why ours differs.

    env = make_env("math", "release", "rollout", max_turns=5)
    env_kwargs("release", "eval", task="choice", benchmark="mmlu_pro")

What "release" sets, and where in the release it comes from:

| setting | rollout | eval | release source |
| --- | --- | --- | --- |
| ``prompt_mode`` | "full" | "simple" | ``generate_weighted_data_vllm_metamathqa.py`` default ``--prompt_mode full``; ``scripts/run_all_benchmark.sh`` ``PROMPT_MODE="simple"`` |
| ``think``, ``use_prefill`` | True, True | True, True | ``DISABLE_THINK=0`` in both scripts; ``prompting.render_prompt`` appends ``<think>`` |
| ``instruction_max_tokens`` | 400 | 400 | ``INSTRUCTION_MAX_TOKENS=400`` in both scripts |
| ``parsing`` | "release" | "release" | ``prompting.parse_response``, ``MAX_ACTIONS_PER_TURN=1`` |
| math ``grader`` | "string" | "string"; "numeric" for TheoremQA | ``MultiTurnAnswerEpisode._check_answer``; ``benchmark.get_answer_checker`` |
| choice ``grader`` | "last-letter" | "last-letter" | ``benchmark.normalize_choice_answer`` |
| choice ``letter_range`` | "A-D"; "A-J" for MMLU-Pro | same | ``benchmark.MMLU_INSTRUCTION`` / ``GPQA_INSTRUCTION`` / ``MMLU_PRO_INSTRUCTION`` |
| ``skip_special_tokens`` | True | True | vLLM's ``SamplingParams`` default: the text the release parses has no special tokens |

"drift-jax" sets nothing: the environments' defaults are our protocol. Task "tool"
(MTU-Bench, ``envs.tool_use``) is the release's evaluation under both protocols; only
``skip_special_tokens`` follows the protocol.
"""

from __future__ import annotations

from drift_jax.data.layouts import PROTOCOLS, name_key

STAGES = ("rollout", "eval")
TASKS = ("math", "choice", "tool")

# The release evaluates with 1,024 new tokens per turn, greedy (scripts/run_all_benchmark.sh);
# its rollouts use 512 at temperature 1 (scripts/run_generate_data.sh).
RELEASE_EVAL_MAX_NEW_TOKENS = 1024
RELEASE_ROLLOUT_MAX_NEW_TOKENS = 512


def env_kwargs(protocol: str, stage: str, task: str = "math", benchmark: str | None = None) -> dict:
    """Keyword arguments for ``MathEnv`` (task "math"), ``MultipleChoiceEnv`` ("choice") or
    ``ToolUseEnv`` ("tool") that put ``protocol`` in force at ``stage`` ("rollout" or "eval").

    ``benchmark`` (a name such as "theoremqa" or "mmlu_pro", matched ignoring case and
    punctuation) selects the release's per-benchmark grader and letter range at eval.
    "drift-jax" returns {} (the defaults)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if protocol == "drift-jax":
        return {}
    if task == "tool":
        return {"skip_special_tokens": True}
    kwargs = {"prompt_mode": "full" if stage == "rollout" else "simple", "think": True, "use_prefill": True,
              "instruction_max_tokens": 400, "parsing": "release", "skip_special_tokens": True}
    name = name_key(benchmark or "")
    if task == "math":
        kwargs["grader"] = "numeric" if "theoremqa" in name else "string"
        kwargs["boxed_fallback"] = False
    else:
        kwargs["grader"] = "last-letter"
        kwargs["letter_range"] = "A-J" if "mmlupro" in name else "A-D"
    return kwargs


def make_env(task: str, protocol: str = "drift-jax", stage: str = "rollout", *, benchmark: str | None = None,
             **overrides):
    """The environment of ``task`` under ``protocol`` at ``stage``; ``overrides`` (e.g.
    ``max_turns``, ``format_penalty``, ``timeout_seconds``) are applied last."""
    from drift_jax.envs.choice import MultipleChoiceEnv
    from drift_jax.envs.math import MathEnv
    from drift_jax.envs.tool_use import ToolUseEnv

    kwargs = {**env_kwargs(protocol, stage, task, benchmark), **overrides}
    return {"math": MathEnv, "choice": MultipleChoiceEnv, "tool": ToolUseEnv}[task](**kwargs)
