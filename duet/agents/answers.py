"""Extract final answers from model output and decide whether two answers mean the same thing.

The solver and the critic both end their responses with ``\\boxed{...}``; the evaluation code compares those
answers with dataset gold answers (GSM8K's ``#### 72``, MATH's LaTeX) and with each other.  This module is
the single place that knows how to do that.

Public API
----------
``extract_boxed(text)``    content of the last ``\\boxed{}`` / ``\\fbox{}`` (balanced braces) or ``None``.
``extract_answer(text)``   last box, else GSM8K ``#### X``, else a trailing "The answer is X" phrase.
``gold_answer(text)``      a dataset's gold field reduced to the bare answer.
``normalize(answer)``      canonical display form; equal forms imply ``equivalent`` (a fast equality key).
``parse(answer)``          a :class:`Parsed` value (number, expression, tuple, set, ratio, yes/no, text).
``equivalent(a, b)``       do two answers mean the same?  Symmetric, never raises, ``None`` equals nothing.

Semantics decisions (documented here once, tested in ``tests/test_answers.py``)
--------------------------------------------------------------------------------
* **Numbers** are exact :class:`fractions.Fraction` values: ``1,234.5``, ``-3``, ``+3``, ``.5``, ``3.``,
  ``1e3``, ``1/2``, ``\\frac{1}{2}``.  Two integers compare exactly; otherwise two numbers are equal within
  ``rel_tol`` (relative) or ``abs_tol`` (absolute), so ``1/3 == 0.3333333`` but ``1/3 != 0.33`` and
  ``1000000 != 1000001``.  Pass ``rel_tol=0`` for exact comparison.
* **Thousands separators**: ``1,234`` (and ``1{,}234``, ``1\\,234``) is one number at the top level of an
  answer.  Inside brackets commas separate elements (``(1,250)`` is a pair) unless the elements are
  separated by comma-space, in which case ``(1,000, 2,000)`` is a pair of thousands.
* **Units and currency are ignored**: ``$18 == 18 dollars == 18.00 == \\$18``, ``10\\text{ cm} == 10``,
  ``5 km/h == 5``, ``30^\\circ == 30``.  A word after a number is a unit unless it is a maths name
  (``2 pi``, ``3 i``); glued to the number (``5cm``) only known unit abbreviations count, so ``2x`` stays
  an expression.  ``12 apples == 12 oranges`` is therefore true: the unit carries no weight.
* **Percent**: ``50%``, ``50\\%`` and ``50 percent`` are the same percentage.  A percentage compared with a
  bare number is equal when the number equals *either* the figure (``50%`` == ``50``: GSM8K writes the gold
  of a percent question without the sign, as with any unit) *or* the value (``50%`` == ``0.5``).  This
  relation is symmetric but, across kinds, not transitive (``50 != 0.5``).
* **Mixed numbers**: ``2 1/2`` and ``2\\frac{1}{2}`` mean 5/2 when the fraction is proper (numerator <
  denominator); ``2\\frac{3}{2}`` is the product 3.  Two bare numbers side by side (``2 3``) are not a
  product: such text is not a number.
* **Ratios**: ``3:2`` is a ratio.  Two ratios are equal when proportional (``3:2 == 6:4``, also for three or
  more parts); a two-part ratio equals the number ``a/b`` (``3:2 == 1.5 == \\frac{3}{2}``).  Clock times are
  read as ratios too, which is harmless when both sides write a time.
* **Yes/no**: ``yes``/``true`` and ``no``/``false``, case-insensitive, compare as booleans; a boolean never
  equals a number (``yes != 1``).
* **Expressions** are built by a small, allow-listed recursive-descent parser that understands plain
  maths (``sqrt(18)``, ``3*sqrt(2)``, ``2x^2``, ``x**2``) and the usual LaTeX (``\\frac``, ``\\dfrac``,
  ``\\frac12``, ``\\sqrt[3]{x}``, ``\\pi``, ``\\cdot``, ``\\times``, ``\\left( \\right)``, ``^{...}``,
  ``\\sin``, ``\\log_2``, ``\\binom``, ``|x|``) and constructs sympy objects directly -- no ``eval``, no
  ``parse_expr`` and no antlr.  ``e`` is Euler's number and ``i`` the imaginary unit.  Rational arithmetic
  is folded exactly (``2^{10}`` is the number 1024, ``\\sqrt{18}`` becomes ``3*sqrt(2)``); everything else
  stays an unevaluated sympy tree, because sympy's automatic simplification can call ``evalf`` with unbounded
  precision.  Expressions are compared structurally, then numerically with mpmath at fixed precision --
  at six fixed pseudo-random points (|values| in [0.3, 2.1], some negative) when they contain variables, a
  probabilistic identity test: ``(x+1)^2 == x^2+2x+1``, ``|x| != x``.  Every value is magnitude-checked
  (about ``2**±4096``), and huge powers, factorials and literals are rejected (the answer is then compared
  as text), so ``9**9**9**9`` cannot hang.
* **Collections**: ``(1, 2)`` and ``[1, 2)`` are ordered tuples/intervals whose brackets must match; ``\\{1,
  2\\}`` is a set (order and repeats ignored); a bare ``1, 2`` list compares unordered with lists and sets,
  and in order with a tuple.  ``x = 5`` is read as ``5``; ``1 \\pm \\sqrt{2}`` as the list of both roots;
  ``\\begin{pmatrix}`` as a tuple.
* **Text** compares case- and whitespace-insensitively after normalisation (``\\text{}`` unwrapped).
* **Wrappers**: an answer that still contains ``\\boxed{}`` is reduced to its box; ``$...$``, ``\\(...\\)``,
  markdown bold and a trailing period are dropped.  Two empty answers are *not* equivalent (no answer
  is not agreement), and ``None`` equals nothing.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

__all__ = ["Parsed", "extract_boxed", "extract_answer", "gold_answer", "normalize", "parse", "equivalent"]

# Size limits that keep every call bounded in time.
_MAX_CLEAN_LEN = 5000  # longer answers are compared as raw text
_MAX_PARSE_LEN = 400  # longest answer handed to the number/expression parsers
_MAX_TOKENS = 200
_MAX_DIGITS = 1000  # digits in one numeric literal
_MAX_EXP10 = 1000  # |e| in scientific notation 1e...
_MAX_BITS = 4096  # bit length of any exact rational built while parsing
_MAX_POW_EXP = 10**6  # largest numeric exponent accepted
_MAX_POW_NEST = 3  # a^b^c^d is the deepest power tower accepted
_MAX_NEST = 40  # bracket nesting in the expression parser
_MAX_FACTORIAL = 1000
_MAX_ELEMENTS = 64  # elements in a tuple/set/list
_MAX_DEPTH = 3  # nesting of tuples/sets/lists


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


# --------------------------------------------------------------------------------------------------------
# Cleaning: strings in, strings out
# --------------------------------------------------------------------------------------------------------

_UNICODE = {
    "\u2212": "-",  # minus sign
    "\u2013": "-",
    "\u00d7": "*",
    "\u22c5": "*",
    "\u00b7": "*",
    "\u00f7": "/",
    "\u221a": "\\sqrt",
    "\u03c0": "\\pi ",
    "\u221e": "\\infty ",
    "\u00b1": "\\pm ",
    "\u00b2": "^2",
    "\u00b3": "^3",
    "\u00a0": " ",
    "\u2009": " ",
    "\u202f": " ",
}
_WRAPPER_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|texttt|textnormal|textup|mathrm|mathbf|mathit|mathsf|mathtt"
    r"|mathbb|mathcal|boldsymbol|mbox|hbox|operatorname|rm|bf)\s*\{([^{}]*)\}"
)
_MATRIX_RE = re.compile(r"\\begin\{[pbvBV]?matrix\}(.*?)\\end\{[pbvBV]?matrix\}", re.S)
_SIZING_RE = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])\.?")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|\u00b0")
_THIN_THOUSANDS_RE = re.compile(r"(?<=\d)\\[,!;: ](?=\d{3}(?!\d))")
_BOLD_RE = re.compile(r"(?<![\w)\]}])\*\*|\*\*(?![\w(\[{\\.])")  # markdown bold, not x**2
_SPACES_RE = re.compile(r"\\[,;: ]|\\q?quad(?![a-zA-Z])|~")


def _matrix_to_tuple(m: re.Match[str]) -> str:
    """``\\begin{pmatrix} a \\\\ b \\end{pmatrix}`` -> ``(a, b)``; a matrix becomes a tuple of row tuples."""
    rows = [r for r in (r.strip() for r in m.group(1).split("\\\\")) if r]
    cells = [[c.strip() for c in r.split("&")] for r in rows]
    if all(len(r) == 1 for r in cells):
        return "(" + ", ".join(r[0] for r in cells) + ")"
    if len(cells) == 1:
        return "(" + ", ".join(cells[0]) + ")"
    return "(" + ", ".join("(" + ", ".join(r) + ")" for r in cells) + ")"


def _clean(s: str) -> str:
    """Strip presentation from an answer: delimiters, ``\\text{}``, sizing, currency, thin spaces, bold.

    Numbers, units, percent signs and structure are left for :func:`_parse_clean`.
    """
    s = s.strip()
    if len(s) > _MAX_CLEAN_LEN:
        return s
    if "\\boxed" in s or "\\fbox" in s:
        boxed = extract_boxed(s)
        if boxed is not None:
            s = boxed
    s = _BOLD_RE.sub("", s)
    for k, v in _UNICODE.items():
        if k in s:
            s = s.replace(k, v)
    if "\\begin" in s:
        s = _MATRIX_RE.sub(_matrix_to_tuple, s)
    s = re.sub(r"\\[()\[\]]", " ", s)  # \( \) \[ \] math delimiters
    s = s.replace("\\$", " ").replace("$", " ")
    s = s.replace("\\displaystyle", " ").replace("\\!", "")
    s = _SIZING_RE.sub("", s)
    for _ in range(3):  # nested wrappers: \text{\textbf{A}}
        new = _WRAPPER_RE.sub(r" \1 ", s)
        if new == s:
            break
        s = new
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "%")
    s = s.replace("{,}", ",")
    s = _THIN_THOUSANDS_RE.sub("", s)
    s = _SPACES_RE.sub(" ", s)
    s = re.sub(r"[\u20ac\u00a3\u00a5\u20b9]|\\euro(?![a-zA-Z])|\\pounds(?![a-zA-Z])", " ", s)
    s = " ".join(s.split())
    s = re.sub(r"^([+-]) (?=[\d.])", r"\1", s)  # "- 5" (from "-$5") -> "-5"
    s = s.strip("\"'`")
    s = s.rstrip(".;, ").strip()
    return s


# --------------------------------------------------------------------------------------------------------
# The parsed value
# --------------------------------------------------------------------------------------------------------

_SCALAR_KINDS = ("number", "expr")


@dataclass(frozen=True)
class Parsed:
    """A structured answer.

    ``kind`` is one of:

    * ``"number"`` -- ``value`` is an exact :class:`~fractions.Fraction`;
    * ``"expr"`` -- ``value`` is a sympy expression (irrational constants, variables, complex numbers);
    * ``"tuple"`` -- ``value`` is a tuple of Parsed, ``brackets`` the opening and closing brackets;
    * ``"set"`` / ``"list"`` -- a tuple of Parsed compared without order (``list``: a bare ``1, 2``);
    * ``"ratio"`` -- a tuple of scalar Parsed, ``a:b:c``;
    * ``"bool"`` -- yes/true or no/false;
    * ``"text"`` -- ``value`` is the normalised string.

    ``percent`` marks a number or expression written with a percent sign; ``value`` then holds the figure
    (``50`` for ``50%``).  ``text`` is the canonical display form returned by :func:`normalize`.
    """

    kind: str
    value: Any
    text: str
    percent: bool = False
    brackets: str = ""

    @property
    def is_scalar(self) -> bool:
        """True for numbers and expressions."""
        return self.kind in _SCALAR_KINDS


def _text(s: str) -> Parsed:
    return Parsed("text", s, s)


# --------------------------------------------------------------------------------------------------------
# Numbers: the fast path, no sympy
# --------------------------------------------------------------------------------------------------------

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUM_RE = re.compile(rf"^{_NUM}$")
_SIMPLE_NUM_RE = re.compile(r"^\s*-?\d{1,15}(?:\.\d{1,15})?\s*$")
_FRAC_RE = re.compile(r"^([+-]?)\s*(\d+)\s*/\s*(\d+)$")
_LATEX_FRAC_RE = re.compile(r"^([+-]?)\s*\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))$")
_MIXED_RE = re.compile(r"^([+-]?)(\d+)\s+(\d+)\s*/\s*(\d+)$")
_LATEX_MIXED_RE = re.compile(r"^([+-]?)(\d+)\s*\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))$")
_REPEATING_RE = re.compile(r"^([+-]?)(\d*)\.(\d*)\\overline\s*\{(\d{1,30})\}$")
_PERCENT_RE = re.compile(r"\s*(?:%|\bpercent\b|\bper\s*cent\b|\bpct\b)\s*$", re.I)


def _fraction(text: str) -> Fraction | None:
    """A numeric literal (``1.5``, ``-3``, ``.5``, ``3.``, ``1e3``) as an exact Fraction, size-limited."""
    if len(text) > _MAX_DIGITS + 8 or not _NUM_RE.match(text):
        return None
    mantissa, _, exp = text.lower().partition("e")
    if exp and (len(exp) > 6 or abs(int(exp)) > _MAX_EXP10):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _number(s: str) -> Fraction | None:
    """A plain number, fraction ``a/b``, ``\\frac{a}{b}``, mixed number ``2 1/2`` or repeating decimal
    ``0.\\overline{3}``; None otherwise."""
    v = _fraction(s)
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


def _format_number(v: Fraction) -> str:
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


def _strip_unit(s: str) -> tuple[str, int] | None:
    """``12 apples`` -> ``12``, ``5 km/h`` -> ``5``, ``3\\sqrt{2} cm`` -> ``3\\sqrt{2}``; None if no unit.

    Returns the head and a scale: ``1.2 million dollars`` -> (``1.2``, 10**6).
    """
    if len(s) > _MAX_PARSE_LEN:
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
# Expressions: an allow-listed tokenizer and recursive-descent parser that builds sympy objects directly
# --------------------------------------------------------------------------------------------------------


class _Reject(Exception):
    """The text is not an expression this parser accepts (or it is too large to evaluate safely)."""


_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)|(?P<cmd>\\[a-zA-Z]+|\\[{}|])"
    r"|(?P<word>[a-zA-Z]+)|(?P<op>\*\*|[-+*/^()\[\]{}!|_,]))"
)
_FUNCS = frozenset(
    "sqrt sin cos tan cot sec csc arcsin arccos arctan asin acos atan sinh cosh tanh ln log exp abs".split()
)
_CONSTS = frozenset("pi oo inf infty infinity".split())
_WORD_NAMES = sorted(_FUNCS | _CONSTS, key=len, reverse=True)
_GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma "
    "tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split()
)
_MUL_OPS = frozenset({"*", "\\cdot", "\\times", "\\ast"})
_DIV_OPS = frozenset({"/", "\\div"})
_OPENERS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}
_CLOSING_CMDS = frozenset({"\\}", "\\|", "\\rfloor", "\\rceil", "\\rvert"})

Token = tuple[str, str]  # (type, text): types num, sym, name, cmd, op


def _split_word(word: str) -> list[Token]:
    """A run of letters: a known name (``sqrt``, ``pi``), or single-letter symbols (``xy`` -> x*y).

    More than two unknown letters in a row (``apples``, ``Monday``) is a word, not maths: rejected.
    """
    if word in _FUNCS or word in _CONSTS:
        return [("name", word)]
    out: list[Token] = []
    i, run = 0, 0
    while i < len(word):
        for name in _WORD_NAMES:
            if len(name) > 1 and word.startswith(name, i):
                out.append(("name", name))
                i += len(name)
                run = 0
                break
        else:
            run += 1
            if run > 2:
                raise _Reject(word)
            out.append(("sym", word[i]))
            i += 1
    return out


def _tokenize(s: str) -> list[Token]:
    """Tokens of an expression, or :class:`_Reject` on any character outside the allow-list."""
    tokens: list[Token] = []
    pos = 0
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            raise _Reject(s[pos:])
        pos = m.end()
        kind = m.lastgroup
        text = m.group(kind)  # type: ignore[arg-type]
        if kind == "word":
            tokens.extend(_split_word(text))
        elif kind == "op":
            tokens.append(("op", "^" if text == "**" else text))
        else:
            tokens.append((kind, text))  # type: ignore[arg-type]
        if len(tokens) > _MAX_TOKENS:
            raise _Reject("too long")
    return tokens


def _sp() -> Any:
    """The sympy module, imported on first use (the number fast path never needs it)."""
    import sympy

    return sympy


class _TooBig(_Reject):
    """A value whose magnitude is beyond what is safe to evaluate further."""


_MP_PREC = 120  # bits of working precision for numeric comparison
_MAX_MAG_BITS = 4096  # |log2 |x|| of any value evaluated numerically
_MP_FUNCS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
    "asin": "asin", "acos": "acos", "atan": "atan", "acot": "acot",
    "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "exp": "exp", "log": "log",
    "Abs": "fabs", "floor": "floor", "ceiling": "ceil", "factorial": "factorial", "gamma": "gamma",
}  # fmt: skip


def _mp_eval(e: Any, subs: dict[Any, Any], memo: dict[Any, Any]) -> Any | None:
    """Evaluate a sympy tree with mpmath at fixed precision, guarding magnitudes at every node.

    Returns an mpmath number, or None when the tree has an unbound symbol, an infinity, or an unsupported
    function.  Raises :class:`_TooBig` when any intermediate value is beyond ``2**±_MAX_MAG_BITS``: such a
    value (or the sine of it) would need unbounded precision.  This, not sympy's ``evalf``, is used for all
    numeric work, because ``evalf`` raises its precision to whatever an argument demands.
    """
    if e in memo:
        return memo[e]
    import mpmath

    sp = _sp()
    v: Any
    if e.is_Rational:
        v = mpmath.mpf(int(e.p)) / int(e.q)
    elif e.is_Symbol:
        v = subs.get(e)
        v = None if v is None else mpmath.mpf(v)
    elif e is sp.pi:
        v = +mpmath.pi
    elif e is sp.E:
        v = +mpmath.e
    elif e is sp.I:
        v = mpmath.mpc(0, 1)
    elif e.is_Float:
        v = mpmath.mpf(e)
    else:
        args = [_mp_eval(a, subs, memo) for a in e.args]
        if any(a is None for a in args):
            v = None
        elif e.is_Add:
            v = mpmath.fsum(args)
        elif e.is_Mul:
            v = mpmath.fprod(args)
        elif e.is_Pow:
            base, exp = args
            if base == 0:
                v = None if mpmath.re(exp) <= 0 else mpmath.mpf(0)
            else:  # |log2 result| <= |exp| * (|ln |base|| + pi) / ln 2: refuse before computing a giant
                bound = abs(exp) * (abs(mpmath.log(abs(base))) + 4)
                if bound > _MAX_MAG_BITS:
                    raise _TooBig("power too large")
                v = mpmath.power(base, exp)
        elif type(e).__name__ == "binomial":
            v = mpmath.binomial(*args)
        elif type(e).__name__ in _MP_FUNCS and len(args) == 1:
            fn = getattr(mpmath, _MP_FUNCS[type(e).__name__])
            arg = args[0]
            real_only = fn in (mpmath.floor, mpmath.ceil, mpmath.factorial, mpmath.gamma)
            if real_only and isinstance(arg, mpmath.mpc) and arg.imag == 0:
                arg = arg.real
            if fn in (mpmath.exp, mpmath.sinh, mpmath.cosh) and abs(arg) > _MAX_MAG_BITS:
                raise _TooBig("exponential too large")
            v = abs(arg) if fn is mpmath.fabs else fn(arg)
        else:
            v = None
    if v is not None:
        if not mpmath.isfinite(v):
            v = None
        elif v != 0 and abs(mpmath.mag(v)) > _MAX_MAG_BITS:
            raise _TooBig("value too large")
    memo[e] = v
    return v


def _numeric(e: Any, subs: dict[Any, Any] | None = None) -> Any | None:
    """e as an mpmath number, or None if it is not a finite number of moderate size."""
    import mpmath

    try:
        with mpmath.workprec(_MP_PREC):
            v = _mp_eval(e, subs or {}, {})
            return None if v is None else mpmath.mpc(v)
    except Exception:  # _TooBig, mpmath domain errors, RecursionError: not a usable number
        return None


_CHECK_MEMO: dict[Any, Any] = {}


def _check(v: Any) -> Any:
    """Reject values too large to keep computing with: exact rationals beyond ``_MAX_BITS`` bits, and numeric
    (symbol-free) values whose magnitude is beyond ``2**±_MAX_MAG_BITS``."""
    import mpmath

    if getattr(v, "is_Rational", False):
        if int(v.p).bit_length() > _MAX_BITS or int(v.q).bit_length() > _MAX_BITS:
            raise _Reject("number too large")
        return v
    if len(_CHECK_MEMO) > 4096:
        _CHECK_MEMO.clear()
    try:
        with mpmath.workprec(_MP_PREC):
            _mp_eval(v, {}, _CHECK_MEMO)  # raises _TooBig; unbound symbols just give None
    except _Reject:
        raise
    except Exception:  # mpmath domain errors and the like: the value is simply not checked further
        pass
    return v


# Arithmetic on sympy values.  Exact rationals are folded exactly (bit-limited); everything else becomes an
# UNEVALUATED node (evaluate=False): sympy's automatic simplification queries assumptions, which can call
# evalf with unbounded precision on adversarial input.  All numeric work goes through _mp_eval instead.


def _add(a: Any, b: Any) -> Any:
    if a.is_Rational and b.is_Rational:
        return _check(a + b)
    return _check(_sp().Add(a, b, evaluate=False))


def _neg(a: Any) -> Any:
    if a.is_Number:  # rationals and infinities
        return -a
    return _check(_sp().Mul(_sp().S.NegativeOne, a, evaluate=False))


def _mul(a: Any, b: Any) -> Any:
    if a.is_Rational and b.is_Rational:
        return _check(a * b)
    return _check(_sp().Mul(a, b, evaluate=False))


def _div(a: Any, b: Any) -> Any:
    if a.is_Rational and b.is_Rational and b != 0:
        return _check(a / b)
    return _mul(a, _sp().Pow(b, _sp().S.NegativeOne, evaluate=False))


def _exact_root(x: Any, n: int) -> Any | None:
    """The exact n-th root of a non-negative rational, or None if it is irrational."""
    from sympy import integer_nthroot

    p, exact_p = integer_nthroot(int(x.p), n)
    q, exact_q = integer_nthroot(int(x.q), n)
    return _sp().Rational(p, q) if exact_p and exact_q else None


def _pow(base: Any, exp: Any) -> Any:
    """``base ** exp`` with guards against results too large to represent or evaluate; exact when rational."""
    sp = _sp()
    if exp.is_Rational:
        if abs(exp) > _MAX_POW_EXP:
            raise _Reject("exponent too large")
        if base.is_Rational and base not in (0, 1, -1):
            size = max(int(base.p).bit_length(), int(base.q).bit_length())
            if float(abs(exp)) * size > _MAX_BITS:
                raise _Reject("power too large")
        if base.is_Rational and not (base == 0 and exp < 0):
            if exp.is_Integer:
                return _check(base**exp)
            if max(int(base.p).bit_length(), int(base.q).bit_length()) <= 64 and exp.q <= 64:
                # small radicals: sympy's number theory (bounded trial division): sqrt(18) = 3*sqrt(2)
                return _check(sp.Pow(base, exp))
            if base > 0 and exp.q <= 64:
                root = _exact_root(base, int(exp.q))
                if root is not None:
                    return _check(root ** int(exp.p))
    return _check(sp.Pow(base, exp, evaluate=False))


def _root(x: Any, n: Any) -> Any:
    """``\\sqrt[n]{x}``; the real root for a negative rational under an odd index (``\\sqrt[3]{-8} = -2``)."""
    sp = _sp()
    if n.is_Integer and n > 0 and n % 2 == 1 and x.is_Rational and x < 0:
        return _neg(_pow(-x, sp.Rational(1, int(n))))
    return _pow(x, _div(sp.S.One, n))


class _Parser:
    """Recursive descent over tokens; precedence: ``+ -`` < ``* / implicit`` < unary sign < ``^`` < ``!``."""

    def __init__(self, tokens: list[Token]) -> None:
        self.toks = tokens
        self.i = 0
        self.nest = 0
        self.pow_nest = 0
        self.sp = _sp()

    # token helpers
    def peek(self) -> Token | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def peek_text(self) -> str | None:
        t = self.peek()
        return t[1] if t else None

    def take(self) -> Token:
        t = self.peek()
        if t is None:
            raise _Reject("unexpected end")
        self.i += 1
        return t

    def expect(self, text: str) -> None:
        if self.peek_text() != text:
            raise _Reject(f"expected {text}")
        self.i += 1

    # grammar
    def parse(self) -> Any:
        v = self.expr()
        if self.i != len(self.toks):
            raise _Reject("trailing tokens")
        return v

    def expr(self) -> Any:
        self.nest += 1
        if self.nest > _MAX_NEST:
            raise _Reject("too deeply nested")
        v = self.term()
        while self.peek_text() in ("+", "-"):
            op = self.take()[1]
            r = self.term()
            v = _add(v, r) if op == "+" else _add(v, _neg(r))
        self.nest -= 1
        return v

    def starts_implicit(self) -> bool:
        """Can the next token begin an implicitly multiplied factor (``2x``, ``3\\sqrt{2}``, ``(a)(b)``)?"""
        t = self.peek()
        if t is None:
            return False
        kind, text = t
        if kind in ("sym", "name"):
            return True
        if kind == "cmd":
            return text not in _MUL_OPS and text not in _DIV_OPS and text not in _CLOSING_CMDS
        return text in ("(", "[", "{", "\\{")

    def term(self) -> Any:
        v = self.unary()
        while True:
            text = self.peek_text()
            if text in _MUL_OPS:
                self.take()
                v = _mul(v, self.unary())
            elif text in _DIV_OPS:
                self.take()
                v = _div(v, self.unary())
            elif self.starts_implicit():
                v = _mul(v, self.power())
            else:
                return v

    def unary(self) -> Any:
        text = self.peek_text()
        if text in ("+", "-"):
            self.take()
            v = self.unary()
            return _neg(v) if text == "-" else v
        return self.power()

    def power(self) -> Any:
        base = self.postfix()
        if self.peek_text() == "^":
            self.take()
            return _pow(base, self.exponent())
        return base

    def exponent(self) -> Any:
        self.pow_nest += 1
        if self.pow_nest > _MAX_POW_NEST:
            raise _Reject("power tower too deep")
        v = self.latex_arg() if self.peek_text() == "{" else self.unary()
        self.pow_nest -= 1
        return v

    def postfix(self) -> Any:
        v = self.primary()
        while self.peek_text() == "!":
            self.take()
            if v.is_Number and (not v.is_Integer or v > _MAX_FACTORIAL):
                raise _Reject("factorial too large")
            if v.is_Integer and v >= 0:
                v = _check(self.sp.Integer(math.factorial(int(v))))
            else:
                v = _check(self.sp.factorial(v, evaluate=False))
        return v

    def group(self, close: str) -> Any:
        v = self.expr()
        self.expect(close)
        return v

    def latex_arg(self) -> Any:
        """A LaTeX macro argument: ``{...}``, or a single character (``\\frac12``), or one primary."""
        t = self.peek()
        if t is None:
            raise _Reject("missing argument")
        if t[1] == "{":
            self.take()
            return self.group("}")
        if t[0] == "num":
            if len(t[1]) > 1:  # \frac12: the argument is the single digit "1"
                if not t[1][0].isdigit():
                    raise _Reject("bad argument")
                self.toks[self.i] = ("num", t[1][1:])
                return self.sp.Integer(int(t[1][0]))
            self.take()
            return self.sp.Integer(int(t[1]))
        return self.primary()

    def number(self, text: str) -> Any:
        v = _fraction(text)
        if v is None:
            raise _Reject("bad number")
        return _check(self.sp.Rational(v.numerator, v.denominator))

    def symbol(self, name: str) -> Any:
        if self.peek_text() == "_":  # subscript: x_1, a_{12}
            self.take()
            t = self.take()
            if t[1] == "{":
                parts = []
                while self.peek_text() != "}":
                    tt = self.take()
                    if tt[0] not in ("num", "sym", "name"):
                        raise _Reject("bad subscript")
                    parts.append(tt[1])
                self.take()
                sub = "".join(parts)
            elif t[0] in ("num", "sym", "name"):
                sub = t[1]
            else:
                raise _Reject("bad subscript")
            return self.sp.Symbol(f"{name}_{sub}")
        if name == "e":
            return self.sp.E
        if name == "i":
            return self.sp.I
        return self.sp.Symbol(name)

    def function(self, name: str) -> Any:
        """``sqrt(x)``, ``\\sin^2 x``, ``\\log_2 8``, ``\\ln(x)``: name already consumed."""
        sp = self.sp
        if name == "sqrt":
            index = None
            if self.peek_text() == "[":
                self.take()
                index = self.group("]")
            arg = self.latex_arg() if self.peek_text() not in ("(", "[") else self.primary()
            if index is None:
                return _pow(arg, sp.Rational(1, 2))
            return _root(arg, index)
        fpow = None
        if self.peek_text() == "^":
            self.take()
            fpow = self.exponent()
        base = None
        if name == "log" and self.peek_text() == "_":
            self.take()
            base = self.latex_arg()
        t = self.peek()
        if t is None:
            raise _Reject("missing function argument")
        arg = self.primary() if t[1] in ("(", "[", "{", "\\{") else self.power()
        if name == "exp":
            self.pow_nest += 1
            if self.pow_nest > _MAX_POW_NEST:
                raise _Reject("power tower too deep")
            self.pow_nest -= 1
            v = _pow(sp.E, arg)
        elif name in ("ln", "log"):
            v = sp.log(arg, evaluate=False)
            if base is not None:
                v = _div(v, sp.log(base, evaluate=False))
        elif name == "abs":
            v = sp.Abs(arg, evaluate=False)
        else:
            alias = {"arcsin": "asin", "arccos": "acos", "arctan": "atan"}.get(name, name)
            v = getattr(sp, alias)(arg, evaluate=False)
        return _check(v if fpow is None else _pow(v, fpow))

    def primary(self) -> Any:
        sp = self.sp
        kind, text = self.take()
        if kind == "num":
            return self.number(text)
        if kind == "sym":
            return self.symbol(text)
        if kind == "name":
            if text == "pi":
                return sp.pi
            if text in ("oo", "inf", "infty", "infinity"):
                return sp.oo
            return self.function(text)
        if kind == "op":
            if text in _OPENERS:
                self.nest += 1
                v = self.group(_OPENERS[text])
                self.nest -= 1
                return v
            if text == "|":
                v = self.expr()
                self.expect("|")
                return _check(sp.Abs(v, evaluate=False))
            raise _Reject(f"unexpected {text}")
        # LaTeX commands
        name = text[1:]
        if text == "\\{":
            return self.group("\\}")
        if name == "frac":
            num = self.latex_arg()
            den = self.latex_arg()
            return _div(num, den)
        if name == "binom":
            n, k = self.latex_arg(), self.latex_arg()
            if n.is_Number and (not n.is_Integer or abs(n) > 10000):
                raise _Reject("binomial too large")
            if n.is_Integer and k.is_Integer and n >= 0:
                return _check(sp.Integer(math.comb(int(n), int(k)) if k >= 0 else 0))
            return _check(sp.binomial(n, k, evaluate=False))
        if name == "pi":
            return sp.pi
        if name == "infty":
            return sp.oo
        if name in _GREEK:
            return self.symbol(name)
        if name in _FUNCS:
            return self.function(name)
        if name in ("lfloor", "lceil"):
            v = self.expr()
            self.expect("\\rfloor" if name == "lfloor" else "\\rceil")
            if v.is_Rational:
                return sp.Integer(math.floor(v) if name == "lfloor" else math.ceil(v))
            return _check(sp.floor(v, evaluate=False) if name == "lfloor" else sp.ceiling(v, evaluate=False))
        if name in ("lvert", "vert") or text == "\\|":
            v = self.expr()
            if self.peek_text() not in ("\\rvert", "\\vert", "|"):
                raise _Reject("unclosed |")
            self.take()
            return _check(sp.Abs(v, evaluate=False))
        raise _Reject(f"unsupported command {text}")


def _expression(s: str) -> Any | None:
    """A sympy expression for s, or None when s is not an expression the parser accepts."""
    if not s or len(s) > _MAX_PARSE_LEN:
        return None
    try:
        return _Parser(_tokenize(s)).parse()
    except (_Reject, RecursionError, ValueError, TypeError, ArithmeticError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------------------
# Structure: numbers, expressions, tuples, sets, lists, ratios, yes/no, text
# --------------------------------------------------------------------------------------------------------

_YES = frozenset({"yes", "true"})
_NO = frozenset({"no", "false"})
_ASSIGN_RE = re.compile(  # "x = ", "a_1 = ", "f(x) = ", "x \in "
    r"^[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?\s*(?:=|\\in(?![a-zA-Z]))\s*(?=\S)"
)
_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?!\d|,\d)")
_CLOSERS = {")": "(", "]": "[", "}": "{"}


def _drop_thousands(s: str) -> str:
    """``1,234,567.5`` -> ``1234567.5`` wherever the digit groups are well formed."""
    return _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s) if "," in s else s


def _split_top(s: str, sep: str) -> list[str] | None:
    """Split s at top-level occurrences of the character sep; None if the brackets are unbalanced."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0:
                return None
        elif c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    if depth != 0:
        return None
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _encloses(s: str) -> bool:
    """Does the bracket at s[0] close at s[-1] (``(1, 2)`` yes, ``(1)(2)`` no)?  Interval mixes allowed."""
    depth = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


