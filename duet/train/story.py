"""A word problem as a masked story, and its solution written with named quantities.

A :class:`Story` is a problem's text with its numbers masked (``number0``, ``number1``, ...), the values of
those masks, and the equation in prefix notation over the masks (MAWPS' own representation). Every source
of one- and two-step problems (MAWPS + ASDiv-A rows, their variations, the story generator) is a Story, so
they are all solved the same way.

The solution names every number the problem gives after the words around it, then combines the names::

    novels = 5
    comics = 7
    more_comics = 3
    answer = comics + more_comics
    print(answer)

Copying a number next to its name is easy for a small model; choosing which names to combine is then a
matter of matching the question's words against the names, which carries over to stories it never saw
(a solution written as ``answer = 7 + 3`` leaves the model to memorise which template uses which number).
"""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass, replace

_MASK = re.compile(r"\bnumber(\d+)\b")
_OPS = ("+", "-", "*", "/")
_STOP = {"a", "an", "the", "of", "and", "or", "in", "on", "at", "to", "for", "each", "every", "with", "from", "by",
         "per", "is", "are", "was", "were", "be", "it", "them", "they", "he", "she", "his", "her", "their", "its",
         "that", "this", "these", "those", "than", "as", "if", "so", "then", "into", "out", "up", "all", "some",
         "had", "has", "have", "did", "does", "do", "how", "many", "much", "what", "there", "s", "times"}
_MODIFIERS = {"more", "fewer", "less", "extra", "additional", "other", "new", "old"}


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
        if tok in _OPS:
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


def infix(equation: tuple[str, ...] | list[str], names: dict[str, str]) -> str:
    """The prefix equation as a Python expression over ``names`` (masks) and literal constants."""
    precedence = {"+": 1, "-": 1, "*": 2, "/": 2}

    def render(t, parent: int = 0, right: bool = False) -> str:
        if isinstance(t, str):
            return names.get(t) or number_text(float(t))
        op, a, b = t
        p = precedence[op]
        text = f"{render(a, p)} {op} {render(b, p, True)}"
        needs = p < parent or (right and p == parent)  # a - (b - c), a / (b * c)
        return f"({text})" if needs else text

    return render(_parse(equation))


def masks_used(equation: tuple[str, ...] | list[str]) -> set[str]:
    return {t for t in equation if _MASK.fullmatch(t)}


# ----------------------------------------------------------------------------- naming the numbers


def _words_around(text: str, mask: str) -> tuple[list[str], list[str]]:
    """The lower-case words before and after ``mask`` in its sentence (other masks and symbols dropped)."""
    for sentence in sentences(text):
        if re.search(rf"\b{mask}\b", sentence):
            before, after = re.split(rf"\b{mask}\b", sentence, maxsplit=1)
            words = lambda s: re.findall(r"[a-z]+|number\d+|[.,?!;:]", s.lower())  # noqa: E731
            return words(before), words(after)
    return [], []


def _noun_after(after: list[str]) -> tuple[str | None, str | None]:
    """(modifier, noun): the first content word after a number, with a `more`-like word before it."""
    modifier = None
    for w in after[:3]:
        if w in _MODIFIERS and modifier is None:
            modifier = w
            continue
        if not w.isalpha() or w in _STOP or w.startswith("number"):
            return modifier, None
        return modifier, w
    return modifier, None


def _word_before(before: list[str]) -> str | None:
    for w in reversed(before[-3:]):
        if w.isalpha() and w not in _STOP and not w.startswith("number"):
            return w
    return None


def quantity_names(text: str, masks: list[str]) -> dict[str, str]:
    """A Python name for each mask from the words around it: ``3 more comics`` -> ``more_comics``; a name
    already taken gets the word before the number (``ate_cupcakes``), then a number."""
    names: dict[str, str] = {}
    taken: set[str] = {"answer", "print"}
    for mask in masks:
        before, after = _words_around(text, mask)
        modifier, noun = _noun_after(after)
        prev = _word_before(before)
        candidates = []
        if noun:
            candidates.append(f"{modifier}_{noun}" if modifier else noun)
            if prev:
                candidates.append(f"{prev}_{noun}")
        elif prev:
            candidates.append(f"{prev}_{modifier}" if modifier else prev)
        base = candidates[0] if candidates else "number"
        candidates += [f"{base}_{i}" for i in range(2, 20)]
        for c in candidates:
            c = re.sub(r"\W", "_", c)
            if c not in taken and c.isidentifier() and not keyword.iskeyword(c):
                names[mask] = c
                taken.add(c)
                break
    return names


def masks_in_order(text: str) -> list[str]:
    """The masks as they appear in the text, each once."""
    return list(dict.fromkeys(m.group(0) for m in _MASK.finditer(text)))


def named_code(story: Story) -> str:
    """The solution code: one line per number of the problem, then the answer over the names."""
    masks = masks_in_order(story.text)
    names = quantity_names(story.text, masks)
    lines = [f"{names[m]} = {number_text(story.numbers[int(m[6:])])}" for m in masks]
    lines.append(f"answer = {infix(story.equation, names)}")
    lines.append("print(answer)")
    return "\n".join(lines)


def is_clean(value: float) -> bool:
    """A value a word problem would have as its answer: finite, positive, at most 2 decimals."""
    return math.isfinite(value) and value > 0 and abs(value * 100 - round(value * 100)) < 1e-6
