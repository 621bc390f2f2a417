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


# -- the release's reading (src/benchmark.py), kept apart: it differs on nested, empty and
# unbalanced boxes ------------------------------------------------------------------------

_RELEASE_BOXED_RE = re.compile(r"\\(boxed|fbox)\s*\{", re.DOTALL)


def release_boxed(text: str) -> str | None:
    """The release's ``extract_boxed_answer``: the content of the LAST ``\\boxed{`` /
    ``\\fbox{`` opening (so ``\\boxed{\\boxed{2}}`` gives ``2``), its braces counted with
    no regard for escapes (``\\{`` opens a group); None when that last box never closes,
    whatever boxes came before. The content is returned as is, possibly empty."""
    matches = list(_RELEASE_BOXED_RE.finditer(text or ""))
    if not matches:
        return None
    start = text.find("{", matches[-1].end() - 1)
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def release_gold(answer, solution) -> str:
    """The release's ``extract_ground_truth_answer`` (MATH-500, Hendrycks MATH, GSM8K):

    1. a truthy ``answer`` field: its text after the last ``####`` (stripped), or the
       content of its last box when that is non-empty;
    2. else the solution's last box when non-empty (``\\boxed{ }`` gives "");
    3. else the solution's last ``#### x`` line, else its last non-empty line (so a
       solution with no box, an empty box or an unclosed last box gives that line);
    4. else "" (a question no answer matches)."""
    if answer:
        text = str(answer).strip()
        parsed = text.split("####")[-1].strip() if "####" in text else text
        if parsed:
            boxed = release_boxed(parsed)
            return boxed.strip() if boxed else parsed
    solution = solution or ""
    boxed = release_boxed(solution)
    if boxed:
        return boxed.strip()
    if solution:
        hashes = re.findall(r"####\s*(.+)", solution)
        if hashes:
            return hashes[-1].strip()
        lines = [line.strip() for line in solution.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""
