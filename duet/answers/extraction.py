"""Finding the final answer in model output and in a dataset's gold field."""

from __future__ import annotations

import re

# --------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the ``{...}`` group opening at ``text[start]`` and the index after it; None if unbalanced.

    Backslash-escaped braces (``\\{``, ``\\}``) are literal characters and do not count.
    """
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in text, with balanced nested braces.

    ``\\boxed 5`` (no braces) yields the following word.  Returns None if there is no box or the last box
    is unterminated.
    """
    if not isinstance(text, str):
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    end = matches[-1].end()
    i = end
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        got = _braced(text, i)
        return None if got is None else got[0].strip()
    if i > end:  # "\boxed 5": LaTeX takes the next token
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


_GSM_RE = re.compile(r"####\s*([^\n]*)")
_PHRASE_RE = re.compile(r"(?i)\b(?:final\s+answer|the\s+answer|answer)\b\s*(?:is\b\s*:?|:|=)")


def _trim_phrase_answer(ans: str) -> str:
    """The answer part of a 'The answer is ...' sentence: up to the end of its sentence."""
    ans = ans.replace("**", "").strip()
    if ans.startswith("$") and not ans.startswith("$$"):  # $...$ math: take it whole
        close = ans.find("$", 1)
        if close > 0:
            return ans[: close + 1]
    m = re.search(r"\.(?:\s|$)", ans)  # a sentence end, not a decimal point
    if m:
        ans = ans[: m.start()]
    return ans.strip().rstrip(".").strip()


def extract_answer(text: str) -> str | None:
    """The final answer in a model response, or None if there is none.

    Order: the last ``\\boxed{}`` (an empty box counts as none); else the last GSM8K ``#### X``; else the last
    "The answer is X" / "Answer: X" / "final answer is X" phrase, cut at the end of its sentence.
    """
    if not isinstance(text, str) or not text:
        return None
    try:
        boxed = extract_boxed(text)
        if boxed:
            return boxed
        gsm = [m.group(1).strip() for m in _GSM_RE.finditer(text)]
        gsm = [g for g in gsm if g]
        if gsm:
            return gsm[-1]
        for m in reversed(list(_PHRASE_RE.finditer(text))):
            line_end = text.find("\n", m.end())
            ans = _trim_phrase_answer(text[m.end() : None if line_end < 0 else line_end])
            if ans:
                return ans
    except Exception:  # pragma: no cover - defensive: extraction must never raise
        return None
    return None


def gold_answer(text: str) -> str:
    """Normalise a dataset's gold field to the bare answer.

    GSM8K solution text -> the part after the last ``####``; a MATH solution with a ``\\boxed{}`` -> the box
    content; otherwise the text stripped.
    """
    if text is None:
        return ""
    text = str(text)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    if _BOX_RE.search(text):
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed
    return text.strip()
