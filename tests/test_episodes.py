"""Episodes played by a (tiny, random) policy, deterministic SFT batches, and rollout files.

``play_episodes`` runs on the toy task with its word-level tokenizer; three compiled
shapes in all (temperature 1 at prompt buckets 16 and 32, greedy at 16).
"""

import collections
import json
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax import rollout as rollout_module
from drift_jax.chat import SFTExample, encode_dialogue, end_of_turn_id
from drift_jax.data import make_batch_fn
from drift_jax.envs.secret import SecretGuessEnv, build_tokenizer, scripted_episode
from drift_jax.models import Transformer
from drift_jax.rollout import append_rollouts, episode_keys, generated_tokens, play_episodes
from drift_jax.rollouts import (
    BadRecord,
    context_check,
    read_jsonl,
    read_rollouts,
    resume_point,
    summarize_skipped,
    validate_record,
    write_jsonl,
)
from drift_jax.sampling import SamplingParams, bucket_length
from drift_jax.weights import trajectory_weights

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


def play(policy, toy, questions, seed, env=None, sampling=None, num_samples=K):
    tokenizer, toy_env, _, toy_sampling = toy
    episodes, generated = play_episodes(
        policy, tokenizer, env or toy_env, questions, num_samples=num_samples,
        sampling=sampling or toy_sampling, seed=seed, batch_size=BATCH, progress=False,
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


# -- make_batch_fn ------------------------------------------------------------------------

def _examples(lengths):
    """Example i's tokens all equal i + 1, so a batch row names its example."""
    return [SFTExample(np.full(n, i + 1, np.int32), np.arange(n) >= n // 2, weight=1.0 + i)
            for i, n in enumerate(lengths)]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=25), batch_size=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_each_epoch_covers_every_example_once_in_one_shape(lengths, batch_size, seed):
    examples = _examples(lengths)
    batch_fn, steps = make_batch_fn(examples, batch_size, seed, pad_id=0)
    assert steps == math.ceil(len(examples) / batch_size)
    shape = (batch_size, bucket_length(max(lengths)))
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            batch = batch_fn(step)
            assert batch["tokens"].shape == batch["valid"].shape == batch["loss_mask"].shape == shape
            real = batch["weights"] > 0
            assert not batch["valid"][~real].any()  # filler rows are empty
            for row in np.flatnonzero(real):
                i = int(batch["tokens"][row, 0]) - 1
                seen.append(i)
                assert batch["weights"][row] == examples[i].weight
                assert batch["valid"][row].sum() == lengths[i]
        assert sorted(seen) == list(range(len(examples)))


def test_batch_of_a_step_is_deterministic_and_epochs_reshuffle():
    examples = _examples(range(1, 21))
    batch_fn, steps = make_batch_fn(examples, 4, seed=0, pad_id=0)
    rebuilt, _ = make_batch_fn(examples, 4, seed=0, pad_id=0)
    reseeded, _ = make_batch_fn(examples, 4, seed=1, pad_id=0)
    for step in (0, 3, steps, 2 * steps + 1):
        for k, v in batch_fn(step).items():
            np.testing.assert_array_equal(v, batch_fn(step)[k])
            np.testing.assert_array_equal(v, rebuilt(step)[k])
    order = lambda fn, epoch: [fn(s)["tokens"][:, 0].tolist() for s in range(epoch * steps, (epoch + 1) * steps)]  # noqa: E731
    assert order(batch_fn, 0) != order(batch_fn, 1)
    assert order(batch_fn, 0) != order(reseeded, 0)


def test_make_batch_fn_without_examples_raises():
    with pytest.raises(ValueError, match="no training examples"):
        make_batch_fn([], 4, seed=0, pad_id=0)


# -- rollout files ------------------------------------------------------------------------

def _good_records(n=4):
    env = SecretGuessEnv()
    rng = np.random.default_rng(0)
    return [scripted_episode(env, q, rng, p_repeat=0.5, p_format_error=0.2).to_record()
            for q in env.make_questions(n, seed=0, prefix="g")]


def _with(**changes):
    record = dict(_good_records(1)[0])
    for key, value in changes.items():
        if value is _DROP:
            del record[key]
        else:
            record[key] = value
    return json.dumps(record)


_DROP = object()
BAD_LINES = {
    "malformed JSON": ('{"prompt_id": "x", "messages": [', r"malformed JSON"),
    "missing field": (_with(turn_rewards=_DROP), r"missing required field 'turn_rewards'"),
    "missing prompt id": (_with(prompt_id=_DROP), r"missing required field 'prompt_id'"),
    "missing answers": (_with(answer_norms=_DROP), r"missing required field 'answer_norms'"),
    "prompt id not a string": (_with(prompt_id=7), r"field 'prompt_id' is 7, not a non-empty string"),
    "NaN reward": (_with(turn_rewards={"t1": float("nan")}), r"field 'turn_rewards.t1' is nan"),
    "infinite reward": (_with(turn_rewards={"t1": float("inf")}), r"field 'turn_rewards.t1' is inf"),
    "non-numeric reward": (_with(turn_rewards={"t1": "1.0"}), r"field 'turn_rewards.t1' is '1.0'"),
    "reward beyond float32": (_with(turn_rewards={"t1": 1e39}), r"field 'turn_rewards.t1' is 1e\+39"),
    "rewards sum beyond float32": (_with(turn_rewards={"t1": 3e38, "t2": 3e38}),
                                   r"field 'turn_rewards' sums beyond float32's range"),
    "bad turn key": (_with(turn_rewards={"turn1": 1.0}), r"field 'turn_rewards' has key 'turn1'"),
    "answers not strings": (_with(answer_norms=[1]), r"field 'answer_norms' must be a list of strings"),
    "positive format penalty": (_with(format_penalty=0.1), r"field 'format_penalty' is 0.1, not a finite number <= 0"),
    "messages not a list": (_with(messages="hello"), r"field 'messages' must be a non-empty list"),
    "empty messages": (_with(messages=[]), r"field 'messages' must be a non-empty list"),
    "no assistant": (_with(messages=[{"role": "user", "content": "hi"}]),
                     r"field 'messages' has no assistant message"),
    "unknown role": (_with(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]),
                     r"field 'messages\[1\].role' is 'tool'"),
    "not an object": ("[1, 2]", r"record is a list, not a JSON object"),
    "bool reward": (_with(turn_rewards={"t1": True}), r"field 'turn_rewards.t1' is True"),
    "infinite penalty": (_with(format_penalty=float("-inf")), r"field 'format_penalty' is -inf"),
    # Lines that used to escape as OverflowError, ValueError, RecursionError, UnicodeDecodeError:
    "reward too big for a float": (_with(turn_rewards={"t1": 10**400}), r"field 'turn_rewards.t1' is 1000"),
    "number over the digit limit": ('{"prompt_id": ' + "1" * 5000 + "}", r"unreadable JSON"),
    "deep nesting": ("[" * 100_000, r"unreadable JSON"),
    "not UTF-8": (b'{"prompt_id": "\xff\xfe"}', r"line is not UTF-8 text"),
}


