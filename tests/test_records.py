"""drift_jax.data.records: the one record parser, the bad-line policy, and the JSONL reader and
writer (single files, the training set of several files, crash-safe appending).

Properties: a valid record parses to its typed form and round-trips through the file
format and through ``Record``; every kind of bad field is named with ``file:line``; skip
mode accounts for every line; the writers refuse to write what the reader would refuse.
"""

import collections
import dataclasses
import json
import logging
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drift_jax.data.chat import context_check, encode_dialogue
from drift_jax.data.records import (
    ROLES,
    BadLines,
    BadRecord,
    Record,
    append_group,
    json_lines,
    parse_record,
    read_jsonl,
    read_rollouts,
    resume_point,
    summarize_skipped,
    validate_record,
    write_jsonl,
)
from drift_jax.envs.secret import build_tokenizer
from drift_jax.weights import trajectory_weights

from helpers import good_records, group_lines, write_lines

F32_MAX = float(np.finfo(np.float32).max)
_settings = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- valid records ------------------------------------------------------------------------

_turn = st.integers(1, 6)
_reward = st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-3, 3)
_message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=6)})


@st.composite
def valid_records(draw):
    """A release-format record ``parse_record`` must accept, with optional fields present
    or not and fields it does not read (gold, verifier, a stale weight) sometimes added."""
    messages = draw(st.lists(_message, max_size=4))
    at = draw(st.integers(0, len(messages)))
    messages.insert(at, {"role": "assistant", "content": draw(st.text(max_size=6))})
    record = {
        "prompt_id": draw(st.text(min_size=1, max_size=8)),
        "messages": messages,
        "turn_rewards": draw(st.dictionaries(_turn.map(lambda t: f"t{t}"), _reward, max_size=4)),
        "answer_norms": draw(st.lists(st.text(max_size=4), max_size=4)),
    }
    optional = draw(st.fixed_dictionaries({}, optional={
        "format_penalty": st.floats(-10.0, 0.0) | st.integers(-3, 0),
        "t_star": st.none() | _turn,
        "gold": st.text(max_size=3),
        "verifier": st.dictionaries(st.just("t1"), st.integers(0, 1)),
        "weight": st.floats(0.0, 5.0),
    }))
    return {**record, **optional}


def _expected(record):
    """The ``Record`` worked out independently of the parser."""
    by_turn = {int(k[1:]): float(v) for k, v in record["turn_rewards"].items()}
    return Record(
        prompt_id=record["prompt_id"],
        turn_rewards=tuple(by_turn.get(t, 0.0) for t in range(1, max(by_turn, default=0) + 1)),
        answer_norms=tuple(record["answer_norms"]),
        format_penalty=float(record.get("format_penalty", 0.0)),
        t_star=record.get("t_star"),
        messages=tuple(record["messages"]),
    )


def _as_dict(parsed: Record) -> dict:
    """A release record holding exactly what ``parsed`` holds."""
    return {"prompt_id": parsed.prompt_id, "messages": list(parsed.messages),
            "turn_rewards": {f"t{t}": r for t, r in enumerate(parsed.turn_rewards, start=1)},
            "answer_norms": list(parsed.answer_norms), "format_penalty": parsed.format_penalty,
            "t_star": parsed.t_star}


@_settings
@given(record=valid_records())
def test_a_valid_record_parses_to_its_typed_form_and_round_trips(record):
    parsed = parse_record(record)
    assert parsed == _expected(record)
    assert all(type(r) is float for r in parsed.turn_rewards) and type(parsed.format_penalty) is float
    assert parse_record(_as_dict(parsed)) == parsed  # Record -> dict -> Record
    assert parse_record(json.loads(json.dumps(record))) == parsed  # through JSON
    # Without the dialogue: the same rewards, no messages.
    without = parse_record({k: v for k, v in record.items() if k != "messages"}, messages=False)
    assert without == parse_record(record, messages=False) == dataclasses.replace(parsed, messages=None)
    validate_record(record, "again")