def _elements(inner: str, depth: int) -> tuple[Parsed, ...] | None:
    """Parse comma-separated elements; thousands separators only where elements use comma-space."""
    if re.search(r",\s", inner):
        inner = _drop_thousands(inner)
    parts = _split_top(inner, ",")
    if parts is None or len(parts) > _MAX_ELEMENTS or any(not p for p in parts):
        return None
    return tuple(_parse_clean(p, depth + 1) for p in parts)


def _parse_scalar(s: str, units: bool = True) -> Parsed | None:
    """A number or expression, with an optional percent sign and (if ``units``) unit; None otherwise."""
    if not s or len(s) > _MAX_PARSE_LEN:
        return None
    percent = False
    m = _PERCENT_RE.search(s)
    if m:
        percent, s = True, s[: m.start()].strip()
    s = s.strip()
    if s.startswith("{") and s.endswith("}") and _encloses(s):  # "{5}" LaTeX grouping
        s = s[1:-1].strip()
    candidates = [(s, 1, percent)]
    unit = _strip_unit(s) if units else None
    if unit:
        head, scale = unit
        m = _PERCENT_RE.search(head)
        head_percent = bool(m) or percent
        if m:
            head = head[: m.start()].strip()
        candidates.insert(0, (head, scale, head_percent))  # "5 m" is five metres, not 5*m
    for c, scale, pct in candidates:
        v = _number(c)
        if v is not None:
            return _number_parsed(v * scale, pct)
    for c, scale, pct in candidates:
        e = _expression(c)
        if e is not None:
            e = _mul(e, _sp().Integer(scale)) if scale != 1 else e
            if e.is_Rational:
                return _number_parsed(Fraction(int(e.p), int(e.q)), pct)
            return Parsed("expr", e, _expr_text(e) + ("%" if pct else ""), pct)
    return None


