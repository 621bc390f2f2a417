"""Chat rendering with the tokenizer's own template, and SFT loss masks by token position.

The supervised span of an assistant message is found on the FULL rendered dialogue: the
characters between the rendering of everything before it (with the generation prompt)
and the rendering through it, mapped to tokens by the tokenizer's offsets and cut after
the end-of-turn token. Truncation happens afterwards, on tokens, from the left, so it can
never shift or cut the supervised answer (the reference release measured the prompt
length on a separately tokenised prompt, which goes wrong under truncation).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from drift_jax.data.batching import SFTExample


def render(tokenizer, messages, add_generation_prompt: bool = False, prefill: str = "") -> str:
    """The dialogue rendered by the tokenizer's chat template. ``prefill`` (with
    ``add_generation_prompt`` only) is appended after the generation prompt: the start of
    the assistant's reply that the model continues, as the release's ``<think>``."""
    if prefill and not add_generation_prompt:
        raise ValueError("a prefill continues the generation prompt; pass add_generation_prompt=True")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return text + prefill


def encode_prompt(tokenizer, messages, prefill: str = "") -> list[int]:
    """Token ids of a dialogue followed by the assistant generation prompt and ``prefill``
    (the text is tokenised as one string, as a prompt string is by vLLM)."""
    text = render(tokenizer, messages, add_generation_prompt=True, prefill=prefill)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn (``<|im_end|>``, ``<|eot_id|>``, ...)."""
    for name in ("<|im_end|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no end-of-turn or eos token")
    return tokenizer.eos_token_id


def encode_dialogue(tokenizer, messages, supervise: str = "last", max_len: int | None = None,
                    weight: float = 1.0) -> SFTExample:
    """Tokenise a dialogue and mark the assistant tokens to supervise.

    Args:
      messages: list of {role, content}; must contain an assistant message.
      supervise: "last" (DRIFT: the final assistant message only) or "all" (every one).
      max_len: if the dialogue is longer, drop tokens from the LEFT; raises if even the
        supervised span does not fit.
    """
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_idx:
        raise ValueError("dialogue has no assistant message to supervise")
    if supervise == "last":
        assistant_idx = assistant_idx[-1:]
    elif supervise != "all":
        raise ValueError(f"supervise must be 'last' or 'all', got {supervise!r}")

    full = render(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    tokens = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]])
    eot = end_of_turn_id(tokenizer)
    mask = np.zeros(len(tokens), bool)
    for i in assistant_idx:
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through)):
            raise ValueError(
                "the chat template does not render dialogue prefixes as prefixes; "
                "cannot locate the assistant message by position"
            )
        in_span = np.flatnonzero((starts >= len(before)) & (starts < len(through)))
        if in_span.size == 0:
            raise ValueError(f"assistant message {i} renders to no tokens")
        closing = in_span[tokens[in_span] == eot]
        last = closing[0] if closing.size else in_span[-1]
        mask[in_span[0] : last + 1] = True

    truncated = False
    if max_len is not None and len(tokens) > max_len:
        first_supervised = int(np.argmax(mask))
        if len(tokens) - first_supervised > max_len:
            raise ValueError(
                f"supervised answer needs {len(tokens) - first_supervised} tokens > max_len {max_len}"
            )
        tokens, mask, truncated = tokens[-max_len:], mask[-max_len:], True
    return SFTExample(tokens, mask, float(weight), truncated)

def context_check(tokenizer, max_len: int) -> Callable[[dict], None]:
    """A ``read_rollouts`` check: the record's last assistant message (what DRIFT
    supervises) must fit in ``max_len`` tokens; a longer prompt is left-truncated at
    training time and is fine."""
    def check(record: dict) -> None:
        try:
            encode_dialogue(tokenizer, record["messages"], supervise="last", max_len=max_len)
        except ValueError as e:
            raise ValueError(f"field 'messages': {e}") from None

    return check
