"""Compile every device program of a config's run for accelerators this host lacks.

    python benchmarks/aot.py --config=experiments/configs/qwen2_5_3b_metamath.py --target=h100 \\
        [--target=v5e-8 ...] [--lora] [--only=train_step,decode] --out aot.json
    python benchmarks/aot.py --out aot.json --merge gpu.json --merge tpu.json   # reports of parallel runs
    python benchmarks/aot.py --out aot.json --docs        # the tables of docs/scaling.md from aot.json

The config is read and resolved as ``experiments/run.py`` reads it (its protocol's
settings filled in); the model's shapes come from ``drift_jax.models.PRESETS`` matched to
``model.checkpoint`` (nothing is downloaded). Each program of ``drift_jax.aot.pipeline``
is compiled at the run's shapes for each target (``drift_jax.aot.targets``) and its
report (compiled or the error's first line, per-device memory against the budget,
FLOPs, bytes, roofline time, compile seconds) goes into ``--out`` as soon as it is done:
a rerun keeps the programs already there (``--only`` recompiles the named ones), so a
long report resumes where it stopped. ``--lora`` compiles the training programs with
LoRA as a second variant (the config's ``lora`` settings, rank 16 where it has none: the
release's rank 16, alpha 32 on q, k, v, o are base.py's defaults); sampling runs merged weights,
the same programs as full fine-tuning.

Shapes a config does not fix are assumptions, written into the JSON: a prompt of
``--prompt_tokens`` tokens, ``--feedback_tokens`` per feedback turn, and replies at
their budget, so a turn-T dialogue has ``prompt + T x max_new + (T - 1) x feedback``
tokens; training batches are padded to its bucket (``data.batching.bucket_length``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only targets; never open a device here

import jax  # noqa: E402

from drift_jax.aot import estimate, pipeline, targets  # noqa: E402
from drift_jax.aot.compile import compile_program, verdict  # noqa: E402
from drift_jax.data.batching import bucket_length, held_out_count  # noqa: E402
from drift_jax.models import PRESETS, LoRAConfig, preset  # noqa: E402
from drift_jax.rollout.interface import EngineOptions  # noqa: E402
from experiments.policies import DTYPES  # noqa: E402
from experiments.preflight import check_values  # noqa: E402

DOC = os.path.join(REPO, "docs", "scaling.md")
START, END = "<!-- aot:start -->", "<!-- aot:end -->"
# Questions of each paper benchmark's evaluated split (the datasets' cards), for the
# evaluation's estimate.
BENCHMARK_QUESTIONS = {"math500": 500, "math": 5000, "theoremqa": 800, "gpqa_diamond": 198, "mmlu_redux": 5700,
                       "mmlu_pro": 12032}
TRAINING = ("train_step", "held_out_loss", "rl_update")
RELEASE_LORA_RANK = 16  # the release's optional LoRA; alpha, dropout and targets are the config's


def load_config(path: str, lora: bool):
    spec = importlib.util.spec_from_file_location("aot_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    if lora and not cfg.lora.rank:
        cfg.lora.rank = RELEASE_LORA_RANK
    return check_values(cfg)


def lora_config(lc) -> LoRAConfig:
    return LoRAConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets)


def model_config(cfg):
    """The preset of ``model.checkpoint`` with the config's dtypes, remat and kernel."""
    m = cfg.model
    name = os.path.basename(m.checkpoint.rstrip("/")).lower().removesuffix("-instruct")
    if name not in PRESETS:
        raise SystemExit(f"model.checkpoint {m.checkpoint!r} matches no preset of drift_jax.models.PRESETS "
                         f"({sorted(PRESETS)})")
    return preset(name, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], remat=m.remat,
                  attention_impl=m.attention_impl)


