"""Golden tests: the "release" protocol produces the strings of the authors' release
(GitHub 2020-qqtcg/DRIFT, src/prompting.py and the scripts that call it), and "drift-jax"
keeps ours.

Every expected string below was written by hand from the release's format strings; each
says which function of the release it comes from. The release's settings used:
scripts/run_generate_data.sh (rollouts: prompt_mode "full" by default, DISABLE_THINK=0,
INSTRUCTION_MAX_TOKENS=400, MAX_ACTIONS_PER_TRAJ=5, MAX_ACTIONS_PER_TURN=1,
FORMAT_PENALTY=-0.1) and scripts/run_all_benchmark.sh (eval: PROMPT_MODE="simple", the
same think / budget settings).
"""

import pytest

import drift_jax.rollout.episodes
import drift_jax.rollout.static
from drift_jax.data.chat import encode_prompt, render
from drift_jax.data.questions import Question
from drift_jax.envs.base import FEEDBACK, Episode, env_prefill, release_parse
from drift_jax.envs.choice import MultipleChoiceEnv, release_choice_key
from drift_jax.envs.math import MathEnv, release_numeric_equal, string_equal
from drift_jax.envs.protocol import env_kwargs, make_env
from drift_jax.rollout.sampling import SamplingParams

from helpers import chatml_tokenizer

QUESTION = Question("q/1", "What is $2+3$?", "5")

# prompting.py SYSTEM_MESSAGE and DEFAULT_ENV_INSTRUCTION.
SYSTEM = "You're a helpful assistant. "
INSTRUCTION = "You are solving Math problems. Only give the final answer between <answer> and </answer>."
# prompting.build_turn_block / build_initial_messages: format_prompt with enable_think=True.
THINK_FORMAT = "<think> [Your thoughts] </think> <answer> [your answer] </answer>"
# prompting.build_turn_block's closing line with instruction_max_tokens=400.
RULES = (f"Always output: {THINK_FORMAT} with no extra text. Strictly follow this format. "
         "Max response length: 400 words (tokens).\n")

# prompting.build_initial_messages, prompt_mode "full": instruction + "\n" + turn block 1
# (state = the question, actions_left = --max_actions_per_traj = 5).
TURN1_USER = INSTRUCTION + "\nTurn 1:\nState:\nWhat is $2+3$?\nYou have 5 actions left. " + RULES
# prompting.build_reward_message, "full": f"Reward:\n{reward}\n" + the next turn block; the
# state is MultiTurnAnswerEpisode.state, the incorrect observation after an executed answer.
TURN2_USER = "Reward:\n0.0\nTurn 2:\nState:\nIncorrect. Please think again.\nYou have 4 actions left. " + RULES
# After a format error no answer is executed (generate_..._metamathqa.process_turn): the
# state stays the incorrect observation and the actions left stay 4.
TURN3_USER = "Reward:\n0.0\nTurn 3:\nState:\nIncorrect. Please think again.\nYou have 4 actions left. " + RULES
TURN4_USER = "Reward:\n0.0\nTurn 4:\nState:\nIncorrect. Please think again.\nYou have 3 actions left. " + RULES

# What the model samples after the "<think>" prefill, turn by turn (a wrong answer, a
# format error: a tagless box, a wrong answer followed by a second, right, tag).
CONTINUATIONS = [" 2+3 is 6. </think> <answer> 6 </answer>",
                 "Let me recompute: \\boxed{5}",
                 "I think</think>\n<answer>7 || 5</answer> and <answer>5</answer>"]
# process_turn prepends the prefill; prompting.parse_response rewrites a matching reply as
# f"<think>{think}</think><answer>{action}</answer>" (special tokens removed, stripped, the
# answer cut to its first "||" piece since max_actions_per_turn=1) and returns a reply
# without a match unchanged.
STORED = ["<think>2+3 is 6.</think><answer>6</answer>",
          "<think>Let me recompute: \\boxed{5}",
          "<think>I think</think><answer>7</answer>"]


def release_env(stage="rollout"):
    return make_env("math", "release", stage)