@_settings
@given(batch=st.lists(valid_records(), min_size=1, max_size=4))
def test_valid_records_round_trip_through_the_file(tmp_path_factory, batch):
    path = str(tmp_path_factory.mktemp("rt") / "r.jsonl")
    write_jsonl(path, batch)
    again, skipped = read_jsonl(path)
    assert again == batch and not skipped
    assert [parse_record(r) for r in again] == [parse_record(r) for r in batch]
    appended = str(tmp_path_factory.mktemp("rt") / "a.jsonl")
    append_group(appended, batch[:1])
    append_group(appended, batch[1:])
    assert read_jsonl(appended) == (batch, collections.Counter())


def test_record_is_frozen_and_turn_rewards_are_dense():
    parsed = parse_record({"prompt_id": "p", "turn_rewards": {"t3": 1, "t1": 0.5}, "answer_norms": []},
                          messages=False)
    assert parsed.turn_rewards == (0.5, 0.0, 1.0) and parsed.t_star is None and parsed.messages is None
    assert parse_record({"prompt_id": "p", "turn_rewards": {}, "answer_norms": []},
                        messages=False).turn_rewards == ()
    with pytest.raises(AttributeError):
        parsed.prompt_id = "q"


def test_float32_range_is_the_limit():
    base = {"prompt_id": "p", "turn_rewards": {"t1": F32_MAX}, "answer_norms": []}
    assert parse_record(base, messages=False).turn_rewards == (F32_MAX,)
    with pytest.raises(BadRecord, match=r"^record: field 'turn_rewards.t1' is "):
        parse_record({**base, "turn_rewards": {"t1": math.nextafter(F32_MAX, math.inf)}}, messages=False)
    with pytest.raises(BadRecord, match=r"^record: field 'turn_rewards' sums beyond float32's range"):
        parse_record({**base, "turn_rewards": {"t1": F32_MAX, "t2": -F32_MAX}}, messages=False)
    with pytest.raises(BadRecord, match=r"field 'turn_rewards' sums beyond"):
        parse_record({**base, "format_penalty": -F32_MAX}, messages=False)


# -- bad fields ---------------------------------------------------------------------------

def _drop(field):
    return lambda r: {k: v for k, v in r.items() if k != field}


def _set(**changes):
    return lambda r: {**r, **changes}


def _rewards(**extra):
    return lambda r: {**r, "turn_rewards": {**r["turn_rewards"], **extra}}