def _number_parsed(v: Fraction, percent: bool) -> Parsed:
    return Parsed("number", v, _format_number(v) + ("%" if percent else ""), percent)


def _expr_text(e: Any) -> str:
    try:
        return _sp().sstr(e, order="none")  # no term ordering: ordering may evaluate numerically
    except Exception:  # pragma: no cover - printing never fails in practice
        return repr(e)


def _collection(kind: str, elems: tuple[Parsed, ...], brackets: str = "") -> Parsed:
    texts = [p.text for p in elems]
    if kind in ("set", "list"):
        texts = sorted(texts)
    if kind == "set":
        text = "\\{" + ", ".join(texts) + "\\}"
    elif kind == "tuple":
        text = brackets[:1] + ", ".join(texts) + brackets[1:]
    elif kind == "ratio":
        text = ":".join(texts)
    else:
        text = ", ".join(texts)
    return Parsed(kind, elems, text, brackets=brackets)


def _parse_clean(s: str, depth: int = 0) -> Parsed:
    """Parse an already-cleaned answer."""
    s = s.strip()
    if not s:
        return _text("")
    if len(s) > _MAX_PARSE_LEN or depth > _MAX_DEPTH:
        return _text(" ".join(s.split()))
    low = s.lower().rstrip(".!")
    if low in _YES:
        return Parsed("bool", True, "yes")
    if low in _NO:
        return Parsed("bool", False, "no")
    m = _ASSIGN_RE.match(s)
    if m and "=" not in s[m.end() :]:
        s = s[m.end() :]

    # sets: \{1, 2\} or {1, 2}
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s[1:]):
        elems = _elements(s[2:-2], depth)
        if elems is not None:
            return _collection("set", elems)
    if s.startswith("{") and s.endswith("}") and _encloses(s) and _split_top(s[1:-1], ","):
        parts = _split_top(s[1:-1], ",")
        if parts and len(parts) > 1:
            elems = _elements(s[1:-1], depth)
            if elems is not None:
                return _collection("set", elems)

    # tuples and intervals: (1, 2), [0, 1), (-\infty, 3]
    if s[0] in "([" and s[-1] in ")]" and _encloses(s):
        parts = _split_top(s[1:-1], ",")
        if parts is not None and len(parts) > 1:
            elems = _elements(s[1:-1], depth)
            if elems is not None:
                return _collection("tuple", elems, s[0] + s[-1])

    # a ± b: both values
    if s.count("\\pm") == 1:
        a, b = s.replace("\\pm", "+"), s.replace("\\pm", "-")
        pa, pb = _parse_scalar(a), _parse_scalar(b)
        if pa and pb:
            return _collection("list", (pa, pb))

    # ratios: 3:2, 1:2:3
    if ":" in s:
        parts = _split_top(s, ":")
        if parts and len(parts) > 1:
            elems = tuple(_parse_scalar(p) for p in parts)
            if all(e is not None and not e.percent for e in elems):
                return _collection("ratio", elems)  # type: ignore[arg-type]

    # top level: thousands separators, then bare lists "1, 2, 3"
    s = _drop_thousands(s)
    parts = _split_top(s, ",")
    if parts is not None and len(parts) > 1:
        elems = _elements(s, depth)
        if elems is not None:
            return _collection("list", elems)

    scalar = _parse_scalar(s)
    if scalar is not None:
        return scalar

    # "2 and 3", "x = 1 or x = 2"
    words = re.split(r"\s+(?:and|or)\s+", s)
    if len(words) > 1:
        scalars = [_parse_scalar(_ASSIGN_RE.sub("", w), units=False) for w in words]
        if all(e is not None for e in scalars):
            return _collection("list", tuple(scalars))  # type: ignore[arg-type]
    return _text(s)