def settings_and_work(cfg, args) -> tuple[pipeline.Settings, dict, dict]:
    """(pipeline settings, the run's work for the stage estimates, the assumptions)."""
    turns, p, fb = cfg.task.max_turns, args.prompt_tokens, args.feedback_tokens
    r, e, t, o = cfg.rollout, cfg.eval, cfg.train, cfg.online_rl

    def dialogue(new: int, upto: int) -> int:
        return p + upto * new + (upto - 1) * fb

    def mean_context(new: int) -> int:  # a decode step's context, averaged over turns and reply positions
        return p + (turns - 1) * (new + fb) // 2 + new // 2

    # The run's engine (Experiment.engine), each request at most the assumed turn-T dialogue.
    options = EngineOptions(kind=r.engine, page_size=r.page_size, num_pages=r.num_pages,
                            memory_fraction=r.memory_fraction, steps_per_visit=r.steps_per_visit,
                            refill_after=r.refill_after, row_buckets=r.row_buckets)
    train_len = args.train_len or (t.pack_length or t.max_len if t.pack else
                                   bucket_length(min(t.max_len or 1 << 30, dialogue(r.max_new_tokens, turns))))
    optimizer = dict(learning_rate=t.learning_rate, warmup_ratio=t.warmup_ratio, schedule=t.schedule,
                     weight_decay=t.weight_decay, grad_clip=t.grad_clip)
    rl_optimizer = dict(learning_rate=o.learning_rate, warmup_ratio=o.warmup_ratio, schedule=o.schedule,
                        weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    rl_len = o.seq_len or bucket_length(dialogue(r.max_new_tokens, turns))

    def sampling(slots, new, temperature):
        return pipeline.Sampling(slots, new, temperature, turns, mean_context(new), dialogue(new, turns - 1) + fb,
                                 dataclasses.replace(options, slot_tokens=dialogue(new, turns)))

    settings = pipeline.Settings(
        model=model_config(cfg), lora=lora_config(cfg.lora) if cfg.lora.rank else None,
        train=pipeline.Fit(t.batch_size, train_len, t.num_micro_batches, optimizer, t.loss_normalize,
                           t.loss_chunk_size),
        rl=pipeline.Fit(o.prompts_per_step * r.num_samples, rl_len, o.num_micro_batches, rl_optimizer,
                        loss_chunk_size=t.loss_chunk_size),
        rollout=sampling(r.batch_size, r.max_new_tokens, r.temperature),
        eval=sampling(e.batch_size, e.max_new_tokens, 0.0),
        mesh=(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), kl_coef=o.kl_coef, rl_normalize=o.loss_normalize,
        seed=cfg.seed)
    episodes = r.num_prompts * r.num_samples
    held_out = held_out_count(episodes, t.eval_fraction)
    updates = t.epochs * math.ceil((episodes - held_out) / t.batch_size)
    questions = sum(BENCHMARK_QUESTIONS.get(b, 0) for b in cfg.eval.benchmarks)
    rl_episodes = o.steps * o.prompts_per_step * r.num_samples
    work = {
        "episodes": episodes, "turns": turns, "rollout_new_tokens": r.max_new_tokens, "rollout_slots": r.batch_size,
        "rollout_prefill_tokens": r.num_prompts * p + episodes * (turns - 1) * fb,
        # The targets are accelerators: their visit length.
        "prefill_chunk": options.prefill_chunk, "decode_steps": options.for_platform("gpu").steps_per_visit,
        "updates": updates, "held_out_batches": math.ceil(held_out / t.batch_size),
        "held_out_evals": (updates // t.eval_every + 1) if held_out else 0,
        "eval_questions": questions, "eval_new_tokens": e.max_new_tokens, "eval_slots": e.batch_size,
        "eval_prefill_tokens": questions * (p + (turns - 1) * fb),
        "rl_updates": o.steps, "rl_episodes": rl_episodes, "rl_slots": o.prompts_per_step * r.num_samples,
        "rl_prefill_tokens": o.steps * o.prompts_per_step * p + rl_episodes * (turns - 1) * fb,
        "policies_evaluated": 1 + len(cfg.methods),
    }
    assumptions = {"prompt_tokens": p, "feedback_tokens": fb, "train_length": train_len, "rl_length": rl_len,
                   "decode_context_rollout": settings.rollout.context, "decode_context_eval": settings.eval.context,
                   "static_prompt_rollout": bucket_length(settings.rollout.longest_context),
                   "static_prompt_eval": bucket_length(settings.eval.longest_context),
                   "benchmark_questions": {b: BENCHMARK_QUESTIONS.get(b) for b in cfg.eval.benchmarks}}
    return settings, work, assumptions


def read_report(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": {}}


def write_report(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def environment() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("jax", "jaxlib", "jax-cuda13-plugin", "libtpu", "nvidia-cudnn-cu13", "flax"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {**versions, "commit": commit(), "host_cpus": os.cpu_count(), "python": platform.python_version()}


def commit() -> str | None:
    """The checkout's short commit, "-dirty" when a tracked file differs from it."""
    try:
        def git(*a):
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
        head = git("rev-parse", "--short", "HEAD")
        return (head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except OSError:
        return None


def merge(report: dict, other: dict) -> None:
    """``other``'s programs, commands and environment into ``report`` (its entries win)."""
    for key, run_report in other.get("runs", {}).items():
        mine = report["runs"].setdefault(key, {"targets": {}})
        mine.update({k: v for k, v in run_report.items() if k != "targets"})
        for name, programs in run_report["targets"].items():
            mine["targets"].setdefault(name, {}).update(programs)
    for command in other.get("commands", []):
        if command not in report.setdefault("commands", []):
            report["commands"].append(command)
    report["environment"] = other.get("environment", report.get("environment"))


def run(args) -> dict:
    report = read_report(args.out)
    report["environment"] = environment()
    command = " ".join(["python benchmarks/aot.py", *args.argv])
    if command not in report.setdefault("commands", []):
        report["commands"].append(command)
    only = set(args.only.split(",")) if args.only else None
    for config in args.config:
        for lora in ([False, True] if args.lora else [False]):
            cfg = load_config(config, lora)
            settings, work, assumptions = settings_and_work(cfg, args)
            key = f"{os.path.splitext(os.path.basename(config))[0]}/{'lora' if lora else 'full'}"
            run_report = report["runs"].setdefault(key, {"targets": {}})
            run_report.update(config=os.path.relpath(config, REPO), work=work, assumptions=assumptions,
                              model=cfg.model.checkpoint)
            write_report(args.out, report)  # the work, though no program of this variant compiles
            names = [n for n in pipeline.program_names(settings) if not lora or n in TRAINING]
            for name in args.target:
                target = targets.get(name)
                done = run_report["targets"].setdefault(name, {})
                for program in names:
                    if program in done and not (only and program in only):
                        continue
                    if only and program not in only:
                        continue
                    t0 = time.perf_counter()
                    try:
                        built = pipeline.build(program, settings, target)
                    except Exception as e:  # noqa: BLE001 (a program that cannot be built is a finding)
                        from drift_jax.aot.compile import first_line
                        done[program] = {"program": program, "target": name, "compiled": False,
                                         "error": "building: " + first_line(e)}
                    else:
                        done[program] = compile_program(built, target)
                        if program.startswith("static_"):
                            fitting_rows(done[program], settings, target, program)
                    done[program]["wall_s"] = round(time.perf_counter() - t0, 1)
                    done[program]["commit"] = report["environment"]["commit"]
                    jax.clear_caches()
                    write_report(args.out, report)
                    print(f"{key} {name} {program}: {estimate.cell(done[program])} "
                          f"({done[program]['wall_s']} s)", flush=True)
    return report


def fitting_rows(entry: dict, settings, target, program: str, smallest: int = 8) -> None:
    """The static sampler's largest chunk that fits ``target``, into ``entry`` as
    ``fits_at_rows`` (rows, peak bytes; None below ``smallest``) when the configured rows do
    not: its dense cache and whole-dialogue prefill grow with the rows, and its row count
    is the config's ``batch_size`` (rollout or eval) under ``rollout.engine="static"``."""
    if entry.get("compiled") and entry["memory"].get("fits"):
        return
    rows = entry["shapes"]["rows"]
    entry["fits_at_rows"] = None
    while rows > smallest:
        rows //= 2
        r = compile_program(pipeline.static_program(settings, target, program.split("_")[1], rows), target)
        if r.get("compiled") and r["memory"].get("fits"):
            entry["fits_at_rows"] = {"rows": rows, "peak_bytes": r["memory"]["peak_bytes"]}
            return


def render(report: dict, path: str) -> str:
    """The markdown block of docs/scaling.md from a report (the JSON file ``path``)."""
    env = report.get("environment", {})
    commands = "`, `".join(report.get("commands", []))
    commits = sorted({r.get("commit") or "unrecorded" for run_report in report["runs"].values()
                      for programs in run_report["targets"].values() for r in programs.values()})
    out = [f"Made by `{commands}`, their reports in `{os.path.relpath(path, REPO)}` (jax {env.get('jax')}, jax-cuda13-plugin {env.get('jax-cuda13-plugin')}, "
           f"libtpu {env.get('libtpu')}, commit {', '.join(commits)}), compiled on a CPU-only host. A cell is "
           "the program's peak bytes per device (arguments + outputs - donated + temporaries) over the "
           "budget (GPU: 0.75 of the device, XLA's default pool; TPU: the HBM libtpu makes available), and "
           "its roofline time, max(FLOPs / peak, bytes / bandwidth) per device.\n"]
    for key, run_report in report["runs"].items():
        by_target = run_report["targets"]
        for name, programs in by_target.items():  # every entry judged by the current rule
            for r in programs.values():
                if "peak_bytes" in r.get("memory", {}):
                    r["memory"].update(verdict(r["memory"], targets.get(name).platform))
        seen = {p for progs in by_target.values() for p in progs}
        names = [p for p in pipeline.PROGRAMS if p in seen]
        target_names = list(by_target)
        a = run_report["assumptions"]
        out.append(f"\n#### `{run_report['config']}`, {key.split('/')[1]} ({run_report['model']})\n\n"
                   f"Training batches of {a['train_length']} tokens; decode at {a['decode_context_rollout']} "
                   f"(rollout) and {a['decode_context_eval']} (evaluation) tokens of context; static sampler "
                   f"prompts of {a['static_prompt_rollout']} and {a['static_prompt_eval']} tokens (turn 5); "
                   f"a prompt of {a['prompt_tokens']} tokens and {a['feedback_tokens']} per feedback turn "
                   "(assumed).\n\n")
        out.append(estimate.program_table(by_target, target_names, names))
        # LoRA samples with merged weights: the full fine-tuning run's sampling programs.
        full = report["runs"].get(key.replace("/lora", "/full"), {}).get("targets", {})
        times = {t: estimate.stage_times({**full.get(t, {}), **progs}, run_report["work"], targets.get(t).num_hosts)
                 for t, progs in by_target.items()}
        w = run_report["work"]
        out.append(f"\nEstimated time per stage (an estimate: upper bounds of the work at roofline speed, "
                   f"{w['episodes']:,} rollout episodes of {w['turns']} turns at their token budget, "
                   f"{w['updates']} updates, {w['eval_questions']:,} evaluation questions per policy, "
                   f"{w['policies_evaluated']} policies evaluated; sampling on one device per host; the model "
                   "is drift_jax/aot/estimate.py's):\n\n")
        out.append(estimate.stage_table(times, target_names))
        problems = estimate.failures(by_target)
        if problems:
            out.append("\nNot compiled or over budget:\n\n" + "".join(f"- {p}\n" for p in problems))
    return "".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="a config file (repeatable)")
    parser.add_argument("--target", action="append", default=[], help=f"one of {sorted(targets.TARGETS)}")
    parser.add_argument("--lora", action="store_true", help="also the release's LoRA training programs")
    parser.add_argument("--only", default="", help=f"comma-separated programs to (re)compile: {pipeline.PROGRAMS}")
    parser.add_argument("--out", default="aot.json")
    parser.add_argument("--merge", action="append", default=[],
                        help="another report whose programs go into --out (repeatable; e.g. from a second process)")
    parser.add_argument("--docs", action="store_true", help=f"rewrite the {START} block of docs/scaling.md")
    parser.add_argument("--prompt_tokens", type=int, default=512)
    parser.add_argument("--feedback_tokens", type=int, default=32)
    parser.add_argument("--train_len", type=int, default=0, help="training batch length (0: from the dialogue)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    report = run(args) if args.config else read_report(args.out)
    if args.merge:
        for path in args.merge:
            merge(report, read_report(path))
        write_report(args.out, report)
    if args.docs:
        from experiments.readme_results import rewrite

        with open(DOC) as f:
            text = f.read()
        with open(DOC, "w") as f:
            f.write(rewrite(text, render(report, args.out), START, END, "docs/scaling.md"))
        print(f"rewrote the {START} block of docs/scaling.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