_NO_ASSISTANT = [{"role": "user", "content": "hi"}]
# name -> (corruption of a valid record, what the message says after "where: ").
FIELD_FAULTS = {
    "prompt_id missing": (_drop("prompt_id"), r"missing required field 'prompt_id'"),
    "prompt_id a number": (_set(prompt_id=7), r"field 'prompt_id' is 7, not a non-empty string"),
    "prompt_id empty": (_set(prompt_id=""), r"field 'prompt_id' is '', not a non-empty string"),
    "prompt_id null": (_set(prompt_id=None), r"field 'prompt_id' is None"),
    "turn_rewards missing": (_drop("turn_rewards"), r"missing required field 'turn_rewards'"),
    "turn_rewards a list": (_set(turn_rewards=[1.0]), r"field 'turn_rewards' must be an object"),
    "turn key with a leading zero": (_rewards(t01=1.0), r"field 'turn_rewards' has key 't01', expected 't1'"),
    "turn key t0": (_rewards(t0=1.0), r"field 'turn_rewards' has key 't0'"),
    "turn key x1": (_rewards(x1=1.0), r"field 'turn_rewards' has key 'x1'"),
    "turn key T1": (_rewards(T1=1.0), r"field 'turn_rewards' has key 'T1'"),
    "turn key with a space": (_rewards(**{"t1 ": 1.0}), r"field 'turn_rewards' has key 't1 '"),
    "turn key turn1": (_rewards(turn1=1.0), r"field 'turn_rewards' has key 'turn1'"),
    "NaN reward": (_rewards(t2=float("nan")), r"field 'turn_rewards.t2' is nan, not a finite number"),
    "infinite reward": (_rewards(t2=float("inf")), r"field 'turn_rewards.t2' is inf"),
    "negative infinite reward": (_rewards(t2=float("-inf")), r"field 'turn_rewards.t2' is -inf"),
    "string reward": (_rewards(t2="1.0"), r"field 'turn_rewards.t2' is '1.0'"),
    "bool reward": (_rewards(t2=True), r"field 'turn_rewards.t2' is True"),
    "null reward": (_rewards(t2=None), r"field 'turn_rewards.t2' is None"),
    "reward beyond float32": (_rewards(t2=1e39), r"field 'turn_rewards.t2' is 1e\+39"),
    "reward too big for a float": (_rewards(t2=10**400), r"field 'turn_rewards.t2' is 1000"),
    "rewards sum beyond float32": (_set(turn_rewards={"t1": 3e38, "t2": 3e38}),
                                   r"field 'turn_rewards' sums beyond float32's range"),
    "answer_norms missing": (_drop("answer_norms"), r"missing required field 'answer_norms'"),
    "answer_norms a string": (_set(answer_norms="a"), r"field 'answer_norms' must be a list of strings"),
    "answer not a string": (_set(answer_norms=["a", 1]), r"field 'answer_norms' must be a list of strings"),
    "positive format penalty": (_set(format_penalty=0.1), r"field 'format_penalty' is 0.1, not a finite number <= 0"),
    "NaN format penalty": (_set(format_penalty=float("nan")), r"field 'format_penalty' is nan"),
    "infinite format penalty": (_set(format_penalty=float("-inf")), r"field 'format_penalty' is -inf"),
    "null format penalty": (_set(format_penalty=None), r"field 'format_penalty' is None"),
    "bool format penalty": (_set(format_penalty=False), r"field 'format_penalty' is False"),
    "t_star zero": (_set(t_star=0), r"field 't_star' is 0, not null or a turn number >= 1"),
    "t_star negative": (_set(t_star=-1), r"field 't_star' is -1"),
    "t_star a bool": (_set(t_star=True), r"field 't_star' is True"),
    "t_star a float": (_set(t_star=1.0), r"field 't_star' is 1.0"),
    "t_star a string": (_set(t_star="1"), r"field 't_star' is '1'"),
    "messages missing": (_drop("messages"), r"missing required field 'messages'"),
    "messages a string": (_set(messages="hello"), r"field 'messages' must be a non-empty list"),
    "messages empty": (_set(messages=[]), r"field 'messages' must be a non-empty list"),
    "no assistant": (_set(messages=_NO_ASSISTANT), r"field 'messages' has no assistant message"),
    "unknown role": (_set(messages=_NO_ASSISTANT + [{"role": "tool", "content": "x"}]),
                     r"field 'messages\[1\].role' is 'tool'"),
    "no role": (_set(messages=[{"content": "x"}]), r"field 'messages\[0\].role' is None"),
    "content not a string": (_set(messages=[{"role": "assistant", "content": 3}]),
                             r"field 'messages\[0\]' needs a string 'content'"),
    "message not an object": (_set(messages=["hi"]), r"field 'messages\[0\]' needs a string 'content'"),
}


def _good():
    return good_records(1)[0]


@pytest.mark.parametrize("fault", list(FIELD_FAULTS))
def test_parse_record_names_the_bad_field(fault):
    corrupt, message = FIELD_FAULTS[fault]
    with pytest.raises(BadRecord, match=rf"^somewhere: {message}"):
        parse_record(corrupt(_good()), where="somewhere")
    assert issubclass(BadRecord, ValueError)


@pytest.mark.parametrize("fault", [f for f in FIELD_FAULTS if "messages" in FIELD_FAULTS[f][1]])
def test_messages_false_ignores_the_dialogue(fault):
    corrupt, _ = FIELD_FAULTS[fault]
    assert parse_record(corrupt(_good()), messages=False) == parse_record(_good(), messages=False)


@_settings
@given(record=valid_records(), fault=st.sampled_from(sorted(FIELD_FAULTS)), before=st.integers(0, 3),
       after=st.integers(0, 2), blanks=st.booleans())
def test_strict_read_names_file_line_and_field_of_any_fault(tmp_path_factory, record, fault, before, after,
                                                            blanks):
    corrupt, message = FIELD_FAULTS[fault]
    good = json.dumps(record)
    lines = [good] * before + ([""] if blanks else []) + [json.dumps(corrupt(record))] + [good] * after
    path = write_lines(tmp_path_factory.mktemp("fault") / "f.jsonl", lines)
    line = before + blanks + 1  # blank lines count in the numbering
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:{line}: {message}"):
        read_jsonl(path)
    kept, skipped = read_jsonl(path, on_bad_record="skip")
    assert kept == [record] * (before + after)
    assert sum(skipped.values()) == 1 and re.match(message, next(iter(skipped)))