@lru_cache(maxsize=8192)
def _parse_cached(answer: str) -> Parsed:
    m = _SIMPLE_NUM_RE.match(answer)
    if m:  # the common case: "72", "-3.5"
        return _number_parsed(Fraction(answer.strip()), False)
    return _parse_clean(_clean(answer))


def parse(answer: str) -> Parsed:
    """Structured value of an answer: number (exact Fraction), sympy expression, tuple/set/list/ratio of
    parsed values, yes/no boolean, or normalised text.  Never raises; None and non-strings are accepted."""
    if answer is None:
        return _text("")
    if not isinstance(answer, str):
        answer = str(answer)
    try:
        return _parse_cached(answer)
    except Exception:
        return _text(" ".join(answer.split())[:_MAX_CLEAN_LEN])


def normalize(answer: str) -> str:
    """Canonical display form of an answer, also a fast equality key (equal forms => ``equivalent``).

    Strips ``$``/``\\$``, ``\\text{...}`` units, currency, thousands separators, trailing ``.``, ``x =``;
    numbers come out canonical (``$1,200.50`` -> ``1200.5``, ``\\frac{1}{2}`` -> ``0.5``, ``1/3`` stays);
    a percentage keeps its sign (``50\\%`` -> ``50%``); expressions are printed by sympy (``\\sqrt{18}`` ->
    ``3*sqrt(2)``); set and list elements are sorted; yes/true -> ``yes``, no/false -> ``no``.
    """
    return parse(answer).text


