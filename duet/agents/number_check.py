"""The number check: numbers a solution's code gets wrong in ways that need no model to see.

A small model's most common slips on word problems are in copying numbers: 809 becomes 8093, 378
becomes 678, or one number is written twice (``532 - 532`` for "750 seats, 532 people"). The
arithmetic is then right and the answer wrong, and a checker built from the same model usually
slips the same way. This check is exact and costs no model call. It reads the numeric literals of
the solution's code blocks (with :mod:`ast`, so numbers inside strings and comments do not count)
and finds:

* *ungrounded* numbers: neither in the problem nor common constants;
* *reused* numbers: ``a - a`` or ``a / a`` (always 0 or 1) where the problem gives ``a`` only once, or a
  given number used more times than the problem gives it (``29 * 29``);
* when neither is found, *unused* numbers: numbers the problem writes in digits, or as cardinal words from
  two to ninety-nine (``eleven``, ``forty-three``), that no code block uses (a percentage counts as used in
  any of its forms). The message gives a word's value in digits, which a small solver can copy where it
  misreads the word. On the dev set, most solutions that left a number
  unused were wrong (the rest skipped a distractor, such as carrots in a question about
  watermelons); asking about them cut the answers the critic agreed to but were wrong from 62 to 39,
  and the dialogue fixed 4 and broke none.

A number is *given* by the problem when it appears there as digits (``1,200``, ``3.5``; ``5%``
also gives 0.05, 1.05 and 0.95), as a number word (``five``, ``dozen``, ``half``), or is a small integer or common
conversion factor (:data:`CONSTANTS`), which a correct solution may use without the problem saying
so.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
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

_UNITS = ["two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
          "nineteen"]
# a cardinal from two to ninety-nine: an amount a solution must use (not "one", "half", "third", "twice")
_CARDINAL = re.compile(rf"\b(?:(?P<tens>{'|'.join(_TENS)})(?:[- ](?P<unit>one|{'|'.join(_UNITS)}))?"
                       rf"|(?P<word>{'|'.join(_UNITS + _TEENS)}))\b")
_DIGITS = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")
_WORDS = re.compile(r"[a-z]+")
_ORDINAL = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b")


@dataclass(frozen=True)
class Finding:
    """One thing the number check found: ``key`` identifies it (a number is questioned once per
    dialogue), ``message`` says it in words for the solver."""

    key: str
    message: str


def question_mentions(question: str) -> list[tuple[Fraction, str]]:
    """Every number the problem mentions, in order, with how it is written (``25%`` also gives 0.25)."""
    found: list[tuple[Fraction, str]] = []
    for match in _DIGITS.finditer(question):
        text = match.group().rstrip(",").replace(",", "")
        try:
            value = Fraction(text)
        except ValueError:
            continue
        found.append((value, text))
        if question[match.end():match.end() + 1] == "%" or question[match.end():match.end() + 8] == " percent":
            found += [(value / 100, text), (1 + value / 100, text), (1 - value / 100, text)]  # 1.05 ** years
    found += [(Fraction(NUMBER_WORDS[w]), w) for w in _WORDS.findall(question.lower()) if w in NUMBER_WORDS]
    found += [(Fraction(value), text) for value, text in cardinal_words(question) if value % 10]  # forty-three
    return found


def cardinal_words(question: str) -> list[tuple[int, str]]:
    """The cardinals from two to ninety-nine the problem writes as words (``forty-three`` -> 43), in order."""
    found = []
    for m in _CARDINAL.finditer(question.lower()):
        if m.group("tens"):
            value = 10 * (_TENS.index(m.group("tens")) + 2) + (
                NUMBER_WORDS[m.group("unit")] if m.group("unit") else 0)
        else:
            value = NUMBER_WORDS[m.group("word")]
        found.append((value, m.group()))
    return found


def question_numbers(question: str) -> dict[Fraction, str]:
    """The numbers the problem gives, keyed by exact value, with how each is first written."""
    found: dict[Fraction, str] = {}
    for value, text in question_mentions(question):
        found.setdefault(value, text)
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


def check_numbers(question: str, solution: str) -> list[Finding]:
    """What the number check finds in ``solution``'s code blocks for ``question`` (first use order): ungrounded
    and reused numbers, or, when there are none, unused ones."""
    return ungrounded_numbers(question, solution) + reused_numbers(question, solution) or unused_numbers(
        question, solution)


def unused_numbers(question: str, solution: str) -> list[Finding]:
    """Numbers the problem writes in digits or as cardinal words that no code block of ``solution`` uses (none
    without code)."""
    blocks = find_code_blocks(solution)
    used = {value for block in blocks for value, _ in code_numbers(block.code)}
    forms: dict[str, set[Fraction]] = {}  # "25" -> {25, 0.25, 1.25, 0.75} for "25%"
    ordinals = set(_ORDINAL.findall(question))  # "the 3rd day" names a day, it is not an amount
    for value, text in question_mentions(question if blocks else ""):
        if (text[0].isdigit() or text[0] == ".") and text not in ordinals:  # digits, not a word or an ordinal
            forms.setdefault(text, set()).add(value)
    found = [Finding(f"unused {text}", f"the code never uses {text}, which the problem gives")
             for text, values in forms.items() if not values & used]
    words = {text: value for value, text in cardinal_words(question if blocks else "")}
    return found + [Finding(f"unused {text}", f"the code never uses {text} ({value}), which the problem gives")
                    for text, value in words.items() if Fraction(value) not in used]


def ungrounded_numbers(question: str, solution: str) -> list[Finding]:
    """Numbers the code uses that the problem does not give, each with the problem's closest number."""
    given = question_numbers(question)
    allowed = set(given) | {Fraction(str(c)) for c in CONSTANTS}
    written = [t for t in given.values() if t[0].isdigit()]
    found: list[Finding] = []
    seen: set[Fraction] = set()
    for block in find_code_blocks(solution):
        for value, text in code_numbers(block.code):
            if value in allowed or value in seen:
                continue
            seen.add(value)
            closest = _closest(text, written)
            hint = f" (did you mean {closest}?)" if closest else ""
            found.append(Finding(text, f"the code uses {text}{hint}, not a number of the problem"))
    return found


