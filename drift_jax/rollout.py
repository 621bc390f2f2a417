"""Multi-turn episodes played by a policy in an environment (rollouts and evaluation).

Host side: render each live dialogue with the chat template, verify replies, append the
feedback. Device side: one ``generate_batched`` call per turn for all live episodes.
Turn 1 draws K samples of each prompt; later turns extend each live trajectory with one
sample, exactly as in the reference release.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from drift_jax.chat import encode_prompt
from drift_jax.envs.base import Environment, Episode, Question
from drift_jax.sampling import SamplingParams, generate_batched


def episode_keys(seed: int, prompt_ids: Sequence[str], sample_idx: Sequence[int], turn: int):
    """``[N]`` PRNG keys from (seed, prompt id, sample index, turn): a trajectory's samples
    do not depend on which other prompts share its batch or its run."""
    prompt_hash = np.asarray([zlib.crc32(p.encode()) & 0x7FFFFFFF for p in prompt_ids], np.uint32)
    base = jax.random.fold_in(jax.random.key(seed), turn)

    def one(h, j):
        return jax.random.fold_in(jax.random.fold_in(base, h), j)

    return jax.vmap(one)(prompt_hash, np.asarray(sample_idx, np.uint32))


def play_episodes(
    model,
    tokenizer,
    env: Environment,
    questions: Sequence[Question],
    *,
    num_samples: int,
    sampling: SamplingParams,
    seed: int,
    batch_size: int = 64,
    max_len: int | None = None,
    desc: str = "episodes",
    progress: bool = True,
) -> tuple[list[Episode], int]:
    """Play ``num_samples`` episodes of every question.

    Returns the episodes (question-major: the K samples of question 0 first) and the
    number of tokens generated.
    """
    episodes = [Episode(env, q) for q in questions for _ in range(num_samples)]
    sample_idx = [j for _ in questions for j in range(num_samples)]
    generated = 0
    bar = tqdm(total=len(episodes), desc=desc, unit="episode", disable=not progress, leave=False)
    for turn in range(1, env.max_turns + 1):
        live = [i for i, e in enumerate(episodes) if not e.done]
        if not live:
            break
        bar.set_postfix(turn=turn, live=len(live))
        prompts = [encode_prompt(tokenizer, episodes[i].messages) for i in live]
        keys = episode_keys(
            seed, [episodes[i].question.prompt_id for i in live], [sample_idx[i] for i in live], turn
        )
        outputs = generate_batched(model, prompts, keys, sampling, batch_size=batch_size, max_len=max_len)
        for i, (tokens, _) in zip(live, outputs):
            generated += len(tokens)
            episodes[i].step(tokenizer.decode(tokens, skip_special_tokens=True).strip())
            if episodes[i].done:
                bar.update(1)
    bar.close()
    return episodes, generated
