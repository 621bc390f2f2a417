"""Chat rendering and SFT masks, on two tokenizers: the toy word-level one and a
byte-level BPE with a ChatML (Qwen-style) template.

The properties: the loss mask covers exactly the supervised assistant messages' tokens
plus their end-of-turn token; left truncation keeps that span intact; the generation
prompt's tokens are a prefix of the full dialogue's tokens and the supervised span starts
right after them.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drift_jax.data.chat import encode_dialogue, encode_prompt, end_of_turn_id, render
from drift_jax.envs.base import FEEDBACK
from drift_jax.envs.secret import build_tokenizer

from helpers import WORDS, chatml_tokenizer

_TOKENIZERS = {}


def get_tokenizer(name):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = build_tokenizer() if name == "toy" else chatml_tokenizer()
    return _TOKENIZERS[name]


@pytest.fixture(params=["toy", "chatml"])
def tokenizer(request):
    return get_tokenizer(request.param)


def dialogue(contents, system=True):
    """user, assistant, user(feedback), assistant, ... ending on an assistant message."""
    messages = [{"role": "system", "content": "guess the secret"}] if system else []
    messages.append({"role": "user", "content": "guess the secret puzzle 7 42"})
    for i, content in enumerate(contents):
        if i:
            messages.append({"role": "user", "content": FEEDBACK})
        messages.append({"role": "assistant", "content": content})
    return messages


DIALOGUE = dialogue(["maybe B", "<answer>A</answer>", "the secret <answer>C</answer>"])
_content = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)
_dialogues = st.builds(dialogue, st.lists(_content, min_size=1, max_size=4), st.booleans())
_settings = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def runs(mask):
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def assert_span_is_message(tokenizer, tokens, content):
    """A supervised span is the message's own tokens followed by one end-of-turn token."""
    eot = end_of_turn_id(tokenizer)
    assert tokens[-1] == eot and eot not in tokens[:-1]
    assert list(tokens) == tokenizer(content, add_special_tokens=False)["input_ids"] + [eot]
    assert tokenizer.decode(tokens, skip_special_tokens=True).strip() == content


@_settings
@given(messages=_dialogues)
def test_supervise_last_masks_exactly_the_last_answer_and_its_end_of_turn(tokenizer, messages):
    ex = encode_dialogue(tokenizer, messages, supervise="last")
    (span,) = runs(ex.loss_mask)
    assert_span_is_message(tokenizer, ex.tokens[span[0] : span[1]], messages[-1]["content"])
    assert span[1] == len(ex.tokens) or tokenizer.decode(ex.tokens[span[1]:]).strip() == ""
    assert not ex.truncated and ex.weight == 1.0
    # The tokens are the full rendering's.
    assert list(ex.tokens) == tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]


@_settings
@given(messages=_dialogues)
def test_supervise_all_masks_every_answer(tokenizer, messages):
    ex = encode_dialogue(tokenizer, messages, supervise="all")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    spans = runs(ex.loss_mask)
    assert len(spans) == len(answers)
    for (start, end), content in zip(spans, answers):
        assert_span_is_message(tokenizer, ex.tokens[start:end], content)
    last = encode_dialogue(tokenizer, messages, supervise="last")
    assert np.array_equal(ex.loss_mask & last.loss_mask, last.loss_mask)


def test_decoded_mask_reads_as_the_answer(tokenizer):
    """The same check spelled out on a fixed dialogue, decoding with special tokens."""
    ex = encode_dialogue(tokenizer, DIALOGUE, supervise="last")
    text = tokenizer.decode(ex.tokens[ex.loss_mask])
    assert text.replace(" ", "") == "thesecret<answer>C</answer><|im_end|>"
    every = encode_dialogue(tokenizer, DIALOGUE, supervise="all")
    assert tokenizer.decode(every.tokens[every.loss_mask]).replace(" ", "") == (
        "maybeB<|im_end|><answer>A</answer><|im_end|>thesecret<answer>C</answer><|im_end|>")


@_settings
@given(messages=_dialogues, data=st.data())
def test_left_truncation_keeps_the_supervised_span(tokenizer, messages, data):
    supervise = data.draw(st.sampled_from(["last", "all"]))
    full = encode_dialogue(tokenizer, messages, supervise=supervise)
    needed = len(full.tokens) - int(np.argmax(full.loss_mask))
    max_len = data.draw(st.integers(needed, len(full.tokens) + 3))
    ex = encode_dialogue(tokenizer, messages, supervise=supervise, max_len=max_len)
    assert ex.truncated == (max_len < len(full.tokens))
    assert len(ex.tokens) == min(max_len, len(full.tokens))
    np.testing.assert_array_equal(ex.tokens, full.tokens[-len(ex.tokens):])
    np.testing.assert_array_equal(ex.loss_mask, full.loss_mask[-len(ex.tokens):])
    assert ex.loss_mask.sum() == full.loss_mask.sum()  # nothing supervised was cut
    if max_len > 1 and needed > 1:
        with pytest.raises(ValueError, match=f"supervised answer needs {needed} tokens > max_len {needed - 1}"):
            encode_dialogue(tokenizer, messages, supervise=supervise, max_len=needed - 1)


def test_max_len_smaller_than_the_answer_raises(tokenizer):
    answer_len = int(encode_dialogue(tokenizer, DIALOGUE).loss_mask.sum())
    with pytest.raises(ValueError, match="supervised answer needs"):
        encode_dialogue(tokenizer, DIALOGUE, max_len=answer_len - 1)


def test_dialogue_without_assistant_message_raises(tokenizer):
    with pytest.raises(ValueError, match="no assistant message"):
        encode_dialogue(tokenizer, DIALOGUE[:2])


def test_unknown_supervise_mode_raises(tokenizer):
    with pytest.raises(ValueError, match="supervise must be"):
        encode_dialogue(tokenizer, DIALOGUE, supervise="first")


@_settings
@given(messages=_dialogues)
def test_encode_prompt_is_the_prefix_before_each_answer(tokenizer, messages):
    full = encode_dialogue(tokenizer, messages, supervise="all")
    starts = [start for start, _ in runs(full.loss_mask)]
    answer_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i, start in zip(answer_idx, starts):
        prompt = encode_prompt(tokenizer, messages[:i])
        assert len(prompt) == start  # the answer starts right after the generation prompt
        assert list(full.tokens[:start]) == prompt


def test_end_of_turn_is_the_closing_token(tokenizer):
    eot = end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"


def test_a_prefill_ends_the_prompt_and_a_supervised_reply_starting_with_it_follows_it():
    """The release's rollouts prompt with "<think>" and store replies starting with it: the
    SFT span of such a reply starts where the prefilled prompt's text ends."""
    tokenizer = chatml_tokenizer()
    messages = [{"role": "user", "content": "guess the secret"}]
    text = render(tokenizer, messages, add_generation_prompt=True)
    assert render(tokenizer, messages, add_generation_prompt=True, prefill="<think>") == text + "<think>"
    prompt = encode_prompt(tokenizer, messages, "<think>")
    assert prompt == tokenizer(text + "<think>", add_special_tokens=False)["input_ids"]
    assert prompt != encode_prompt(tokenizer, messages)
    reply = "<think>maybe</think><answer>B</answer>"
    example = encode_dialogue(tokenizer, messages + [{"role": "assistant", "content": reply}])
    supervised = tokenizer.decode(example.tokens[example.loss_mask])
    assert supervised == reply + "<|im_end|>"
    with pytest.raises(ValueError, match="add_generation_prompt"):
        render(tokenizer, messages, prefill="<think>")
