"""The continuous engine against the static sampler and the full forward: same tokens for
the same keys over 5-turn episodes with K samples, mixed prompt lengths and rows that
stop at different times (and the static sampler behind the same ``Sampler`` interface
gives them too); prefix reuse across turns gives the full prefill's logits; paged
attention equals dense attention (gather path and the Pallas kernel, interpreted on
CPU); eviction under a small page pool changes nothing; compiles stay bounded; work
figures merge over runs.

The multi-turn driver is synthetic: turn t+1's context is turn t's context + reply + a
feedback of random tokens, and each (episode, turn) has its own budget, so rows stop at
different times although a random model never samples a stop token.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from drift_jax.models import Transformer, paged
from drift_jax.rollout import engine as engine_lib
from drift_jax.rollout import pool_size
from drift_jax.rollout.engine import Engine
from drift_jax.rollout.episodes import episode_keys, prompt_hash
from drift_jax.rollout.interface import EngineOptions, Request, merge_work, split_invariant
from drift_jax.rollout.sampling import SamplingParams, generate_batched
from drift_jax.rollout.static import StaticSampler

TURNS, K, N_PROMPTS, MAX_NEW = 5, 3, 4, 8


@pytest.fixture
def model(tiny_cfg):
    return Transformer(tiny_cfg, rngs=nnx.Rngs(0))


def _workload(vocab, seed=0, n_prompts=N_PROMPTS):
    """Prompts of mixed lengths, per-(episode, turn) budgets and feedback tokens."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, vocab, size=n).tolist() for n in rng.integers(3, 40, size=n_prompts)]
    budgets = rng.integers(1, MAX_NEW + 1, size=(n_prompts * K, TURNS + 1))
    feedback = rng.integers(1, vocab, size=(n_prompts * K, TURNS + 1, 5)).tolist()
    ends = rng.integers(2, TURNS + 1, size=n_prompts * K)  # the turn an episode stops after
    return prompts, budgets, feedback, ends


def _rewrite(reply):
    """The release's stored reply, in miniature: another first token, the last dropped."""
    return [reply[0] % 7 + 1 if reply[0] % 7 + 1 != reply[0] else reply[0] + 1] + reply[1:-1]


