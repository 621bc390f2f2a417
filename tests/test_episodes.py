"""drift_jax.rollout.episodes: episodes played by a (tiny, random) policy, the text a reply adds to
the dialogue, per-trajectory keys, the resumable rollout writer, and the sampler each
caller plays on: the one configured (spied), with the same episodes on either.

``play_episodes`` runs on the toy task with its word-level tokenizer, on the continuous
engine unless a test names the static sampler. Reading and writing records is tested in
test_records.py.
"""

import collections
import itertools
import types

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.data.chat import encode_prompt, end_of_turn_id
from drift_jax.data.records import read_jsonl, validate_record, write_jsonl
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer
from drift_jax.models import Transformer
from drift_jax.rollout.engine import Engine
from drift_jax.rollout.episodes import (
    append_rollouts,
    decode_reply,
    episode_keys,
    generated_tokens,
    play_episodes,
    prompt_hash,
)
from drift_jax.rollout.interface import ENGINES, EngineOptions, request_key_data
from drift_jax.rollout.sampling import SamplingParams
from drift_jax.rollout.static import StaticSampler

from helpers import WORDS, chatml_tokenizer, spy_samplers

K = 2
BATCH = 8

# -- play_episodes ------------------------------------------------------------------------
# Prompts: 8 tokens at turn 1, <= 16 at turn 2, <= 32 at turn 3 (replies of <= 3 tokens).


@pytest.fixture(scope="module")
def toy():
    tokenizer = build_tokenizer(num_values=10)
    env = SecretGuessEnv(num_values=10, id_length=1, max_turns=3, max_answers=3)
    questions = env.make_questions(3, seed=0, prefix="q")
    sampling = SamplingParams(temperature=1.0, max_new_tokens=3, stop_ids=(end_of_turn_id(tokenizer),))
    return tokenizer, env, questions, sampling


@pytest.fixture
def policy(tiny_cfg, toy):
    return Transformer(tiny_cfg.replace(vocab_size=len(toy[0])), rngs=nnx.Rngs(0))


def play(policy, toy, questions, seed, env=None, sampling=None, num_samples=K, engine="continuous", stats=None):
    tokenizer, toy_env, _, toy_sampling = toy
    episodes, generated = play_episodes(
        policy, tokenizer, env or toy_env, questions, num_samples=num_samples,
        sampling=sampling or toy_sampling, seed=seed, batch_size=BATCH, progress=False, engine=engine,
        stats=stats,
    )
    assert all(e.done for e in episodes)
    return [e.to_record() for e in episodes], generated


def test_play_episodes_returns_k_finished_episodes_per_question_in_order(policy, toy, tmp_path):
    _, env, questions, sampling = toy
    records, generated = play(policy, toy, questions, seed=0)
    assert len(records) == K * len(questions)
    assert [r["prompt_id"] for r in records] == [q.prompt_id for q in questions for _ in range(K)]
    assert [r["gold"] for r in records] == [q.gold for q in questions for _ in range(K)]
    turns = 0
    for r in records:
        validate_record(r, "played")
        roles = [m["role"] for m in r["messages"]]
        n = len(r["turn_rewards"])
        turns += n
        assert roles == ["user"] + ["assistant", "user"] * (n - 1) + ["assistant"]
        assert list(r["turn_rewards"]) == [f"t{t}" for t in range(1, n + 1)]
        # Finished: solved at its last turn, or out of turns / answers.
        if r["t_star"] is not None:
            assert r["t_star"] == n and r["turn_rewards"][f"t{n}"] == 1.0
        else:
            assert n == env.max_turns or len(r["answer_norms"]) == env.max_answers
    assert 0 < generated <= turns * sampling.max_new_tokens
    # The records survive the file format.
    write_jsonl(tmp_path / "r.jsonl", records)
    assert read_jsonl(str(tmp_path / "r.jsonl")) == (records, collections.Counter())


