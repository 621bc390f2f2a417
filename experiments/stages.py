"""The stages of a run, each skipped when its output is already in the workdir:
reference -> rollout -> weights -> train (per method) -> eval -> report. Which of them
a run goes through, and in what order, is ``experiments/plan.py``'s call."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import numpy as np

from drift_jax import diagnostics, methods
from drift_jax.data import records
from drift_jax.data.batching import split_held_out
from drift_jax.data.chat import encode_dialogue
from drift_jax.envs.secret import SecretGuessEnv, scripted_episode
from drift_jax.envs.tool_use import ToolUseEnv
from drift_jax.evaluation import multi_at_k as evaluate
from drift_jax.evaluation import report, tool_use
from drift_jax.evaluation.probes import answer_check
from drift_jax.parallel import distributed
from drift_jax.rollout.episodes import append_rollouts, chunk_size, generated_tokens, play_episodes
from drift_jax.rollout.interface import merge_work, split_invariant
from drift_jax.weights import trajectory_returns, trajectory_weights
from experiments.fitting import fit
from experiments.workdir import Experiment, read_json, write_json


def stage_reference(exp: Experiment) -> None:
    """Train the base policy from scratch on synthetic transcripts of the base habit
    (embedded task only: a real model's checkpoint is its own reference)."""
    if exp.begin("reference"):
        return
    rc = exp.cfg.reference
    rng = np.random.default_rng(exp.cfg.seed * 1000 + 1)
    questions = exp.env.make_questions(rc.num_transcripts, seed=exp.cfg.seed * 1000 + 1, prefix="ref-")
    examples = [
        encode_dialogue(exp.tokenizer, scripted_episode(exp.env, q, rng, rc.p_repeat, rc.p_format_error,
                                         rc.preference_decay).messages,
                        supervise="all")
        for q in questions
    ]
    fit(exp, "reference", examples, exp.new_model(), rc.train, rc.train.steps)
    exp.finish("reference")


def stage_rollout(exp: Experiment) -> None:
    """K trajectories per training prompt from the frozen reference, as JSONL records.

    Appended one prompt group at a time: a killed run resumes where it stopped and ends
    with the same file (``episodes.append_rollouts``). In a multi-process job each
    process plays its shard of the prompts (whole rollout chunks) on its own devices into
    its own part file, resumable the same way, and process 0 concatenates the parts, in
    prompt order, into the file a single process writes (``play_shards``)."""
    if exp.begin("rollout"):
        return
    rc = exp.cfg.rollout
    t0 = time.time()
    path = exp.path("rollouts.jsonl")
    policy = exp.load_policy("reference", for_sampling=True)
    work: dict = {}  # this process's sampler figures (slot utilisation, prefill tokens)

    def play(target: str, questions) -> int:
        return append_rollouts(
            target, policy, exp.tokenizer, exp.env, questions, num_samples=rc.num_samples, seed=exp.cfg.seed,
            sampling=exp.sampling(temperature=rc.temperature, top_p=rc.top_p),
            batch_size=rc.batch_size, desc="rollout", engine=exp.engine(), stats=work)["resumed_groups"]

    resumed = play_shards("rollout", path, exp.train_questions, chunk_size(rc.batch_size, rc.num_samples), play)
    written, _ = records.read_jsonl(path)
    t_stars = [r["t_star"] for r in written]
    summary = evaluate.summarize(t_stars, exp.env.max_turns)
    answers = [[d["answer"] if d["parsed"] else None for d in r["reward_details"]] for r in written]
    summary["distinct_paths"] = evaluate.distinct_paths(answers, t_stars, exp.env.max_turns)
    write_json(exp.path("rollout_stats.json"), {
        "trajectories": len(written), "generated_tokens": sum(map(generated_tokens, written)),
        "resumed_groups": sum(resumed),  # > 0: this run finished an interrupted one
        "wall_s": time.time() - t0 + exp.ledger.earlier_s("rollout"), "sampled_reference": summary, "engine": exp.cfg.rollout.engine,
        "work": work})
    exp.finish("rollout")
    remove_parts(path)


def play_shards(name: str, path: str, questions, chunk: int, play) -> list:
    """Play ``questions`` into the file ``path``, split over the job's processes.

    One process: ``play(path, questions)``. Several: process i calls ``play(part, shard)``
    on its shard (``distributed.shard_range``, whole chunks of ``chunk`` questions) and
    part file (``distributed.part_path``); once every process is done, process 0
    concatenates the parts in shard order into ``path``, and every process returns once
    ``path`` is complete. ``play`` writes a whole file (or resumes one) and returns a
    JSON-serialisable value; returns the values of the processes that played, in process
    order (a process whose shard is empty, when there are fewer chunks than processes,
    plays nothing and has none)."""
    count = distributed.process_count()
    if count == 1:
        return [play(path, questions)]
    start, stop = distributed.shard_range(len(questions), count, distributed.process_index(), align=chunk)
    part = distributed.part_path(path)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    played = stop > start
    values = distributed.gather(f"{name}:played", [play(part, questions[start:stop])] if played else [])
    # every part is complete past this point
    if distributed.is_main():
        shards = [distributed.shard_range(len(questions), count, i, align=chunk) for i in range(count)]
        records.concat_files(path, [distributed.part_path(path, i, count)
                                    for i, (a, b) in enumerate(shards) if b > a])
    distributed.barrier(f"{name}:merged")
    return [value for shard in values for value in shard]


def remove_parts(path: str) -> None:
    """Delete ``path``'s part files (process 0, after the stage is recorded as done: a
    kill before that leaves the parts to resume from)."""
    if distributed.is_main():
        shutil.rmtree(f"{path}.parts", ignore_errors=True)


def stage_weights(exp: Experiment) -> None:
    """Returns and importance weights of every trajectory (uniform ones for ``sft``)."""
    if exp.begin("weights"):
        return
    d = exp.cfg.drift
    t0 = time.time()
    trajectories, skipped = exp.read_rollouts()
    beta = d.beta
    if d.target_ess_fraction > 0:  # beta chosen so the mean ESS / K hits the target
        beta = diagnostics.choose_beta(trajectories, d.gamma, d.lam, d.target_ess_fraction)
    weights = trajectory_weights(trajectories, d.gamma, beta, d.lam, weight_norm=d.normalize)
    returns = [trajectory_returns(r, d.gamma, d.lam) for r in trajectories]
    diag = diagnostics.summary(trajectories, weights)
    print(f"weights ({exp.workdir}): beta={beta:.4g}, mean ESS/K={diag['mean_ess_fraction']:.3f}, "
          f"groups where every trajectory failed: {diag['all_fail_share']:.1%}")
    write_json(exp.path("weights.json"), {
        "drift": weights.tolist(), "returns": returns, "beta": beta, "diagnostics": diag,
        "skipped_records": records.summarize_skipped(skipped),  # {"total", "reasons"}
        "wall_s": time.time() - t0})
    exp.finish("weights")


def method_examples(exp: Experiment, method: methods.Method) -> list:
    """The weighted SFT data of an offline method: the records it keeps, the turns it
    supervises and its weights (``drift_jax/methods.py``)."""
    raw = exp.rollout_records()
    weights = read_json(exp.path("weights.json"))["drift"] if method.weighted else [1.0] * len(raw)
    examples = exp.examples(method.supervise)
    if not len(examples) == len(weights) == len(raw):
        raise RuntimeError(f"{exp.path('weights.json')} holds {len(weights)} weights for {len(raw)} "
                           "records: delete it to recompute")
    examples = [dataclasses.replace(e, weight=w) for e, w, r in zip(examples, weights, raw)
                if method.keep(records.parse_record(r, messages=False))]
    if not examples:
        raise ValueError(f"method {method.name!r} has no training examples in {exp.rollout_files()}")
    return examples


def stage_train(exp: Experiment, method: methods.Method) -> None:
    """Weighted SFT from the reference on the method's examples."""
    if exp.begin(f"train:{method.name}"):
        return
    tc = exp.cfg.train
    # The last eval_fraction of the rows (file order) is not trained on (the release's 5%).
    examples, held_out = split_held_out(method_examples(exp, method), tc.eval_fraction)
    # The reference trained from scratch is full training; methods train adapters under LoRA.
    fit(exp, method.name, examples, exp.adapt(exp.load_policy("reference")), tc, held_out=held_out)
    exp.finish(f"train:{method.name}")


def stage_eval(exp: Experiment, method: str) -> None:
    """Greedy multi@k and correction rates on every benchmark's held-out prompts.

    Played on the run's sampler (``Experiment.engine``; static: in chunks of
    ``eval.batch_size`` prompts); in a multi-process job each process plays its shard of
    whole chunks into a part file and process 0 merges them in question order
    (``play_shards``), so the records, and the metrics computed from them, are a single
    process's. The summary's "sampler" holds the sampler's kind and the work figures that
    do not depend on how many processes played (``interface.split_invariant``); the
    others (slot utilisation, prefill) are printed."""
    ec = exp.cfg.eval
    policy = None
    for bench, (env, questions) in exp.benchmarks.items():
        out = exp.path("eval", f"{bench}_{method}.json")
        if exp.begin(f"eval:{method}:{bench}"):
            continue
        policy = policy or exp.load_policy(method, for_sampling=True)
        os.makedirs(exp.path("eval"), exist_ok=True)
        path = exp.path("eval", f"{bench}_{method}.jsonl")
        played = play_shards(f"eval:{method}:{bench}", path, questions, chunk_size(ec.batch_size, 1),
                             eval_player(exp, policy, env, f"eval {method} {bench}"))
        work: dict = {}
        for p in filter(None, played):  # a process with an empty shard played nothing
            work = merge_work(work, p["sampler"])
        print(f"eval {method} {bench}: {work.get('kind')} sampler, slot utilisation "
              f"{work.get('slot_utilization', 0):.3f}, {work.get('prefill_tokens', 0)} prefill tokens")
        written, _ = records.read_jsonl(path)
        summary = {**evaluate.summarize([r["t_star"] for r in written], env.max_turns),
                   "questions": len(questions),
                   "generated_tokens": sum(p["generated_tokens"] for p in filter(None, played)),
                   "sampler": split_invariant(work)}
        if isinstance(env, SecretGuessEnv):  # how close greedy decoding's choices are to ties
            summary["answer_check"] = answer_check(policy, exp.tokenizer, env, questions[0])
        if isinstance(env, ToolUseEnv):  # MTU-Bench: the release's TS / PS / TN / TO / ATS / SATS / SR / TPR
            summary["tool_use"] = tool_use.summarize(written)
            print(f"eval {method} {bench}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["tool_use"].items()
                                                         if k in tool_use.METRICS))
        write_json(out, summary)
        exp.finish(f"eval:{method}:{bench}")
        remove_parts(path)