def play_static(model, params, workload, seed=0, rewrite=list):
    """Turn by turn with ``generate_batched`` on the full contexts (the reference); the
    next context holds ``rewrite(reply)``."""
    prompts, budgets, feedback, ends = workload
    contexts = [list(prompts[e // K]) for e in range(len(prompts) * K)]
    replies = [[] for _ in contexts]
    for turn in range(1, TURNS + 1):
        live = [e for e in range(len(contexts)) if turn <= ends[e]]
        if not live:
            break
        keys = episode_keys(seed, [f"p{e // K}" for e in live], [e % K for e in live], turn)
        out = generate_batched(model, [contexts[e] for e in live], keys, params, batch_size=8,
                               max_new=[int(budgets[e, turn]) for e in live])
        for e, (reply, _) in zip(live, out):
            replies[e].append(reply)
            contexts[e] = contexts[e] + rewrite(reply) + feedback[e][turn]
    return replies


def play_engine(model, params, workload, seed=0, sampler=None, rewrite=list, **options):
    """The workload through a ``Sampler``'s requests: the engine with ``options``, or
    ``sampler``; the next context holds ``rewrite(reply)``. Returns (replies per episode
    and turn, the work figures)."""
    prompts, budgets, feedback, ends = workload
    replies = [[] for _ in range(len(prompts) * K)]

    def request(e, turn, tokens, share=None):
        return Request(e, tokens, (turn, prompt_hash(f"p{e // K}"), e % K), int(budgets[e, turn]),
                       share=share, share_count=K)

    def source():
        for p in range(len(prompts)):
            yield [request(p * K + j, 1, list(prompts[p]), share=p) for j in range(K)]

    def on_finish(req, reply, _logps):
        e, turn = req.episode, req.key_ids[0]
        replies[e].append(list(reply))
        if turn < ends[e]:
            return [request(e, turn + 1, list(req.tokens) + rewrite(list(reply)) + feedback[e][turn])]
        return []

    sampler = sampler or Engine(model, params, seed=seed, options=EngineOptions(**options), max_len=512)
    stats = sampler.run(source(), on_finish)
    return replies, stats


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_gives_the_static_samplers_tokens(model, temperature):
    params = SamplingParams(temperature=temperature, max_new_tokens=MAX_NEW)
    workload = _workload(model.cfg.vocab_size)
    static = play_static(model, params, workload)
    ours, stats = play_engine(model, params, workload, num_slots=4, page_size=8, steps_per_visit=3)
    same = sum(a == b for a, b in zip(static, ours))
    # fp32 logits agree to rounding; a differing token would need a near-tie (greedy) or
    # a uniform draw within ~1e-6 of a CDF boundary (sampled): we require all of them.
    assert same == len(static), f"{same}/{len(static)} trajectories identical"
    assert stats["kind"] == "continuous"
    assert stats["useful_tokens"] == sum(len(r) for rs in static for r in rs)
    later = sum(v for t, v in stats["prefill_tokens_by_turn"].items() if t > 1)
    prompts_later = sum(v for t, v in stats["prompt_tokens_by_turn"].items() if t > 1)
    assert later < prompts_later / 3  # turns 2-5 prefill only what the cache lacks


def test_packing_prefill_into_pieces_changes_no_token(model):
    """Prefill calls of 3-token rows, 8 rows a call at most (a request's pieces spread
    over rows and calls, rows of several requests in one call) give the static
    sampler's tokens under rewritten replies; turns 2-5 then prefill exactly the tokens
    past where the cached context + reply and the next context diverge."""
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW)
    workload = _workload(model.cfg.vocab_size)
    static = play_static(model, params, workload, rewrite=_rewrite)
    ours, stats = play_engine(model, params, workload, rewrite=_rewrite, num_slots=4, page_size=8,
                              prefill_piece=3, prefill_chunk=24)
    assert ours == static
    later = sum(v for t, v in stats["prefill_tokens_by_turn"].items() if t > 1)
    assert later == sum(stats["new_tokens_by_turn"].values()) > 0
    assert 1 <= stats["prefill_padding_ratio"] < 2


@hypothesis.given(n=st.integers(0, 2000), big=st.integers(1, 300))
def test_prefill_calls_carry_every_piece_in_three_shapes_with_little_padding(n, big):
    calls = engine_lib._prefill_calls(n, big)
    mid, small = max(1, big // 8), max(1, big // 64)
    assert set(calls) <= {big, mid, small}
    assert n <= sum(calls) <= n + mid // 2 + small
    assert calls == sorted(calls, reverse=True)


def test_the_static_sampler_serves_the_same_requests(model):
    """Behind the ``Sampler`` interface, the static sampler plays the request workload
    (per-request budgets, follow-ups) as the hand-written turn loop does, in chunks of
    whole groups: its tokens and work figures are play_static's."""
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW)
    workload = _workload(model.cfg.vocab_size)
    static = play_static(model, params, workload)
    ours, stats = play_engine(model, params, workload, sampler=StaticSampler(model, params, seed=0, batch_size=8))
    assert ours == static
    assert stats["kind"] == "static" and stats["useful_tokens"] == sum(len(r) for rs in static for r in rs)
    assert stats["requests"] == sum(len(rs) for rs in static)
    assert stats["prefill_tokens"] == stats["prompt_tokens"] == sum(stats["prompt_tokens_by_turn"].values())
    assert 0 < stats["slot_utilization"] == stats["useful_tokens"] / stats["slot_steps"] < 1


def test_a_pool_sized_from_device_memory_below_the_slots_need_changes_no_token(model, monkeypatch):
    """A device whose memory leaves room for 20 pages (19 usable; one request needs <=
    15, four slots up to 60, the cap ``slot_tokens`` sets): the engine sizes its pool to
    that, evicts waiting episodes' caches, and samples the tokens of a roomy pool."""
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW)
    workload = _workload(model.cfg.vocab_size)  # the workload above: its programs are compiled
    roomy, _ = play_engine(model, params, workload, num_slots=4, page_size=8)
    options = EngineOptions(num_slots=4, page_size=8, slot_tokens=15 * 8)
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    workspace = pool_size.workspace_bytes(model.cfg, 4, options.prefill_chunk, paged.CHUNK_PAGES * 8)
    device = (weights + workspace + 20.5 * paged.page_bytes(model.cfg, 8)) / options.memory_fraction
    monkeypatch.setattr(pool_size, "device_memory", lambda device_=None: (int(device), 0))
    eng = Engine(model, params, seed=0, options=options, max_len=512)
    assert eng.caches.pool.num_pages == 20
    tight, stats = play_engine(model, params, workload, sampler=eng)
    assert stats["evictions"] > 0
    assert tight == roomy


def test_prefix_reuse_gives_the_full_prefills_logits(model):
    """Prefill 13 tokens, then 8 more on top of the cached pages, then run the last one
    as a request's first decode step does: its logits equal the uncached forward's over
    all 22 (fp32, atol 1e-5)."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, model.cfg.vocab_size, size=22).tolist()
    eng = Engine(model, SamplingParams(max_new_tokens=4), seed=0, options=EngineOptions(num_slots=2, page_size=4),
                 max_len=64)
    pages = eng.caches.pool.allocate(6)
    eng._run_prefill([(pages, tokens[:13], 0)])
    eng._run_prefill([(pages, tokens[:21], 13)])
    tables_1m = np.zeros((1, eng.table_width), np.int32)
    tables_1m[0, :len(pages)] = pages
    hidden_11d, _ = model.paged_hidden(jnp.asarray([[tokens[21]]]), eng.cache, jnp.asarray(tables_1m),
                                       jnp.asarray([[21]]), jnp.ones((1, 1), bool))
    full = model(jnp.asarray([tokens]))[0, -1]
    np.testing.assert_allclose(np.asarray(model.logits(hidden_11d[:, 0])[0]), np.asarray(full), atol=1e-5)


def _bf16_exact(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def _random_pages(rng, k, num_pages, page, h, heads_major):
    """Random key or value pages in the layout asked for, and the same values in the
    other one: ``[K, P, page, H]`` heads-major, ``[P, page, K * H]`` token-major."""
    pages_kpsh = rng.normal(size=(k, num_pages, page, h))
    if heads_major:
        return jnp.asarray(pages_kpsh, jnp.float32)
    return jnp.asarray(np.transpose(pages_kpsh, (1, 2, 0, 3)).reshape(num_pages, page, k * h), jnp.float32)


@pytest.mark.parametrize("impl,chunk_pages,heads_major", [("xla", 1, False), ("xla", 3, False), ("xla", 8, False),
                                                          ("xla", 3, True), ("pallas_interpret", 8, True),
                                                          ("pallas_tpu_interpret", 8, True)])
def test_paged_attention_equals_dense_attention(impl, chunk_pages, heads_major):
    """Decode rows of mixed lengths: the chunked loop (a chunk of 1 or 3 pages: several
    trips, a ragged last chunk, trips stopped at the longest row; either pool layout)
    and the Pallas GPU and TPU kernels give dense attention over the gathered pages.
    Inputs are bf16-exact: the TPU interpreter multiplies float32 at the TPU's default
    precision (one bf16 pass), which is exact on them."""
    rng = np.random.default_rng(0)
    b, n, k, h, page, m, num_pages = 3, 4, 2, 16, 4, 8, 30
    lengths = np.array([1, 7, 16])
    tables = np.stack([rng.permutation(np.arange(1, num_pages))[:m] for _ in range(b)]).astype(np.int32)
    k_pages = _bf16_exact(_random_pages(rng, k, num_pages, page, h, heads_major))
    v_pages = _bf16_exact(_random_pages(rng, k, num_pages, page, h, heads_major))
    q = _bf16_exact(jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.float32))
    refs = paged.PageRefs(jnp.asarray(tables), None, None, jnp.asarray(lengths - 1)[:, None])
    out = paged.attend(q, k_pages, v_pages, refs, impl, chunk_pages=chunk_pages)
    dense_k = paged.gather(k_pages, jnp.asarray(tables), h)
    dense_v = paged.gather(v_pages, jnp.asarray(tables), h)
    mask = np.arange(m * page)[None, :] < lengths[:, None]
    want = jax.nn.dot_product_attention(q, dense_k, dense_v, mask=jnp.asarray(mask)[:, None, None, :])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


def test_the_tpu_kernel_in_row_groups_equals_dense_attention(monkeypatch):
    """Block tables too large for one call's SMEM go through the kernel in row groups
    (here one row a call)."""
    monkeypatch.setattr(paged, "TPU_TABLE_BYTES", 4 * 8)
    test_paged_attention_equals_dense_attention("pallas_tpu_interpret", 8, True)


def test_auto_takes_the_tpu_kernel_where_it_lowers(monkeypatch):
    """On a TPU, decode steps take the Pallas TPU kernel for a head dim of 128 lanes or
    more (Qwen2.5-3B, Llama 3); Qwen2.5-0.5B's 64 and multi-token calls stay on XLA."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert paged.attention_backend(1, "auto", 128) == "pallas_tpu"
    assert paged.attention_backend(1, "auto", 64) == "xla"
    assert paged.attention_backend(16, "auto", 128) == "xla"
    assert paged.attention_backend(1, "pallas_tpu_interpret", 64) == "pallas_tpu_interpret"
    with pytest.raises(ValueError, match="expected one of"):
        paged.attention_backend(1, "mosaic")


def test_both_pool_layouts_hold_the_same_keys():
    """A write then a gather gives the same ``[B, M * page, K, H]`` in either layout,
    and the written keys sit at their positions."""
    rng = np.random.default_rng(2)
    b, t, k, h, page, m, num_pages = 2, 3, 2, 8, 4, 3, 10
    tables = jnp.asarray([[3, 5, 7], [2, 4, 6]], jnp.int32)
    positions = jnp.asarray([[0, 1, 2], [5, 6, 7]])
    refs = paged.page_refs(tables, positions, jnp.ones((b, t), bool), page)
    new = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
    got = [paged.gather(paged.write(jnp.zeros(shape, jnp.float32), new, refs), tables, h)
           for shape in ((k, num_pages, page, h), (num_pages, page, k * h))]
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(got[1]))
    np.testing.assert_array_equal(np.asarray(got[1])[np.arange(b)[:, None], np.asarray(positions)], np.asarray(new))


