"""The device programs a run executes, built from plain settings at abstract shapes.

Every program is the library's own jitted function (``training.step.make_train_step``,
``training.step.eval_sums_fn``, the engine's module-level ``_prefill`` / ``_decode``,
``rollout.sampling.generate``), called with ``jax.ShapeDtypeStruct`` arguments that carry
their sharding on a target's compile-only devices, so compiling one is compiling what
the run would run:

- ``train_step``: the weighted-SFT update (AdamW, gradient accumulation), its train
  state on the training mesh (parameters and moments by their logical axes, batch rows
  over data x fsdp); with LoRA, the adapters' update;
- ``held_out_loss``: the weighted loss of one held-out batch (logged every
  ``eval_every`` updates);
- ``rl_update``: online RL's policy-gradient update against the frozen reference;
- ``prefill`` / ``decode``: the continuous engine's programs at the rollout's slots
  (one device: the engine does not shard), ``eval_decode`` its greedy decode of the
  evaluation (``eval_prefill`` too where its page pool differs);
- ``static_rollout`` / ``static_eval``: the static sampler's program for a turn-5
  chunk of the rollout and of the evaluation (1,024 new tokens per turn).

The attention kernels are the target's (``targets.kernels``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from drift_jax.aot.compile import Program
from drift_jax.aot.targets import Target, devices, kernels
from drift_jax.data.batching import bucket_length, collate
from drift_jax.models import paged
from drift_jax.models.config import ModelConfig
from drift_jax.models.lora import LoRAConfig, apply_lora
from drift_jax.models.transformer import Transformer
from drift_jax.parallel.sharding import batch_sharding, make_mesh, param_shardings
from drift_jax.rollout import engine as engine_lib
from drift_jax.rollout import pool_size
from drift_jax.rollout.interface import EngineOptions
from drift_jax.rollout.sampling import SamplingParams, generate
from drift_jax.rollout.slots import Slots
from drift_jax.training.policy_gradient import pg_loss_fn
from drift_jax.training.step import eval_sums_fn, make_train_step
from drift_jax.training.train_state import (
    abstract_train_state,
    make_optimizer,
    split_trainable,
)


@dataclasses.dataclass(frozen=True)
class Fit:
    """One training's shapes and optimizer: ``rows`` per update of ``length`` tokens in
    ``micro_batches``; ``optimizer``: ``make_optimizer``'s keyword arguments."""

    rows: int
    length: int
    micro_batches: int
    optimizer: dict
    loss_normalize: str = "batch"
    loss_chunk_size: int | str | None = "auto"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One sampling stage: ``slots`` rows decoded together, ``max_new_tokens`` per turn,
    ``turns`` turns; ``context`` the typical context of a decode step (the roofline's
    pages read) and ``longest_context`` a turn-5 context (the static sampler's prompt
    bucket); ``options`` the engine's settings (``num_slots`` is ``slots``)."""

    slots: int
    max_new_tokens: int
    temperature: float
    turns: int
    context: int
    longest_context: int
    options: EngineOptions
    stop_ids: tuple[int, ...] = (0,)

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                              stop_ids=self.stop_ids)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run's programs depend on. ``model``: the training config (dtype, storage
    dtype, remat); sampling runs a copy stored in the compute dtype. ``mesh``: (data,
    fsdp, tensor) of the training, None: FSDP over all of a target's devices (a run
    over several hosts needs a mesh over every device). ``rl``: the online-RL update
    (None: not run), ``kl_coef`` / ``rl_normalize`` its loss."""

    model: ModelConfig
    train: Fit
    rollout: Sampling
    eval: Sampling
    rl: Fit | None = None
    lora: LoRAConfig | None = None
    mesh: tuple[int, int, int] | None = None
    kl_coef: float = 1e-3
    rl_normalize: str = "token"
    held_out_micro_batches: int | None = None  # None: the train step's
    max_len: int | None = None  # the engine's context limit (None: the model's)
    seed: int = 0


PROGRAMS = ("train_step", "held_out_loss", "rl_update", "prefill", "decode", "eval_prefill", "eval_decode",
            "static_rollout", "static_eval")


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _replicated(tree, mesh):
    """Abstract leaves of ``tree`` (arrays or shapes), whole on every device of ``mesh``."""
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=rep), tree)


def context_mesh(mesh):
    """The context mesh a run trains under (``experiments/fitting.py``): the training mesh,
    none for one device."""
    return mesh if mesh.size > 1 else None


def train_mesh(settings: Settings, target: Target):
    devs = devices(target.name)
    if settings.mesh is None or math.prod(settings.mesh) != len(devs):
        return make_mesh(fsdp=len(devs), devices=devs)
    return make_mesh(*settings.mesh, devices=devs)


def one_device_mesh(target: Target):
    return make_mesh(devices=devices(target.name)[:1])


def _make_model(cfg: ModelConfig, lora: LoRAConfig | None, seed: int):
    def make():
        model = Transformer(cfg, rngs=nnx.Rngs(seed))
        return apply_lora(model, lora, nnx.Rngs(seed)) if lora else model
    return make


def _train_state(settings: Settings, target: Target, fit: Fit, steps: int = 100):
    """(graphdef, abstract train state on the training mesh, tx, schedule, mesh)."""
    cfg = kernels(target, settings.model)
    make = _make_model(cfg, settings.lora, settings.seed)
    tx, schedule = make_optimizer(total_steps=steps, **fit.optimizer)
    state = abstract_train_state(make, tx, settings.seed)
    graphdef = nnx.graphdef(nnx.eval_shape(make))
    mesh = train_mesh(settings, target)
    params_sharding = param_shardings(state.params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Moments take their parameter's sharding, counters are replicated (as
    # training.sharded_state places a state).
    opt_sharding = optax.tree_map_params(tx, lambda _, s: s, state.opt_state, split_trainable(params_sharding)[0],
                                         transform_non_params=lambda _: replicated)
    abstract = state.replace(params=_abstract(state.params, params_sharding),
                             opt_state=_abstract(state.opt_state, opt_sharding),
                             step=_replicated(state.step, mesh), rng=_replicated(state.rng, mesh))
    return graphdef, abstract, tx, schedule, mesh


def _batch(rows: int, length: int, mesh, row_scalars=("weights",)):
    """An abstract batch of ``collate``'s layout, rows over data x fsdp."""
    host = collate([], length, 0, batch_size=rows, row_scalars={k: [] for k in row_scalars})
    sharding = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in host.items()}