def eval_player(exp: Experiment, policy, env, desc: str):
    """``play(path, questions) -> {"generated_tokens", "sampler"}`` for ``play_shards``:
    greedy episodes of ``questions`` on the run's sampler (``eval.batch_size`` rows),
    their records written to ``path``; "sampler": its work figures (``interface.Sampler``)."""
    ec = exp.cfg.eval

    def play(path: str, questions) -> dict:
        work: dict = {}
        episodes, generated = play_episodes(
            policy, exp.tokenizer, env, questions, num_samples=1, seed=exp.cfg.seed,
            sampling=exp.sampling(temperature=0.0, max_new_tokens=ec.max_new_tokens),
            batch_size=ec.batch_size, desc=desc, engine=exp.engine(), stats=work)
        records.write_jsonl(path, (e.to_record() for e in episodes))
        return {"generated_tokens": generated, "sampler": work}

    return play


def eval_summary(exp: Experiment, method: str) -> tuple[dict, dict]:
    """(mean over benchmarks of multi@k and correction rates, per-benchmark summaries)."""
    per_bench = {b: read_json(exp.path("eval", f"{b}_{method}.json")) for b in exp.benchmarks}
    if not per_bench:
        return {}, {}
    mean = {}
    for key, value in next(iter(per_bench.values())).items():
        if key.startswith("multi@"):
            mean[key] = float(np.mean([s[key] for s in per_bench.values()]))
    rates = np.array([[np.nan if r is None else r for r in s["correction_rate"]] for s in per_bench.values()])
    mean["correction_rate"] = [None if np.all(np.isnan(c)) else float(np.nanmean(c)) for c in rates.T]
    return mean, per_bench