@pytest.mark.parametrize("chunk_pages", [1, 3, 8])
def test_chunked_prefill_attention_is_causal_dense_attention(chunk_pages):
    """Several new queries per row at positions start.. (a prefill on top of cached
    pages): each sees positions 0..its own, as dense causal attention does."""
    rng = np.random.default_rng(1)
    b, t, n, k, h, page, m, num_pages = 2, 5, 4, 2, 8, 4, 6, 20
    start = np.array([0, 13])
    tables = np.stack([rng.permutation(np.arange(1, num_pages))[:m] for _ in range(b)]).astype(np.int32)
    k_pages = _random_pages(rng, k, num_pages, page, h, heads_major=False)
    v_pages = _random_pages(rng, k, num_pages, page, h, heads_major=False)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    positions = jnp.asarray(start[:, None] + np.arange(t))
    out = paged.attend(q, k_pages, v_pages, paged.PageRefs(jnp.asarray(tables), None, None, positions), "xla",
                       chunk_pages=chunk_pages)
    dense_k = paged.gather(k_pages, jnp.asarray(tables), h)
    dense_v = paged.gather(v_pages, jnp.asarray(tables), h)
    mask = np.arange(m * page)[None, None, :] <= np.asarray(positions)[:, :, None]
    want = jax.nn.dot_product_attention(q, dense_k, dense_v, mask=jnp.asarray(mask)[:, None])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


