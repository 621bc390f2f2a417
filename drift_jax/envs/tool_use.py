"""Tool use: MTU-Bench as the release evaluates it (``src/eval_math_multiturn_vllm.py``
``evaluate_mtu_bench`` and ``src/benchmark.py``), as an environment of the multi-turn protocol.

The dialogue: the system message ``MTU_SYSTEM_MESSAGE`` (the release's
``MTU_BENCH_SYSTEM_MESSAGE``; its ReAct ``MTU_BENCH_INSTRUCTION`` is defined but never
sent), the row's question as the user message, and a generation prompt ending with the
``<think>`` prefill. A reply is stored as the model's continuation (the prefill not
included, as the release stores vLLM's output) and read by ``answer_calls``: the
``<answer>`` of ``<think>...</think><answer>...</answer>`` (else the first ``<answer>``,
else the whole text), each ``name(key=value, ...)`` in it a call. A turn succeeds when
the calls match the expected ones (``turn_success``: same number, each in order with the
same normalised name and every expected parameter present with an equal normalised
value); otherwise the next user message is an ``Observation:`` that says what was wrong
(``feedback_message``), up to ``max_turns`` turns. There is no format penalty and no
answer budget: every turn is one try.

The episode's answer is the predicted calls as JSON (``data.tool_calls.calls_json``), the
gold the expected ones; ``evaluation.tool_use`` computes the release's TS / PS / TN / TO /
ATS / SATS / SR / TPR from the records.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from drift_jax.data.questions import Question
from drift_jax.data.tool_calls import ToolCalls, calls_from_json, calls_json
from drift_jax.envs.base import FEEDBACK, RELEASE_SPECIAL_TOKENS

MTU_SYSTEM_MESSAGE = (
    "You are a helpful assistant with access to tools. "
    "Always output in the following format:\n"
    "<think> [Your reasoning about what to do] </think> "
    "<answer> [tool_name(param1=value1, param2=value2)] </answer>\n"
    "If you don't need to use a tool, just put your response in <answer> tags.\n"
    "Example with tool: <think>I need to search for weather</think><answer>get_weather(city=\"Beijing\")</answer>\n"
    "Example without tool: <think>This is a simple greeting</think><answer>Hello! How can I help you?</answer>"
)
NO_TOOL_EXPECTED = "You should not call any tool for this request. Please respond directly without tool calls."
TOOL_EXPECTED = "You need to call a tool to complete this task. Please try again with the appropriate tool call."
WRONG_CALL = "The tool call was incorrect. Please check the tool name and parameters, then try again."

_THINK_ANSWER_RE = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_CALL_RE = re.compile(r"(\w+)\s*\(\s*(.*?)\s*\)", re.DOTALL)
_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"([^"]*?)"|\'([^\']*?)\'|([^,\)]+))', re.DOTALL)


def answer_calls(output: str) -> tuple[str, ToolCalls]:
    """``(thought, calls)`` of a reply (``parse_tool_calls_from_answer_tag``): ``<think>``
    prepended unless the reply starts with it; special tokens deleted from both parts;
    every ``name(...)`` of the answer a call, its parameters ``key=value`` pairs (quoted
    or not; values are always text)."""
    if not output:
        return "", []
    text = output if output.strip().startswith("<think>") else "<think>" + output
    thought, content = "", None
    match = _THINK_ANSWER_RE.search(text)
    if match is not None:
        thought, content = match.group(1).strip(), match.group(2).strip()
    else:
        found = _ANSWER_RE.search(text)
        content = found.group(1).strip() if found else text.strip()
    for token in RELEASE_SPECIAL_TOKENS:
        thought = thought.replace(token, "").strip()
        content = content.replace(token, "").strip()
    calls = []
    for call in _CALL_RE.finditer(content):
        params = {}
        for param in _PARAM_RE.finditer(call.group(2).strip()):
            value = param.group(2) or param.group(3) or param.group(4) or ""
            params[param.group(1).strip()] = value.strip()
        calls.append((call.group(1).strip(), params))
    return thought, calls


def tool_name_key(name: str) -> str:
    """``normalize_tool_name``: lower-case, runs of ``_``/``-``/space as one ``_``, other
    punctuation removed."""
    name = re.sub(r"[_\-\s]+", "_", (name or "").lower().strip())
    return re.sub(r"[^\w]", "", name)


def param_key(value: Any) -> Any:
    """``normalize_param_value``: text stripped and lower-cased, inside lists and dicts
    too; numbers as they are (so the expected 5 never equals a predicted "5")."""
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, (list, tuple)):
        return [param_key(v) for v in value]
    if isinstance(value, dict):
        return {k.lower(): param_key(v) for k, v in value.items()}
    return value


def compare_call(pred: tuple[str, dict], expected: tuple[str, dict]) -> tuple[bool, bool]:
    """``compare_tool_calls`` (lenient): (same name, every expected parameter given with an
    equal value; extra predicted parameters allowed). A wrong name is (False, False)."""
    if tool_name_key(pred[0]) != tool_name_key(expected[0]):
        return False, False
    for key, value in expected[1].items():
        given = pred[1].get(key) or pred[1].get(key.lower())
        if given is None or param_key(given) != param_key(value):
            return True, False
    return True, True


def turn_success(pred: ToolCalls, expected: ToolCalls) -> bool:
    """The release's per-turn check: no call when none is expected, else as many calls as
    expected, each right (name and parameters) in order."""
    if not expected:
        return not pred
    return len(pred) == len(expected) and all(all(compare_call(p, e)) for p, e in zip(pred, expected))


@dataclasses.dataclass
class ToolUseEnv:
    """MTU-Bench's dialogue (module docstring). ``think``: the prefill is ``<think>``
    (else ``<answer>``), the release's ``--disable_think`` off; ``skip_special_tokens``:
    as ``base.ProtocolEnv``'s. ``max_answers`` and ``format_penalty`` are accepted for
    the shared budget settings and unused: no answer is a format error, none uses an
    attempt."""

    max_turns: int = 5
    max_answers: int = 5
    format_penalty: float = 0.0
    feedback: str = FEEDBACK
    system_prompt: str = MTU_SYSTEM_MESSAGE
    think: bool = True
    skip_special_tokens: bool = False

    @property
    def prefill(self) -> str:
        return "<think>" if self.think else "<answer>"

    def initial_messages(self, question: Question) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question.text}]

    def parse_reply(self, reply: str) -> tuple[str, str]:
        output = reply.removeprefix(self.prefill)
        return output, calls_json(answer_calls(output)[1])

    def extract_answer(self, reply: str) -> str:
        return self.parse_reply(reply)[1]

    def counts_as_attempt(self, answer: str) -> bool:
        return False

    def is_correct(self, answer: str, gold: str) -> bool:
        return turn_success(calls_from_json(answer), calls_from_json(gold))

    def feedback_message(self, episode) -> str:
        expected = calls_from_json(episode.question.gold)
        pred = calls_from_json(episode.details[-1]["answer"])
        message = NO_TOOL_EXPECTED if not expected else TOOL_EXPECTED if not pred else WRONG_CALL
        return f"Observation: {message}"