# --------------------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tol:
    rel: float
    abs: float


def _frac_close(x: Fraction, y: Fraction, tol: _Tol) -> bool:
    """Exact for two integers; otherwise within relative or absolute tolerance."""
    if x == y:
        return True
    if x.denominator == 1 and y.denominator == 1:
        return False
    diff = abs(x - y)
    return diff <= max(Fraction(tol.rel) * max(abs(x), abs(y)), Fraction(tol.abs))


def _to_sympy(v: Any) -> Any:
    if isinstance(v, Fraction):
        return _sp().Rational(v.numerator, v.denominator)
    return v


def _close(x: Any, y: Any, tol: _Tol) -> bool:
    return abs(x - y) <= max(tol.rel * max(abs(x), abs(y)), tol.abs)


def _sympy_eq(a: Any, b: Any, tol: _Tol) -> bool:
    """Structural, then exact-rational, then numeric equality (at fixed points when there are variables)."""
    if a == b:
        return True
    if a.is_Rational and b.is_Rational:
        return _frac_close(Fraction(int(a.p), int(a.q)), Fraction(int(b.p), int(b.q)), tol)
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        va, vb = _numeric(a), _numeric(b)
        return va is not None and vb is not None and _close(va, vb, tol)
    if len(symbols) > 8:
        return False
    rng = random.Random(1234 + len(symbols))
    agreed = 0
    for k in range(6):  # three points with positive values, three with mixed signs (|x| != x)
        point = {s: rng.randint(300, 2100) / 1000 * (1 if k < 3 else rng.choice((1, -1))) for s in symbols}
        va, vb = _numeric(a, point), _numeric(b, point)
        if va is None or vb is None:
            continue
        if not _close(va, vb, tol):
            return False
        agreed += 1
    return agreed >= 2