def _shapes(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def train_program(settings: Settings, target: Target) -> Program:
    fit = settings.train
    graphdef, state, tx, schedule, mesh = _train_state(settings, target, fit)
    step = make_train_step(graphdef, tx, fit.micro_batches, fit.loss_normalize, schedule,
                           loss_chunk_size=fit.loss_chunk_size)
    return Program("train_step", step, (state, _batch(fit.rows, fit.length, mesh)),
                   mesh=context_mesh(mesh), shapes=_shapes(
                       rows=fit.rows, length=fit.length, micro_batches=fit.micro_batches, mesh=dict(mesh.shape),
                       lora=bool(settings.lora), attention=kernels(target, settings.model).attention_impl))


def held_out_program(settings: Settings, target: Target) -> Program:
    fit = settings.train
    graphdef, state, _, _, mesh = _train_state(settings, target, fit)
    m = settings.held_out_micro_batches or fit.micro_batches
    sums = eval_sums_fn(graphdef, m, fit.loss_normalize, fit.loss_chunk_size)
    return Program("held_out_loss", sums, (state.params, _batch(fit.rows, fit.length, mesh)),
                   mesh=context_mesh(mesh),
                   shapes=_shapes(rows=fit.rows, length=fit.length, micro_batches=m, mesh=dict(mesh.shape)))


def rl_program(settings: Settings, target: Target) -> Program:
    fit = settings.rl
    graphdef, state, tx, schedule, mesh = _train_state(settings, target, fit)
    step = make_train_step(graphdef, tx, fit.micro_batches, schedule_fn=schedule,
                           loss_fn=pg_loss_fn(settings.kl_coef, settings.rl_normalize, fit.loss_chunk_size))
    batch = _batch(fit.rows, fit.length, mesh, row_scalars=("advantages",))
    # The frozen reference is stored in the compute dtype (``load_policy(for_sampling=True)``).
    compute = jnp.dtype(settings.model.dtype)
    reference = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                       sharding=x.sharding), state.params)
    return Program("rl_update", step, (state, batch, reference),
                   mesh=context_mesh(mesh),
                   shapes=_shapes(rows=fit.rows, length=fit.length, micro_batches=fit.micro_batches,
                                  mesh=dict(mesh.shape)))


def sampling_model(settings: Settings, target: Target):
    """The abstract sampling policy: the model stored in its compute dtype (as
    ``load_policy(for_sampling=True)`` loads it; LoRA merged), the target's kernels."""
    cfg = kernels(target, settings.model.replace(param_dtype=settings.model.dtype))
    return nnx.eval_shape(_make_model(cfg, None, settings.seed))


