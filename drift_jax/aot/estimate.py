"""A run's time per stage estimated from its programs' roofline times, and the report's
markdown tables.

The model (an estimate: rooflines are lower bounds of a program's time, and the
counts below are upper bounds of the work):

- rollout: every episode plays every turn and every reply runs to its budget:
  ``episodes x turns x max_new_tokens / slots`` decode steps, each ``decode / steps``
  of a visit, plus ``prefill tokens / chunk`` prefill calls (the prompt once
  per group, ``feedback_tokens`` per later turn); each host's process samples on one
  device, so the hosts split the episodes;
- train: ``updates x train_step`` plus the held-out loss, every ``eval_every`` updates
  and after the last, over every held-out batch;
- online RL: ``updates x rl_update`` plus its episodes sampled as in the rollout;
- eval: per evaluated policy, as the rollout with one greedy episode per question.
"""

from __future__ import annotations

import math
import re

GIB = 2**30


def roofline(entries: dict, name: str) -> float | None:
    """Roofline seconds of program ``name`` in ``entries`` ({program: report}), or None if
    it did not compile."""
    report = entries.get(name)
    if not report or not report.get("compiled") or "roofline_s" not in report.get("cost", {}):
        return None
    return report["cost"]["roofline_s"]


def sampling_s(entries: dict, decode: str, prefill: str, episodes: int, new_tokens: int, w: dict,
               slots: int, prefill_tokens: int, hosts: int) -> float | None:
    """Seconds to sample ``episodes`` of ``w["turns"]`` turns of ``new_tokens`` each on
    ``slots`` slots with programs ``decode`` and ``prefill`` (module docstring)."""
    decode_s, prefill_s = roofline(entries, decode), roofline(entries, prefill)
    if decode_s is None or prefill_s is None:
        return None
    decode_steps = math.ceil(episodes * w["turns"] * new_tokens / slots)
    calls = math.ceil(prefill_tokens / w["prefill_chunk"])
    return (decode_steps * decode_s / w["decode_steps"] + calls * prefill_s) / hosts


def stage_times(entries: dict, w: dict, hosts: int) -> dict[str, float | None]:
    """{stage: seconds} of one target from its programs' reports (``entries``: {program:
    report}) and the run's work ``w`` (``benchmarks/aot.py``'s ``work``: episodes,
    turns, tokens, updates)."""
    out = {"rollout": sampling_s(entries, "decode", "prefill", w["episodes"], w["rollout_new_tokens"], w,
                                 w["rollout_slots"], w["rollout_prefill_tokens"], hosts)}
    step, held = roofline(entries, "train_step"), roofline(entries, "held_out_loss")
    out["train (per method)"] = (None if step is None or held is None
                                 else w["updates"] * step + w["held_out_evals"] * w["held_out_batches"] * held)
    prefill = "eval_prefill" if "eval_prefill" in entries else "prefill"
    out["eval (per policy)"] = sampling_s(entries, "eval_decode", prefill, w["eval_questions"], w["eval_new_tokens"],
                                          w, w["eval_slots"], w["eval_prefill_tokens"], hosts)
    if w.get("rl_updates"):
        rl = roofline(entries, "rl_update")
        # Sampled on the rollout's programs: decode is memory-bound, its step time set by
        # the weights it reads, so fewer slots take about as long per step.
        sample = sampling_s(entries, "decode", "prefill", w["rl_episodes"], w["rollout_new_tokens"], w,
                            w["rl_slots"], w["rl_prefill_tokens"], hosts)
        out["online RL (when run)"] = None if rl is None or sample is None else w["rl_updates"] * rl + sample
    return out


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cell(report: dict | None) -> str:
    """One program on one target: peak GiB of budget and roofline time, or why not."""
    if report is None:
        return "not run"
    if not report.get("compiled"):
        error = report.get("error") or ""
        sizes = re.search(r"\(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", error)
        if sizes:
            return f"does not fit: {sizes.group(1)} > {sizes.group(2)}"
        return "fails: " + error.split(":", 1)[0]
    memory, cost = report.get("memory", {}), report.get("cost", {})
    if "peak_bytes" not in memory:
        return "compiled"
    if memory.get("at_limit"):  # TPU: libtpu's own check passed though the sum is above the HBM
        used = (f"args {memory['argument_bytes'] / GIB:.1f} + temp {memory['temp_bytes'] / GIB:.1f} GiB "
                f"(libtpu: fits {memory['budget_bytes'] / GIB:.2f})")
    else:
        mark = "" if memory["fits"] else " **over**"
        used = f"{memory['peak_bytes'] / GIB:.1f} / {memory['budget_bytes'] / GIB:.0f} GiB{mark}"
    return f"{used}, {duration(cost.get('roofline_s'))}"


def program_table(entries: dict[str, dict[str, dict]], targets: list[str], programs: list[str]) -> str:
    """Markdown: a row per program, a column per target ({target: {program: report}})."""
    lines = ["| program | " + " | ".join(targets) + " |", "| --- |" + " --- |" * len(targets)]
    for name in programs:
        lines.append(f"| {name} | " + " | ".join(cell(entries.get(t, {}).get(name)) for t in targets) + " |")
    return "\n".join(lines) + "\n"


def stage_table(times: dict[str, dict[str, float | None]], targets: list[str]) -> str:
    """Markdown: a row per stage, a column per target ({target: {stage: seconds}})."""
    stages = list(next(iter(times.values()), {}))
    lines = ["| stage (estimate) | " + " | ".join(targets) + " |", "| --- |" + " --- |" * len(targets)]
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(duration(times.get(t, {}).get(stage)) for t in targets) + " |")
    return "\n".join(lines) + "\n"


def failures(entries: dict[str, dict[str, dict]]) -> list[str]:
    """"target program: first error line" of every program that did not compile or fit;
    the static sampler's marked as such (a run uses it only with ``rollout.engine="static"``)."""
    out = []
    for target, programs in entries.items():
        for name, report in programs.items():
            where = f"{target} {name}" + (" (static sampler, not the configured engine)"
                                          if name.startswith("static_") else "")
            if not report.get("compiled"):
                line = f"{where}: {report.get('error')}"
            elif not report.get("memory", {}).get("fits", True):
                m = report["memory"]
                line = f"{where}: peak {m['peak_bytes'] / GIB:.2f} GiB > budget {m['budget_bytes'] / GIB:.2f} GiB"
            else:
                continue
            if "fits_at_rows" in report:
                fit = report["fits_at_rows"]
                line += ("; fits at no chunk of 8 rows or more" if fit is None else
                         f"; fits at {fit['rows']} rows ({fit['peak_bytes'] / GIB:.1f} GiB)")
            out.append(line)
    return out
