"""The multi-turn protocol (``Episode``), answer extraction, and the toy secret-letter task."""

import collections

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from drift_jax.data.questions import Question
from drift_jax.envs.base import FEEDBACK, AnswerTagEnv, Episode, extract_tagged_answer
from drift_jax.envs.secret import LETTERS, SecretGuessEnv, scripted_episode

RECORD_KEYS = {"prompt_id", "gold", "messages", "turn_rewards", "verifier", "t_star",
               "answer_norms", "format_penalty", "reward_details"}
Q = Question("q0", "guess the secret puzzle 1 2 3", "C")


def play(env, replies, question=Q):
    episode = Episode(env, question)
    for reply in replies:
        episode.step(reply)
    return episode


def tag(answer):
    return f"<answer>{answer}</answer>"


# -- Episode ------------------------------------------------------------------------------

def test_stops_at_the_first_correct_answer():
    episode = play(AnswerTagEnv(), [tag("A"), tag("B"), tag(" c ")])
    assert episode.done and episode.t_star == 3 and episode.turn == 3
    assert episode.turn_rewards == {"t1": 0.0, "t2": 0.0, "t3": 1.0}
    assert episode.verifier == {"t1": 0, "t2": 0, "t3": 1}
    assert episode.answer_norms == ["a", "b", "c"]
    assert episode.messages[-1] == {"role": "assistant", "content": tag(" c ")}  # no feedback after
    with pytest.raises(RuntimeError, match="finished episode"):
        episode.step(tag("C"))


def test_feedback_after_each_wrong_answer_is_the_fixed_sentence():
    assert FEEDBACK == "Incorrect. Please think again."
    episode = play(AnswerTagEnv(system_prompt="be brief"), [tag("A"), "no tags here", tag("B")])
    roles = [m["role"] for m in episode.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in episode.messages[3::2]] == [FEEDBACK] * 3
    assert episode.messages[1] == {"role": "user", "content": Q.text}
    assert not episode.done and episode.t_star is None


def test_unparsable_reply_costs_a_format_penalty_and_a_turn_but_no_answer():
    env = AnswerTagEnv(max_turns=5, max_answers=2)
    episode = play(env, ["maybe C", "<answer> </answer>", tag("A")])
    assert episode.format_penalty == pytest.approx(-0.2)
    assert episode.turn == 3 and episode.answer_norms == ["a"]
    assert episode.turn_rewards == {"t1": 0.0, "t2": 0.0, "t3": 0.0}
    assert [d["parsed"] for d in episode.details] == [False, False, True]
    assert not episode.done  # 3 turns of 5, 1 answer of 2
    episode.step(tag("C"))
    assert episode.t_star == 4 and episode.to_record()["format_penalty"] == -0.2


def test_max_answers_stops_the_episode_before_max_turns():
    episode = play(AnswerTagEnv(max_turns=5, max_answers=2), [tag("A"), "oops", tag("A")])
    assert episode.done and episode.turn == 3 and episode.t_star is None
    assert episode.messages[-1]["role"] == "assistant"


def test_max_turns_stops_the_episode_even_without_answers():
    episode = play(AnswerTagEnv(max_turns=3, max_answers=3), ["a", "b", "c"])
    assert episode.done and episode.turn == 3 and episode.answer_norms == []
    assert episode.format_penalty == pytest.approx(-0.3)


def test_a_correct_answer_on_the_last_allowed_turn_counts():
    episode = play(AnswerTagEnv(max_turns=2, max_answers=2), [tag("A"), tag("C")])
    assert episode.done and episode.t_star == 2


def test_record_has_the_release_keys_and_values():
    env = AnswerTagEnv(max_turns=4)
    record = play(env, [tag("B"), "maybe", tag("c")]).to_record()
    assert set(record) == RECORD_KEYS
    assert record["prompt_id"] == "q0" and record["gold"] == "C"
    assert record["turn_rewards"] == {"t1": 0.0, "t2": 0.0, "t3": 1.0}
    assert record["verifier"] == {"t1": 0, "t2": 0, "t3": 1}
    assert record["t_star"] == 3 and record["answer_norms"] == ["b", "c"]
    assert record["format_penalty"] == -0.1
    assert [d["turn"] for d in record["reward_details"]] == [1, 2, 3]
    assert [d["correct"] for d in record["reward_details"]] == [False, False, True]
    # One reward per assistant turn.
    assert sum(m["role"] == "assistant" for m in record["messages"]) == len(record["turn_rewards"])


# -- extract_tagged_answer ----------------------------------------------------------------

@pytest.mark.parametrize("reply, answer", [
    ("<answer>B</answer>", "B"),
    ("first <answer>A</answer> then <answer> 42 </answer>.", "42"),
    ("<answer>\nx = 2\n</answer>", "x = 2"),
    ("<answer>A</answer> and <answer>  </answer>", None),  # the last tag wins, even empty
    ("<answer></answer>", None),
    ("no tags", None),
    ("<answer>unclosed", None),
])
def test_extract_tagged_answer_examples(reply, answer):
    assert extract_tagged_answer(reply) == answer