def _with(**changes):
    return json.dumps({k: v for k, v in {**_good(), **changes}.items() if v is not _DROP})


_DROP = object()
# Whole lines, including what fails before a record is parsed.
BAD_LINES = {
    "malformed JSON": ('{"prompt_id": "x", "messages": [', r"malformed JSON"),
    "missing field": (_with(turn_rewards=_DROP), r"missing required field 'turn_rewards'"),
    "NaN reward": (_with(turn_rewards={"t1": float("nan")}), r"field 'turn_rewards.t1' is nan"),
    "not an object": ("[1, 2]", r"record is a list, not a JSON object"),
    "a string": ('"hello"', r"record is a str, not a JSON object"),
    # Lines that used to escape as ValueError, RecursionError, UnicodeDecodeError:
    "number over the digit limit": ('{"prompt_id": ' + "1" * 5000 + "}", r"unreadable JSON"),
    "deep nesting": ("[" * 100_000, r"unreadable JSON"),
    "not UTF-8": (b'{"prompt_id": "\xff\xfe"}', r"line is not UTF-8 text"),
}


def _nonblank_lines(path):
    """Lines ``read_jsonl`` must either keep or count as skipped."""
    def blank(raw):
        try:
            return not raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return False
    with open(path, "rb") as f:
        return sum(not blank(raw) for raw in f)


def test_write_then_read_round_trips(tmp_path):
    records = good_records()
    path = tmp_path / "rollouts.jsonl"
    write_jsonl(str(path), records)
    assert read_jsonl(str(path)) == (records, collections.Counter())
    assert [p.name for p in tmp_path.iterdir()] == ["rollouts.jsonl"]  # no temporary left


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_strict_read_names_file_line_and_field(tmp_path, case):
    line, message = BAD_LINES[case]
    good = json.dumps(_good())
    path = write_lines(tmp_path / "bad.jsonl", [good, "", line, good])
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:3: {message}"):
        read_jsonl(path)


def test_skip_mode_keeps_good_records_and_counts_the_rest(tmp_path):
    good = good_records(3)
    lines = [json.dumps(good[0]), BAD_LINES["NaN reward"][0], json.dumps(good[1]),
             BAD_LINES["missing field"][0], BAD_LINES["NaN reward"][0], json.dumps(good[2])]
    records, skipped = read_jsonl(write_lines(tmp_path / "mixed.jsonl", lines), on_bad_record="skip")
    assert records == good
    assert sum(skipped.values()) == 3 and len(skipped) == 2
    assert skipped["field 'turn_rewards.t1' is nan, not a finite number"] == 2
    assert skipped["missing required field 'turn_rewards'"] == 1


def test_empty_file_raises(tmp_path):
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(BadRecord, match="holds no records"):
            read_jsonl(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="on_bad_record"):
        read_jsonl(str(tmp_path / "empty.jsonl"), on_bad_record="ignore")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**400) | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_roles = st.sampled_from(["system", "user", "assistant", "tool", "", None, 3])
