"""The number check: numbers a solution's code uses that the question never gives.

A small model's most common slip on word problems is miscopying a number (809 becomes 8093, 378
becomes 678): the arithmetic is then right, the answer wrong, and a checker from the same model
usually miscopies the same way. This check is exact and costs no model call: it reads the numeric
literals of the solution's code blocks (with :mod:`ast`, so numbers inside strings and comments do
not count) and reports those that are neither in the question nor common constants.

A number is *given* by the question when it appears there as digits (``1,200``, ``3.5``, ``25%``
also gives 0.25), as a number word (``five``, ``dozen``, ``half``), or as a small integer or common
conversion factor (:data:`CONSTANTS`), which a correct solution may use without the question
saying so.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction

from duet.agents.protocol import find_code_blocks

CONSTANTS = frozenset(
    [*range(0, 13), 15, 16, 20, 24, 25, 30, 36, 48, 50, 52, 60, 100, 360, 365, 1000, 3600, 0.5, 0.25, 0.75]
)
"""Numbers any solution may use: small counts, halves and quarters, units (hours, weeks, percent...)."""

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
    "thousand": 1000, "million": 1_000_000, "dozen": 12, "score": 20, "half": 0.5, "quarter": 0.25,
    "twice": 2, "double": 2, "triple": 3, "thrice": 3, "third": 3, "fourth": 4, "fifth": 5,
}

_DIGITS = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")
_WORDS = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Ungrounded:
    """A number of the code that the question does not give, and the question's closest one."""

    value: str  # as written in the code
    closest: str | None  # the question's number most like it (digits), None when it has none


def question_numbers(question: str) -> dict[Fraction, str]:
    """The numbers the question gives, keyed by exact value, with how each is written."""
    found: dict[Fraction, str] = {}
    for match in _DIGITS.finditer(question):
        text = match.group().rstrip(",").replace(",", "")
        try:
            value = Fraction(text)
        except ValueError:
            continue
        found.setdefault(value, text)
        if question[match.end():match.end() + 1] == "%" or question[match.end():match.end() + 8] == " percent":
            found.setdefault(value / 100, text)
    for word in _WORDS.findall(question.lower()):
        if word in NUMBER_WORDS:
            found.setdefault(Fraction(NUMBER_WORDS[word]), word)
    return found


def code_numbers(code: str) -> list[tuple[Fraction, str]]:
    """The int and float literals of ``code`` (in source order), with their source text."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    lines = code.splitlines()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            text = lines[node.lineno - 1][node.col_offset:node.end_col_offset] if node.end_col_offset else ""
            found.append(((node.lineno, node.col_offset), Fraction(str(node.value)),
                          text.replace("_", "") or repr(node.value)))
    return [(value, text) for _, value, text in sorted(found, key=lambda item: item[0])]


def ungrounded_numbers(question: str, solution: str) -> list[Ungrounded]:
    """The numbers that ``solution``'s code blocks use and ``question`` does not give (first use order)."""
    given = question_numbers(question)
    allowed = set(given) | {Fraction(str(c)) for c in CONSTANTS}
    found: list[Ungrounded] = []
    seen: set[Fraction] = set()
    for block in find_code_blocks(solution):
        for value, text in code_numbers(block.code):
            if value in allowed or value in seen:
                continue
            seen.add(value)
            found.append(Ungrounded(text, _closest(text, [t for t in given.values() if t[0].isdigit()])))
    return found


def number_check_reason(ungrounded: list[Ungrounded]) -> str:
    """The one-line critique for ungrounded numbers: which, and what the question has instead."""
    parts = []
    for u in ungrounded:
        hint = f" (did you mean {u.closest}?)" if u.closest else ""
        parts.append(f"{u.value}{hint}")
    return f"the code uses {', '.join(parts)}, not a number of the problem; copy the numbers exactly."


def _closest(text: str, candidates: list[str]) -> str | None:
    """The candidate with the smallest edit distance to ``text`` (ties: the first), or None."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: _edit_distance(text, c))


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]
