"""MTU-Bench's tool-use metrics as the release computes them (``src/benchmark.py``
``compute_mtu_bench_turn_metrics``, ``compute_mtu_bench_metrics``,
``aggregate_mtu_bench_metrics``, applied by ``evaluate_mtu_bench``), from the records of
``envs.tool_use.ToolUseEnv`` episodes.

Per dialogue, on ONE turn's calls: the turn of the first success, else the last turn.
Against the expected calls, position by position:

| metric | key | per dialogue |
| --- | --- | --- |
| TS | ``tool_selection_accuracy`` | right tool names / expected calls |
| PS | ``parameter_selection_accuracy`` | calls with the right name and parameters / expected calls |
| TN | ``tool_number_accuracy`` | 1 when as many calls as expected |
| TO | ``tool_order_accuracy`` | 1 when the names in order are the expected ones |
| ATS | ``turn_success_rate`` | 1 when every call is right and none is extra |
| SATS | ``soft_turn_success_rate`` | ATS weighted by 0.9^turn over the one turn scored: ATS |
| SR | ``success_rate`` | 1 when any turn succeeded |
| TPR | ``task_process_rate`` | SR (the release overrides both with the episode's success) |

With no call expected, TS, PS, TN and ATS are 1 when none was made, TO is 1. Each
metric's value is the mean over dialogues.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from drift_jax.data.tool_calls import ToolCalls, calls_from_json
from drift_jax.envs.tool_use import compare_call, tool_name_key

METRICS = ("tool_selection_accuracy", "parameter_selection_accuracy", "tool_number_accuracy",
           "tool_order_accuracy", "turn_success_rate", "soft_turn_success_rate", "success_rate",
           "task_process_rate")


def turn_metrics(pred: ToolCalls, expected: ToolCalls) -> dict:
    """One turn's ``tool_selection``, ``param_selection``, ``tool_number``, ``tool_order``
    and ``turn_success`` (``compute_mtu_bench_turn_metrics``)."""
    if not expected:
        none = float(not pred)
        return {"tool_selection": none, "param_selection": none, "tool_number": none, "tool_order": 1.0,
                "turn_success": none}
    checks = [compare_call(p, e) for p, e in zip(pred, expected)]
    tools = sum(t for t, _ in checks)
    params = sum(p for _, p in checks)
    n = len(expected)
    return {"tool_selection": tools / n, "param_selection": params / n, "tool_number": float(len(pred) == n),
            "tool_order": float([tool_name_key(c[0]) for c in pred] == [tool_name_key(c[0]) for c in expected]),
            "turn_success": float(tools == n and params == n and len(pred) == n)}


def dialogue_metrics(pred_turns: Sequence[ToolCalls], expected_turns: Sequence[ToolCalls],
                     decay: float = 0.9) -> dict:
    """``compute_mtu_bench_metrics``: the turn metrics averaged over the expected turns
    (a missing predicted turn counts as no call), SATS weighting turn i by ``decay**i``,
    SR 1 when every turn succeeded, TPR = ATS."""
    n = max(len(expected_turns), 1)
    pred_turns = list(pred_turns) + [[]] * (len(expected_turns) - len(pred_turns))
    per_turn = [turn_metrics(p, e) for p, e in zip(pred_turns[:n], expected_turns)]
    if not per_turn:
        return dict.fromkeys(METRICS, 0.0)
    mean = {k: sum(m[k] for m in per_turn) / n for k in per_turn[0]}
    weights = [decay ** i for i in range(n)]
    ats = mean["turn_success"]
    return {"tool_selection_accuracy": mean["tool_selection"], "parameter_selection_accuracy": mean["param_selection"],
            "tool_number_accuracy": mean["tool_number"], "tool_order_accuracy": mean["tool_order"],
            "turn_success_rate": ats,
            "soft_turn_success_rate": sum(w * m["turn_success"] for w, m in zip(weights, per_turn)) / sum(weights),
            "success_rate": float(all(m["turn_success"] == 1.0 for m in per_turn)), "task_process_rate": ats}


def record_metrics(record: Mapping) -> dict:
    """One ``ToolUseEnv`` record's metrics as ``evaluate_mtu_bench`` scores it: the calls
    of the first successful turn (``t_star``), else of the last; SR and TPR 1 exactly
    when some turn succeeded."""
    details = record["reward_details"]
    turn = record["t_star"] if record.get("t_star") is not None else len(details)
    final = calls_from_json(details[turn - 1]["answer"]) if details else []
    expected = calls_from_json(record["gold"])
    out = dialogue_metrics([final], [expected] if expected else [[]])
    solved = float(record.get("t_star") is not None)
    return {**out, "success_rate": solved, "task_process_rate": solved}


def summarize(records: Iterable[Mapping]) -> dict:
    """The mean of each metric over the records (``aggregate_mtu_bench_metrics``; all 0
    for none), and their number under ``"dialogues"``."""
    per_record = [record_metrics(r) for r in records]
    n = len(per_record)
    return {**{k: (sum(m[k] for m in per_record) / n if n else 0.0) for k in METRICS}, "dialogues": n}
