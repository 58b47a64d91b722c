"""Whether two answers mean the same thing (`equivalent`), and the majority answer of several."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from duet.answers.expressions import exact_div, lazy_sympy, numeric_value
from duet.answers.parsing import Parsed, normalize, parse

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
        return lazy_sympy().Rational(v.numerator, v.denominator)
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
        va, vb = numeric_value(a), numeric_value(b)
        return va is not None and vb is not None and _close(va, vb, tol)
    if len(symbols) > 8:
        return False
    rng = random.Random(1234 + len(symbols))
    agreed = 0
    for k in range(6):  # three points with positive values, three with mixed signs (|x| != x)
        point = {s: rng.randint(300, 2100) / 1000 * (1 if k < 3 else rng.choice((1, -1))) for s in symbols}
        va, vb = numeric_value(a, point), numeric_value(b, point)
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
    return v / 100 if isinstance(v, Fraction) else exact_div(v, lazy_sympy().Integer(100))


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
            return [exact_div(_to_sympy(x), _to_sympy(v)) for x in values]
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
        q = exact_div(_to_sympy(num), _to_sympy(den))
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
