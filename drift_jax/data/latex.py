"""The answer in a LaTeX ``\\boxed{...}``: how MATH's solutions mark their final answer,
and how a model's reply may mark its own (``envs.math`` reads it as a fallback).
"""

from __future__ import annotations

import re

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _closing_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` that closes ``text[open_idx] == "{"``, or None if unbalanced.

    Escaped braces (``\\{``, ``\\}``) are LaTeX literals, not grouping, so they are skipped.
    """
    depth = 0
    i = open_idx
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level, brace-balanced ``\\boxed{...}`` (or ``\\fbox{}``).

    Nested braces are kept (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); a nested
    ``\\boxed`` stays inside its outer one; an unclosed ``\\boxed{`` is ignored. None when
    there is no complete, non-empty box.
    """
    found = None
    pos = 0
    while (match := _BOXED_RE.search(text, pos)) is not None:
        close = _closing_brace(text, match.end() - 1)
        if close is None:
            pos = match.end()
            continue
        found = text[match.end():close]
        pos = close + 1
    if found is None or not found.strip():
        return None
    return found.strip()
