"""MTU-Bench rows (``wpei/MTU-Bench``, the tool-use benchmark of the release's
``src/benchmark.py``): the question a row asks and the tool calls it expects.

A row as MTU-Bench's ``*_eval.jsonl`` files hold it: ``{"id": "S-S_0", "question": "...",
"answer": {"FindRestaurants": {"city": "San Francisco", ...}}}``; ``"answer": {}`` means no
tool call is expected. The release also reads ``instruction`` + ``input``, a ``gold``
JSON text (``'{"": {}}'`` for no call), a ReAct ``output`` (``Action: x`` / ``Action Input:
{...}``) and a conversation; ``mtu_bench_row`` follows its order of fields
(``load_mtu_bench_dataset``, ``extract_mtu_bench_question``, ``parse_mtu_bench_gold_field``,
``parse_mtu_bench_ground_truth``).

A question's gold is the expected calls as canonical JSON (``calls_json``): a list of
``{"name": ..., "parameters": {...}}`` in order, ``[]`` for none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

ToolCalls = list[tuple[str, dict]]

_REACT_ACTION_RE = re.compile(r"Action:\s*([^\n]+)", re.IGNORECASE)
_REACT_INPUT_RE = re.compile(r"Action Input:\s*(.+?)(?=(?:Thought:|Action:|Observation:|$))",
                             re.DOTALL | re.IGNORECASE)


def calls_json(calls: ToolCalls) -> str:
    return json.dumps([{"name": name, "parameters": params} for name, params in calls], ensure_ascii=False)


def calls_from_json(text: str) -> ToolCalls:
    return [(c["name"], c["parameters"]) for c in json.loads(text)] if text else []


def gold_field_calls(gold_text: str) -> ToolCalls:
    """``parse_mtu_bench_gold_field``: a JSON object ``{tool: params}`` (single quotes
    tried as double quotes) in key order; a key that is empty once stripped is no call,
    params that are not an object are ``{}``."""
    gold_text = (gold_text or "").strip()
    if not gold_text:
        return []
    try:
        gold = json.loads(gold_text)
    except json.JSONDecodeError:
        try:
            gold = json.loads(gold_text.replace("'", '"'))
        except json.JSONDecodeError:
            return []
    if not isinstance(gold, dict):
        return []
    return [(name.strip(), params if isinstance(params, dict) else {}) for name, params in gold.items()
            if name.strip()]


def json_params(text: str) -> dict:
    """``parse_json_params``: JSON, else the outermost ``{...}`` as JSON, else ``key=value``
    / ``key: value`` pairs."""
    text = text.strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        try:
            return json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            pass
    return {key: value.strip().strip("\"'")
            for key, _, value in re.findall(r'(\w+)\s*[=:]\s*(["\']?)([^,\n]+)\2', text)}


def react_calls(text: str) -> ToolCalls:
    """``parse_tool_calls_from_text``: every ``Action: name`` (brackets and quotes removed
    from the name) with the ``Action Input:`` up to the next action."""
    actions = list(_REACT_ACTION_RE.finditer(text or ""))
    calls = []
    for i, action in enumerate(actions):
        name = re.sub(r'[\[\]"\']', "", action.group(1).strip()).strip()
        end = actions[i + 1].start() if i + 1 < len(actions) else len(text)
        found = _REACT_INPUT_RE.search(text[action.end():end])
        calls.append((name, json_params(found.group(1)) if found else {}))
    return calls


_QUESTION_FIELDS = ("question", "problem", "prompt", "query", "context", "text", "task")
_CONVERSATION_FIELDS = ("conversations", "conversation", "messages", "dialogue", "turns", "history")
_USER_ROLES = ("user", "human", "prompt", "question", "input", "instruction", "system")
_GOLD_FIELDS = ("gold", "Action", "action", "target", "label", "answer")


def mtu_question(row: Mapping) -> str:
    """``extract_mtu_bench_question``: instruction and input joined by a newline, else the
    first non-empty question-like field, else a conversation's user turns."""
    parts = [v.strip() for v in (row.get("instruction"), row.get("input")) if isinstance(v, str) and v.strip()]
    if parts:
        return "\n".join(parts).strip()
    for key in _QUESTION_FIELDS:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    convo = next((row.get(k) for k in _CONVERSATION_FIELDS if row.get(k)), None)
    if not isinstance(convo, list):
        return ""
    users, everything = [], []
    for turn in convo:
        if isinstance(turn, dict):
            role = str(turn.get("role") or turn.get("from") or turn.get("speaker") or "").lower()
            content = turn.get("content") or turn.get("value") or turn.get("text") or turn.get("message")
            text = str(content).strip() if content is not None else ""
            if text:
                everything.append(text)
                if role in _USER_ROLES:
                    users.append(text)
        elif str(turn).strip():
            everything.append(str(turn).strip())
            users.append(str(turn).strip())
    if users:
        return users[0] if len(users) == 1 else "\n".join(f"User: {m}" for m in users)
    return "\n".join(everything)


def _gold_text(row: Mapping) -> str:
    """The first gold-like field holding an object (dumped as JSON) or an object's text.
    An object's null-valued entries are left out: a reader that merges the rows' schemas
    (Arrow, tfds) fills in every tool of the file with null."""
    for key in _GOLD_FIELDS:
        value = row.get(key)
        if not value:
            continue
        if isinstance(value, Mapping):
            return json.dumps({k: v for k, v in value.items() if v is not None}, ensure_ascii=False)
        if isinstance(value, str) and value.strip().startswith("{") and value.strip().endswith("}"):
            return value.strip()
    return ""


def mtu_bench_row(row: Mapping) -> tuple[str, ToolCalls] | None:
    """``(question, expected calls)`` of an MTU-Bench row, None for a row with no
    question (the release skips it). The calls: the gold field's, else (none there) the
    ReAct ``output``'s."""
    question = mtu_question(row)
    if not question:
        return None
    calls = gold_field_calls(_gold_text(row))
    output = row.get("output", "")
    output = output.strip() if isinstance(output, str) else (str(output) if output else "")
    if not calls and output:
        calls = react_calls(output)
    return question, calls
