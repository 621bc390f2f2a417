"""The engine's page pool sized from the device's memory: it fills the memory fraction
left after what lives on the device and the workspace, never more than every slot's
longest request; too little memory is an error naming the field; a CPU gets the cap;
the protocol's longest request covers every question's dialogue."""

import math

import jax.numpy as jnp
import pytest

from drift_jax.data.chat import encode_prompt
from drift_jax.data.questions import Question
from drift_jax.envs.base import Episode, env_prefill
from drift_jax.envs.protocol import make_env
from drift_jax.models import preset
from drift_jax.models.paged import page_bytes
from drift_jax.rollout.episodes import context_bound
from drift_jax.rollout.pool_size import pool_pages, workspace_bytes

from helpers import chatml_tokenizer

GIB = 2**30


@pytest.mark.parametrize("device_gib", [4, 16, 80, 141])
def test_the_pool_fills_the_memory_fraction_up_to_every_slots_request(device_gib):
    cfg = preset("qwen2.5-0.5b", dtype=jnp.bfloat16)
    kw = dict(num_slots=256, slot_tokens=5632, page_size=16, page_bytes=page_bytes(cfg, 16),
              resident_bytes=cfg.num_params * 2, workspace=workspace_bytes(cfg, 256, 128, 128), memory_fraction=0.9)
    budget = 0.9 * device_gib * GIB - kw["resident_bytes"] - kw["workspace"]
    cap = 256 * math.ceil(5632 / 16) + 1
    pages = pool_pages(device_bytes=device_gib * GIB, **kw)
    assert pages <= cap
    assert pages * kw["page_bytes"] <= budget
    assert pages == cap or (pages + 1) * kw["page_bytes"] > budget  # no page left unused below the cap
    assert pool_pages(device_bytes=None, **kw) == cap  # no memory figure (CPU): the cap


def test_too_little_memory_for_one_request_names_the_field():
    cfg = preset("qwen2.5-3b", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="rollout.memory_fraction"):
        pool_pages(num_slots=8, slot_tokens=8192, page_size=16, page_bytes=page_bytes(cfg, 16),
                   device_bytes=6 * GIB, resident_bytes=cfg.num_params * 2, memory_fraction=0.9)


def test_the_context_bound_covers_every_questions_last_request():
    """The release's full prompts restate the question in each feedback turn, so the
    longest question makes the longest dialogue: the bound is at least every
    question's context after max_turns - 1 unparsable replies, plus the replies'
    budgets."""
    tokenizer = chatml_tokenizer()
    env = make_env("math", "release", "rollout")
    questions = [Question(f"q{i}", "the secret puzzle " * n, "7") for i, n in enumerate((1, 9, 3))]
    budget = 32
    bound = context_bound(tokenizer, env, questions, budget)
    prefill = env_prefill(env)
    for q in questions:
        episode = Episode(env, q)
        while not episode.done and episode.turn < env.max_turns - 1:
            episode.step(prefill)
        need = len(encode_prompt(tokenizer, episode.messages, prefill)) + env.max_turns * budget
        assert need <= bound
    assert context_bound(tokenizer, env, [], budget) == env.max_turns * budget
