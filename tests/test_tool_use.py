"""MTU-Bench as the release evaluates it (``src/eval_math_multiturn_vllm.py``
``evaluate_mtu_bench``, ``src/benchmark.py``): the rows in MTU-Bench's own format
(tests/fixtures/datasets/mtu_bench.jsonl, written here as its ``*_eval.jsonl`` files hold
them), the prompt, the parsing of calls, the per-turn check and feedback, the TS / PS / TN /
TO / ATS / SATS / SR / TPR metrics, and an end-to-end run of experiments/configs/eval.py.

Every expected value was worked out by hand from the release's code; the comments name
the function.
"""

import json
import os

import pytest

from drift_jax.data.questions import Question, load_questions
from drift_jax.data.tool_calls import calls_from_json, react_calls
from drift_jax.envs.base import Episode
from drift_jax.envs.protocol import make_env
from drift_jax.envs.tool_use import (
    MTU_SYSTEM_MESSAGE,
    NO_TOOL_EXPECTED,
    TOOL_EXPECTED,
    WRONG_CALL,
    answer_calls,
    compare_call,
    turn_success,
)
from drift_jax.evaluation import tool_use

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "datasets", "mtu_bench.jsonl")


def test_replies_are_read_as_the_release_reads_them():
    # parse_tool_calls_from_answer_tag: "<think>" prepended, the answer of the think/answer
    # pair, each "name(k=v, ...)" a call, values always text.
    assert answer_calls('I need weather</think> <answer>get_weather(city="Beijing", days=3)</answer>') == (
        "I need weather", [("get_weather", {"city": "Beijing", "days": "3"})])
    # No <answer>: the whole text is the answer (the prepended "<think>" deleted).
    assert answer_calls("Let me call FindRestaurants(city=Paris)") == (
        "", [("FindRestaurants", {"city": "Paris"})])
    # Any word before parentheses is a call, and several calls keep their order.
    assert answer_calls("x</think><answer>Hello (friend)! A(x=1) B(y='two')</answer>")[1] == [
        ("Hello", {}), ("A", {"x": "1"}), ("B", {"y": "two"})]
    assert answer_calls("ok</think><answer>Sure, which room?</answer>") == ("ok", [])
    assert answer_calls("") == ("", [])
    # parse_tool_calls_from_text (a ReAct "output", the gold's fallback).
    assert react_calls('Thought: t\nAction: "GetWeather"\nAction Input: {"city": "Paris"}\nAction: [Find]\n'
                       "Action Input: location=Paris") == [("GetWeather", {"city": "Paris"}),
                                                           ("Find", {"location": "Paris"})]


def test_calls_are_compared_as_the_release_compares_them():
    expected = ("BookRestaurant", {"day": "Saturday", "people": 5})
    # normalize_tool_name: case and "_" / "-" / space runs; normalize_param_value: text
    # stripped and lower-cased, numbers as they are, so a predicted "5" never equals 5.
    assert compare_call(("bookrestaurant", {"day": " saturday", "people": 5, "extra": "x"}), expected) == (True, True)
    assert compare_call(("BookRestaurant", {"day": "Saturday", "people": "5"}), expected) == (True, False)
    assert compare_call(("Book_Restaurant", {"day": "Saturday", "people": 5}), expected) == (False, False)
    assert compare_call(("BookRestaurant", {"people": 5}), expected) == (True, False)  # a parameter missing
    a, b = ("A", {}), ("B", {})
    assert turn_success([], []) and not turn_success([a], [])
    assert turn_success([a, b], [a, b]) and not turn_success([b, a], [a, b]) and not turn_success([a], [a, b])


# Scripted replies per fixture row (the model's continuation after the "<think>" prefill).
REPLIES = {
    "S-S_0": [('right</think><answer>FindRestaurants(city="San Francisco", cuisine="Brazilian", '
               'price_range="moderate")</answer>')],
    "S-S_3": ["</think><answer>I will book it.</answer>",
              '</think><answer>BookRestaurant(day="Saturday", name="The Slug and Lettuce", people=5)</answer>'],
    "S-M_7": ['</think><answer>GetWeather(city="Paris")</answer>',
              '</think><answer>FindAttractions(location="Paris") GetWeather(city="Paris")</answer>'],
    "M-M_0_0": ["</think><answer>adjust_room_temperature(temperature=20)</answer>",
                "</think><answer>Sure, which room?</answer>"],
}
# evaluate_mtu_bench's feedback after each failed turn but the last.
FEEDBACK = {"S-S_3": [TOOL_EXPECTED], "S-M_7": [WRONG_CALL], "M-M_0_0": [NO_TOOL_EXPECTED]}


def played_records():
    env = make_env("tool", "release", "eval", max_turns=2)
    questions = load_questions(FIXTURE, protocol="release")
    records = []
    for q in questions:
        episode = Episode(env, q)
        for reply in REPLIES[q.prompt_id.split("/")[1]]:
            episode.step(env.prefill + reply)
        records.append(episode)
    return records


def test_the_dialogue_is_the_releases():
    episodes = played_records()
    first = episodes[0]
    # build_mtu_bench_initial_messages: the tool system message (no tools appended), the
    # row's question stripped; render_prompt adds the "<think>" prefill.
    assert first.messages[0] == {"role": "system", "content": MTU_SYSTEM_MESSAGE}
    assert first.messages[1]["content"].startswith("Please reply to the user based on their input")
    assert first.env.prefill == "<think>"
    for episode in episodes:
        name = episode.question.prompt_id.split("/")[1]
        assistant = [m["content"] for m in episode.messages if m["role"] == "assistant"]
        assert assistant == REPLIES[name]  # vLLM's output as stored: the prefill not included
        users = [m["content"] for m in episode.messages[2:] if m["role"] == "user"]
        assert users == [f"Observation: {f}" for f in FEEDBACK.get(name, [])]
        assert episode.format_penalty == 0.0
    assert [e.t_star for e in episodes] == [1, None, None, 2]