def train_stats(exp: Experiment, method: str) -> dict:
    """``train_stats.json`` of a trained method (a DRIFT round's lives in its round)."""
    spec = methods.get(method)
    if spec.round > 1:
        return train_stats(exp.round(spec.round), "drift")
    return read_json(exp.path(method, "train_stats.json"))


def method_cost(exp: Experiment, method: str) -> dict:
    """Tokens generated (rollouts), tokens trained and wall-clock of everything the method
    needed after the reference existed. Rollouts made elsewhere (``cfg.rollouts``) have no
    generation cost here: None."""
    if method == "reference":
        return {"generated_tokens": 0, "trained_tokens": 0, "supervised_tokens": 0, "wall_s": 0.0}
    spec = methods.get(method)
    if spec.round > 1:  # the previous rounds plus this round's rollouts, weights and training
        before = method_cost(exp, spec.previous)
        this = method_cost(exp.round(spec.round), "drift")
        return {k: None if before[k] is None or this[k] is None else before[k] + this[k]
                for k in ("generated_tokens", "trained_tokens", "supervised_tokens", "wall_s")}
    ts = train_stats(exp, method)
    if spec.trainer == "online_rl":  # generates its own episodes at every update
        return {k: ts[k] for k in ("generated_tokens", "trained_tokens", "supervised_tokens")} | {
            "wall_s": ts["wall_s"], "stage_wall_s": {"rollout": ts["rollout_s"], "train": ts["train_s"]}}
    weights = read_json(exp.path("weights.json"))
    rollout = (read_json(exp.path("rollout_stats.json")) if not exp.given_rollouts
               else {"generated_tokens": None, "wall_s": 0.0})
    return {"generated_tokens": rollout["generated_tokens"], "trained_tokens": ts["trained_tokens"],
            "supervised_tokens": ts["supervised_tokens"],
            "wall_s": rollout["wall_s"] + weights["wall_s"] + ts["wall_s"],
            "stage_wall_s": {"rollout": rollout["wall_s"], "weights": weights["wall_s"], "train": ts["wall_s"]}}


