"""Multi-turn episodes played by a policy in an environment: the one player used by
rollouts, evaluation and online RL, and the resumable rollout writer.

Host side (here): render each live dialogue with the chat template, verify replies,
append the feedback. Device side: a sampler (``interface.Sampler``) chosen once from
``EngineOptions`` (``make_sampler``): the continuous engine (``engine.Engine``, the
default) or the static reference (``static.StaticSampler``: one ``generate_batched``
call per turn of each chunk). Turn 1 draws K samples of each prompt; later turns extend
each live trajectory with one sample, exactly as in the reference release. An
environment's ``prefill`` (the release's ``<think>``) ends every prompt, and the reply
handed to ``Episode.step`` is the prefill plus the decoded continuation: what the model
said (the environment may then rewrite it).

``append_rollouts`` is the resumable form used for Stage 1: it appends each finished
prompt group to the rollout file in prompt order, so a killed run rerun with the same
arguments writes the same file.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from drift_jax.data import records
from drift_jax.data.chat import encode_prompt
from drift_jax.data.questions import Question
from drift_jax.envs.base import Environment, Episode, env_prefill
from drift_jax.rollout.engine import Engine
from drift_jax.rollout.interface import EngineOptions, Request, Sampler, engine_options, merge_work
from drift_jax.rollout.sampling import SamplingParams
from drift_jax.rollout.static import StaticSampler


def prompt_hash(prompt_id: str) -> int:
    """The prompt's part of its sampling keys (31 bits of its crc32)."""
    return zlib.crc32(prompt_id.encode()) & 0x7FFFFFFF


def episode_keys(seed: int, prompt_ids: Sequence[str], sample_idx: Sequence[int], turn: int):
    """``[N]`` PRNG keys from (seed, prompt id, sample index, turn): a trajectory's samples
    do not depend on which other prompts share its batch or its run."""
    prompt_hash_n = np.asarray([prompt_hash(p) for p in prompt_ids], np.uint32)
    base = jax.random.fold_in(jax.random.key(seed), turn)

    def one(h, j):
        return jax.random.fold_in(jax.random.fold_in(base, h), j)

    return jax.vmap(one)(prompt_hash_n, np.asarray(sample_idx, np.uint32))


def decode_reply(tokenizer, reply_ids: Sequence[int], stop_ids: Sequence[int],
                 skip_special_tokens: bool = False) -> str:
    """The text a sampled reply adds to the dialogue: its ids minus one final stop token
    (the chat template closes the turn itself), unstripped. By default decoded WITH any
    other special tokens, so the next turn's context holds what the policy sampled:
    dropping them would hide, and so never penalise, a stray ``<|user|>`` in a reply (on
    the toy task online RL then learned to emit them). ``skip_special_tokens=True`` is
    what vLLM's ``SamplingParams`` default gives the release: the tokenizer's special
    tokens left out of the text that is parsed and stored."""
    body = reply_ids[:-1] if len(reply_ids) and reply_ids[-1] in stop_ids else reply_ids
    return tokenizer.decode(list(body), skip_special_tokens=skip_special_tokens)


def make_sampler(engine: "str | EngineOptions", model, sampling: SamplingParams, *, seed: int, batch_size: int,
                 max_len: int | None = None, slot_tokens: int | None = None) -> Sampler:
    """The sampler ``engine`` names (a kind or ``EngineOptions``): the continuous engine
    with ``num_slots`` (default ``batch_size``) slots, or the static sampler with
    ``batch_size`` rows per call. ``slot_tokens``: the longest request the workload
    holds (``context_bound``), where the options name none."""
    opts = engine_options(engine, batch_size)
    if opts.kind == "static":
        return StaticSampler(model, sampling, seed=seed, batch_size=batch_size, max_len=max_len)
    if opts.slot_tokens is None and slot_tokens is not None:
        opts = dataclasses.replace(opts, slot_tokens=slot_tokens)
    return Engine(model, sampling, seed=seed, options=opts, max_len=max_len)


