"""A word problem as a masked story, solved from its equation.

A :class:`Story` is a problem's text with its numbers masked (``number0``, ``number1``, ...), the values of
those masks, and the equation in prefix notation over the masks (MAWPS' own representation). Every source
of one- and two-step problems (MAWPS + ASDiv-A rows, their variations, the story generator) is a Story, so
they are all solved the same way.

The solution is one line of Python over the numbers, ``answer = 7 + 3``, from the equation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

_MASK = re.compile(r"\bnumber(\d+)\b")
OPS = ("+", "-", "*", "/")


@dataclass(frozen=True)
class Story:
    """A masked word problem: ``text`` with ``number0``.. masks, their ``numbers``, and a prefix ``equation``."""

    text: str
    numbers: tuple[float, ...]
    equation: tuple[str, ...]
    source: str = ""  # e.g. "mawps-17"; variations keep their source row's
    spelled: tuple[tuple[str, str], ...] = ()  # (mask, how the text writes it): ("number1", "seven")

    def value(self) -> float:
        """The equation's value with this story's numbers (ValueError if it cannot be evaluated)."""
        return evaluate(self.equation, self.numbers)

    def question(self) -> str:
        """The text with its numbers written in."""
        spelled = dict(self.spelled)
        return _MASK.sub(lambda m: spelled.get(m.group(0)) or number_text(self.numbers[int(m.group(1))]), self.text)

    def with_numbers(self, numbers: list[float] | tuple[float, ...]) -> Story:
        return replace(self, numbers=tuple(numbers), spelled=())


def number_text(value: float) -> str:
    """``5.0`` -> ``5``; ``2.5`` -> ``2.5``."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


def tidy(text: str) -> str:
    """MAWPS text is tokenised (``books .``): join punctuation back and collapse spaces."""
    text = re.sub(r"\s+([.,?!;:%)])", r"\1", text.strip())
    text = re.sub(r"([($])\s+", r"\1", text)
    return re.sub(r"\s+", " ", text)


def sentences(text: str) -> list[str]:
    """The sentences of a tidy text (split after ``.``, ``?`` or ``!`` followed by a space)."""
    return [s for s in re.split(r"(?<=[.?!])\s+", text.strip()) if s]


# ----------------------------------------------------------------------------- equations


def _parse(tokens: tuple[str, ...] | list[str]):
    """Prefix tokens -> a nested tuple tree ``(op, left, right)`` or a leaf token."""
    pos = 0

    def node():
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("the equation ends early")
        tok = tokens[pos]
        pos += 1
        if tok in OPS:
            return (tok, node(), node())
        return tok

    tree = node()
    if pos != len(tokens):
        raise ValueError("trailing tokens in the equation")
    return tree


def _leaf_value(tok: str, numbers: tuple[float, ...] | list[float]) -> float:
    m = _MASK.fullmatch(tok)
    return numbers[int(m.group(1))] if m else float(tok)


def evaluate(equation: tuple[str, ...] | list[str], numbers: tuple[float, ...] | list[float]) -> float:
    """The value of a prefix equation over masks (ValueError on a bad equation or a division by zero)."""
    def ev(t) -> float:
        if isinstance(t, str):
            return _leaf_value(t, numbers)
        op, a, b = t
        x, y = ev(a), ev(b)
        if op == "+":
            return x + y
        if op == "-":
            return x - y
        if op == "*":
            return x * y
        if y == 0:
            raise ValueError("division by zero")
        return x / y

    try:
        return ev(_parse(equation))
    except (IndexError, ZeroDivisionError) as e:
        raise ValueError(str(e)) from None


def infix(equation: tuple[str, ...] | list[str], names: dict[str, str], *, minimal: bool = True) -> str:
    """The prefix equation as a Python expression over ``names`` (what each mask is written as) and literal
    constants: with the fewest parentheses, or (``minimal=False``) each inner operation in parentheses, as the
    embedded model's solutions write it: ``(8 * 8) - 2``."""
    precedence = {"+": 1, "-": 1, "*": 2, "/": 2}

    def render(t, parent: int = 0, right: bool = False) -> str:
        if isinstance(t, str):
            return names.get(t) or number_text(float(t))
        op, a, b = t
        p = precedence[op]
        text = f"{render(a, p)} {op} {render(b, p, True)}"
        needs = p < parent or (right and p == parent)  # a - (b - c), a / (b * c)
        return f"({text})" if needs or (parent and not minimal) else text

    return render(_parse(equation))


def masks_used(equation: tuple[str, ...] | list[str]) -> set[str]:
    return {t for t in equation if _MASK.fullmatch(t)}


def is_clean(value: float) -> bool:
    """A value a word problem would have as its answer: finite, positive, at most 2 decimals."""
    return math.isfinite(value) and value > 0 and abs(value * 100 - round(value * 100)) < 1e-6