def test_return_ids_gives_the_context_and_reply_of_every_turn(policy, toy):
    """``turns[i]`` holds, per turn, the ids the policy saw and the ids it sampled: the
    prompt is the rendered dialogue so far, the reply decodes to the assistant message."""
    tokenizer, env, questions, sampling = toy
    plain, generated = play(policy, toy, questions, seed=0)
    episodes, generated_ids, turns = play_episodes(
        policy, tokenizer, env, questions, num_samples=K, sampling=sampling, seed=0,
        batch_size=BATCH, progress=False, return_ids=True)
    assert [e.to_record() for e in episodes] == plain  # the same episodes either way
    assert generated_ids == generated == sum(len(reply) for t in turns for _, reply in t)
    assert len(turns) == len(episodes)
    for episode, per_turn in zip(episodes, turns):
        messages = episode.messages
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(per_turn) == len(assistant) == len(episode.turn_rewards)
        for i, (prompt_ids, reply_ids) in zip(assistant, per_turn):
            assert prompt_ids == encode_prompt(tokenizer, messages[:i])
            assert 0 < len(reply_ids) <= sampling.max_new_tokens
            assert all(isinstance(t, int) for t in prompt_ids + reply_ids)
            assert messages[i]["content"] == decode_reply(tokenizer, reply_ids, sampling.stop_ids)


def test_same_seed_same_records_other_seed_other_records(policy, toy):
    questions = toy[2]
    first, n_first = play(policy, toy, questions, seed=0)
    again, n_again = play(policy, toy, questions, seed=0)
    assert first == again and n_first == n_again
    other, _ = play(policy, toy, questions, seed=1)
    assert [r["messages"] for r in other] != [r["messages"] for r in first]


def test_a_questions_trajectories_do_not_depend_on_the_other_questions(policy, toy):
    q0, q1 = toy[2][:2]
    both, _ = play(policy, toy, [q0, q1], seed=3)
    alone, _ = play(policy, toy, [q1], seed=3)
    assert both[K:] == alone
    # ... nor on the run's sample count for the samples they share.
    more, _ = play(policy, toy, [q1], seed=3, num_samples=K + 1)
    assert more[:K] == alone


def test_greedy_evaluation_is_deterministic(policy, toy):
    tokenizer, _, questions, sampling = toy
    env = SecretGuessEnv(num_values=10, id_length=1, max_turns=2, max_answers=2)  # bucket 16 only
    greedy = SamplingParams(temperature=0.0, max_new_tokens=3, stop_ids=sampling.stop_ids)
    first, _ = play(policy, toy, questions, seed=0, env=env, sampling=greedy, num_samples=1)
    other_seed, _ = play(policy, toy, questions, seed=9, env=env, sampling=greedy, num_samples=1)
    assert first == other_seed  # the seed plays no part in greedy decoding
    assert len(first) == len(questions) and all(len(r["turn_rewards"]) >= 1 for r in first)


def test_episode_keys_depend_on_prompt_sample_and_turn_only():
    data = lambda keys: np.asarray(jax.random.key_data(keys))  # noqa: E731
    keys = data(episode_keys(0, ["a", "b", "a"], [0, 0, 1], turn=1))
    assert len({k.tobytes() for k in keys}) == 3
    assert np.array_equal(data(episode_keys(0, ["x", "b"], [5, 0], turn=1))[1], keys[1])
    assert not np.array_equal(data(episode_keys(0, ["b"], [0], turn=2))[0], keys[1])
    assert not np.array_equal(data(episode_keys(1, ["b"], [0], turn=1))[0], keys[1])
    # The samplers' requests carry (turn, prompt hash, sample): the same bits.
    for seed, turn in ((0, 1), (7, 3)):
        ids = [(turn, prompt_hash(p), j) for p, j in (("a", 0), ("b", 0), ("a", 1))]
        np.testing.assert_array_equal(request_key_data(seed, np.asarray(ids, np.int64)),
                                      data(episode_keys(seed, ["a", "b", "a"], [0, 0, 1], turn)))


# -- the sampler each caller plays on ----------------------------------------------------