def _write_lines(path, lines):
    """Lines as given (str as UTF-8, bytes as they are), each followed by a newline."""
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return str(path)


def _nonblank_lines(path):
    """Lines ``read_jsonl`` must either keep or count as skipped."""
    def blank(raw):
        try:
            return not raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return False
    with open(path, "rb") as f:
        return sum(not blank(raw) for raw in f)


def test_write_then_read_round_trips(tmp_path):
    records = _good_records()
    path = tmp_path / "rollouts.jsonl"
    write_jsonl(str(path), records)
    assert read_jsonl(str(path)) == (records, collections.Counter())
    assert [p.name for p in tmp_path.iterdir()] == ["rollouts.jsonl"]  # no temporary left


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_strict_read_names_file_line_and_field(tmp_path, case):
    line, message = BAD_LINES[case]
    good = json.dumps(_good_records(1)[0])
    path = _write_lines(tmp_path / "bad.jsonl", [good, "", line, good])
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:3: {message}"):
        read_jsonl(path)


def test_skip_mode_keeps_good_records_and_counts_the_rest(tmp_path):
    good = _good_records(3)
    lines = [json.dumps(good[0]), BAD_LINES["NaN reward"][0], json.dumps(good[1]),
             BAD_LINES["missing field"][0], BAD_LINES["NaN reward"][0], json.dumps(good[2])]
    records, skipped = read_jsonl(_write_lines(tmp_path / "mixed.jsonl", lines), on_bad_record="skip")
    assert records == good
    assert sum(skipped.values()) == 3 and len(skipped) == 2
    assert skipped["field 'turn_rewards.t1' is nan, not a finite number"] == 2
    assert skipped["missing required field 'turn_rewards'"] == 1


def test_empty_file_raises(tmp_path):
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(BadRecord, match="holds no records"):
            read_jsonl(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="on_bad_record"):
        read_jsonl(str(tmp_path / "empty.jsonl"), on_bad_record="ignore")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**400) | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_roles = st.sampled_from(["system", "user", "assistant", "tool", "", None, 3])