def pool_pages(model, sampling: Sampling, target: Target, max_len: int | None) -> int:
    """The page pool a run on ``target`` gets (``rollout.pool_size``, as ``pool_size.engine_pages``
    sizes it on the device): ``options.num_pages`` if set, else what
    ``options.memory_fraction`` of the target's budget leaves after the weights and the
    engine's workspace, at most every slot's ``slot_tokens``."""
    options = sampling.options
    if options.num_pages is not None:
        return options.num_pages
    cfg = model.cfg
    slot_tokens = min(max_len or cfg.max_position_embeddings, options.slot_tokens or 1 << 30)
    weights = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.state(model)))
    workspace = pool_size.workspace_bytes(cfg, sampling.slots, options.prefill_chunk,
                                          paged.CHUNK_PAGES * options.page_size)
    return pool_size.pool_pages(num_slots=sampling.slots, slot_tokens=slot_tokens, page_size=options.page_size,
                                page_bytes=paged.page_bytes(cfg, options.page_size),
                                device_bytes=target.memory_budget_bytes, resident_bytes=weights, workspace=workspace,
                                memory_fraction=options.memory_fraction)


def abstract_engine(model, sampling: Sampling, target: Target, max_len: int | None):
    """(engine, abstract page pool): ``engine.Engine`` built as a run on ``target`` builds it
    (its slot count, page pool and block-table width), its pool traced, never allocated."""
    options = dataclasses.replace(sampling.options, num_slots=sampling.slots,
                                  num_pages=pool_pages(model, sampling, target, max_len)).for_platform(target.platform)
    built = []

    def build():
        built.append(engine_lib.Engine(model, sampling.params, seed=0, options=options, max_len=max_len))
        return built[0].cache

    cache = jax.eval_shape(build)
    return built[0], cache


def _paged_model(cfg: ModelConfig, rows: int, queries: int, context: int, logits: bool) -> dict:
    """FLOPs and bytes of one call of the engine's model over ``rows`` rows of ``queries``
    new tokens at ``context`` tokens of cache (the weights in ``cfg.param_dtype``):
    matmuls 2 x parameters per token (the LM head's only with ``logits``), attention
    4 N H per query and key; the weights read once, the keys and values of ``context``
    tokens read and the new ones written per row and layer."""
    d, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    head = v * d
    body = cfg.num_params - head * (1 if cfg.tie_word_embeddings else 2)
    weight = jnp.dtype(cfg.param_dtype).itemsize
    kv = 2 * layers * k * h * jnp.dtype(cfg.dtype).itemsize
    tokens = rows * queries
    flops = 2.0 * tokens * (body + (head if logits else 0)) + 4.0 * tokens * n * h * context * layers
    read = weight * (body + (head if logits else 0)) + rows * context * kv + tokens * kv
    return {"flops": flops, "bytes": float(read)}


def _paged_hints(cfg: ModelConfig, engine, rows: int, queries: int, context: int, program: str):
    """(loop_trips, kernel_hints) of an engine program at ``context`` tokens: the XLA
    path's page-chunk loop runs once per chunk of pages up to the context after the
    first (``paged._attend_chunked`` starts from chunk 0, outside the loop); the Pallas
    kernel does ``4 N H`` FLOPs per query and key, and reads the keys and values of
    ``context`` tokens per row."""
    chunks = max(1, math.ceil(context / (paged.CHUNK_PAGES * engine.page_size)))
    trips = {rf"^jit\({program}\)/(.+/)?while/body/(.+/)?while$|^jit\(_prefill\)/(.+/)?while$": chunks - 1}
    k, n, h = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
    itemsize = jnp.dtype(cfg.dtype).itemsize
    flops = 4.0 * rows * queries * n * context * h
    moved = 2.0 * rows * context * k * h * itemsize + 2.0 * rows * queries * n * h * itemsize
    return trips, {r"paged_attention|pallas": ("paged_attention_kernel", flops, moved)}