def _value_eq(x: Any, y: Any, tol: _Tol) -> bool:
    """Equality of two scalar values (Fraction or sympy)."""
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return _frac_close(x, y, tol)
    return _sympy_eq(_to_sympy(x), _to_sympy(y), tol)


def _div100(v: Any) -> Any:
    return v / 100 if isinstance(v, Fraction) else _div(v, _sp().Integer(100))


def _scalar_eq(a: Parsed, b: Parsed, tol: _Tol) -> bool:
    """Scalars: when exactly one side is a percentage, its figure or its value may match (see module doc)."""
    if a.percent == b.percent:
        return _value_eq(a.value, b.value, tol)
    p, q = (a, b) if a.percent else (b, a)
    return _value_eq(p.value, q.value, tol) or _value_eq(_div100(p.value), q.value, tol)


def _is_zero(v: Any) -> bool:
    return v == 0  # structural for sympy: assumption queries could evaluate numerically


def _ratio_unit(elems: tuple[Parsed, ...]) -> list[Any] | None:
    """A ratio scaled so that its first nonzero part is 1 (None for all zeros)."""
    values = [e.value for e in elems]
    for v in values:
        if not _is_zero(v):
            if all(isinstance(x, Fraction) for x in values):
                return [x / v for x in values]
            return [_div(_to_sympy(x), _to_sympy(v)) for x in values]
    return None