def stage_report(exp: Experiment, run_methods: list[methods.Method]) -> dict:
    results = {"methods": {}, "benchmarks": {}, "config": exp.cfg.to_dict(), "warnings": []}
    if exp.offline:  # the rollouts, and the weight diagnostics (ESS, all-fail share, histogram)
        weights = read_json(exp.path("weights.json"))
        results.update(rollout_files=exp.rollout_files(), skipped_records=weights["skipped_records"],
                       weight_diagnostics={"drift": {"beta": weights["beta"], **weights["diagnostics"]}})
        if not exp.given_rollouts:
            results["sampled_reference"] = read_json(exp.path("rollout_stats.json"))["sampled_reference"]
    for method in run_methods:
        if method.round > 1:
            w = read_json(exp.round(method.round).path("weights.json"))
            results["weight_diagnostics"][method.name] = {"beta": w["beta"], **w["diagnostics"]}
    for method in ["reference", *(m.name for m in run_methods)]:
        summary, per_bench = eval_summary(exp, method)
        results["methods"][method] = {**summary, "cost": method_cost(exp, method)}
        if method != "reference" and train_stats(exp, method).get("unchanged_policy"):
            results["warnings"].append(f"{method}: the trained policy equals its initial weights "
                                       "(every update ran at learning rate 0)")
        for bench, s in per_bench.items():
            results["benchmarks"].setdefault(bench, {})[method] = s
    write_json(exp.path("results.json"), results)
    if not exp.benchmarks or not distributed.is_main():  # the report and plots: process 0's
        return results
    with open(exp.path("report.md"), "w") as f:
        f.write(report.markdown(results, exp.env.max_turns, title=f"DRIFT: {', '.join(exp.benchmarks)} ({exp.workdir})"))
    for plot, file in ((report.plot_multi_at_k, "multi_at_k.png"), (report.plot_cost, "cost.png"),
                       (report.plot_correction_rate, "correction_rate.png")):
        plot(results, exp.env.max_turns, exp.path(file))
    return results
