"""Multi-turn episodes played by a policy in an environment: the one player used by
rollouts, evaluation and online RL, and the resumable rollout writer.

Host side: render each live dialogue with the chat template, verify replies, append the
feedback. Device side: the continuous engine (``drift_jax.rollout.engine``, the default), or
with ``engine="static"`` one ``generate_batched`` call per turn for all live episodes.
Turn 1 draws K samples of each prompt; later turns extend each live trajectory with one
sample, exactly as in the reference release. An environment's ``prefill`` (the release's
``<think>``) ends every prompt, and the reply handed to ``Episode.step`` is the prefill
plus the decoded continuation: what the model said (the environment may then rewrite it).

``append_rollouts`` is the resumable form used for Stage 1: it appends each finished
prompt group to the rollout file in prompt order, so a killed run rerun with the same
arguments writes the same file.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from drift_jax.data import records
from drift_jax.data.chat import encode_prompt
from drift_jax.rollout.engine import Engine, EngineOptions, Request, engine_options
from drift_jax.envs.base import Environment, Episode, Question, env_prefill
from drift_jax.rollout.sampling import SamplingParams, add_work, generate_batched


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


def decode_reply(tokenizer, reply_ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """The text a sampled reply adds to the dialogue: its ids minus one final stop token
    (the chat template closes the turn itself), decoded WITH any other special tokens and
    unstripped, so the next turn's context holds what the policy sampled. Dropping
    special tokens would hide, and so never penalise, a stray ``<|user|>`` in a reply
    (on the toy task online RL then learned to emit them)."""
    body = reply_ids[:-1] if len(reply_ids) and reply_ids[-1] in stop_ids else reply_ids
    return tokenizer.decode(list(body), skip_special_tokens=False)


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
    """Play ``num_samples`` episodes of every question.

    Returns ``(episodes, generated)``: the episodes (question-major: the K samples of
    question 0 first) and the number of tokens generated. With ``return_ids``,
    ``(episodes, generated, turns)`` where ``turns[i]`` lists (prompt_ids, reply_ids) per
    turn of episode i: the context the policy saw and the ids it sampled (online RL
    trains on exactly these).
    """
    episodes, turns = _play(model, tokenizer, env, questions, num_samples=num_samples,
                            sampling=sampling, seed=seed, batch_size=batch_size, max_len=max_len,
                            desc=desc, progress=progress, keep_ids=return_ids)
    generated = sum(len(reply) for t in turns for _, reply in t) if return_ids else sum(map(sum, turns))
    return (episodes, generated, turns) if return_ids else (episodes, generated)


def _play(model, tokenizer, env, questions, *, num_samples, sampling, seed, batch_size, max_len,
          desc, progress, keep_ids, engine=None, stats=None):
    """``play_episodes`` on the static sampler; per episode and turn, (prompt ids, reply
    ids) with ``keep_ids``, else the number of tokens generated."""
    episodes = [Episode(env, q) for q in questions for _ in range(num_samples)]
    sample_idx = [j for _ in questions for j in range(num_samples)]
    turns: list[list] = [[] for _ in episodes]
    prefill = env_prefill(env)
    bar = tqdm(total=len(episodes), desc=desc, unit="episode", disable=not progress, leave=False)
    for turn in range(1, env.max_turns + 1):
        live = [i for i, e in enumerate(episodes) if not e.done]
        if not live:
            break
        bar.set_postfix(turn=turn, live=len(live))
        prompts = [encode_prompt(tokenizer, episodes[i].messages, prefill) for i in live]
        keys = episode_keys(
            seed, [episodes[i].question.prompt_id for i in live], [sample_idx[i] for i in live], turn
        )
        turn_stats = {} if stats is not None else None
        outputs = generate_batched(model, prompts, keys, sampling, batch_size=batch_size, max_len=max_len,
                                   stats=turn_stats)
        if stats is not None:
            by_turn = stats.setdefault("prefill_tokens_by_turn", {})
            by_turn[turn] = by_turn.get(turn, 0) + turn_stats["prefill_tokens"]
            add_work(stats, **{k: v for k, v in turn_stats.items() if k != "slot_utilization"})
        for i, prompt, (reply, _) in zip(live, prompts, outputs):
            turns[i].append((list(prompt), list(reply)) if keep_ids else len(reply))
            episodes[i].step(prefill + decode_reply(tokenizer, reply, sampling.stop_ids))
            if episodes[i].done:
                bar.update(1)
    bar.close()
    return episodes, turns


def _play_continuous(model, tokenizer, env, questions, *, num_samples, sampling, seed, batch_size, max_len,
                     desc, progress, keep_ids, engine, on_group=None, stats=None):
    """``_play`` on the continuous engine. ``on_group(q, episodes, turns)`` is called as
    soon as question q's K episodes have all ended (in any order of q); ``stats``, a
    dict, receives the engine's work-done figures."""
    opts = engine_options(engine, batch_size)
    k = num_samples
    episodes = [Episode(env, q) for q in questions for _ in range(k)]
    turns: list[list] = [[] for _ in episodes]
    hashes = [prompt_hash(q.prompt_id) for q in questions]
    unfinished = [k] * len(questions)
    prefill = env_prefill(env)
    budget = sampling.max_new_tokens
    bar = tqdm(total=len(episodes), desc=desc, unit="episode", disable=not progress, leave=False)

    def source():
        for q in range(len(questions)):
            tokens = encode_prompt(tokenizer, episodes[q * k].messages, prefill)
            yield [Request(q * k + j, tokens, (1, hashes[q], j), budget, share=q, share_count=k) for j in range(k)]

    def on_finish(req: Request, reply: list, _logps) -> list:
        i, q = req.episode, req.episode // k
        turns[i].append((list(req.tokens), list(reply)) if keep_ids else len(reply))
        episodes[i].step(prefill + decode_reply(tokenizer, reply, sampling.stop_ids))
        if not episodes[i].done:
            tokens = encode_prompt(tokenizer, episodes[i].messages, prefill)
            return [Request(i, tokens, (len(turns[i]) + 1, hashes[q], i % k), budget)]
        bar.update(1)
        unfinished[q] -= 1
        if unfinished[q] == 0 and on_group is not None:
            on_group(q, episodes[q * k:(q + 1) * k], turns[q * k:(q + 1) * k])
        return []

    eng = Engine(model, sampling, seed=seed, num_slots=opts.num_slots, page_size=opts.page_size,
                 num_pages=opts.num_pages, steps_per_visit=opts.steps_per_visit,
                 refill_after=opts.refill_after, row_buckets=opts.row_buckets, max_len=max_len)
    eng_stats = eng.run(source(), on_finish)
    bar.close()
    if stats is not None:
        stats.update(eng_stats.as_dict())
    return episodes, turns