_fuzz_message = st.fixed_dictionaries({}, optional={"role": _roles, "content": st.text(max_size=6) | _json})
_record = st.fixed_dictionaries({}, optional={
    "prompt_id": _json | st.sampled_from(["p", "q"]), "messages": st.lists(_fuzz_message, max_size=3) | _json,
    "turn_rewards": st.dictionaries(st.sampled_from(["t1", "t2", "t01", "x"]) | st.text(max_size=3), _json,
                                    max_size=2) | _json,
    "answer_norms": st.lists(st.text(max_size=3) | _json, max_size=2) | _json,
    "format_penalty": _json, "t_star": _json,
})
# Well-formed records but for their numbers (``_record`` varies the rest): whatever the
# reader accepts must give finite weights.
_near_valid = st.fixed_dictionaries({
    "prompt_id": st.sampled_from(["p", "q"]),
    "messages": st.just([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    "turn_rewards": st.dictionaries(st.sampled_from(["t1", "t2", "t3"]),
                                    st.floats(-1e39, 1e39) | st.integers(-2, 2) | _json, max_size=3),
    "answer_norms": st.lists(st.text(max_size=3), max_size=2),
}, optional={"format_penalty": st.floats(-1e39, 1.0) | _json})
_line = st.one_of(
    _record.map(json.dumps),
    _near_valid.map(json.dumps),
    _json.map(json.dumps),
    st.text(max_size=30),
    st.binary(max_size=30),
    # A cut-off write, maybe inside a multi-byte character.
    _record.map(lambda r: json.dumps(r, ensure_ascii=False).encode()).map(lambda b: b[: len(b) // 2]),
)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(_line, min_size=1, max_size=4))
def test_fuzz_strict_read_raises_only_bad_record(tmp_path_factory, lines):
    path = write_lines(tmp_path_factory.mktemp("fuzz") / "f.jsonl", lines)
    try:
        records, skipped = read_jsonl(path)
    except BadRecord as e:
        assert str(e).startswith(path)
    else:
        assert records and not skipped
        for r in records:
            validate_record(r, "again")
        # What the reader accepts, the weights accept (no error past the reader).
        assert np.isfinite(trajectory_weights(records, gamma=0.9, beta=0.1)).all()
    # Skip mode accounts for every non-blank line: kept or counted.
    nonblank = _nonblank_lines(path)
    if nonblank:
        records, skipped = read_jsonl(path, on_bad_record="skip")
        assert len(records) + sum(skipped.values()) == nonblank


# -- the bad-line policy ------------------------------------------------------------------

def test_bad_lines_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match=r"on_bad_record must be one of \('error', 'skip'\), got 'ignore'"):
        BadLines("ignore")


def test_bad_lines_error_mode_raises_the_error_itself():
    policy = BadLines()  # "error" by default
    error = BadRecord("f.jsonl:3: field 'x' is bad")
    with pytest.raises(BadRecord) as raised:
        policy(error)
    assert raised.value is error and not policy.skipped
    with pytest.raises(BadRecord):
        policy(error, reason="any reason")


@settings(max_examples=40, deadline=None)
@given(errors=st.lists(st.tuples(st.sampled_from(["a.jsonl:1", "b.jsonl:20", "c (record 3)"]),
                                 st.sampled_from(["field 'x' is 1", "malformed JSON (Expecting ',': line 1)",
                                                  "missing required field 'y'"]),
                                 st.none() | st.sampled_from(["group too small"])), max_size=8))
def test_bad_lines_skip_mode_counts_each_line_by_reason(errors):
    policy = BadLines("skip")
    for where, message, reason in errors:
        policy(BadRecord(f"{where}: {message}"), reason=reason)
    # The reason is the message without its "where: " (a reason with ": " inside is kept whole).
    assert policy.skipped == collections.Counter(reason or message for _, message, reason in errors)
    summary = summarize_skipped(policy.skipped)
    assert summary["total"] == len(errors) and sum(summary["reasons"].values()) == len(errors)
    counts = list(summary["reasons"].values())
    assert counts == sorted(counts, reverse=True)  # most frequent first
    json.dumps(summary)


def test_bad_lines_skip_mode_logs_what_it_skips(caplog):
    policy = BadLines("skip")
    with caplog.at_level(logging.WARNING):
        policy(BadRecord("f.jsonl:7: field 't_star' is 0"))
    assert "skipping f.jsonl:7: field 't_star' is 0" in caplog.text


def test_json_lines_numbers_lines_and_one_policy_counts_over_files(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", ['{"k": 1}', "", "   ", "{bad", '[2]'])
    b = write_lines(tmp_path / "b.jsonl", [b"\xff", '"s"'])
    policy = BadLines("skip")
    assert list(json_lines(a, policy)) == [(f"{a}:1", {"k": 1}), (f"{a}:5", [2])]
    assert list(json_lines(b, policy)) == [(f"{b}:2", "s")]
    assert sum(policy.skipped.values()) == 2
    assert {r.split(" (")[0] for r in policy.skipped} == {"malformed JSON", "line is not UTF-8 text"}
    with pytest.raises(BadRecord, match=rf"^{re.escape(a)}:4: malformed JSON"):
        list(json_lines(a, BadLines("error")))


# -- the writers validate -----------------------------------------------------------------

@pytest.mark.parametrize("fault", ["NaN reward", "turn key with a leading zero", "messages missing",
                                   "positive format penalty", "t_star zero"])
def test_write_jsonl_refuses_a_bad_record_and_keeps_the_old_file(tmp_path, fault):
    corrupt, message = FIELD_FAULTS[fault]
    path = str(tmp_path / "r.jsonl")
    write_jsonl(path, good_records(2))
    before = open(path, "rb").read()
    batch = good_records(3)
    batch[2] = corrupt(batch[2])
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)} \(record 2\): {message}"):
        write_jsonl(path, batch)
    assert open(path, "rb").read() == before


def test_a_refused_write_leaves_no_temporary(tmp_path):
    with pytest.raises(BadRecord):
        write_jsonl(str(tmp_path / "r.jsonl"), [{"prompt_id": "p"}])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", ["NaN reward", "reward beyond float32", "no assistant", "prompt_id empty"])
def test_append_group_refuses_a_bad_record_and_appends_nothing_of_its_group(tmp_path, fault):
    corrupt, message = FIELD_FAULTS[fault]
    path = str(tmp_path / "r.jsonl")
    group = [{**r, "prompt_id": "q"} for r in good_records(3)]
    group[1] = corrupt(group[1])
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)} \(record 1\): {message}"):
        append_group(path, group)
    assert not (tmp_path / "r.jsonl").exists()  # nothing written, not even record 0
    append_group(path, [{**r, "prompt_id": "p"} for r in good_records(2)])
    before = open(path, "rb").read()
    with pytest.raises(BadRecord):
        append_group(path, group)
    assert open(path, "rb").read() == before
    assert resume_point(path, ["p", "q"], 2) == 1


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(_record | valid_records(), min_size=1, max_size=3))
def test_what_the_writer_writes_the_reader_reads_back(tmp_path_factory, batch):
    path = str(tmp_path_factory.mktemp("w") / "w.jsonl")
    try:
        write_jsonl(path, batch)
    except BadRecord as e:
        assert str(e).startswith(f"{path} (record ")
        with pytest.raises(BadRecord):
            for i, r in enumerate(batch):
                validate_record(r, str(i))
    else:
        assert read_jsonl(path) == (batch, collections.Counter())