def test_metrics_on_the_fixture_rows():
    records = [e.to_record() for e in played_records()]
    # Per dialogue (compute_mtu_bench_metrics on the success turn's calls, else the last
    # turn's; SR and TPR overridden with the success): TS, PS, TN, TO, ATS(=SATS), SR(=TPR)
    #   S-S_0   1 call right at turn 1:               1, 1, 1, 1, 1, 1
    #   S-S_3   right name, people "5" != 5:          1, 0, 1, 1, 0, 0
    #   S-M_7   both calls, in the wrong order:       0, 0, 1, 0, 0, 0
    #   M-M_0_0 no call expected, none at turn 2:     1, 1, 1, 1, 1, 1
    assert tool_use.summarize(records) == pytest.approx({
        "tool_selection_accuracy": 0.75, "parameter_selection_accuracy": 0.5, "tool_number_accuracy": 1.0,
        "tool_order_accuracy": 0.75, "turn_success_rate": 0.5, "soft_turn_success_rate": 0.5,
        "success_rate": 0.5, "task_process_rate": 0.5, "dialogues": 4})
    assert tool_use.summarize([]) == {**dict.fromkeys(tool_use.METRICS, 0.0), "dialogues": 0}


def test_dialogue_metrics_over_several_turns():
    a, b = ("A", {"x": "1"}), ("B", {})
    # compute_mtu_bench_metrics: turn 1 right, turn 2 missing (padded with no call):
    # ATS = TPR = 1/2, SATS = (1 * 1 + 0.9 * 0) / (1 + 0.9), SR = 0.
    got = tool_use.dialogue_metrics([[a]], [[a], [b]])
    assert got == pytest.approx({
        "tool_selection_accuracy": 0.5, "parameter_selection_accuracy": 0.5, "tool_number_accuracy": 0.5,
        "tool_order_accuracy": 0.5, "turn_success_rate": 0.5, "soft_turn_success_rate": 1 / 1.9,
        "success_rate": 0.0, "task_process_rate": 0.5})
    # compute_mtu_bench_turn_metrics, one wrong parameter of two calls.
    assert tool_use.turn_metrics([a, ("B", {"y": "2"})], [("A", {"x": "2"}), ("B", {})]) == {
        "tool_selection": 1.0, "param_selection": 0.5, "tool_number": 1.0, "tool_order": 1.0, "turn_success": 0.0}


def test_gold_fields_the_release_reads(tmp_path):
    rows = [
        # load_mtu_bench_dataset: "gold" (a JSON text; '{"": {}}' is no call) before "answer".
        {"id": "g1", "instruction": "Use tools.", "input": "Weather in Rome?", "gold": '{" GetWeather": {"city": "Rome"}}'},
        # no call in the gold field: the ReAct "output" (parse_mtu_bench_ground_truth).
        {"id": "g2", "question": "Find a bus.", "gold": '{"": {}}',
         "output": 'Thought: x\nAction: FindBus\nAction Input: {"to_city": "Austin"}'},
        # a schema-merging reader's null entries are not calls.
        {"id": "g3", "question": "Hi!", "answer": {"GetWeather": None, "FindBus": {"to_city": "LA"}}},
    ]
    path = tmp_path / "mtu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = load_questions(str(path), layout="mtu_bench")
    # extract_mtu_bench_question: instruction and input joined by a newline.
    assert questions[0] == Question("mtu_bench/g1", "Use tools.\nWeather in Rome?", questions[0].gold)
    assert [calls_from_json(q.gold) for q in questions] == [
        [("GetWeather", {"city": "Rome"})], [("FindBus", {"to_city": "Austin"})], [("FindBus", {"to_city": "LA"})]]


def test_eval_config_runs_mtu_bench_end_to_end(tmp_path, run_tiny):
    """experiments/configs/eval.py with an MTU-Bench benchmark on the fixture rows, a
    random-init checkpoint: every stage it runs, and the tool-use metrics reported."""
    from helpers import tiny_hf_checkpoint

    checkpoint = str(tmp_path / "init")
    tiny_hf_checkpoint(checkpoint)
    config = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "eval.py")
    out = run_tiny(tmp_path / "run", config=config, extra=(
        f"--config.model.checkpoint={checkpoint}", "--config.model.dtype=float32", "--config.model.remat=none",
        f"--config.eval.benchmarks.mtu_bench.source={FIXTURE}", "--config.eval.benchmarks.mtu_bench.task=tool",
        "--config.eval.benchmarks=mtu_bench", "--config.task.max_turns=1", "--config.eval.max_new_tokens=2",
        "--config.eval.batch_size=4", "--config.rollout.engine=static"))  # the fewest programs to compile
    summary = json.loads((tmp_path / "run" / "eval" / "mtu_bench_reference.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "run" / "eval" / "mtu_bench_reference.jsonl").open()]
    assert summary["questions"] == len(records) == 4
    assert summary["tool_use"] == tool_use.summarize(records)  # the metrics of the dialogues played
    assert set(tool_use.METRICS) <= set(summary["tool_use"])
    assert all(r["messages"][0]["content"] == MTU_SYSTEM_MESSAGE for r in records)
    assert "eval reference mtu_bench: tool_selection_accuracy" in out
