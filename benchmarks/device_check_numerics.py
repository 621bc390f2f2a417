"""The device check's numerical comparisons: each GPU-only path against its reference at
real shapes (``benchmarks/device_check.py`` runs them and writes the JSON).

Every comparison draws fresh random inputs in the compute dtype (bf16 on a device) and
compares each implementation with a float32 reference computed from the SAME inputs
(upcast, matmuls at HIGHEST precision), so that only the implementations' own rounding
and any bug show. Errors (``compare``): max_abs = max |out - ref|; max_rel = max_abs /
max |ref|; rel_l2 = ||out - ref|| / ||ref||, the worst over rows (sequences) for
attention outputs, so that a bug in one short row is not averaged away. NaN or inf
never passes.

Tolerances (``verdict``), with u = 2^-8 the unit roundoff of bf16 (8 significand bits):
  - an XLA path in bf16 (the paged gather path, XLA attention's forward): rel_l2 <= 4u
    against float32. Its inputs are the reference's own, and between them and the
    output it rounds to bf16 at most three times, each a relative error <= u, with
    float32 accumulation in between: q / sqrt(H) (the paged path scales in bf16), the
    probabilities before the PV product, the output. 4u bounds these with room for the
    softmax's amplification of the first. A missed page, a wrong mask or a wrong scale
    gives errors of order 0.1 to 1 in the rows they touch.
  - a GPU kernel (Pallas paged decode, cuDNN attention, a train update through cuDNN):
    rel_l2 <= 2 x the XLA path's own error on the same inputs + u. It must be as close
    to float32 as the path it replaces, up to a factor 2 for another order of
    accumulation and one more bf16 rounding (the Pallas kernel's input is q / sqrt(H)
    rounded to bf16: ``paged._pallas_decode``). Backward passes and train updates have
    no fixed bound of their own (cancellations in dS = P (dP - rowsum) make the XLA
    path's error input-dependent), only this relative one.
"""

from __future__ import annotations

import contextlib
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from drift_jax.models import ModelConfig, Transformer, paged, preset
from drift_jax.models.attention import attend as model_attention
from drift_jax.models.attention import attention_mask
from drift_jax.training.step import make_train_step
from drift_jax.training.train_state import init_train_state

U_BF16 = 2.0 ** -8
XLA_BF16_TOL = 4 * U_BF16
KERNEL_FACTOR = 2.0
# A small Qwen2.5-shaped model for --smoke: GQA, q/k/v bias, tied embeddings.
TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=1_000_000.0, qkv_bias=True, tie_word_embeddings=True)


def model_config(name: str, layers: int | None = None) -> ModelConfig:
    """A preset's widths (``"tiny"``: ``TINY``) with ``layers`` layers (None: all)."""
    cfg = TINY if name == "tiny" else preset(name)
    return cfg.replace(num_layers=layers or cfg.num_layers)


_INITS: dict = {}


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A ``Transformer`` of ``cfg`` with random weights. The float32 init of each (widths,
    layers, seed) is made once and shared by the items that ask for it (an init is a
    compile), then copied in ``cfg.param_dtype``: a copy, since a train step donates it."""
    widths = cfg.replace(dtype=jnp.float32, param_dtype=jnp.float32, remat="none", attention_impl=None)
    if (widths, seed) not in _INITS:
        _INITS[widths, seed] = nnx.state(nnx.jit(lambda: Transformer(widths, rngs=nnx.Rngs(seed)))(), nnx.Param)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))))
    copy = jax.jit(lambda p: jax.tree.map(lambda x: jnp.array(x, cfg.param_dtype, copy=True), p))
    return nnx.merge(graphdef, copy(_INITS[widths, seed]))


def compare(out, ref, rows: bool = True) -> dict:
    """Errors of ``out`` against ``ref`` (see the module docstring); ``rows``: rel_l2 is
    the worst over the leading axis, else over the whole array."""
    out = np.asarray(jax.device_get(out), np.float64)
    ref = np.asarray(jax.device_get(ref), np.float64)
    diff = out - ref
    finite = bool(np.all(np.isfinite(out)))
    max_abs = float(np.max(np.abs(diff))) if finite else math.inf
    scale = float(np.max(np.abs(ref))) or 1.0
    axes = tuple(range(1, ref.ndim)) if rows and ref.ndim > 1 else None
    num = np.sqrt(np.sum(diff ** 2, axis=axes))
    den = np.maximum(np.sqrt(np.sum(ref ** 2, axis=axes)), 1e-30)
    rel_l2 = float(np.max(num / den)) if finite else math.inf
    return {"max_abs": max_abs, "max_rel": max_abs / scale, "rel_l2": rel_l2, "finite": finite}


def worst(*errors: dict) -> dict:
    """The elementwise worst of several ``compare`` results (e.g. dq, dk, dv)."""
    return {k: (all(e[k] for e in errors) if k == "finite" else max(e[k] for e in errors)) for k in errors[0]}


def kernel_tolerance(reference_error: float) -> float:
    """A kernel's bound from the XLA path's error on the same inputs (module docstring)."""
    return KERNEL_FACTOR * reference_error + U_BF16


def verdict(errors: dict, reference_error: float | None) -> dict:
    """Tolerance and pass of one candidate: ``reference_error`` None means the candidate
    is an XLA path (fixed bound 4u), else the XLA path's rel_l2 that it must match."""
    if reference_error is None:
        tol, rule = XLA_BF16_TOL, "rel_l2 <= 4u (u = 2^-8, bf16 unit roundoff)"
    else:
        tol, rule = kernel_tolerance(reference_error), "rel_l2 <= 2 x the XLA path's rel_l2 + u"
    return {"tolerance": {"rel_l2": tol, "rule": rule}, "passed": bool(errors["finite"] and errors["rel_l2"] <= tol)}