def reused_numbers(question: str, solution: str) -> list[Finding]:
    """Numbers the code uses more often than the problem gives them: ``a - a`` or ``a / a`` (always 0 or 1)
    where the problem gives ``a`` only once, and any given number written more times in one code block than
    the problem writes it (``29 * 29`` for "2 students at each of 29 tables", ``11 * (6 + 11)`` for "6 pop and 5
    country albums of 11 songs"): the slip of a solver that copies one number into another's place. On the
    embedded model's own solutions a reused number marks a wrong answer in nearly every case (a square's side
    times itself is the rare right solution it questions). Counted per block: a block that rewrites the code of
    an earlier one does not reuse its numbers."""
    counts = Counter(value for value, _ in question_mentions(question))
    found: list[Finding] = []
    for block in find_code_blocks(solution):
        try:
            tree = ast.parse(block.code)
        except SyntaxError:
            continue
        degenerate: set[Fraction] = set()  # a - a, a / a: said as such, not again as a reused number
        for node in ast.walk(tree):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Sub, ast.Div))):
                continue
            left, right = node.left, node.right
            if not (isinstance(left, ast.Constant) and isinstance(right, ast.Constant)
                    and type(left.value) in (int, float) and left.value == right.value):
                continue
            value = Fraction(str(left.value))
            text = ast.get_source_segment(block.code, left) or repr(left.value)
            op = "-" if isinstance(node.op, ast.Sub) else "/"
            key = f"{text} {op} {text}"
            if counts[value] < 2:
                degenerate.add(value)
                found.append(Finding(key, f"the code computes {key}, but the problem gives {text} only once"))
        uses = Counter(value for value, _ in code_numbers(block.code))
        texts = {value: text for value, text in reversed(code_numbers(block.code))}  # first written form
        for value, n in uses.items():
            if counts[value] and n > counts[value] and value not in degenerate:
                used = "twice" if n == 2 else f"{n} times"
                given = "only once" if counts[value] == 1 else f"only {counts[value]} times"
                found.append(Finding(f"{texts[value]} x{n}",
                                     f"the code uses {texts[value]} {used}, but the problem gives it {given}"))
    return list({f.key: f for f in found}.values())


def number_features(question: str, solution: str) -> dict[str, float]:
    """The number check's findings as features of the verifier's head (``duet.agents.verifier``): whether the
    code uses a number the problem does not give, how many given numbers it leaves unused, whether it uses a
    given number more often than the problem does (``a - a``, ``29 * 29``). On the embedded model's own
    solutions each one marks a wrong answer far more often than a right one (an unused number can be a
    distractor, so it counts rather than vetoes)."""
    return {"ungrounded": float(bool(ungrounded_numbers(question, solution))),
            "unused": float(len(unused_numbers(question, solution))),
            "reused": float(bool(reused_numbers(question, solution)))}


def number_check_reason(findings: list[Finding]) -> str:
    """The one-line critique of the findings. Unused numbers alone ask a question rather than give an order:
    a number the problem gives may be a distractor, and a solver that can tell should keep its answer."""
    if all(f.key.startswith("unused ") for f in findings):
        return "; ".join(f.message for f in findings) + "; check whether the answer needs it."
    return "; ".join(f.message for f in findings) + "; use the problem's numbers exactly as given."


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