@pytest.mark.parametrize("kind", ENGINES)
def test_play_episodes_runs_the_configured_sampler_and_reports_its_work(policy, toy, monkeypatch, kind):
    ran = spy_samplers(monkeypatch)
    questions = toy[2]
    for engine in (kind, EngineOptions(kind=kind, page_size=8)):
        ran.clear()
        stats: dict = {}
        _, generated = play(policy, toy, questions, seed=0, engine=engine, stats=stats)
        assert ran == [kind] and stats["kind"] == kind
        assert stats["useful_tokens"] == generated and stats["requests"] >= K * len(questions)
        assert 0 < stats["slot_utilization"] <= 1 and stats["prefill_tokens"] > 0
    # Stats passed again are added to (e.g. over chunks or calls).
    play(policy, toy, questions, seed=0, engine=kind, stats=stats)
    assert stats["useful_tokens"] == 2 * generated


@pytest.mark.parametrize("kind", ENGINES)
def test_the_eval_stage_plays_on_the_configured_sampler(policy, toy, tmp_path, monkeypatch, kind):
    """``stages.eval_player`` (the eval stage's player, per process) plays on the sampler
    of ``Experiment.engine`` and returns its work figures with the tokens generated."""
    from experiments.stages import eval_player

    tokenizer, env, questions, sampling = toy
    exp = types.SimpleNamespace(
        cfg=types.SimpleNamespace(seed=0, eval=types.SimpleNamespace(batch_size=BATCH, max_new_tokens=3)),
        tokenizer=tokenizer, engine=lambda: EngineOptions(kind=kind),
        sampling=lambda temperature, max_new_tokens: SamplingParams(
            temperature=temperature, max_new_tokens=max_new_tokens, stop_ids=sampling.stop_ids))
    ran = spy_samplers(monkeypatch)
    played = eval_player(exp, policy, env, "eval")(str(tmp_path / "eval.jsonl"), questions)
    assert ran == [kind] and played["sampler"]["kind"] == kind
    records, _ = read_jsonl(str(tmp_path / "eval.jsonl"))
    assert len(records) == len(questions) and played["generated_tokens"] == played["sampler"]["useful_tokens"] > 0


def test_greedy_evaluation_gives_the_same_dialogues_on_both_samplers(policy, toy):
    """Evaluation's case: greedy, one sample, more questions than a static chunk holds."""
    _, env, _, sampling = toy
    questions = env.make_questions(BATCH + 1, seed=2, prefix="e")  # static: chunks of 8 and 1
    greedy = SamplingParams(temperature=0.0, max_new_tokens=3, stop_ids=sampling.stop_ids)
    played = {kind: play(policy, toy, questions, seed=0, sampling=greedy, num_samples=1, engine=kind)
              for kind in ENGINES}
    assert played["continuous"] == played["static"]  # records and tokens generated
    assert len(played["static"][0]) == len(questions) and played["static"][1] > 0


# -- decode_reply: one rule for every player ----------------------------------------------

@pytest.fixture(scope="module")
def chatml():
    return chatml_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_decode_reply_keeps_a_special_token_inside_the_reply(chatml):
    eot, start = chatml.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    reply = _ids(chatml, "maybe B") + [start] + _ids(chatml, "user\nthe secret") + [eot]
    assert decode_reply(chatml, reply, (eot,)) == "maybe B<|im_start|>user\nthe secret"
    # ... and a stop token that is not the last one.
    reply = _ids(chatml, "7") + [eot] + _ids(chatml, " 42") + [eot]
    assert decode_reply(chatml, reply, (eot,)) == "7<|im_end|> 42"


def test_decode_reply_without_special_tokens_is_what_vllm_hands_the_release(chatml):
    """vLLM decodes with SamplingParams.skip_special_tokens=True (its default): every
    special token of the reply left out, the final stop token too, nothing stripped."""
    eot, start, pad = chatml.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
    reply = _ids(chatml, "maybe B") + [start] + _ids(chatml, " user\nthe secret") + [eot, pad] + _ids(chatml, " 7")
    assert decode_reply(chatml, reply + [eot], (eot,), skip_special_tokens=True) == "maybe B user\nthe secret 7"
    assert decode_reply(chatml, reply + [eot], (eot,)) == "maybe B<|im_start|> user\nthe secret<|im_end|><|endoftext|> 7"