def test_release_rollout_messages_for_a_wrong_answer_a_format_error_and_a_wrong_answer():
    episode = Episode(release_env(), QUESTION)
    assert episode.messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURN1_USER}]
    for continuation in CONTINUATIONS:
        episode.step("<think>" + continuation)
    assert episode.messages == [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": TURN1_USER},
        {"role": "assistant", "content": STORED[0]}, {"role": "user", "content": TURN2_USER},
        {"role": "assistant", "content": STORED[1]}, {"role": "user", "content": TURN3_USER},
        {"role": "assistant", "content": STORED[2]}, {"role": "user", "content": TURN4_USER},
    ]
    # The record fields the release's process_turn fills: answers as normalize_answer'd,
    # -0.1 for the format error, the first tag's answer (7) read, not the last (5).
    assert episode.answer_norms == ["6", "7"]
    assert episode.format_penalty == pytest.approx(-0.1)
    assert episode.turn_rewards == {"t1": 0.0, "t2": 0.0, "t3": 0.0}
    assert [d["answer"] for d in episode.details] == ["6", None, "7"]
    assert not episode.done


def test_a_format_error_before_any_answer_keeps_the_question_as_the_state():
    # MultiTurnAnswerEpisode.state is the question until an answer is executed.
    episode = Episode(release_env(), QUESTION)
    episode.step("<think>no tags at all")
    assert episode.messages[-1]["content"] == (
        "Reward:\n0.0\nTurn 2:\nState:\nWhat is $2+3$?\nYou have 5 actions left. " + RULES)


def test_the_rendered_prompt_ends_with_the_think_prefill():
    tokenizer = chatml_tokenizer()
    episode = Episode(release_env(), QUESTION)
    prefill = env_prefill(episode.env)
    assert prefill == "<think>"
    # prompting.render_prompt: apply_chat_template(..., add_generation_prompt=True) + "<think>".
    expected = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{TURN1_USER}<|im_end|>\n"
                "<|im_start|>assistant\n<think>")
    assert render(tokenizer, episode.messages, add_generation_prompt=True, prefill=prefill) == expected
    assert encode_prompt(tokenizer, episode.messages, prefill) == tokenizer(expected, add_special_tokens=False)["input_ids"]
    # The next turn's context holds the stored (rewritten) reply, then the prefill again.
    episode.step("<think>" + CONTINUATIONS[0])
    assert render(tokenizer, episode.messages, add_generation_prompt=True, prefill=prefill).endswith(
        f"<|im_start|>assistant\n{STORED[0]}<|im_end|>\n<|im_start|>user\n{TURN2_USER}<|im_end|>\n"
        "<|im_start|>assistant\n<think>")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        render(tokenizer, episode.messages, prefill=prefill)


def test_think_implies_the_think_prefill_unless_told_otherwise():
    # The constructor, MathEnv(prompt_mode="full", think=True), starts the reply
    # inside the think block, as the release's render_prompt does.
    assert env_prefill(MathEnv(prompt_mode="full", think=True)) == "<think>"
    assert env_prefill(MathEnv(think=True, use_prefill=False)) == ""
    assert env_prefill(MathEnv(think=False, use_prefill=True)) == "<answer>"
    assert env_prefill(MathEnv()) == ""


def test_think_off_prefills_answer_and_parses_the_first_answer_tag():
    env = MathEnv(**{**env_kwargs("release", "rollout"), "think": False})
    assert env.prefill == "<answer>"
    # build_turn_block with enable_think=False asks for the answer tag only.
    assert "Always output: <answer> [your answer] </answer> with no extra text." in env.initial_messages(QUESTION)[1]["content"]
    assert release_parse("<answer> 4 </answer><answer>5</answer>", think=False) == ("<answer>4</answer>", "4")


def test_release_eval_uses_the_simple_prompt_with_the_think_format():
    # prompting.build_initial_messages, prompt_mode "simple", enable_think=True.
    episode = Episode(release_env("eval"), QUESTION)
    assert episode.messages[1]["content"] == (
        INSTRUCTION + "\n\nProblem:\nWhat is $2+3$?\n\n"
        f"Always output: {THINK_FORMAT} with no extra text. Strictly follow this format.")
    episode.step("<think>" + CONTINUATIONS[0])
    # prompting.build_reward_message, "simple": the incorrect observation alone.
    assert episode.messages[-1] == {"role": "user", "content": FEEDBACK}
    assert episode.messages[-2] == {"role": "assistant", "content": STORED[0]}