@given(st.text())
def test_extract_tagged_answer_never_raises(text):
    answer = extract_tagged_answer(text)
    assert answer is None or (answer == answer.strip() and answer and answer in text)


@given(prefix=st.text(alphabet=st.characters(blacklist_characters="<")), answer=st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1))
def test_the_last_tag_wins(prefix, answer):
    found = extract_tagged_answer(prefix + tag(answer))
    assert found == (answer.strip() or None)


# -- SecretGuessEnv -----------------------------------------------------------------------

def test_make_questions_is_deterministic_and_unique():
    env = SecretGuessEnv(num_candidates=4)
    a = env.make_questions(200, seed=1, prefix="train")
    assert a == env.make_questions(200, seed=1, prefix="train")
    assert a != env.make_questions(200, seed=2, prefix="train")
    assert len({q.prompt_id for q in a}) == len({q.text for q in a}) == 200
    assert all(q.prompt_id.startswith("train") for q in a)
    assert {q.gold for q in a} == set(LETTERS[:4]) == set(env.candidates)


def test_make_questions_respects_exclude():
    env = SecretGuessEnv()
    train = env.make_questions(300, seed=0, prefix="train")
    test = env.make_questions(300, seed=0, prefix="test", exclude={q.text for q in train})
    assert not {q.text for q in train} & {q.text for q in test}


def test_without_a_puzzle_id_every_question_has_one_text_and_only_the_secret_differs():
    env = SecretGuessEnv(id_length=0)
    train = env.make_questions(300, seed=0, prefix="train")
    test = env.make_questions(300, seed=1, prefix="test", exclude={q.text for q in train})
    assert {q.text for q in train + test} == {"guess the secret puzzle"}
    assert len({q.prompt_id for q in train}) == 300
    assert {q.gold for q in test} == set(env.candidates)
    assert [q.gold for q in test] != [q.gold for q in train]


@pytest.mark.parametrize("n", [1000, 1024, 3])
def test_golds_are_balanced_in_random_order(n):
    env = SecretGuessEnv(num_candidates=5)
    golds = [q.gold for q in env.make_questions(n, seed=3, prefix="q")]
    counts = collections.Counter(golds)
    assert set(counts) <= set(env.candidates) and sum(counts.values()) == n
    assert max(counts.values()) - min(counts[c] for c in env.candidates) <= 1
    if n >= 10:
        assert golds != sorted(golds) and golds[:5] != golds[5:10]
        assert golds != [q.gold for q in env.make_questions(n, seed=4, prefix="q")]


def _scripted(n, seed=0, **kwargs):
    env = SecretGuessEnv(num_candidates=5, max_turns=5, max_answers=5)
    rng = np.random.default_rng(seed)
    questions = env.make_questions(n, seed=seed, prefix="s")
    return [scripted_episode(env, q, rng, **kwargs) for q in questions]


def _answers(episode):
    return [d["answer"] for d in episode.details if d["parsed"]]


def test_scripted_p_repeat_one_never_switches_after_its_first_answer():
    for episode in _scripted(200, p_repeat=1.0, p_format_error=0.2):
        answers = _answers(episode)
        assert episode.done
        assert len(set(answers)) <= 1, answers
        if answers and answers[0] != episode.question.gold:
            assert episode.t_star is None


def test_scripted_p_repeat_zero_never_repeats_a_tried_letter():
    episodes = _scripted(200, p_repeat=0.0, p_format_error=0.2, preference_decay=0.6)
    for episode in episodes:
        answers = _answers(episode)
        assert len(set(answers)) == len(answers), answers
    # Without format errors, 5 distinct answers among 5 letters always find the secret.
    assert all(e.t_star is not None for e in _scripted(100, p_repeat=0.0, p_format_error=0.0))


def test_scripted_format_errors_are_untagged_replies():
    episodes = _scripted(300, p_repeat=0.5, p_format_error=0.3)
    parsed = [d["parsed"] for e in episodes for d in e.details]
    assert 0.2 < 1 - np.mean(parsed) < 0.4
    assert all(e.format_penalty == pytest.approx(-0.1 * sum(not d["parsed"] for d in e.details))
               for e in episodes)


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_scripted_first_answers_follow_the_prior(decay):
    episodes = _scripted(3000, seed=5, p_repeat=0.5, p_format_error=0.0, preference_decay=decay)
    first = collections.Counter(_answers(e)[0] for e in episodes)
    prior = decay ** np.arange(5)
    prior /= prior.sum()
    freq = np.array([first[c] for c in LETTERS[:5]]) / len(episodes)
    np.testing.assert_allclose(freq, prior, atol=0.03)


def test_unclosed_earlier_tag_does_not_swallow_the_answer():
    from drift_jax.envs.base import extract_tagged_answer

    assert extract_tagged_answer("I think <answer>maybe... actually <answer>B</answer>") == "B"