# -- the training set: several files, prompt groups, the context ---------------------------

def test_read_rollouts_keeps_file_order_across_files(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", group_lines("p", 2) + group_lines("q", 3))
    b = write_lines(tmp_path / "b.jsonl", group_lines("r", 2))
    records, skipped = read_rollouts([a, b])
    assert [r["prompt_id"] for r in records] == ["p", "p", "q", "q", "q", "r", "r"] and not skipped
    with pytest.raises(ValueError, match="listed twice"):
        read_rollouts([a, b, a])


def test_same_prompt_id_in_two_files_is_an_error_or_dropped_from_the_later_file(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", group_lines("p", 2) + group_lines("q", 2))
    b = write_lines(tmp_path / "b.jsonl", group_lines("r", 2) + group_lines("q", 2))
    with pytest.raises(BadRecord, match=rf"^{re.escape(b)}:3: field 'prompt_id' 'q' is also in {re.escape(a)}:3;"):
        read_rollouts([a, b])
    records, skipped = read_rollouts([a, b], on_bad_record="skip")
    assert [r["prompt_id"] for r in records] == ["p", "p", "q", "q", "r", "r"]
    assert sum(skipped.values()) == 2


def test_prompt_group_of_one_is_an_error_or_dropped_unless_allowed(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", group_lines("p", 3) + group_lines("lone", 1) + group_lines("q", 2))
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:4: field 'prompt_id': prompt group 'lone' has 1 "):
        read_rollouts([path])
    records, skipped = read_rollouts([path], on_bad_record="skip")
    assert [r["prompt_id"] for r in records] == ["p"] * 3 + ["q"] * 2
    assert summarize_skipped(skipped) == {"total": 1, "reasons": {"prompt group smaller than 2": 1}}
    records, _ = read_rollouts([path], min_group_size=1)  # plain SFT data: kept
    assert len(records) == 6
    # A bad record that leaves its group alone drops the group too when skipping.
    bad = group_lines("r", 1) + group_lines("r", 1, turn_rewards={"t1": float("nan")})
    path = write_lines(tmp_path / "h.jsonl", group_lines("p", 2) + bad)
    records, skipped = read_rollouts([path], on_bad_record="skip")
    assert [r["prompt_id"] for r in records] == ["p", "p"] and sum(skipped.values()) == 2


def test_nothing_usable_is_an_error_in_both_modes(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for mode in ("error", "skip"):
        with pytest.raises(BadRecord, match="holds no records"):
            read_rollouts([str(empty)], on_bad_record=mode)
    bad = write_lines(tmp_path / "bad.jsonl", [BAD_LINES["NaN reward"][0], BAD_LINES["malformed JSON"][0]])
    with pytest.raises(BadRecord, match=r"no usable records \({'total': 2"):
        read_rollouts([bad], on_bad_record="skip")


def test_prompt_longer_than_context_is_truncated_but_an_answer_that_does_not_fit_is_reported(tmp_path):
    tokenizer = build_tokenizer(num_values=10)
    short = [{"role": "user", "content": "guess the secret puzzle 1"},
             {"role": "assistant", "content": "<answer>A</answer>"}]
    long_prompt = [{"role": "user", "content": "guess " * 40}, short[1]]
    long_answer = [short[0], {"role": "assistant", "content": "maybe " * 40}]
    max_len = 16
    full = encode_dialogue(tokenizer, long_prompt)
    cut = encode_dialogue(tokenizer, long_prompt, max_len=max_len)
    assert len(full.tokens) > max_len and cut.truncated and len(cut.tokens) == max_len
    # Left-truncation keeps the supervised answer whole and in place at the end.
    np.testing.assert_array_equal(cut.tokens[cut.loss_mask], full.tokens[full.loss_mask])
    np.testing.assert_array_equal(cut.tokens, full.tokens[-max_len:])

    lines = [json.dumps({**_good(), "prompt_id": pid, "messages": m})
             for pid, m in [("a", short), ("a", long_prompt), ("b", short), ("b", long_answer), ("b", short)]]
    path = write_lines(tmp_path / "ctx.jsonl", lines)
    check = context_check(tokenizer, max_len)
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:4: field 'messages': supervised answer needs \d+ tokens > max_len 16"):
        read_rollouts([path], check=check)
    records, skipped = read_rollouts([path], on_bad_record="skip", check=check)
    assert records == [json.loads(line) for i, line in enumerate(lines) if i != 3]
    assert sum(skipped.values()) == 1


# -- resume_point: what the crash-safe writer cuts back -----------------------------------

def test_a_file_of_another_run_is_not_resumed(tmp_path):
    lines = group_lines("p", 2) + group_lines("q", 1)
    path = write_lines(tmp_path / "other.jsonl", lines)
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:3: field 'prompt_id' is 'q', expected 'r'"):
        resume_point(path, ["p", "r"], 2)
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:3: .*another config"):
        resume_point(path, ["p"], 2)  # more groups than prompts
    assert (tmp_path / "other.jsonl").read_bytes().count(b"\n") == 3  # left as it was
    path = write_lines(tmp_path / "junk.jsonl", group_lines("p", 1) + ["{not json"])
    with pytest.raises(BadRecord, match=rf"^{re.escape(path)}:2: not a rollout record"):
        resume_point(path, ["p"], 2)
    assert resume_point(str(tmp_path / "missing.jsonl"), ["p"], 2) == 0


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 3), size=st.integers(1, 3), data=st.data())
def test_resume_point_cuts_any_prefix_back_to_its_last_complete_group(tmp_path_factory, groups, size, data):
    path = str(tmp_path_factory.mktemp("resume") / "r.jsonl")
    pids = [f"p{g}" for g in range(groups)]
    for pid in pids:
        append_group(path, [{**r, "prompt_id": pid} for r in good_records(size)])
    full = open(path, "rb").read()
    group_ends = [i + 1 for i, b in enumerate(full) if b == ord("\n")][size - 1::size]
    cut = data.draw(st.integers(0, len(full)))
    with open(path, "wb") as f:
        f.write(full[:cut])
    done = resume_point(path, pids, size)
    assert done == sum(end <= cut for end in group_ends)
    assert open(path, "rb").read() == full[: group_ends[done - 1] if done else 0]