def test_tagless_boxed_is_a_format_error_under_release_and_an_answer_under_drift_jax():
    release = Episode(release_env(), QUESTION)
    release.step("<think>so \\boxed{5}")
    assert release.details[0]["answer"] is None and release.format_penalty == pytest.approx(-0.1)
    assert not release.done

    ours = Episode(make_env("math", "drift-jax", "rollout"), QUESTION)
    ours.step("so \\boxed{5}")
    assert ours.details[0] == {"turn": 1, "answer": "5", "parsed": True, "correct": True}
    assert ours.format_penalty == 0.0 and ours.done
    # and ours stores the reply as said, prompts without a prefill, takes the last tag.
    assert ours.messages[-1] == {"role": "assistant", "content": "so \\boxed{5}"}
    assert env_prefill(ours.env) == ""
    assert ours.env.extract_answer("<answer>7</answer> <answer>5</answer>") == "5"


def test_release_grading_is_normalised_string_equality():
    env = release_env()
    # MultiTurnAnswerEpisode._check_answer: normalize_answer (lower-case, no whitespace) equality.
    assert env.is_correct("X = 2", "x=2") and not env.is_correct("1/2", "0.5")
    assert MathEnv().is_correct("1/2", "0.5")  # math-verify under drift-jax
    assert string_equal("\\frac{1}{2}", "\\frac{1}{2}") and not string_equal("5", "")
    # benchmark.check_numeric_answer (TheoremQA): first unsigned number, else plain text.
    theorem = make_env("math", "release", "eval", benchmark="theoremqa")
    assert theorem.grader == "numeric"
    assert release_numeric_equal("3.0 m", "3") and release_numeric_equal("-3", "3")
    assert release_numeric_equal("True", "true.") and not release_numeric_equal("0.5", "1/2")


def test_release_choice_protocol():
    # benchmark.normalize_choice_answer: the last standalone letter, any case.
    assert release_choice_key("I think A or b") == "b" and release_choice_key("(C)") == "c"
    assert release_choice_key("42") == "42"
    env = make_env("choice", "release", "eval", benchmark="gpqa_diamond")
    q = Question("g/1", "Which?\nA. x\nB. y\nC. z\nD. w", "B")
    episode = Episode(env, q)
    # benchmark.GPQA_INSTRUCTION in the simple prompt.
    assert episode.messages[1]["content"].startswith(
        "You are solving multiple-choice questions. Only give the final answer letter (A-D) "
        "between <answer> and </answer>.\n\nProblem:\nWhich?\nA. x")
    episode.step("<think>hmm</think><answer>A or B</answer>")
    assert episode.done and episode.details[0]["answer"] == "B"
    pro = make_env("choice", "release", "eval", benchmark="mmlu_pro")
    assert "letter (A-J)" in Episode(pro, Question("p/1", "Q?\nA. 1\nB. 2\nC. 3", "A")).messages[1]["content"]
    # drift-jax reads "A or B" as no letter: a wrong answer.
    ours = Episode(MultipleChoiceEnv(), q)
    ours.step("<answer>A or B</answer>")
    assert not ours.details[0]["correct"]


def test_drift_jax_settings_are_the_defaults_and_bad_names_are_refused():
    for stage in ("rollout", "eval"):
        assert env_kwargs("drift-jax", stage) == {} and env_kwargs("drift-jax", stage, task="choice") == {}
    assert make_env("math") == MathEnv()
    with pytest.raises(ValueError, match="protocol"):
        env_kwargs("paper", "eval")
    with pytest.raises(ValueError, match="stage"):
        env_kwargs("release", "train")
    with pytest.raises(ValueError, match="prompt_mode"):
        MathEnv(prompt_mode="long")
    with pytest.raises(ValueError, match="grader"):
        MathEnv(grader="exact")


def test_the_player_prepends_the_prefill_and_stores_the_rewritten_reply(monkeypatch):
    """The static player: prompts end with the prefill's tokens; the reply given to the
    episode is prefill + decoded continuation, stored rewritten."""
    tokenizer = chatml_tokenizer()
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seen_prompts = []
    script = iter(CONTINUATIONS)

    def fake_generate(model, prompts, keys, sampling, batch_size, max_len, max_new=None, stats=None):
        seen_prompts.extend(prompts)
        text = next(script)
        return [(tokenizer(text, add_special_tokens=False)["input_ids"] + [stop], None) for _ in prompts]

    monkeypatch.setattr(drift_jax.rollout.static, "generate_batched", fake_generate)
    env = make_env("math", "release", "rollout", max_turns=3)
    episodes, _ = drift_jax.rollout.episodes.play_episodes(
        None, tokenizer, env, [QUESTION], num_samples=1, sampling=SamplingParams(stop_ids=(stop,)),
        seed=0, progress=False, engine="static")  # the static player calls generate_batched
    (episode,) = episodes
    prefill_ids = tokenizer("<|im_start|>assistant\n<think>", add_special_tokens=False)["input_ids"]
    assert len(seen_prompts) == 3
    assert all(list(p[-len(prefill_ids):]) == prefill_ids for p in seen_prompts)
    assert [m["content"] for m in episode.messages if m["role"] == "assistant"] == STORED
    assert episode.done and episode.format_penalty == pytest.approx(-0.1)


