"""The rollout stage at paper scale on one accelerator, estimated without one.

The engine's own scheduler (``rollout.engine.Engine``: admission, page pool, evictions,
visits, packed prefill) plays the paper's workload with a tiny model standing in for the
device, and records every device call (``Engine.trace``). Each call is then priced at
Qwen2.5-3B on a target: the roofline, max(FLOPs / peak, bytes / bandwidth), of the call's
work by the model the accelerator compile uses for the engine's programs
(``pipeline._paged_model``: matmuls 2 x parameters a token, the weights read once a
step, the keys and values each row attends to), with the rows, steps and contexts the
call really had. Attention over pages moves ``ATTENTION_BYTES`` times the live keys and
values it reads, as counted in the compiled programs (``benchmarks/engine_aot.py
bytes``). The host's time between a visit's end and the next launch is measured on
this machine (its bookkeeping, ``EngineStats.host_wait_s``) and added, with an assumed
``VISIT_TRANSFER_S`` a visit for dispatching the next call and copying the visit's
inputs and outputs: the device has nothing queued then.

The workload (``Workload``, an assumption, stated in the output): 1,800 prompts x K=16
episodes of up to 5 turns under the release protocol, at most 512 new tokens a turn;
reply lengths log-normal, turn outcomes Bernoulli; the stored reply is the release's
rewrite, which diverges from the sampled tokens at its first token (the worst case
for reuse: all of it is prefilled again), followed by the feedback block.

Beside it: the static sampler (chunks of whole prompt groups, each turn one call over
whole left-padded dialogues, decoded to the call's longest reply; priced on the same
model, its dense cache read whole every step) and the ideal (the reply tokens decoded
with every slot busy, each step reading the weights and the live keys and values once,
plus the prefill no reuse can avoid, at peak FLOP/s).
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from drift_jax.aot import pipeline, targets
from drift_jax.aot.targets import Target
from drift_jax.data.batching import bucket_length
from drift_jax.models import Transformer, preset
from drift_jax.rollout.engine import Engine
from drift_jax.rollout.interface import Request
from drift_jax.rollout.sampling import SamplingParams

# Bytes attention over pages moves per live key and value it reads, per path
# (docs/scaling.md, "The decode kernel on GPUs": 1.00-1.02 for the Pallas GPU kernel,
# which reads whole blocks of 8 pages; 3.6-3.7 for the XLA loop, which gathers each
# chunk of pages into a buffer and reads it twice). The TPU kernel reads the same
# blocks; its bytes are assumed, a custom call's are not in its compile.
ATTENTION_BYTES = {"pallas": 1.0, "pallas_tpu": 1.0, "xla": 3.7}
VISIT_TRANSFER_S = 2e-4  # assumed: a jitted call's dispatch and a few small host-device copies
BLOCK_TOKENS = 8 * 16  # a Pallas kernel reads whole blocks of 8 pages of 16 tokens


@dataclasses.dataclass(frozen=True)
class Workload:
    """The paper's rollout stage under the release protocol (assumed shapes).

    prompts x samples episodes of up to ``turns`` turns, ``budget`` new tokens a turn at
    most; prompt tokens uniform in ``prompt_tokens`` (system message, the "full" turn
    block with its instruction, the question, the chat template, the ``<think>``
    prefill); reply tokens log-normal with median ``reply_median`` and shape
    ``reply_sigma``, clipped to the budget; an episode ends at its first correct answer,
    drawn with ``first_correct`` at turn 1 and ``later_correct`` at each later turn; a
    stored reply is ``rewrite_trim`` tokens shorter than the sampled one (tags and
    whitespace stripped) and diverges from it at its first token; each later turn adds
    ``feedback_tokens`` (the "Reward:" + turn block, the chat template, ``<think>``).
    """

    prompts: int = 1800
    samples: int = 16
    turns: int = 5
    budget: int = 512
    prompt_tokens: tuple[int, int] = (150, 350)
    reply_median: float = 300.0
    reply_sigma: float = 0.6
    first_correct: float = 0.6
    later_correct: float = 0.25
    rewrite_trim: int = 4
    feedback_tokens: int = 75

    @property
    def max_len(self) -> int:
        """The longest request: a turn-5 context + its budget."""
        return self.prompt_tokens[1] + self.turns * self.budget + (self.turns - 1) * self.feedback_tokens


def draw(w: Workload, seed: int = 0) -> dict:
    """Per prompt its length; per episode its end turn and per turn its reply length."""
    rng = np.random.default_rng(seed)
    episodes = w.prompts * w.samples
    lengths_et = np.exp(np.log(w.reply_median) + w.reply_sigma * rng.standard_normal((episodes, w.turns)))
    lengths_et = np.clip(lengths_et.astype(int), w.rewrite_trim + 2, w.budget)
    correct_et = rng.random((episodes, w.turns)) < np.where(np.arange(w.turns) == 0, w.first_correct,
                                                             w.later_correct)
    ends_e = np.where(correct_et.any(axis=1), correct_et.argmax(axis=1) + 1, w.turns)
    return {"prompt_lengths": rng.integers(w.prompt_tokens[0], w.prompt_tokens[1] + 1, size=w.prompts),
            "lengths": lengths_et, "ends": ends_e}


def play(w: Workload, d: dict, options, model, prompts: range | None = None, seed: int = 0) -> tuple[dict, list]:
    """The engine's scheduler over the drawn episodes of ``prompts`` (default: all), with
    ``model`` (tiny: its tokens only feed the cache bookkeeping) standing in for the
    device; each request's budget is its drawn reply length (a random model stops at
    none). Returns (the engine's work figures, its trace of device calls)."""
    vocab = model.cfg.vocab_size
    rng = np.random.default_rng(seed)
    prompts = range(w.prompts) if prompts is None else prompts
    texts = {p: rng.integers(1, vocab, size=int(d["prompt_lengths"][p])).tolist() for p in prompts}
    feedback = rng.integers(1, vocab, size=w.feedback_tokens).tolist()

    def request(e: int, turn: int, tokens: list, share=None) -> Request:
        return Request(e, tokens, (turn, e // w.samples, e % w.samples), int(d["lengths"][e, turn - 1]),
                       share=share, share_count=w.samples)

    def source():
        for p in prompts:
            yield [request(p * w.samples + j, 1, texts[p], share=p) for j in range(w.samples)]

    def on_finish(req, reply, _):
        e, turn = req.episode, req.key_ids[0]
        if turn >= d["ends"][e]:
            return []
        # The release's rewrite: another first token, tags and whitespace trimmed.
        stored = [reply[0] % (vocab - 1) + 1] + list(reply[1:len(reply) - w.rewrite_trim])
        return [request(e, turn + 1, list(req.tokens) + stored + feedback)]

    engine = Engine(model, SamplingParams(temperature=1.0, max_new_tokens=w.budget), seed=seed, options=options,
                    max_len=w.max_len)
    engine.trace = []
    stats = engine.run(source(), on_finish)
    return stats, engine.trace


def reply_tokens(d: dict) -> int:
    """Tokens the episodes generate (each turn up to its episode's end)."""
    turns = np.arange(1, d["lengths"].shape[1] + 1)
    return int(np.sum(d["lengths"] * (turns[None, :] <= d["ends"][:, None])))


@dataclasses.dataclass(frozen=True)
class Cost:
    """Qwen2.5-3B's sizes for pricing (from its ``ModelConfig``): weight bytes read per
    step (``body`` parameters without the embedding table, plus the LM head), a token's
    keys and values over all layers in bytes, FLOPs per attended key and query."""

    body: float  # parameters of the layers (matmuls per token: 2 x body)
    head: float  # the LM head's parameters (decode computes logits, prefill does not)
    weight_item: int
    kv_token: float  # bytes of one token's keys and values, all layers
    attn_flops: float  # FLOPs per (query, key) pair, all layers: 4 x heads x head_dim x layers

    @classmethod
    def of(cls, cfg) -> "Cost":
        head = cfg.vocab_size * cfg.hidden_size
        body = cfg.num_params - head * (1 if cfg.tie_word_embeddings else 2)
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
        return cls(body, head, jnp.dtype(cfg.param_dtype).itemsize, kv,
                   4.0 * cfg.num_heads * cfg.head_dim * cfg.num_layers)

    def roofline(self, target: Target, flops: float, nbytes: float) -> float:
        return max(flops / target.peak_flops, nbytes / target.hbm_bytes_per_s)

    def decode(self, target: Target, rows: int, steps: int, keys: int, path: str) -> float:
        """A visit of ``steps`` steps over ``rows`` rows whose live rows attended to
        ``keys`` keys in all; a kernel reads at least one block a row and step."""
        if path != "xla":
            keys += rows * steps * BLOCK_TOKENS // 2  # whole blocks: half a block a row on average
        flops = 2.0 * rows * steps * (self.body + self.head) + self.attn_flops * keys
        nbytes = (steps * self.weight_item * (self.body + self.head) + ATTENTION_BYTES[path] * keys * self.kv_token
                  + rows * steps * self.kv_token)
        return self.roofline(target, flops, nbytes)

    def prefill(self, target: Target, rows: int, width: int, keys: int) -> float:
        """A call of ``rows`` rows of ``width`` tokens whose rows attend to ``keys`` keys
        in all (each row reads its context once, on the XLA path)."""
        flops = 2.0 * rows * width * self.body + self.attn_flops * keys * width
        nbytes = (self.weight_item * self.body + ATTENTION_BYTES["xla"] * keys * self.kv_token
                  + rows * width * self.kv_token)
        return self.roofline(target, flops, nbytes)


def price_trace(trace: list, cost: Cost, target: Target, decode_path: str) -> dict:
    """Seconds of the recorded device calls on ``target``: {"decode_s", "prefill_s",
    "calls": {shape: count}}."""
    out = {"decode_s": 0.0, "prefill_s": 0.0, "calls": {}}
    for kind, rows, width_or_steps, _, keys in trace:
        if kind == "decode":
            out["decode_s"] += cost.decode(target, rows, width_or_steps, keys, decode_path)
            shape = f"decode {rows} rows"
        else:
            out["prefill_s"] += cost.prefill(target, rows, width_or_steps, keys)
            shape = f"prefill {rows}x{width_or_steps}"
        out["calls"][shape] = out["calls"].get(shape, 0) + 1
    return out


def static_s(w: Workload, d: dict, cost: Cost, target: Target, rows: int, bucket) -> float:
    """The static sampler's schedule (``static.StaticSampler``): chunks of ``rows // K``
    prompts; per turn one call over the live episodes' whole dialogues, left-padded to
    ``bucket(longest)``, then decode of ``rows`` rows until the longest reply ends, each
    step reading the weights and the dense cache of every row (prompt + budget)."""
    group = max(1, rows // w.samples)
    total = 0.0
    lengths, ends = d["lengths"], d["ends"]
    for p0 in range(0, w.prompts, group):
        prompts = range(p0, min(p0 + group, w.prompts))
        eps = np.asarray([p * w.samples + j for p in prompts for j in range(w.samples)])
        context = np.repeat(d["prompt_lengths"][list(prompts)], w.samples).astype(np.int64)
        for t in range(w.turns):
            live = ends[eps] > t
            if not live.any():
                break
            p = bucket(int(context[live].max()))
            steps = int(lengths[eps[live], t].max())
            flops = 2.0 * rows * p * cost.body + cost.attn_flops * rows * p * p / 2
            total += cost.roofline(target, flops, cost.weight_item * cost.body + rows * p * cost.kv_token)
            total += steps * cost.roofline(
                target, 2.0 * rows * (cost.body + cost.head) + cost.attn_flops * rows * (p + w.budget),
                cost.weight_item * (cost.body + cost.head) + rows * (p + w.budget) * cost.kv_token)
            context = context + lengths[eps, t] - w.rewrite_trim + w.feedback_tokens
    return total


def ideal_s(stats: dict, trace: list, cost: Cost, target: Target, slots: int) -> dict:
    """The reply tokens decoded with every slot busy, each step reading the weights and
    the slots' live keys and values once (at the run's mean context a decoded token
    attends to), plus the context tokens no reuse avoids (prompts once a group, the new
    tokens of later turns) at peak FLOP/s."""
    fed = sum(c[3] for c in trace if c[0] == "decode")
    keys = sum(c[4] for c in trace if c[0] == "decode")
    context = keys / max(1, fed)
    steps = stats["useful_tokens"] / slots
    step = cost.roofline(target, 2.0 * slots * (cost.body + cost.head) + cost.attn_flops * slots * context,
                         cost.weight_item * (cost.body + cost.head) + slots * context * cost.kv_token)
    needed = stats["prefill_tokens_by_turn"].get(1, 0) + sum(stats["new_tokens_by_turn"].values())
    return {"decode_s": steps * step, "prefill_s": 2.0 * needed * cost.body / target.peak_flops,
            "mean_context": context}


def later_turn_ratio(stats: dict) -> float:
    """Tokens prefilled on turns 2.. over those turns' new tokens (past the prefix shared
    with the cached context + sampled reply)."""
    later = sum(v for t, v in stats["prefill_tokens_by_turn"].items() if int(t) > 1)
    return later / max(1, sum(stats["new_tokens_by_turn"].values()))


# The largest static-sampler chunk whose program fits one device at Qwen2.5-3B (rows;
# docs/aot.json, static_rollout at a turn-5 context: fits_at_rows, or the whole batch).
STATIC_ROWS = {"h100": 128, "h200": 256, "v5e-8": 32}
TARGETS = ("h100", "h200", "v5e-8")


def tiny_model() -> Transformer:
    """The device's stand-in: Qwen2.5's architecture at a few thousand parameters."""
    return Transformer(preset("qwen2.5-0.5b", vocab_size=256, hidden_size=16, intermediate_size=32, num_layers=1,
                              num_heads=2, num_kv_heads=1, head_dim=8), rngs=nnx.Rngs(0))


def run(w: Workload, options, names=TARGETS, seed: int = 0) -> dict:
    """The estimate for Qwen2.5-3B on each target of ``names``: the engine with
    ``options`` (``num_slots`` set; visit settings left None take the target's) plays
    ``draw(w, seed)`` once per distinct page pool and host count. Returns the JSON of
    ``benchmarks/rollout.py --estimate``: per target engine_s, static_s, ideal_s,
    prefill_padding_ratio, release_prefill_ratio and their parts."""
    d = draw(w, seed=seed)
    cfg = preset("qwen2.5-3b", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    cost = Cost.of(cfg)
    big = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # shapes only: the pool's sizing
    tiny = tiny_model()
    slots = options.num_slots
    print(f"workload (assumed): {w}\n{d['ends'].size} episodes, {reply_tokens(d)} reply tokens, "
          f"mean {np.mean(d['ends']):.2f} turns an episode")
    runs: dict = {}  # (pages, hosts) -> (stats, trace, wall): targets that share a pool share a run
    out: dict = {"workload": dataclasses.asdict(w), "reply_tokens": reply_tokens(d), "slots": slots}
    for name in names:
        target = targets.get(name)
        resolved = options.for_platform(target.platform)
        sampling = pipeline.Sampling(slots, w.budget, 1.0, w.turns, 0, w.max_len, resolved)
        pages = pipeline.pool_pages(big, sampling, target, w.max_len)  # as a run on the target sizes it
        hosts = target.num_hosts  # each host samples its share on one device
        if (pages, hosts) not in runs:  # the same visit settings on every accelerator
            t0 = time.perf_counter()
            stats, trace = play(w, d, dataclasses.replace(resolved, num_pages=pages), tiny,
                                prompts=range(0, w.prompts, hosts), seed=seed)
            runs[pages, hosts] = stats, trace, time.perf_counter() - t0
            print(f"  scheduler run: {pages} pages, {len(range(0, w.prompts, hosts))} prompts: "
                  f"{runs[pages, hosts][2]:.0f} s on this machine, {stats['visits']} visits, "
                  f"{stats['evictions']} evictions, slot utilisation {stats['slot_utilization']:.3f}")
        stats, trace, _ = runs[pages, hosts]
        path = targets.kernels(target, cfg).paged_attention_impl
        priced = price_trace(trace, cost, target, path)
        ideal = ideal_s(stats, trace, cost, target, slots)
        static = static_s(w, d, cost, target, STATIC_ROWS[name], bucket_length) / hosts
        host_s = stats["host_wait_s"] + stats["visits"] * VISIT_TRANSFER_S
        engine_s = priced["decode_s"] + priced["prefill_s"] + host_s
        out[name] = {
            "engine_s": engine_s, "static_s": static, "ideal_s": ideal["decode_s"] + ideal["prefill_s"],
            "ideal_decode_s": ideal["decode_s"],
            "engine_over_ideal": engine_s / (ideal["decode_s"] + ideal["prefill_s"]),
            "decode_s": priced["decode_s"], "prefill_s": priced["prefill_s"], "host_s": host_s,
            "prefill_padding_ratio": stats["prefill_padding_ratio"], "decode_path": path, "pages": pages,
            "hosts": hosts, "static_rows": STATIC_ROWS[name], "visits": stats["visits"],
            "evictions": stats["evictions"], "slot_utilization": stats["slot_utilization"],
            "release_prefill_ratio": later_turn_ratio(stats), "calls": priced["calls"],
            "mean_context": ideal["mean_context"]}
    out["release_prefill_ratio"] = out[names[0]]["release_prefill_ratio"]
    return out


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def markdown(e: dict, order: tuple[str, ...] = TARGETS) -> str:
    """The estimate ``e`` (``benchmarks/rollout.py --estimate``'s JSON) as markdown: a
    column per target it has, in ``order`` (docs/scaling.md's estimate block)."""
    names = [n for n in order if n in e]
    lines = [f"Made by `python benchmarks/rollout.py --estimate --out r.json` at commit {e['commit']} "
             f"({e['workload']['prompts']:,} prompts x K={e['workload']['samples']}, "
             f"{e['reply_tokens'] / 1e6:.1f} M reply tokens drawn; {e['slots']} slots). An estimate: "
             "rooflines of the recorded calls, no device.", "",
             "| Qwen2.5-3B, one device per host | " + " | ".join(names) + " |",
             "| --- |" + " --- |" * len(names)]
    rows = [("continuous engine", lambda x: minutes(x["engine_s"])),
            ("of which decode / prefill / host", lambda x: " / ".join(
                minutes(x[k]) for k in ("decode_s", "prefill_s", "host_s"))),
            ("static sampler", lambda x: f"{minutes(x['static_s'])} ({x['static_rows']} rows a chunk)"),
            ("ideal", lambda x: minutes(x["ideal_s"])),
            ("engine / ideal", lambda x: f"{x['engine_over_ideal']:.2f}"),
            ("prefill tokens computed with padding / without", lambda x: f"{x['prefill_padding_ratio']:.3f}"),
            ("turns 2-5: tokens prefilled / new tokens", lambda x: f"{x['release_prefill_ratio']:.3f}"),
            ("slot utilisation", lambda x: f"{x['slot_utilization']:.3f}"),
            ("decode path; visits; cache evictions", lambda x: f"{x['decode_path']}; {x['visits']:,}; "
                                                                 f"{x['evictions']:,}"),
            ("page pool (pages of 16 tokens); hosts", lambda x: f"{x['pages']:,}; {x['hosts']}")]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(e[n]) for n in names) + " |")
    lines += ["", "New tokens of a later turn: the rewritten reply and the feedback block (the context past "
                  "its prefix shared with the cached context + sampled reply); above 1, caches were evicted "
                  "and rebuilt by prefill."]
    return "\n".join(lines) + "\n"