_message = st.fixed_dictionaries({}, optional={"role": _roles, "content": st.text(max_size=6) | _json})
_record = st.fixed_dictionaries({}, optional={
    "prompt_id": _json | st.sampled_from(["p", "q"]), "messages": st.lists(_message, max_size=3) | _json,
    "turn_rewards": st.dictionaries(st.sampled_from(["t1", "t2", "x"]) | st.text(max_size=3), _json, max_size=2)
    | _json,
    "answer_norms": st.lists(st.text(max_size=3) | _json, max_size=2) | _json,
    "format_penalty": _json, "t_star": _json,
})
# Well-formed records but for their numbers (``_record`` varies the rest): whatever the
# reader accepts must give finite weights.
_near_valid = st.fixed_dictionaries({
    "prompt_id": st.sampled_from(["p", "q"]),
    "messages": st.just([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    "turn_rewards": st.dictionaries(st.sampled_from(["t1", "t2", "t3"]),
                                    st.floats(-1e39, 1e39) | st.integers(-2, 2) | _json, max_size=3),
    "answer_norms": st.lists(st.text(max_size=3), max_size=2),
}, optional={"format_penalty": st.floats(-1e39, 1.0) | _json})
_line = st.one_of(
    _record.map(json.dumps),
    _near_valid.map(json.dumps),
    _json.map(json.dumps),
    st.text(max_size=30),
    st.binary(max_size=30),
    # A cut-off write, maybe inside a multi-byte character.
    _record.map(lambda r: json.dumps(r, ensure_ascii=False).encode()).map(lambda b: b[: len(b) // 2]),
)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(_line, min_size=1, max_size=4))
def test_fuzz_strict_read_raises_only_bad_record(tmp_path_factory, lines):
    path = _write_lines(tmp_path_factory.mktemp("fuzz") / "f.jsonl", lines)
    try:
        records, skipped = read_jsonl(path)
    except BadRecord as e:
        assert str(e).startswith(path)
    else:
        assert records and not skipped
        for r in records:
            validate_record(r, "again")
        # What the reader accepts, the weights accept (no error past the reader).
        assert np.isfinite(trajectory_weights(records, gamma=0.9, beta=0.1)).all()
    # Skip mode accounts for every non-blank line: kept or counted.
    nonblank = _nonblank_lines(path)
    if nonblank:
        records, skipped = read_jsonl(path, on_bad_record="skip")
        assert len(records) + sum(skipped.values()) == nonblank


# -- the training set: several files, prompt groups, the context ---------------------------

def _group(pid, n, **changes):
    """``n`` good records of prompt ``pid`` (as JSON lines)."""
    return [json.dumps({**r, "prompt_id": pid, **changes}) for r in _good_records(n)]


def test_read_rollouts_keeps_file_order_across_files(tmp_path):
    a = _write_lines(tmp_path / "a.jsonl", _group("p", 2) + _group("q", 3))
    b = _write_lines(tmp_path / "b.jsonl", _group("r", 2))
    records, skipped = read_rollouts([a, b])
    assert [r["prompt_id"] for r in records] == ["p", "p", "q", "q", "q", "r", "r"] and not skipped
    with pytest.raises(ValueError, match="listed twice"):
        read_rollouts([a, b, a])


def test_same_prompt_id_in_two_files_is_an_error_or_dropped_from_the_later_file(tmp_path):
    a = _write_lines(tmp_path / "a.jsonl", _group("p", 2) + _group("q", 2))
    b = _write_lines(tmp_path / "b.jsonl", _group("r", 2) + _group("q", 2))
    with pytest.raises(BadRecord, match=rf"^{re.escape(b)}:3: field 'prompt_id' 'q' is also in {re.escape(a)}:3;"):
        read_rollouts([a, b])
    records, skipped = read_rollouts([a, b], on_bad_record="skip")
    assert [r["prompt_id"] for r in records] == ["p", "p", "q", "q", "r", "r"]
    assert sum(skipped.values()) == 2


def test_prompt_group_of_one_is_an_error_or_dropped_unless_allowed(tmp_path):
    path = _write_lines(tmp_path / "g.jsonl", _group("p", 3) + _group("lone", 1) + _group("q", 2))
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:4: field 'prompt_id': prompt group 'lone' has 1 "):
        read_rollouts([path])
    records, skipped = read_rollouts([path], on_bad_record="skip")
    assert [r["prompt_id"] for r in records] == ["p"] * 3 + ["q"] * 2
    assert summarize_skipped(skipped) == {"total": 1, "reasons": {"prompt group smaller than 2": 1}}
    records, _ = read_rollouts([path], min_group_size=1)  # plain SFT data: kept
    assert len(records) == 6
    # A bad record that leaves its group alone drops the group too when skipping.
    bad = _group("r", 1) + _group("r", 1, turn_rewards={"t1": float("nan")})
    path = _write_lines(tmp_path / "h.jsonl", _group("p", 2) + bad)
    records, skipped = read_rollouts([path], on_bad_record="skip")
    assert [r["prompt_id"] for r in records] == ["p", "p"] and sum(skipped.values()) == 2


def test_nothing_usable_is_an_error_in_both_modes(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for mode in ("error", "skip"):
        with pytest.raises(BadRecord, match="holds no records"):
            read_rollouts([str(empty)], on_bad_record=mode)
    bad = _write_lines(tmp_path / "bad.jsonl", [BAD_LINES["NaN reward"][0], BAD_LINES["malformed JSON"][0]])
    with pytest.raises(BadRecord, match=r"no usable records \({'total': 2"):
        read_rollouts([bad], on_bad_record="skip")


def test_prompt_longer_than_context_is_truncated_but_an_answer_that_does_not_fit_is_reported(tmp_path):
    tokenizer = build_tokenizer(num_values=10)
    short = [{"role": "user", "content": "guess the secret puzzle 1"},
             {"role": "assistant", "content": "<answer>A</answer>"}]
    long_prompt = [{"role": "user", "content": "guess " * 40}, short[1]]
    long_answer = [short[0], {"role": "assistant", "content": "maybe " * 40}]
    max_len = 16
    full = encode_dialogue(tokenizer, long_prompt)
    cut = encode_dialogue(tokenizer, long_prompt, max_len=max_len)
    assert len(full.tokens) > max_len and cut.truncated and len(cut.tokens) == max_len
    # Left-truncation keeps the supervised answer whole and in place at the end.
    np.testing.assert_array_equal(cut.tokens[cut.loss_mask], full.tokens[full.loss_mask])
    np.testing.assert_array_equal(cut.tokens, full.tokens[-max_len:])

    lines = [json.dumps({**_good_records(1)[0], "prompt_id": pid, "messages": m})
             for pid, m in [("a", short), ("a", long_prompt), ("b", short), ("b", long_answer), ("b", short)]]
    path = _write_lines(tmp_path / "ctx.jsonl", lines)
    check = context_check(tokenizer, max_len)
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:4: field 'messages': supervised answer needs \d+ tokens > max_len 16"):
        read_rollouts([path], check=check)
    records, skipped = read_rollouts([path], on_bad_record="skip", check=check)
    assert records == [json.loads(line) for i, line in enumerate(lines) if i != 3]
    assert sum(skipped.values()) == 1


# -- append_rollouts: resumable, group by group -------------------------------------------

APPEND_K = 4  # chunk = BATCH // APPEND_K = 2 prompts: 5 prompts -> chunks of 2, 2, 1


def _append(policy, toy, path, questions):
    tokenizer, env, _, sampling = toy
    return append_rollouts(str(path), policy, tokenizer, env, questions, num_samples=APPEND_K,
                           sampling=sampling, seed=0, batch_size=BATCH, progress=False)


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


def test_resume_from_any_interrupted_state_writes_the_same_file(policy, toy, tmp_path, monkeypatch):
    questions = toy[1].make_questions(5, seed=1, prefix="a")
    _append(policy, toy, tmp_path / "full.jsonl", questions)
    full = (tmp_path / "full.jsonl").read_bytes()
    line_ends = [i + 1 for i, b in enumerate(full) if b == ord("\n")]
    group_ends = line_ends[APPEND_K - 1 :: APPEND_K]
    assert len(group_ends) == 5
    replayed = []  # the first prompt id of every chunk played
    real_play = rollout_module._play

    def spy_play(model, tokenizer, env, chunk, **kwargs):
        replayed.append(chunk[0].prompt_id)
        return real_play(model, tokenizer, env, chunk, **kwargs)

    monkeypatch.setattr(rollout_module, "_play", spy_play)
    cuts = {  # prefix length -> (complete groups in it, chunks that must be replayed)
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
        stats = _append(policy, toy, path, questions)
        assert path.read_bytes() == full, cut
        assert stats["resumed_groups"] == groups and replayed == chunks, cut


def test_a_file_of_another_run_is_not_resumed(tmp_path):
    lines = _group("p", 2) + _group("q", 1)
    path = _write_lines(tmp_path / "other.jsonl", lines)
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:3: field 'prompt_id' is 'q', expected 'r'"):
        resume_point(path, ["p", "r"], 2)
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:3: .*another config"):
        resume_point(path, ["p"], 2)  # more groups than prompts
    assert (tmp_path / "other.jsonl").read_bytes().count(b"\n") == 3  # left as it was
    path = _write_lines(tmp_path / "junk.jsonl", _group("p", 1) + ["{not json"])
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:2: not a rollout record"):
        resume_point(path, ["p"], 2)
    assert resume_point(str(tmp_path / "missing.jsonl"), ["p"], 2) == 0