def test_release_theoremqa_counts_only_answers_with_a_number_as_actions():
    """benchmark.check_numeric_answer returns is_valid = "the answer holds a number";
    MultiTurnAnswerEpisode.step counts step_num (and process_turn the actions left,
    max_actions_per_traj - step_num) only for a valid answer, while the state becomes the
    incorrect observation after any executed answer. Full prompt mode, as the fidelity
    check ran it."""
    env = make_env("math", "release", "eval", benchmark="theoremqa", prompt_mode="full")
    episode = Episode(env, Question("t/1", "How many?", "3"))
    episode.step("<think>no idea</think><answer>pi</answer>")  # wrong, no number: not an action
    assert episode.messages[-1]["content"] == (
        "Reward:\n0.0\nTurn 2:\nState:\nIncorrect. Please think again.\nYou have 5 actions left. " + RULES)
    episode.step("<think>count</think><answer>4</answer>")  # wrong, a number: one action
    assert "You have 4 actions left." in episode.messages[-1]["content"]
    assert episode.answer_norms == ["pi", "4"] and episode.attempts == 1
    # MetaMathQA's string check calls every non-empty answer valid: "pi" is an action there.
    metamath = Episode(release_env(), Question("m/1", "How many?", "3"))
    metamath.step("<think>no idea</think><answer>pi</answer>")
    assert "You have 4 actions left." in metamath.messages[-1]["content"]


def test_release_parses_the_reply_decoded_without_special_tokens(monkeypatch):
    """vLLM hands the release its reply decoded without special tokens (skip_special_tokens
    defaults to True), so a stray <|im_start|> between the think and answer blocks does not
    break parse_response's match; decoded with it, the reply is a format error."""
    tokenizer = chatml_tokenizer()
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    continuation = "x</think><|im_start|><answer>5</answer>"

    def fake_generate(model, prompts, keys, sampling, batch_size, max_len, max_new=None, stats=None):
        return [(tokenizer(continuation, add_special_tokens=False)["input_ids"] + [stop], None) for _ in prompts]

    monkeypatch.setattr(drift_jax.rollout.static, "generate_batched", fake_generate)

    def play(env):
        (episode,), _ = drift_jax.rollout.episodes.play_episodes(
            None, tokenizer, env, [QUESTION], num_samples=1, sampling=SamplingParams(stop_ids=(stop,)),
            seed=0, progress=False, engine="static")
        return episode

    release = play(make_env("math", "release", "eval", max_turns=1))
    assert release.details[0]["answer"] == "5" and release.t_star == 1
    assert release.messages[-1]["content"] == "<think>x</think><answer>5</answer>"
    kept = play(make_env("math", "release", "eval", max_turns=1, skip_special_tokens=False))
    assert kept.details[0]["answer"] is None and kept.format_penalty == pytest.approx(-0.1)
    assert kept.messages[-1]["content"] == "<think>" + continuation  # stored as said
    assert make_env("math", "drift-jax").skip_special_tokens is False


def _paper_config(name):
    import os
    import runpy
    return runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", name))["get_config"]()


def test_release_training_order_is_shuffled_and_the_paper_configs_use_seed_42():
    """weight_sft.py's WeightedSFTTrainer overrides get_train_sampler, but transformers'
    Trainer (4.57, the release's pin) calls _get_train_sampler: --disable_shuffle never
    takes effect and the released run trained on shuffled batches. Its scripts pass
    --seed 42 (run_generate_data.sh, run_weight_sft.sh, run_all_benchmark.sh)."""
    from experiments.preflight import resolve

    for name in ("qwen2_5_3b_metamath.py", "qwen2_5_0_5b_metamath.py", "eval.py"):
        paper = _paper_config(name)
        assert paper.train.shuffle is None and paper.seed == 42
        resolved = resolve(paper)
        assert resolved.task.protocol == "release" and resolved.train.shuffle is True
    paper = _paper_config("qwen2_5_3b_metamath.py")
    paper.train.shuffle = False  # file order stays available as a deviation
    assert resolve(paper).train.shuffle is False
