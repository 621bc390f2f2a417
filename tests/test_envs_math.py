"""The math and multiple-choice environments: answer extraction, checkers, prompts."""

import re
import threading

import math_verify
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax.data.latex import extract_boxed
from drift_jax.data.layouts import LETTERS, render_choice_question
from drift_jax.data.questions import Question
from drift_jax.envs.base import FEEDBACK, Episode
from drift_jax.envs.choice import MultipleChoiceEnv, choice_instruction, choice_letter
from drift_jax.envs.math import MATH_INSTRUCTION, SIMPLE_PROMPT, SYSTEM_PROMPT, MathEnv, extract_math_answer, math_equal

EQUIVALENT = [("0.5", "1/2"), (r"\frac{1}{2}", "1/2"), (r"\frac12", "0.5"), (r"\dfrac{1}{2}", "0.5"),
              ("3.0", "3"), ("3", "3.0"), ("b+a", "a+b"), (r"\boxed{1/2}", "0.5"), (r"2 \pi", r"2\pi"),
              ("(x+1)^2", "x^2+2x+1"), (r"\{2, 1\}", r"\{1, 2\}"), ("1,000", "1000"),
              ("1e-5", "0.00001"), ("true", "True"), ("[1,2]", "[1, 2]")]
DIFFERENT = [("1/3", "0.5"), ("4", "3"), ("b-a", "a-b"), ("0.5", "5"), ("(1,2)", "[1,2]"),
             ("False", "True"), ("", "3"), ("3", "")]


@pytest.mark.parametrize("answer,gold", EQUIVALENT)
def test_math_equal_accepts_equivalent_forms(answer, gold):
    assert math_equal(answer, gold)


@pytest.mark.parametrize("answer,gold", DIFFERENT)
def test_math_equal_rejects_different_values(answer, gold):
    assert not math_equal(answer, gold)


def test_a_verifier_exception_or_timeout_counts_as_incorrect(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("sympy blew up")

    def slow(*args, **kwargs):
        raise math_verify.errors.TimeoutException("timed out")  # a BaseException

    monkeypatch.setattr(math_verify, "verify", boom)
    assert not math_equal("0.5", "1/2 + 0")
    monkeypatch.setattr(math_verify, "parse", slow)
    assert not math_equal("0.5", "1/2 + 0*1")


def test_math_verify_timeouts_are_signal_based_only_on_the_main_thread(monkeypatch):
    calls = []
    real_parse, real_verify = math_verify.parse, math_verify.verify

    def parse(text, **kw):
        calls.append(("parse", kw["parsing_timeout"]))
        return real_parse(text, **kw)

    def verify(gold, answer, **kw):
        calls.append(("verify", kw["timeout_seconds"]))
        return real_verify(gold, answer, **kw)

    monkeypatch.setattr(math_verify, "parse", parse)
    monkeypatch.setattr(math_verify, "verify", verify)
    assert math_equal("0.25", r"\frac{1}{4}", timeout_seconds=7)
    assert calls and {t for _, t in calls} == {7}

    calls.clear()
    results = []
    thread = threading.Thread(target=lambda: results.append(
        (math_equal("0.2", r"\frac{1}{5}", 7), math_equal("0.3", r"\frac{1}{5}", 7))))
    thread.start()
    thread.join()
    assert results == [(True, False)]  # correct answers, no "signal only works in main thread"
    assert calls and {t for _, t in calls} == {None}


def test_extraction_prefers_the_last_tag_then_falls_back_to_the_last_box():
    assert extract_math_answer(r"<answer>1</answer> then \boxed{2} <answer> 3 </answer>") == "3"
    assert extract_math_answer(r"so \boxed{1} or rather \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_math_answer(r"<answer>\boxed{x^{2}}</answer>") == "x^{2}"
    assert extract_math_answer("<answer>$3$</answer>") == "3"
    assert extract_math_answer(r"\boxed{\boxed{7}}") == "7"
    assert extract_math_answer(r"the box \boxed{3 is never closed") is None
    assert extract_math_answer(r"\boxed{} and <answer> </answer>") is None
    assert extract_boxed(r"\boxed{\{1, 2\}} and \boxed{4") == r"\{1, 2\}"


def test_math_env_prompt_and_protocol():
    env = MathEnv()
    assert (env.feedback, env.format_penalty) == (FEEDBACK, 0.1)
    question = Question("m0", "What is $1/2 + 0$?", r"\frac{1}{2}")
    messages = env.initial_messages(question)
    assert messages == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": SIMPLE_PROMPT.format(instruction=MATH_INSTRUCTION, question=question.text)},
    ]
    assert question.text in messages[1]["content"] and "<answer>" in messages[1]["content"]
    episode = Episode(env, question)
    for reply in ["no idea", "<answer>1/3</answer>", r"Then it is \boxed{0.5}."]:
        episode.step(reply)
    assert episode.t_star == 3 and episode.format_penalty == pytest.approx(-0.1)
    assert episode.answer_norms == ["1/3", "0.5"]
    assert [m["content"] for m in episode.messages[3::2]] == [FEEDBACK, FEEDBACK]
    assert episode.messages[-1] == {"role": "assistant", "content": r"Then it is \boxed{0.5}."}


# -- hypothesis: the parsers never raise and find what they should --------------------------

PIECES = ["<answer>", "</answer>", "\\boxed{", "\\fbox{", "{", "}", "\\{", "\\}", "\\", "$", " ", "x", "1/2"]
messy_text = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=25).map("".join)
plain = st.text(st.characters(blacklist_characters="<>{}\\$", blacklist_categories=("Cs",)), max_size=12)


