"""drift_jax.methods: the compared methods as data. Every listed name round-trips through
``get``; ``drift_round<r>`` is DRIFT on round r's rollouts and needs drift and every
earlier round before it; the keep filters select exactly what their method trains on;
``parse`` names every bad entry."""

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_jax import methods
from drift_jax.data.records import Record
from drift_jax.methods import METHODS, Method

SETTINGS = settings(max_examples=200, deadline=None)
ROUND = re.compile(r"drift_round([2-9]|[1-9][0-9]+)")


def _record(t_star):
    return Record(prompt_id="p", turn_rewards=(0.0,) * (t_star or 1), answer_norms=(),
                  format_penalty=0.0, t_star=t_star, messages=None)


_t_star = st.none() | st.integers(1, 20)


def test_every_listed_method_round_trips_through_get():
    assert set(METHODS) == {"sft_single", "sft", "rft", "drift", "drift_all_turns", "online_rl"}
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name
        assert methods.get(name) is method
        assert method.round == 1
        assert method.trainer in ("sft", "online_rl") and method.supervise in ("last", "all")
        with pytest.raises(ValueError, match=f"{name} is not an iterative DRIFT round"):
            method.previous
    assert methods.parse(list(METHODS)) == list(METHODS.values())
    assert methods.parse([]) == []


def test_what_each_method_trains_on():
    spec = {  # name: (trainer, supervise, weighted)
        "sft_single": ("sft", "last", False), "sft": ("sft", "last", False), "rft": ("sft", "last", False),
        "drift": ("sft", "last", True), "drift_all_turns": ("sft", "all", True),
        "online_rl": ("online_rl", "last", False),
    }
    for name, (trainer, supervise, weighted) in spec.items():
        m = METHODS[name]
        assert (m.trainer, m.supervise, m.weighted) == (trainer, supervise, weighted), name


def test_a_method_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["drift"].weighted = False


@SETTINGS
@given(t_star=_t_star)
def test_keep_filters(t_star):
    record = _record(t_star)
    assert METHODS["rft"].keep(record) is (t_star is not None)
    assert METHODS["sft_single"].keep(record) is (t_star == 1)
    for name in ("sft", "drift", "drift_all_turns", "online_rl"):
        assert METHODS[name].keep(record), name


@SETTINGS
@given(r=st.integers(2, 10_000), t_star=_t_star)
def test_drift_round_r_is_drift_on_round_r_rollouts(r, t_star):
    name = f"drift_round{r}"
    m = methods.get(name)
    drift = METHODS["drift"]
    assert (m.name, m.round) == (name, r)
    assert (m.trainer, m.supervise, m.weighted) == (drift.trainer, drift.supervise, drift.weighted)
    assert m.keep(_record(t_star)) == drift.keep(_record(t_star))
    assert m.previous == ("drift" if r == 2 else f"drift_round{r - 1}")
    assert methods.get(name) == m  # the same method each time
    assert name not in METHODS  # rounds are not listed, only made
    # drift, then every round up to r, is a valid run.
    chain = ["drift"] + [f"drift_round{q}" for q in range(2, min(r, 12) + 1)]
    assert [x.name for x in methods.parse(chain)] == chain


@pytest.mark.parametrize("name", ["drift_round1", "drift_round0", "drift_round", "drift_round-2",
                                  "drift_round2x", "Drift", "drift ", "sft,drift", "", "drift_round 2"])
def test_get_rejects_other_names(name):
    with pytest.raises(ValueError, match=rf"unknown method {re.escape(repr(name))}: expected one of sft_single, "):
        methods.get(name)


def test_get_rejects_a_round_with_a_leading_zero():
    with pytest.raises(ValueError):
        methods.get("drift_round02")


_names = st.sampled_from(list(METHODS) + [f"drift_round{r}" for r in range(2, 6)]
                         + ["drift_round1", "drift_round0", "dpo", "DRIFT", ""]) | st.text(max_size=6).filter(lambda s: "," not in s)


def _expected_bad(names):
    """The spec, independently of the library: unknown names, and rounds r without drift
    and every round 2..r-1 somewhere before them."""
    bad = []
    for i, name in enumerate(names):
        match = ROUND.fullmatch(name)
        if name in METHODS:
            continue
        if not match:
            bad.append(name)
            continue
        needed = ["drift"] + [f"drift_round{q}" for q in range(2, int(match.group(1)))]
        if not all(n in names[:i] for n in needed):
            bad.append(name)
    return bad


@SETTINGS
@given(names=st.lists(_names, max_size=6))
def test_parse_accepts_valid_runs_and_names_every_bad_entry(names):
    bad = _expected_bad(names)
    if not bad:
        assert [m.name for m in methods.parse(names)] == names
        return
    with pytest.raises(ValueError) as raised:
        methods.parse(names)
    message = str(raised.value)
    assert message.startswith(f"unknown methods {bad!r}: expected some of sft_single, ")
    assert "drift_round<r>" in message


def test_parse_rejects_rounds_out_of_order_naming_them():
    with pytest.raises(ValueError, match=r"unknown methods \['drift_round2'\]"):
        methods.parse(["sft", "drift_round2", "drift"])
    with pytest.raises(ValueError, match=r"unknown methods \['drift_round3'\]"):
        methods.parse(["drift", "drift_round3"])  # round 2 missing
    with pytest.raises(ValueError, match=r"unknown methods \['dpo', 'drift_round3'\]"):
        methods.parse(["dpo", "drift", "drift_round3", "sft"])
    assert [m.name for m in methods.parse(["drift", "sft", "drift_round2", "drift_round3"])] == [
        "drift", "sft", "drift_round2", "drift_round3"]


def test_a_comma_separated_entry_is_several_methods():
    """``--config.methods=sft,drift`` reaches the config as the one-entry tuple ('sft,drift',)."""
    assert [m.name for m in methods.parse(("sft,drift,drift_round2",))] == ["sft", "drift", "drift_round2"]
    with pytest.raises(ValueError, match=r"\['dpo'\]"):
        methods.parse(("sft,dpo",))
