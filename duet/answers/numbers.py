"""Numbers (exact fractions, percentages, mixed numbers) and the units after them."""

from __future__ import annotations

import re
from fractions import Fraction

from duet.answers.limits import MAX_DIGITS, MAX_EXP10, MAX_PARSE_LEN

# --------------------------------------------------------------------------------------------------------
# Numbers: the fast path, no sympy
# --------------------------------------------------------------------------------------------------------

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUM_RE = re.compile(rf"^{_NUM}$")
SIMPLE_NUM_RE = re.compile(r"^\s*-?\d{1,15}(?:\.\d{1,15})?\s*$")
_FRAC_RE = re.compile(r"^([+-]?)\s*(\d+)\s*/\s*(\d+)$")
_LATEX_FRAC_RE = re.compile(r"^([+-]?)\s*\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))$")
_MIXED_RE = re.compile(r"^([+-]?)(\d+)\s+(\d+)\s*/\s*(\d+)$")
_LATEX_MIXED_RE = re.compile(r"^([+-]?)(\d+)\s*\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))$")
_REPEATING_RE = re.compile(r"^([+-]?)(\d*)\.(\d*)\\overline\s*\{(\d{1,30})\}$")
PERCENT_RE = re.compile(r"\s*(?:%|\bpercent\b|\bper\s*cent\b|\bpct\b)\s*$", re.I)


def fraction_of(text: str) -> Fraction | None:
    """A numeric literal (``1.5``, ``-3``, ``.5``, ``3.``, ``1e3``) as an exact Fraction, size-limited."""
    if len(text) > MAX_DIGITS + 8 or not _NUM_RE.match(text):
        return None
    mantissa, _, exp = text.lower().partition("e")
    if exp and (len(exp) > 6 or abs(int(exp)) > MAX_EXP10):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def parse_number(s: str) -> Fraction | None:
    """A plain number, fraction ``a/b``, ``\\frac{a}{b}``, mixed number ``2 1/2`` or repeating decimal
    ``0.\\overline{3}``; None otherwise."""
    v = fraction_of(s)
    if v is not None:
        return v
    if len(s) > 200:
        return None
    m = _REPEATING_RE.match(s)
    if m:
        sign, whole, fixed, period = m.group(1), m.group(2) or "0", m.group(3), m.group(4)
        v = int(whole) + Fraction(int(fixed or "0"), 10 ** len(fixed))
        v += Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
        return -v if sign == "-" else v
    m = _FRAC_RE.match(s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if den == 0:
            return None
        v = Fraction(num, den)
        return -v if m.group(1) == "-" else v
    m = _LATEX_FRAC_RE.match(s)
    if m:
        num, den = int(m.group(2) or m.group(3)), int(m.group(4) or m.group(5))
        if den == 0:
            return None
        v = Fraction(num, den)
        return -v if m.group(1) == "-" else v
    m = _MIXED_RE.match(s) or _LATEX_MIXED_RE.match(s)
    if m:
        g = [x for x in m.groups()[1:] if x is not None]
        whole, num, den = int(g[0]), int(g[1]), int(g[2])
        if 0 < num < den:  # a proper fraction: a mixed number
            v = whole + Fraction(num, den)
            return -v if m.group(1) == "-" else v
    return None


def format_number(v: Fraction) -> str:
    """Canonical text of a number: ``1234``, ``0.125`` (terminating decimals), ``1/3``."""
    if v.denominator == 1:
        return str(v.numerator)
    d, twos, fives = v.denominator, 0, 0
    while d % 2 == 0:
        d //= 2
        twos += 1
    while d % 5 == 0:
        d //= 5
        fives += 1
    if d != 1 or max(twos, fives) > 60:
        return f"{v.numerator}/{v.denominator}"
    places = max(twos, fives)
    scaled = abs(v.numerator) * (10**places // v.denominator)
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if v < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


# Units: a word after a number is dropped.  Known abbreviations may be glued to the number ("5cm").
_MATH_WORDS = frozenset(
    "pi e i sqrt sin cos tan cot sec csc arcsin arccos arctan asin acos atan sinh cosh tanh ln log exp "
    "oo inf infty infinity abs and or".split()
)
_GLUED_UNITS = frozenset(
    "mm cm dm m km in ft yd mi mg g kg lb lbs oz t ml l cl s sec secs min mins h hr hrs ms kmh kph mph "
    "mps w kw kwh v a hz khz mhz ghz j kj cal kcal n pa kpa k c f b kb mb gb tb px pt cents am pm".split()
)
_SPACED_SINGLE_UNITS = frozenset("m g s h l k".split())
_UNIT_TAIL_RE = re.compile(
    r"^(?P<head>.*?[\d)}\]!])(?P<sep>\s*)"
    r"(?P<unit>[A-Za-z][A-Za-z.]*(?:\s*\^\s*\{?-?\d+\}?|[\s/-]+[A-Za-z][A-Za-z.]*)*)$"
)


_SCALE_WORDS = {"dozen": 12, "hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9,
                "trillion": 10**12}


def strip_unit(s: str) -> tuple[str, int] | None:
    """``12 apples`` -> ``12``, ``5 km/h`` -> ``5``, ``3\\sqrt{2} cm`` -> ``3\\sqrt{2}``; None if no unit.

    Returns the head and a scale: ``1.2 million dollars`` -> (``1.2``, 10**6).
    """
    if len(s) > MAX_PARSE_LEN:
        return None
    m = _UNIT_TAIL_RE.match(s)
    if not m:
        return None
    first = re.match(r"[A-Za-z]+", m.group("unit"))
    word = first.group(0).lower() if first else ""
    if not word or word in _MATH_WORDS:
        return None
    if not m.group("sep"):
        if word not in _GLUED_UNITS:
            return None
    elif len(word) == 1 and word not in _SPACED_SINGLE_UNITS:
        return None
    return m.group("head").strip(), _SCALE_WORDS.get(word, 1)


# --------------------------------------------------------------------------------------------------------
# Numbers written in words, and thousands separators, as digits (the text a solver reads)
# --------------------------------------------------------------------------------------------------------

_WORD_TOKEN = re.compile(r"[A-Za-z]+|\d+(?:[.,]\d+)*|\S")
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,]|\.\d)")
_FRACTION_WORDS = re.compile(r"^(?:halves|thirds?|fourths?|fifths?|sixths?|sevenths?|eighths?|ninths?|tenths?|"
                             r"quarters?)$", re.I)