def _balanced(text: str) -> bool:
    depth = 0
    for token in re.findall(r"\\.|[{}]", text, re.DOTALL):
        depth += {"{": 1, "}": -1}.get(token, 0)
        if depth < 0:
            return False
    return depth == 0


@settings(max_examples=300, deadline=None)
@given(messy_text)
def test_extractors_never_raise_and_boxes_are_balanced(text):
    answer = extract_math_answer(text)
    assert answer is None or answer == answer.strip() and answer
    boxed = extract_boxed(text)
    assert boxed is None or _balanced(boxed)
    assert choice_letter(text) in (None, *LETTERS)


@settings(max_examples=200, deadline=None)
@given(st.lists(plain.filter(str.strip), min_size=1, max_size=4), plain)
def test_the_last_tag_wins(contents, tail):
    reply = "".join(f"say <answer>{c}</answer> " for c in contents) + tail
    assert extract_math_answer(reply) == contents[-1].strip()


balanced_body = st.recursive(plain, lambda inner: st.tuples(plain, inner, plain).map(lambda t: f"{t[0]}{{{t[1]}}}{t[2]}"),
                             max_leaves=6)


@settings(max_examples=200, deadline=None)
@given(plain, balanced_body.filter(str.strip), plain)
def test_the_box_fallback_keeps_nested_braces(prefix, body, suffix):
    assert extract_math_answer(f"{prefix}\\boxed{{{body}}}{suffix}") == body.strip()


@settings(max_examples=25, deadline=None)
@given(messy_text, st.sampled_from(["1/2", "3", "a+b", r"\frac{1}{3}"]))
def test_math_equal_never_raises(answer, gold):
    assert math_equal(answer, gold, timeout_seconds=2) in (True, False)


# -- multiple choice -------------------------------------------------------------------------

ACCEPTED_B = ["B", "(B)", "B)", "B) some text", "B. text", "[B]", r"\boxed{B}", "The answer is B", "b",
              "Answer: (B)", "The correct answer is option B.", r"\text{B}", "**B**", "$B$", "B: 42"]
REJECTED_FOR_B = ["C", "(C)", "A or B", "A, B", "A/B", "A) or B)", "I think B", "K", "", "answer", "B or C",
                  "B) or A)", "B. and C", "(B), (C)"]


@pytest.mark.parametrize("answer", ACCEPTED_B)
def test_choice_checker_accepts_the_forms_of_a_letter(answer):
    assert MultipleChoiceEnv().is_correct(answer, "B")
    assert MultipleChoiceEnv().is_correct(answer, "(B)")


@pytest.mark.parametrize("answer", REJECTED_FOR_B)
def test_choice_checker_rejects_other_and_ambiguous_letters(answer):
    assert not MultipleChoiceEnv().is_correct(answer, "B")


@given(st.sampled_from(LETTERS), st.sampled_from(["{}", "({})", "{})", "[{}]", "{}. ", "The answer is {}"]),
       st.text("0123456789 xyz+-=", max_size=10))
def test_every_letter_is_read_in_every_accepted_form(letter, form, option_text):
    text = form.format(letter)
    if form.endswith((")", ". ")):
        text += option_text  # the option's text after "B)" / "B. "
    assert choice_letter(text) == letter
    assert choice_letter(text.lower()) == letter


def test_choice_env_canonicalises_letters_so_repeats_are_seen():
    env = MultipleChoiceEnv()
    question = Question("c0", render_choice_question("2 + 2 = ?", ["3", "4", "5", "22"]), "B")
    assert question.text == "2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 22"
    user = env.initial_messages(question)[-1]["content"]
    assert "(A-D)" in user and question.text in user
    assert "(A-J)" in choice_instruction(render_choice_question("q", [str(i) for i in range(10)]))
    assert env.extract_answer("<answer>(A) 3</answer>") == "A"
    assert env.extract_answer("<answer>A or C</answer>") == "A or C"  # a wrong answer, not a format error
    assert env.extract_answer("A") is None
    episode = Episode(env, question)
    for reply in ["<answer>A</answer>", "<answer>(a)</answer>", "<answer>A or C</answer>", r"\boxed{B}"]:
        episode.step(reply)
    assert episode.answer_norms == ["a", "a", "aorc", "b"] and episode.t_star == 4


def test_render_choice_question_bounds():
    with pytest.raises(ValueError, match="2 to 10 options"):
        render_choice_question("q", ["only"])
    with pytest.raises(ValueError, match="2 to 10 options"):
        render_choice_question("q", list("abcdefghijk"))