def timed(fn, *args, repeats: int = 3) -> tuple:
    """(fn(*args), first call's seconds (compile included), median seconds of ``repeats`` more)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, first, float(np.median(times))


def _label(kernel: str) -> str:
    """A kernel's name among the candidates; "xla" as a kernel is a CPU stand-in."""
    return "xla_stand_in" if kernel == "xla" else kernel


def _result(candidates: dict, shapes: dict, timings: dict, **extra) -> dict:
    """A check's record: passed when every candidate passed."""
    return {"passed": all(c["passed"] for c in candidates.values()), "shapes": shapes,
            "candidates": candidates, "timings_s": timings, **extra}


# -- the Pallas GPU paged decode kernel ----------------------------------------------------

def paged_decode(*, heads: int, kv_heads: int, head_dim: int, rows: int, max_context: int, page_size: int,
                 kernel: str, dtype: str = "bfloat16", seed: int = 0) -> dict:
    """One decode step of ``rows`` rows (contexts of 1..max_context tokens, the edge cases
    1, page, page + 1 and max_context among them) over a shuffled page pool: the kernel
    (``paged.attend`` with impl ``kernel``: "pallas", or "pallas_interpret" on a CPU, over
    the heads-major pool the engine gives it) and the XLA gather path (over the same
    pool, as the engine's prefill reads it on a GPU, and over the token-major pool of
    the other backends) against dense float32 attention over the gathered pages."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    pages_per_row = -(-max_context // page_size)
    width = -(-pages_per_row // paged.CHUNK_PAGES) * paged.CHUNK_PAGES  # the engine's table width
    num_pages = rows * pages_per_row + 1  # page 0 is the trash page
    lengths = rng.integers(1, max_context + 1, rows)
    lengths[:4] = [1, page_size, page_size + 1, max_context][:rows]
    tables = np.zeros((rows, width), np.int32)
    tables[:, :pages_per_row] = rng.permutation(np.arange(1, num_pages)).reshape(rows, pages_per_row)
    # Drawn on the device: a 3B-shaped pool is 2 x 2^28 values.
    keys = jax.random.split(jax.random.key(seed), 3)
    k_kpsh, v_kpsh = (jax.random.normal(key, (kv_heads, num_pages, page_size, head_dim), dt) for key in keys[:2])
    q = jax.random.normal(keys[2], (rows, 1, heads, head_dim), dt)
    refs = paged.PageRefs(jnp.asarray(tables), None, None, jnp.asarray(lengths - 1, jnp.int32)[:, None])

    def token_major(pages_kpsh):  # [K, P, S, H] -> [P, S, K * H]
        return jnp.transpose(pages_kpsh, (1, 2, 0, 3)).reshape(num_pages, page_size, kv_heads * head_dim)

    def attend(impl):
        return jax.jit(lambda q, k, v, r: paged.attend(q, k, v, r, impl))

    @jax.jit
    def dense_f32(q, k_pages, v_pages, tables_bm):
        k = paged.gather(k_pages.astype(jnp.float32), tables_bm, head_dim)
        v = paged.gather(v_pages.astype(jnp.float32), tables_bm, head_dim)
        mask = jnp.arange(k.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
        return jax.nn.dot_product_attention(q.astype(jnp.float32), k, v, mask=mask[:, None, None, :],
                                            implementation="xla")

    with jax.default_matmul_precision("highest"):
        ref = jax.block_until_ready(dense_f32(q, k_kpsh, v_kpsh, refs.block_tables_bm))
    runs = {"xla_gather_heads_major": ("xla", k_kpsh, v_kpsh),
            "xla_gather_token_major": ("xla", token_major(k_kpsh), token_major(v_kpsh)),
            _label(kernel): (kernel, k_kpsh, v_kpsh)}
    outs, timings = {}, {}
    for name, (impl, k_pages, v_pages) in runs.items():
        outs[name], timings[f"{name}_first"], timings[name] = timed(attend(impl), q, k_pages, v_pages, refs)
    errors = {name: compare(out, ref) for name, out in outs.items()}
    candidates = {name: {**err, **verdict(err, None)} for name, err in errors.items() if name.startswith("xla")}
    ker = _label(kernel)
    candidates[ker] = {**errors[ker], **verdict(errors[ker], errors["xla_gather_heads_major"]["rel_l2"]),
                       "against_xla_gather": compare(outs[ker], outs["xla_gather_heads_major"])}
    shapes = {"rows": rows, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "page_size": page_size,
              "max_context": max_context, "table_pages": width, "pool_pages": num_pages, "dtype": dtype}
    return _result(candidates, shapes, timings, reference="dense float32 attention over the gathered pages")


# -- cuDNN attention, forward and backward -------------------------------------------------

def _attention_inputs(seed, batch, seq, heads, kv_heads, head_dim, dt):
    """q, k, v, a cotangent and the model's ``[B, T, T]`` mask: causal, row 0 full, the
    others right-padded (as train batches are)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, g = (jax.random.normal(key, (batch, seq, n, head_dim), dt)
                  for key, n in zip(keys, (heads, kv_heads, kv_heads, heads)))
    lengths = np.full(batch, seq)
    lengths[1:] = np.random.default_rng(seed).integers(seq // 2, seq, batch - 1)
    valid_bt = jnp.asarray(np.arange(seq)[None, :] < lengths[:, None])
    return q, k, v, g, attention_mask(valid_bt)


def attention(*, heads: int, kv_heads: int, head_dim: int, batch: int, seq: int, kernel: str,
              dtype: str = "bfloat16", seed: int = 0) -> dict:
    """The model's attention (``drift_jax.models.attention.attend``: its mask, and
    is_causal) with ``kernel`` ("cudnn") and "xla", forward and backward (dq, dk, dv of
    a random cotangent), against float32 XLA attention."""
    q, k, v, g, mask = _attention_inputs(seed, batch, seq, heads, kv_heads, head_dim, jnp.dtype(dtype))

    def forward(impl):
        return jax.jit(lambda q, k, v: model_attention(q, k, v, impl, mask_bts=mask, is_causal=True))

    def backward(impl):
        fwd = forward(impl)
        return jax.jit(lambda q, k, v, g: jax.vjp(fwd, q, k, v)[1](g))

    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    with jax.default_matmul_precision("highest"):
        ref_out = jax.block_until_ready(forward("xla")(*f32[:3]))
        ref_grads = jax.block_until_ready(backward("xla")(*f32))
    candidates, timings, errors = {}, {}, {}
    for label, impl in (("xla", "xla"), (_label(kernel), kernel)):
        if label != "xla" and impl == "xla":  # a stand-in computes what "xla" did: not twice
            errors[label] = errors["xla"]
            continue
        out, timings[f"{label}_forward_first"], timings[f"{label}_forward"] = timed(forward(impl), q, k, v)
        grads, timings[f"{label}_backward_first"], timings[f"{label}_backward"] = timed(backward(impl), q, k, v, g)
        errors[label] = {"forward": compare(out, ref_out),
                         "backward": worst(*(compare(a, b) for a, b in zip(grads, ref_grads)))}
    for label in errors:
        for pass_ in ("forward", "backward"):
            err = errors[label][pass_]
            if label == "xla":
                # XLA's backward has no fixed bound (module docstring): it sets the kernel's.
                judged = verdict(err, None) if pass_ == "forward" else {"passed": err["finite"], "tolerance": {
                    "rule": "finite (the reference for the kernel's backward)"}}
            else:
                judged = verdict(err, errors["xla"][pass_]["rel_l2"])
            candidates[f"{label}_{pass_}"] = {**err, **judged}
    shapes = {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype}
    return _result(candidates, shapes, timings, reference="float32 XLA attention (forward; dq, dk, dv)")


# -- one train update through cuDNN --------------------------------------------------------

def train_update(*, model: str, layers: int, batch: int, seq: int, kernel: str, seed: int = 0) -> dict:
    """One update of the trainer's step (``make_train_step``, weighted SFT, remat "full",
    bf16 compute over float32 weights) at ``model``'s widths with ``layers`` layers, with
    ``attention_impl=kernel`` and with "xla", against the same step in float32.

    A batch row holds ``seq`` tokens (the model sees seq - 1, odd for the usual seq: the
    case cuDNN refuses unpadded). The optimizer is SGD at learning rate 1, so that the
    parameter change is minus the gradient: AdamW's first step is lr x sign(g), which
    flips on near-zero gradients under any change of rounding and would hide the
    comparison. Compared: the loss, and the parameter change over all parameters."""
    base = model_config(model, layers).replace(param_dtype=jnp.float32, remat="full")
    rng = np.random.default_rng(seed)
    lengths = np.full(batch, seq)
    lengths[1:] = rng.integers(seq // 2, seq, batch - 1)
    valid = np.arange(seq)[None, :] < lengths[:, None]
    data = {"tokens": jnp.asarray(rng.integers(0, base.vocab_size, (batch, seq)), jnp.int32),
            "valid": jnp.asarray(valid),
            "loss_mask": jnp.asarray(valid & (np.arange(seq)[None, :] >= seq // 4)),  # a prompt quarter unsupervised
            "weights": jnp.asarray(rng.uniform(0.1, 2.0, batch), jnp.float32)}
    params = nnx.state(random_model(base, seed), nnx.Param)
    tx = optax.sgd(1.0)
    label = _label(kernel)
    variants = {"float32": base.replace(dtype=jnp.float32, attention_impl="xla"),
                "xla": base.replace(dtype=jnp.bfloat16, attention_impl="xla"),
                label: base.replace(dtype=jnp.bfloat16, attention_impl=kernel)}
    # One program each (not an op per leaf): a fresh state (the step donates its
    # state), the parameter change, and its squared distances to the float32 one.
    fresh = jax.jit(lambda p: init_train_state(jax.tree.map(jnp.copy, p), tx, seed))
    change = jax.jit(lambda new, old: jax.tree.map(jnp.subtract, new, old))
    sq_dist = jax.jit(lambda a, b: (sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
                                    sum(jnp.sum(y ** 2) for y in jax.tree.leaves(b))))
    results, timings = {}, {}
    for name, cfg in variants.items():
        if name == label and kernel == "xla":  # a stand-in computes what "xla" did: not twice
            results[name] = results["xla"]
            continue
        graphdef = nnx.graphdef(nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(seed))))
        step = make_train_step(graphdef, tx)
        state = fresh(params)
        t0 = time.perf_counter()
        exact = jax.default_matmul_precision("highest") if name == "float32" else contextlib.nullcontext()
        with exact:
            new, metrics = step(state, data)
        loss = float(metrics["loss"])  # blocks
        timings[f"{name}_first"] = time.perf_counter() - t0
        results[name] = (loss, change(new.params, params))
        del new
    ref_loss, ref_delta = results["float32"]

    def errors(name):
        loss, delta = results[name]
        num, den = (float(x) for x in sq_dist(delta, ref_delta))
        finite = math.isfinite(loss) and math.isfinite(num)
        return {"loss": loss, "loss_rel": abs(loss - ref_loss) / abs(ref_loss),
                "rel_l2": math.sqrt(num / den) if finite else math.inf, "finite": finite}

    xla_err, ker_err = errors("xla"), errors(label)
    tol, loss_tol = kernel_tolerance(xla_err["rel_l2"]), kernel_tolerance(xla_err["loss_rel"])
    ker_pass = ker_err["finite"] and ker_err["rel_l2"] <= tol and ker_err["loss_rel"] <= loss_tol
    rule = "rel_l2 (parameter change) and loss_rel each <= 2 x the XLA step's + u"
    candidates = {"xla": {**xla_err, "passed": xla_err["finite"],
                          "tolerance": {"rule": "finite (the reference for the kernel's step)"}},
                  label: {**ker_err, "passed": bool(ker_pass),
                           "tolerance": {"rel_l2": tol, "loss_rel": loss_tol, "rule": rule}}}
    shapes = {"model": model, "layers": layers, "batch": batch, "seq": seq, "params": base.num_params,
              "dtype": "bfloat16 over float32 weights", "remat": "full"}
    return _result(candidates, shapes, timings, reference=f"the same step in float32 (loss {ref_loss:.6f})")
