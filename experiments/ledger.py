"""Which stage outputs in a workdir are current: each stage records the settings its
output depends on (``experiments.plan.settings``: its own config keys plus those of the
stages upstream of it), and a stage whose settings changed runs again. Settings that
change how a stage runs but not what it makes (``HOW_NOT_WHAT``) are left out, so they
can be changed on a finished run.

Stale outputs are not deleted: they move to ``<workdir>/stale/<time>/`` (rollouts of a
real model are hours of work).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

from drift_jax.parallel import distributed

# Keys that change memory, speed or bookkeeping, not the numbers a stage writes.
HOW_NOT_WHAT = ("mesh", "model.remat", "model.attention_impl", "allow_tiny", "compilation_cache",
                "train.checkpoint_every", "reference.train.checkpoint_every", "online_rl.checkpoint_every",
                "train.loss_chunk_size", "reference.train.loss_chunk_size", "rollout.memory_fraction")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def select(flat_cfg: dict, prefixes) -> dict:
    """The entries of ``flat_cfg`` under ``prefixes``, less ``HOW_NOT_WHAT``."""
    return {k: v for k, v in flat_cfg.items() if _under(k, prefixes) and not _under(k, HOW_NOT_WHAT)}


def describe_change(saved: dict, current: dict, limit: int = 4) -> str:
    """'drift.beta 0.5 -> 0.3, ...' for the keys that differ."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    parts = [f"{k} {saved.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}" for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def change_label(saved: dict, current: dict) -> str:
    """A folder name for what changed, e.g. 'drift.beta=0.3' or 'drift.beta=0.3+2more': stale
    outputs are kept under it, so TensorBoard lists an old training under what made it old."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if not keys:
        return "unrecorded"
    label = re.sub(r"[^\w.=+-]+", "_", f"{keys[0]}={current.get(keys[0], 'unset')}")[:60]
    return label + (f"+{len(keys) - 1}more" if len(keys) > 1 else "")


def latest_mtime(paths: list[str]) -> float | None:
    """The newest modification time of any file under ``paths`` (None: nothing there)."""
    times = []
    for path in paths:
        if os.path.isfile(path):
            times.append(os.path.getmtime(path))
        for folder, _, files in os.walk(path):
            times += [os.path.getmtime(os.path.join(folder, f)) for f in files]
    return max(times, default=None)


class Ledger:
    """``<workdir>/stages.json``: {stage: {"settings": {...}, "done": bool, "started": time,
    "earlier_s": seconds}}.

    ``begin(stage, settings, outputs)`` is True when the stage's output is current (skip
    the stage); otherwise stale outputs move aside, the stage is recorded as started
    under ``settings`` (a killed stage then resumes only under the same settings) and
    it is False. ``finish(stage)`` marks it done. In a multi-process job process 0 alone
    reads and writes the ledger; every process gets the same answers. ``ran`` lists the stages begun, each
    prefixed by ``label`` (a round's ledger shares its parent's list).

    A stage's cost includes its interrupted attempts: when a stage resumes, the attempt
    before it is charged from its start to the last write to its outputs (a kill loses at
    most the work after that write), accumulated in ``earlier_s`` (``earlier_s(stage)``).
    """

    def __init__(self, workdir: str, ran: list | None = None, label: str = ""):
        self.workdir, self.label = workdir, label
        # One folder per run for whatever it finds stale.
        self.stale_dir = os.path.join(workdir, "stale", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        self.path = os.path.join(workdir, "stages.json")
        self.ran = [] if ran is None else ran

    def _read(self) -> dict:
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f)

    def _write(self, entries: dict) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def status(self, stage: str, settings: dict, outputs: list[str]) -> str:
        """'done', 'resume' (started under these settings), 'new', or why it is stale."""
        entry = self._read().get(stage)
        present = any(os.path.exists(p) for p in outputs)
        if entry is not None and entry["settings"] == settings:
            return "done" if entry["done"] and present else ("resume" if present else "new")
        if not present:
            return "new"
        if entry is None:
            return "stale: no record of the settings that made it"
        return "stale: " + describe_change(entry["settings"], settings)

    def begin(self, stage: str, settings: dict, outputs: list[str]) -> bool:
        # Multi-process: process 0 alone reads the ledger, moves stale outputs and records
        # the start; every process gets its answer (``distributed.agree``), so they all skip
        # or all run the stage, and none starts before the stale outputs are gone.
        skip = distributed.agree(f"begin:{self.label}{stage}", lambda: self._begin(stage, settings, outputs))
        if not skip:
            self.ran.append(self.label + stage)
        return skip

    def _begin(self, stage: str, settings: dict, outputs: list[str]) -> bool:
        status = self.status(stage, settings, outputs)
        if status == "done":
            return True
        entries = self._read()
        entry = entries.get(stage, {})
        earlier = 0.0
        if status == "resume":
            last = latest_mtime(outputs)
            earlier = entry.get("earlier_s", 0.0) + max(0.0, (last or 0.0) - entry.get("started", last or 0.0))
        if status.startswith("stale"):
            label = change_label(entry.get("settings", {}), settings)
            for path in outputs:
                if os.path.exists(path):
                    target = os.path.join(self.stale_dir, label, os.path.relpath(path, self.workdir))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.move(path, target)
            print(f"stage {stage} runs again ({status[len('stale: '):]}); old output moved to "
                  f"{os.path.join(self.stale_dir, label)}")
        entries[stage] = {"settings": settings, "done": False, "started": time.time(), "earlier_s": earlier}
        self._write(entries)
        return False

    def earlier_s(self, stage: str) -> float:
        """Seconds the interrupted attempts of ``stage`` took before the current one."""
        return float(self._read().get(stage, {}).get("earlier_s", 0.0))

    def finish(self, stage: str) -> None:
        """Mark ``stage`` done (process 0), then wait for every process: a stage's
        outputs, written by process 0, are complete for every process once it returns."""
        if distributed.is_main():
            entries = self._read()
            entries[stage]["done"] = True
            self._write(entries)
        distributed.barrier(f"finish:{self.label}{stage}")
