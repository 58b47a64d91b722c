"""An answer reduced to a `Parsed` value: cleaning, then numbers, expressions, collections or text."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

from duet.answers.expressions import exact_mul, lazy_sympy, parse_expression
from duet.answers.extraction import extract_boxed
from duet.answers.limits import MAX_CLEAN_LEN, MAX_DEPTH, MAX_ELEMENTS, MAX_PARSE_LEN
from duet.answers.numbers import PERCENT_RE, SIMPLE_NUM_RE, format_number, parse_number, strip_unit

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


def clean_answer(s: str) -> str:
    """Strip presentation from an answer: delimiters, ``\\text{}``, sizing, currency, thin spaces, bold.

    Numbers, units, percent signs and structure are left for :func:`_parse_clean`.
    """
    s = s.strip()
    if len(s) > MAX_CLEAN_LEN:
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


def text_answer(s: str) -> Parsed:
    return Parsed("text", s, s)




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
    if parts is None or len(parts) > MAX_ELEMENTS or any(not p for p in parts):
        return None
    return tuple(_parse_clean(p, depth + 1) for p in parts)


def _parse_scalar(s: str, units: bool = True) -> Parsed | None:
    """A number or expression, with an optional percent sign and (if ``units``) unit; None otherwise."""
    if not s or len(s) > MAX_PARSE_LEN:
        return None
    percent = False
    m = PERCENT_RE.search(s)
    if m:
        percent, s = True, s[: m.start()].strip()
    s = s.strip()
    if s.startswith("{") and s.endswith("}") and _encloses(s):  # "{5}" LaTeX grouping
        s = s[1:-1].strip()
    candidates = [(s, 1, percent)]
    unit = strip_unit(s) if units else None
    if unit:
        head, scale = unit
        m = PERCENT_RE.search(head)
        head_percent = bool(m) or percent
        if m:
            head = head[: m.start()].strip()
        candidates.insert(0, (head, scale, head_percent))  # "5 m" is five metres, not 5*m
    for c, scale, pct in candidates:
        v = parse_number(c)
        if v is not None:
            return _number_parsed(v * scale, pct)
    for c, scale, pct in candidates:
        e = parse_expression(c)
        if e is not None:
            e = exact_mul(e, lazy_sympy().Integer(scale)) if scale != 1 else e
            if e.is_Rational:
                return _number_parsed(Fraction(int(e.p), int(e.q)), pct)
            return Parsed("expr", e, _expr_text(e) + ("%" if pct else ""), pct)
    return None


def _number_parsed(v: Fraction, percent: bool) -> Parsed:
    return Parsed("number", v, format_number(v) + ("%" if percent else ""), percent)


def _expr_text(e: Any) -> str:
    try:
        return lazy_sympy().sstr(e, order="none")  # no term ordering: ordering may evaluate numerically
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
        return text_answer("")
    if len(s) > MAX_PARSE_LEN or depth > MAX_DEPTH:
        return text_answer(" ".join(s.split()))
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
    return text_answer(s)


@lru_cache(maxsize=8192)
def _parse_cached(answer: str) -> Parsed:
    m = SIMPLE_NUM_RE.match(answer)
    if m:  # the common case: "72", "-3.5"
        return _number_parsed(Fraction(answer.strip()), False)
    return _parse_clean(clean_answer(answer))


def parse(answer: str) -> Parsed:
    """Structured value of an answer: number (exact Fraction), sympy expression, tuple/set/list/ratio of
    parsed values, yes/no boolean, or normalised text.  Never raises; None and non-strings are accepted."""
    if answer is None:
        return text_answer("")
    if not isinstance(answer, str):
        answer = str(answer)
    try:
        return _parse_cached(answer)
    except Exception:
        return text_answer(" ".join(answer.split())[:MAX_CLEAN_LEN])


def normalize(answer: str) -> str:
    """Canonical display form of an answer, also a fast equality key (equal forms => ``equivalent``).

    Strips ``$``/``\\$``, ``\\text{...}`` units, currency, thousands separators, trailing ``.``, ``x =``;
    numbers come out canonical (``$1,200.50`` -> ``1200.5``, ``\\frac{1}{2}`` -> ``0.5``, ``1/3`` stays);
    a percentage keeps its sign (``50\\%`` -> ``50%``); expressions are printed by sympy (``\\sqrt{18}`` ->
    ``3*sqrt(2)``); set and list elements are sorted; yes/true -> ``yes``, no/false -> ``no``.
    """
    return parse(answer).text