def _ratio_eq(a: Parsed, b: Parsed, tol: _Tol) -> bool:
    if len(a.value) != len(b.value):
        return False
    ua, ub = _ratio_unit(a.value), _ratio_unit(b.value)
    if ua is None or ub is None:
        return ua is None and ub is None
    return all(_value_eq(x, y, tol) for x, y in zip(ua, ub, strict=True))


def _ratio_scalar_eq(r: Parsed, x: Parsed, tol: _Tol) -> bool:
    if len(r.value) != 2 or x.percent:
        return False
    num, den = r.value[0].value, r.value[1].value
    if _is_zero(den):
        return False
    if isinstance(num, Fraction) and isinstance(den, Fraction):
        q = num / den
    else:
        q = _div(_to_sympy(num), _to_sympy(den))
    return _value_eq(q, x.value, tol)


def _matching(xs: tuple[Parsed, ...], ys: tuple[Parsed, ...], tol: _Tol) -> bool:
    """Is there a perfect matching of equivalent elements (multiset equality)?  Kuhn's algorithm."""
    if len(xs) != len(ys):
        return False
    adj = [[j for j, y in enumerate(ys) if _eq(x, y, tol)] for x in xs]
    match: list[int | None] = [None] * len(ys)

    def augment(i: int, seen: set[int]) -> bool:
        for j in adj[i]:
            if j not in seen:
                seen.add(j)
                owner = match[j]
                if owner is None or augment(owner, seen):
                    match[j] = i
                    return True
        return False

    return all(augment(i, set()) for i in range(len(xs)))