def context_bound(tokenizer, env: Environment, questions: Sequence[Question], budget: int) -> int:
    """An estimate of the tokens an episode's last request holds (context + budget), for
    the engine's page pool (``EngineOptions.slot_tokens``): the question with the
    longest first prompt (in characters), its dialogue after ``max_turns - 1`` replies
    holding only the prefill (unparsable: each draws the feedback), plus ``budget``
    tokens for each of its ``max_turns`` replies (no questions: the replies alone)."""
    if not questions:
        return env.max_turns * budget
    prefill = env_prefill(env)
    longest = max(questions, key=lambda q: sum(len(str(m.get("content", ""))) for m in env.initial_messages(q)))
    episode = Episode(env, longest)
    while not episode.done and episode.turn < env.max_turns - 1:
        episode.step(prefill)
    return len(encode_prompt(tokenizer, episode.messages, prefill)) + env.max_turns * budget


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
    return_ids: bool = False,
    engine: "str | EngineOptions" = "continuous",
    stats: dict | None = None,
):
    """Play ``num_samples`` episodes of every question on the sampler ``engine`` names
    (``make_sampler``). The episodes do not depend on the sampler (to float rounding),
    nor on which other questions share the call: a slice of the questions that starts at
    a chunk boundary (``chunk_size``) gets the same episodes as the whole list.

    Returns ``(episodes, generated)``: the episodes (question-major: the K samples of
    question 0 first) and the number of tokens generated. With ``return_ids``,
    ``(episodes, generated, turns)`` where ``turns[i]`` lists (prompt_ids, reply_ids) per
    turn of episode i: the context the policy saw and the ids it sampled (online RL
    trains on exactly these). ``stats``, a dict, receives the sampler's work figures
    (``interface.Sampler``; merged into what it holds: ``merge_work``).
    """
    sampler = make_sampler(engine, model, sampling, seed=seed, batch_size=batch_size, max_len=max_len,
                           slot_tokens=context_bound(tokenizer, env, questions, sampling.max_new_tokens))
    episodes, turns, work = _play(sampler, tokenizer, env, questions, num_samples=num_samples, sampling=sampling,
                                  keep_ids=return_ids, desc=desc, progress=progress)
    if stats is not None:
        stats.update(merge_work(stats, work))
    generated = sum(len(reply) for t in turns for _, reply in t) if return_ids else sum(map(sum, turns))
    return (episodes, generated, turns) if return_ids else (episodes, generated)


def _play(sampler: Sampler, tokenizer, env, questions, *, num_samples, sampling, keep_ids, desc, progress,
          on_group=None):
    """The player: question q's K episodes start as one request group (sharing the
    prompt); each finished turn steps its episode and, unless it ended, asks for the
    next turn. Returns (episodes, per episode and turn (prompt ids, reply ids) with
    ``keep_ids`` else tokens generated, the sampler's work). ``on_group(q, episodes,
    turns)`` is called as soon as question q's K episodes have all ended (in any order
    of q)."""
    k = num_samples
    episodes = [Episode(env, q) for q in questions for _ in range(k)]
    turns: list[list] = [[] for _ in episodes]
    hashes = [prompt_hash(q.prompt_id) for q in questions]
    unfinished = [k] * len(questions)
    prefill = env_prefill(env)
    skip_special = bool(getattr(env, "skip_special_tokens", False))
    budget = sampling.max_new_tokens
    bar = tqdm(total=len(episodes), desc=desc, unit="episode", disable=not progress, leave=False)

    def source():
        for q in range(len(questions)):
            tokens = encode_prompt(tokenizer, episodes[q * k].messages, prefill)
            yield [Request(q * k + j, tokens, (1, hashes[q], j), budget, share=q, share_count=k) for j in range(k)]

    def on_finish(req: Request, reply: list, _logps) -> list:
        i, q = req.episode, req.episode // k
        turns[i].append((list(req.tokens), list(reply)) if keep_ids else len(reply))
        episodes[i].step(prefill + decode_reply(tokenizer, reply, sampling.stop_ids, skip_special))
        if not episodes[i].done:
            tokens = encode_prompt(tokenizer, episodes[i].messages, prefill)
            return [Request(i, tokens, (len(turns[i]) + 1, hashes[q], i % k), budget)]
        bar.update(1)
        unfinished[q] -= 1
        if unfinished[q] == 0 and on_group is not None:
            on_group(q, episodes[q * k:(q + 1) * k], turns[q * k:(q + 1) * k])
        return []

    work = sampler.run(source(), on_finish)
    bar.close()
    return episodes, turns, work