def test_decode_reply_drops_only_one_final_stop_id(chatml):
    eot, pad = chatml.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    body = _ids(chatml, "the secret")
    assert decode_reply(chatml, body + [eot], (eot,)) == "the secret"
    assert decode_reply(chatml, body + [eot, eot], (eot,)) == "the secret<|im_end|>"
    assert decode_reply(chatml, body + [pad], (eot, pad)) == "the secret"  # any stop id
    assert decode_reply(chatml, body + [pad], (eot,)) == "the secret<|endoftext|>"  # not a stop id
    assert decode_reply(chatml, body, (eot,)) == "the secret"  # cut at max_new_tokens
    assert decode_reply(chatml, [eot], (eot,)) == decode_reply(chatml, [], (eot,)) == ""
    assert decode_reply(chatml, np.asarray(body + [eot], np.int32), (eot,)) == "the secret"


def test_decode_reply_never_strips(chatml):
    eot = end_of_turn_id(chatml)
    for text in ("  the secret", "maybe B \n", "\n\n", " ", "7  42"):
        assert decode_reply(chatml, _ids(chatml, text) + [eot], (eot,)) == text


_CHATML: dict = {}  # the tokenizer, built once (hypothesis re-runs the test body)
_piece = st.sampled_from(WORDS + [" ", "  ", "\n", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(_piece, max_size=8))
def test_decode_reply_is_the_reply_text_minus_one_stop(pieces):
    tokenizer = _CHATML.setdefault("tokenizer", chatml_tokenizer())
    eot = end_of_turn_id(tokenizer)
    ids = [i for p in pieces for i in _ids(tokenizer, p)]
    text = "".join(pieces)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert decode_reply(tokenizer, ids + [eot], (eot,)) == text
    # Without a stop id of its own, a reply that happens to end in one loses that one.
    cut = text.removesuffix("<|im_end|>") if pieces and pieces[-1] == "<|im_end|>" else text
    assert decode_reply(tokenizer, ids, (eot,)) == cut


def test_decode_reply_on_the_toy_tokenizer_keeps_stray_role_tokens():
    tokenizer = build_tokenizer(num_values=10)
    eot = end_of_turn_id(tokenizer)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    reply = _ids(tokenizer, "maybe") + [user] + _ids(tokenizer, "<answer>A</answer>") + [eot]
    text = decode_reply(tokenizer, reply, (eot,))
    assert text.split() == ["maybe", "<|user|>", "<answer>A</answer>"]  # the final <|im_end|> dropped


# -- append_rollouts: resumable, group by group -------------------------------------------

APPEND_K = 4  # chunk = BATCH // APPEND_K = 2 prompts: 5 prompts -> chunks of 2, 2, 1


def _append(policy, toy, path, questions, engine="continuous"):
    tokenizer, env, _, sampling = toy
    return append_rollouts(str(path), policy, tokenizer, env, questions, num_samples=APPEND_K,
                           sampling=sampling, seed=0, batch_size=BATCH, progress=False, engine=engine)


def _strip_counts(record):
    return {**record, "reward_details": [{k: v for k, v in d.items() if k != "generated_tokens"}
                                         for d in record["reward_details"]]}


def test_append_rollouts_writes_the_groups_of_play_episodes_with_token_counts(policy, toy, tmp_path):
    questions = toy[1].make_questions(5, seed=1, prefix="a")
    stats = _append(policy, toy, tmp_path / "r.jsonl", questions)
    records, _ = read_jsonl(str(tmp_path / "r.jsonl"))
    played, generated = play(policy, toy, questions, seed=0, num_samples=APPEND_K)
    assert [_strip_counts(r) for r in records] == played  # same trajectories, whatever the chunking
    assert stats["trajectories"] == len(records) == APPEND_K * len(questions)
    assert stats["generated_tokens"] == sum(map(generated_tokens, records)) == generated
    assert stats["t_star"] == [r["t_star"] for r in records] and stats["resumed_groups"] == 0
    for r in records:  # one count per turn played
        assert len(r["reward_details"]) == len(r["turn_rewards"])


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_resume_from_any_interrupted_state_writes_the_same_file(policy, toy, tmp_path, monkeypatch, engine):
    """Static: the unfinished chunk is replayed in full; continuous: the remaining
    prompts stream through the engine, from the first unfinished one. Either way the
    file ends as an uninterrupted one, and only the configured sampler runs."""
    questions = toy[1].make_questions(5, seed=1, prefix="a")
    _append(policy, toy, tmp_path / "full.jsonl", questions, engine)
    full = (tmp_path / "full.jsonl").read_bytes()
    line_ends = [i + 1 for i, b in enumerate(full) if b == ord("\n")]
    group_ends = line_ends[APPEND_K - 1 :: APPEND_K]
    assert len(group_ends) == 5
    prompt_of = {prompt_hash(q.prompt_id): q.prompt_id for q in questions}
    replayed = []  # the first prompt id of every static chunk, or of the engine's run
    ran = spy_samplers(monkeypatch)
    real_chunk, real_run = StaticSampler._play_chunk, Engine.run  # Engine.run: the spy

    def spy_chunk(self, requests, *args):
        replayed.append(prompt_of[requests[0].key_ids[1]])
        return real_chunk(self, requests, *args)

    def spy_run(self, source, on_finish):
        first = next(iter(source), None)
        replayed.extend([prompt_of[first[0].key_ids[1]]] if first else [])
        return real_run(self, itertools.chain([first] if first else [], source), on_finish)

    monkeypatch.setattr(StaticSampler, "_play_chunk", spy_chunk)
    monkeypatch.setattr(Engine, "run", spy_run)
    cuts = {  # prefix length -> (complete groups in it, static chunks that must be replayed)
        0: (0, ["a0", "a2", "a4"]),
        line_ends[0] // 2: (0, ["a0", "a2", "a4"]),  # torn first line
        line_ends[0]: (0, ["a0", "a2", "a4"]),  # incomplete first group
        group_ends[0]: (1, ["a0", "a2", "a4"]),  # chunk 0 unfinished: replayed in full
        group_ends[1] + 7: (2, ["a2", "a4"]),  # chunk 0 done: not replayed
        group_ends[3]: (4, ["a4"]),
        len(full) - 1: (4, ["a4"]),  # the last newline missing
        len(full): (5, []),  # finished: nothing played
    }
    assert [q.prompt_id for q in questions] == ["a0", "a1", "a2", "a3", "a4"]
    for cut, (groups, chunks) in cuts.items():
        path = tmp_path / f"cut{cut}.jsonl"
        path.write_bytes(full[:cut])
        replayed.clear()
        ran.clear()
        stats = _append(policy, toy, path, questions, engine)
        assert path.read_bytes() == full, cut
        assert stats["resumed_groups"] == groups, cut
        expected = chunks if engine == "static" else [f"a{g}" for g in range(groups, 5)][:1]
        assert replayed == expected, cut  # the engine starts at the first unfinished group
        assert ran == ([engine] if expected else []), cut


def test_append_rollouts_rejects_bad_arguments(policy, toy, tmp_path):
    tokenizer, env, questions, sampling = toy
    run = lambda qs, k: append_rollouts(str(tmp_path / "r.jsonl"), policy, tokenizer, env, qs,  # noqa: E731
                                        num_samples=k, sampling=sampling, seed=0, progress=False)
    with pytest.raises(ValueError, match="at least one question"):
        run([], 2)
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        run(questions, 0)
    with pytest.raises(ValueError, match="duplicate prompt ids"):
        run([questions[0], questions[0]], 2)
    assert not (tmp_path / "r.jsonl").exists()


def test_generated_tokens_of_a_record_from_elsewhere_is_zero():
    assert generated_tokens({"prompt_id": "p"}) == 0
    assert generated_tokens({"reward_details": {"t1": {"correct": True}}}) == 0  # the release's form
    assert generated_tokens({"reward_details": [{"generated_tokens": 3}, "junk", {"turn": 2}]}) == 3


def test_both_engines_write_the_same_rollout_file(policy, toy, tmp_path, monkeypatch):
    questions = toy[1].make_questions(5, seed=1, prefix="a")
    ran = spy_samplers(monkeypatch)
    for kind in ENGINES:
        stats = _append(policy, toy, tmp_path / f"{kind}.jsonl", questions, kind)
        assert ran[-1] == kind and stats["work"]["kind"] == kind
        assert stats["work"]["useful_tokens"] == stats["generated_tokens"]
    assert ran == list(ENGINES)
    assert (tmp_path / "static.jsonl").read_bytes() == (tmp_path / "continuous.jsonl").read_bytes()