class _Word:
    """A token of `text_to_num.find_numbers`' stream."""

    def __init__(self, text: str) -> None:
        self._text = text

    def text(self) -> str:
        return self._text

    def nt_separated(self, previous: _Word) -> bool:
        return False

    def not_a_number_part(self) -> bool:
        return False


def numbers_as_digits(text: str) -> str:
    """``text`` with its cardinal numbers written in words from two up (``nine`` -> ``9``, ``forty-three`` ->
    ``43``, ``two hundred and five`` -> ``205``) and its thousands separators (``1,200`` -> ``1200``) as plain
    digits, everything else unchanged. Left as words: "one" and "zero" (mostly not amounts: "one of them"),
    ordinals ("the third day") and fractions ("two thirds", "a quarter"). A small model reads and copies digits
    far better than it reads words (``text2num`` does the parsing)."""
    from text_to_num import find_numbers

    words = [(m.group(), m.start(), m.end()) for m in _WORD_TOKEN.finditer(text)]
    out, at = [], 0
    for found in find_numbers([_Word(w) for w, _, _ in words], "en", 0):
        first, last = words[found.start], words[found.end - 1]
        following = words[found.end][0] if found.end < len(words) else ""
        if found.is_ordinal or found.value < 2 or _FRACTION_WORDS.match(following) or first[0][0].isdigit():
            continue
        start = first[1]
        if found.start > 0 and words[found.start - 1][0].lower() in ("a", "an") and first[0].lower() in (
                "hundred", "thousand", "million"):
            start = words[found.start - 1][1]  # "a hundred" -> "100"
        out += [text[at:start], found.text]
        at = last[2]
    return _THOUSANDS.sub(lambda m: m.group().replace(",", ""), "".join([*out, text[at:]]))