def chunk_size(batch_size: int, num_samples: int) -> int:
    """Prompts per chunk of the static sampler, ``G = max(1, batch_size // num_samples)``
    (``static.StaticSampler``), and the unit a multi-process job shards by
    (``distributed.shard_range(..., align=G)``). Chunk c is always
    questions[c*G:(c+1)*G], whoever plays it, so its batches and numbers never depend
    on how many processes share the work."""
    return max(1, batch_size // num_samples)


def generated_tokens(record: dict) -> int:
    """Tokens the policy generated for a record written by ``append_rollouts`` (0 for a
    record from elsewhere: the count lives in its per-turn ``reward_details``)."""
    details = record.get("reward_details")
    if not isinstance(details, list):
        return 0
    return sum(d.get("generated_tokens", 0) for d in details if isinstance(d, dict))


def append_rollouts(path: str, model, tokenizer, env: Environment, questions: Sequence[Question], *,
                    num_samples: int, sampling: SamplingParams, seed: int, batch_size: int = 64,
                    max_len: int | None = None, desc: str = "rollout", progress: bool = True,
                    engine: "str | EngineOptions" = "continuous", stats: dict | None = None) -> dict:
    """Play ``num_samples`` episodes of every question into the JSONL file ``path``,
    resuming whatever an interrupted call with the same arguments left there.

    On entry the file is cut back to its last complete group (``records.resume_point``).
    Every finished prompt group (its K records) is appended with one write + fsync, in
    prompt order, once it and every group before it have ended. Sampling keys come from
    (seed, prompt id, sample, turn) alone.

    - "continuous" engine: the remaining prompts stream through the engine's slots.
    - "static": prompts are played in fixed chunks of ``G = chunk_size(batch_size,
      num_samples)`` (chunk c = questions[c*G:(c+1)*G], by index only); the first chunk
      with unfinished groups is replayed IN FULL, so its batches and numerics are those
      of the uninterrupted run and the file ends byte-identical to it.

    Each record's per-turn ``reward_details`` carry ``generated_tokens``, so the total
    below is the same however often the run was interrupted.

    Returns:
      {"trajectories", "generated_tokens" (total in the file), "resumed_groups" (groups
      already in the file on entry), "t_star" (per record, file order), "work" (the
      sampler's work figures for this call; also merged into ``stats``)}.
    """
    if not questions:
        raise ValueError("append_rollouts needs at least one question")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    prompt_ids = [q.prompt_id for q in questions]
    if len(set(prompt_ids)) != len(prompt_ids):
        raise ValueError("questions have duplicate prompt ids; a prompt id must name one prompt group")
    done = records.resume_point(path, prompt_ids, num_samples)
    work: dict = {}
    if done < len(questions):
        sampler = make_sampler(engine, model, sampling, seed=seed, batch_size=batch_size, max_len=max_len,
                               slot_tokens=context_bound(tokenizer, env, questions, sampling.max_new_tokens))
        # The engine's episodes do not depend on slot placement: it starts at group `done`.
        first = done - done % chunk_size(batch_size, num_samples) if sampler.kind == "static" else done
        bar = tqdm(total=len(questions), initial=done, desc=desc, unit="prompt", disable=not progress)
        ended: dict = {}
        next_group = [first]

        def on_group(q, group_episodes, group_turns):
            ended[first + q] = [_record(e, t) for e, t in zip(group_episodes, group_turns)]
            while next_group[0] in ended:  # write in prompt order
                group = ended.pop(next_group[0])
                if next_group[0] >= done:  # else already in the file
                    records.append_group(path, group)
                    bar.update(1)
                next_group[0] += 1

        _, _, work = _play(sampler, tokenizer, env, questions[first:], num_samples=num_samples,
                           sampling=sampling, keep_ids=False, desc=desc, progress=False, on_group=on_group)
        bar.close()
    if stats is not None:
        stats.update(merge_work(stats, work))
    written, _ = records.read_jsonl(path)
    return {"trajectories": len(written), "generated_tokens": sum(map(generated_tokens, written)),
            "resumed_groups": done, "t_star": [r["t_star"] for r in written], "work": work}


def _record(episode: Episode, tokens_per_turn: list[int]) -> dict:
    """The release record, with each turn's generated token count in its details."""
    record = episode.to_record()
    record["reward_details"] = [{**d, "generated_tokens": n}
                                for d, n in zip(record["reward_details"], tokens_per_turn, strict=True)]
    return record