def chunk_size(batch_size: int, num_samples: int) -> int:
    """Prompts per chunk, ``G = max(1, batch_size // num_samples)``: the unit a player
    plays at once (``append_rollouts``, ``play_chunked``) and the unit a multi-process job
    shards by (``distributed.shard_range(..., align=G)``). Chunk c is always
    questions[c*G:(c+1)*G], whoever plays it, so its batches and numbers never depend
    on how many processes share the work."""
    return max(1, batch_size // num_samples)


def play_chunked(model, tokenizer, env: Environment, questions: Sequence[Question], *, num_samples: int,
                 sampling: SamplingParams, seed: int, batch_size: int = 64, max_len: int | None = None,
                 desc: str = "episodes", progress: bool = True, engine="continuous", stats: dict | None = None):
    """``play_episodes`` over ``questions`` one chunk (``chunk_size``; with the
    continuous engine, all of them at once) at a time:
    (episodes, generated tokens), question-major. A slice of the questions that starts
    at a chunk boundary gets the same episodes as the whole list (a process playing its
    shard of an evaluation writes what a single process would)."""
    chunk = chunk_size(batch_size, num_samples)
    if engine_options(engine, batch_size).kind == "continuous":
        chunk = max(1, len(questions))  # its episodes do not depend on slot placement: no chunk tails
    episodes, generated = [], 0
    bar = tqdm(total=len(questions), desc=desc, unit="prompt", disable=not progress, leave=False)
    for start in range(0, len(questions), chunk):
        played, tokens = play_episodes(model, tokenizer, env, questions[start:start + chunk],
                                       num_samples=num_samples, sampling=sampling, seed=seed,
                                       batch_size=batch_size, max_len=max_len, desc=desc, progress=False,
                                       engine=engine, stats=stats)
        episodes += played
        generated += tokens
        bar.update(len(questions[start:start + chunk]))
    bar.close()
    return episodes, generated


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
    prompt order. Sampling keys come from (seed, prompt id, sample, turn) alone.

    - "continuous" engine: the remaining prompts stream through the engine's slots; a
      group is written once it and every group before it have ended.
    - "static": prompts are played in fixed chunks of ``G = max(1, batch_size //
      num_samples)`` (chunk c = questions[c*G:(c+1)*G], by index only); the first chunk
      with unfinished groups is replayed IN FULL, so its batches and numerics are those
      of the uninterrupted run and the file ends byte-identical to it.

    Each record's per-turn ``reward_details`` carry ``generated_tokens``, so the total
    below is the same however often the run was interrupted.

    Returns:
      {"trajectories", "generated_tokens" (total in the file), "resumed_groups" (groups
      already in the file on entry), "t_star" (per record, file order), "work" (the
      sampler's work-done figures for this call)}.
    """
    if not questions:
        raise ValueError("append_rollouts needs at least one question")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    prompt_ids = [q.prompt_id for q in questions]
    if len(set(prompt_ids)) != len(prompt_ids):
        raise ValueError("questions have duplicate prompt ids; a prompt id must name one prompt group")
    done = records.resume_point(path, prompt_ids, num_samples)
    bar = tqdm(total=len(questions), initial=done, desc=desc, unit="prompt", disable=not progress)
    work: dict = {} if stats is None else stats
    kwargs = dict(num_samples=num_samples, sampling=sampling, seed=seed, batch_size=batch_size,
                  max_len=max_len, desc=desc, progress=False, keep_ids=False, engine=engine, stats=work)
    if engine_options(engine, batch_size).kind == "continuous":
        ended: dict = {}
        next_group = [0]

        def on_group(q, group_episodes, group_turns):
            ended[q] = [_record(e, t) for e, t in zip(group_episodes, group_turns)]
            while next_group[0] in ended:  # write in prompt order
                records.append_group(path, ended.pop(next_group[0]))
                next_group[0] += 1
                bar.update(1)

        if done < len(questions):
            _play_continuous(model, tokenizer, env, questions[done:], on_group=on_group, **kwargs)
    else:
        chunk = chunk_size(batch_size, num_samples)
        first = done - done % chunk if done < len(questions) else len(questions)  # chunk of group `done`
        for start in range(first, len(questions), chunk):
            episodes, tokens_per_turn = _play(model, tokenizer, env, questions[start:start + chunk], **kwargs)
            for g in range(len(episodes) // num_samples):
                if start + g < done:
                    continue  # already in the file
                group = range(g * num_samples, (g + 1) * num_samples)
                records.append_group(path, [_record(episodes[i], tokens_per_turn[i]) for i in group])
                bar.update(1)
    bar.close()
    written, _ = records.read_jsonl(path)
    return {"trajectories": len(written), "generated_tokens": sum(map(generated_tokens, written)),
            "resumed_groups": done, "t_star": [r["t_star"] for r in written], "work": work}


def _record(episode: Episode, tokens_per_turn: list[int]) -> dict:
    """The release record, with each turn's generated token count in its details."""
    record = episode.to_record()
    record["reward_details"] = [{**d, "generated_tokens": n}
                                for d, n in zip(record["reward_details"], tokens_per_turn, strict=True)]
    return record