def test_compiles_stay_bounded_as_work_grows(model):
    """Doubling the prompts (same length range) adds no program: shapes are bucketed."""
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW)
    play_engine(model, params, _workload(model.cfg.vocab_size, seed=5), num_slots=4, page_size=8)
    before = engine_lib._prefill._cache_size() + engine_lib._decode._cache_size()
    _, stats = play_engine(model, params, _workload(model.cfg.vocab_size, seed=5, n_prompts=2 * N_PROMPTS),
                           num_slots=4, page_size=8)
    after = engine_lib._prefill._cache_size() + engine_lib._decode._cache_size()
    assert stats["requests"] > 2 * N_PROMPTS * K
    assert after - before <= 4, (before, after)


def test_a_pool_too_small_for_one_request_is_an_error(model):
    eng = Engine(model, SamplingParams(max_new_tokens=8), seed=0,
                 options=EngineOptions(num_slots=2, page_size=4, num_pages=3), max_len=64)
    with pytest.raises(RuntimeError, match="too small"):
        eng.run([[Request(0, list(range(1, 20)), (1, 0, 0), 8)]], lambda *a: [])


def test_work_figures_merge_over_runs_and_keep_the_split_invariant_ones():
    a = {"kind": "continuous", "num_slots": 4, "useful_tokens": 6, "slot_steps": 8, "slot_utilization": 0.75,
         "requests": 2, "prompt_tokens": 9, "prompt_tokens_by_turn": {1: 5, 2: 4}}
    b = {"kind": "continuous", "num_slots": 4, "useful_tokens": 2, "slot_steps": 8, "slot_utilization": 0.25,
         "requests": 1, "prompt_tokens": 3, "prompt_tokens_by_turn": {"1": 3}}  # a JSON round trip's keys
    merged = merge_work(a, b)
    assert merged == {"kind": "continuous", "num_slots": 4, "useful_tokens": 8, "slot_steps": 16,
                      "slot_utilization": 0.5, "requests": 3, "prompt_tokens": 12,
                      "prompt_tokens_by_turn": {1: 8, 2: 4}}
    assert merge_work({}, a) == a and merge_work(a, None) == a
    assert split_invariant(merged) == {"kind": "continuous", "requests": 3, "useful_tokens": 8,
                                       "prompt_tokens": 12, "prompt_tokens_by_turn": {1: 8, 2: 4}}
    with pytest.raises(ValueError, match="do not merge"):
        merge_work(a, {**b, "kind": "static"})


def test_engine_options_are_checked_once():
    with pytest.raises(ValueError, match="expected one of"):
        EngineOptions(kind="paged")
    for bad in ({"num_slots": 0}, {"page_size": 0}, {"refill_after": 0}, {"prefill_chunk": 2}, {"prefill_piece": 0}):
        with pytest.raises(ValueError, match=">= 1"):
            EngineOptions(**bad)
    options = EngineOptions(num_slots=256)
    assert (options.for_platform("cpu").steps_per_visit, options.for_platform("cpu").refill_after) == (8, 1)
    assert (options.for_platform("gpu").steps_per_visit, options.for_platform("tpu").refill_after) == (32, 16)
    set_here = EngineOptions(num_slots=256, steps_per_visit=5, refill_after=3).for_platform("gpu")
    assert (set_here.steps_per_visit, set_here.refill_after) == (5, 3)


def test_a_context_beyond_max_len_is_an_error(model):
    eng = Engine(model, SamplingParams(max_new_tokens=8), seed=0, options=EngineOptions(num_slots=2), max_len=16)
    with pytest.raises(ValueError, match="max_len 16"):
        eng.run([[Request(0, list(range(1, 12)), (1, 0, 0), 8)]], lambda *a: [])