def _eq(a: Parsed, b: Parsed, tol: _Tol) -> bool:
    """Symmetric equality of two parsed answers."""
    ka, kb = a.kind, b.kind
    if a.is_scalar and b.is_scalar:
        return _scalar_eq(a, b, tol)
    if ka == "text" and kb == "text":
        return _text_key(a.text) == _text_key(b.text)
    if ka == "bool" and kb == "bool":
        return a.value == b.value
    if ka == "tuple" and kb == "tuple":
        return (
            a.brackets == b.brackets
            and len(a.value) == len(b.value)
            and all(_eq(x, y, tol) for x, y in zip(a.value, b.value, strict=True))
        )
    if {ka, kb} == {"tuple", "list"}:
        return len(a.value) == len(b.value) and all(
            _eq(x, y, tol) for x, y in zip(a.value, b.value, strict=True)
        )
    if ka in ("set", "list") and kb in ("set", "list"):
        if ka == kb == "list":
            return _matching(a.value, b.value, tol)
        return all(any(_eq(x, y, tol) for y in b.value) for x in a.value) and all(
            any(_eq(y, x, tol) for x in a.value) for y in b.value
        )
    if ka == "ratio" and kb == "ratio":
        return _ratio_eq(a, b, tol)
    if ka == "ratio" and b.is_scalar:
        return _ratio_scalar_eq(a, b, tol)
    if kb == "ratio" and a.is_scalar:
        return _ratio_scalar_eq(b, a, tol)
    if ka == "set" and len(a.value) == 1 and kb != "set":
        return _eq(a.value[0], b, tol)
    if kb == "set" and len(b.value) == 1 and ka != "set":
        return _eq(a, b.value[0], tol)
    return a.text == b.text


_TEXT_ALIASES = {"\\varnothing": "\\emptyset", "{}": "\\emptyset", "\\{\\}": "\\emptyset", "∅": "\\emptyset"}


def _text_key(s: str) -> str:
    key = "".join(s.split()).casefold()
    return _TEXT_ALIASES.get(key, key)


def equivalent(a: str | None, b: str | None, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """True when two answers mean the same (see the module docstring for every rule).

    Numbers are equal within tolerance (``1,000 == 1000``, ``0.5 == 1/2 == \\frac{1}{2}``, integers exactly),
    percentages as documented (``50% == 50 == 0.5``), expressions symbolically/numerically (``sqrt(18) ==
    3*sqrt(2)``, ``\\frac{\\pi}{2} == pi/2``), tuples in order, sets without order, yes/no as booleans,
    units and currency are ignored (``$18 == 18 dollars == 18.00``), text case/space-insensitively.
    ``None`` is never equal to anything (not even ``None``).  Symmetric; never raises.
    """
    if a is None or b is None:
        return False
    try:
        pa, pb = parse(a), parse(b)
        if pa.kind == "text" and pb.kind == "text" and not pa.text and not pb.text:
            return False  # two empty answers are no answer, not agreement
        return _eq(pa, pb, _Tol(float(rel_tol), float(abs_tol)))
    except Exception:
        return False


def majority(answers: Sequence[str | None]) -> tuple[str | None, list[dict[str, Any]]]:
    """The most frequent answer up to equivalence (ties: the one given first) and the vote counts,
    ``[{"answer", "normalized", "count"}, ...]`` with the most votes first. Missing answers do not vote."""
    groups: list[dict[str, Any]] = []
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if equivalent(group["answer"], answer):
                group["count"] += 1
                break
        else:
            try:
                key = normalize(answer)
            except Exception:
                key = " ".join(answer.split())
            groups.append({"answer": answer, "normalized": key, "count": 1})
    ranked = sorted(groups, key=lambda g: -g["count"])  # stable: ties keep the order of first appearance
    return (ranked[0]["answer"] if ranked else None), ranked