def engine_programs(settings: Settings, target: Target, stage: str) -> list[Program]:
    """The engine's prefill and decode programs of ``stage`` ("rollout" or "eval"):
    decode at its largest row bucket (every slot), prefill at its largest call."""
    sampling = settings.rollout if stage == "rollout" else settings.eval
    mesh = one_device_mesh(target)
    model = sampling_model(settings, target)
    engine, cache = abstract_engine(model, sampling, target, settings.max_len)
    state, cache = _replicated(engine.state, mesh), _replicated(cache, mesh)
    r = engine.num_slots
    # The largest prefill call: prefill_chunk tokens in rows of prefill_piece.
    width = engine.options.prefill_piece
    n = max(1, engine.options.prefill_chunk // width)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    prefix = "" if stage == "rollout" else "eval_"
    pages = engine.caches.pool.num_pages
    pool = {"slots": r, "pages": pages, "page_size": engine.page_size, "table_width": engine.table_width,
            "tokens_per_slot": (pages - 1) * engine.page_size // r, "context": sampling.context}
    trips, hints = _paged_hints(model.cfg, engine, n, width, sampling.context, "_prefill")
    rows = _replicated(np.zeros(n, np.int32), mesh)
    prefill = Program(f"{prefix}prefill", engine_lib._prefill,
                      (engine.graph, state, cache, _replicated(np.zeros((n, width), np.int32), mesh), rows, rows,
                       _replicated(np.zeros((n, engine.table_width), np.int32), mesh)),
                      loop_trips=trips, kernel_hints=hints,
                      analytic=_paged_model(model.cfg, n, width, sampling.context, logits=False),
                      note=f"one call of {n} rows of {width} tokens at {sampling.context} tokens of context",
                      shapes={**pool, "rows": n, "tokens": width, "impl": model.cfg.attention_impl})
    n_steps = engine.steps_per_visit
    inputs = _replicated(Slots(r, engine.table_width).decode_inputs(np.arange(r)), mesh)
    trips, hints = _paged_hints(model.cfg, engine, r, 1, sampling.context, "_decode")
    trips[r"^jit\(_decode\)/while$"] = n_steps
    step = _paged_model(model.cfg, r, 1, sampling.context, logits=True)
    decode = Program(f"{prefix}decode", engine_lib._decode, (engine.graph, state, cache, *inputs, scalar),
                     kwargs={"params": sampling.params, "n_steps": n_steps}, loop_trips=trips, kernel_hints=hints,
                     analytic={k: n_steps * v for k, v in step.items()},
                     note=f"one visit of {n_steps} steps, every slot live at {sampling.context} tokens of context",
                     shapes={**pool, "steps": n_steps, "impl": model.cfg.paged_attention_impl})
    return [prefill, decode]


def static_program(settings: Settings, target: Target, stage: str, rows: int | None = None) -> Program:
    """``sampling.generate`` of one chunk of ``rows`` rows (default: the stage's
    ``slots``, the sampler's ``batch_size``) at a turn-5 context (the static sampler
    re-prefills whole dialogues, so the last turn is its largest program), its decode
    loop run to the turn's budget."""
    sampling = settings.rollout if stage == "rollout" else settings.eval
    mesh = one_device_mesh(target)
    graphdef, state = nnx.split(sampling_model(settings, target))
    b, p = rows or sampling.slots, bucket_length(sampling.longest_context)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    prompt_bp, valid_bp, budget_b = np.zeros((b, p), np.int32), np.zeros((b, p), bool), np.zeros(b, np.int32)
    args = (graphdef, *_replicated((state, prompt_bp, valid_bp, keys, budget_b), mesh))
    return Program(f"static_{stage}", generate, args, kwargs={"params": sampling.params},
                   loop_trips={r"^jit\(generate\)/while$": sampling.max_new_tokens},
                   shapes={"rows": b, "prompt": p, "new_tokens": sampling.max_new_tokens})


def program_names(settings: Settings) -> list[str]:
    """The programs of a run of ``settings``: ``eval_prefill`` only where the
    evaluation's engine differs from the rollout's (slots or pool), ``rl_update`` only
    with ``settings.rl``."""
    names = list(PROGRAMS)
    if settings.rl is None:
        names.remove("rl_update")
    same = (settings.eval.slots, settings.eval.options) == (settings.rollout.slots, settings.rollout.options)
    if same:
        names.remove("eval_prefill")
    return names


def build(name: str, settings: Settings, target: Target) -> Program:
    """Program ``name`` (``PROGRAMS``) of ``settings`` for ``target``."""
    if name == "train_step":
        return train_program(settings, target)
    if name == "held_out_loss":
        return held_out_program(settings, target)
    if name == "rl_update":
        return rl_program(settings, target)
    if name in ("prefill", "decode", "eval_prefill", "eval_decode"):
        stage = "eval" if name.startswith("eval_") else "rollout"
        return {p.name: p for p in engine_programs(settings, target, stage)}[name]
    if name in ("static_rollout", "static_eval"):
        return static_program(settings, target, name.split("_")[1])
    raise ValueError(f"unknown program {name!r}; known: {PROGRAMS}")
