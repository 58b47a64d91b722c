"""A generator of one- to three-step stories over many owners, things, verbs and units.

A story follows one owner's amount of one kind of thing through events (gains, losses, groups of things,
rates over time), then asks for the end amount, the amount at the start (given the end), a share, or a
comparison with somebody else; a number the answer does not need is sometimes added. The same story can
end in different questions, so the model learns to read what is asked rather than which template it is
in. Stories come out as :class:`~duet.train.story.Story` (masked text, numbers, prefix equation), solved
the same way as the MAWPS rows.
"""

from __future__ import annotations

import random

from duet.train.story import Story, evaluate, is_clean
from duet.train.variations import NAMES, OTHER_ITEMS

THINGS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "stamps", "eggs",
          "flowers", "toy cars", "balloons", "cupcakes", "coins", "loaves", "muffins", "beads", "rocks", "comics",
          "novels", "oranges", "crayons", "tickets", "seeds", "plants", "bottles", "candies", "blocks", "pens"]
CONTAINERS = ["bags", "boxes", "packs", "trays", "baskets", "crates", "jars", "rows", "shelves", "cartons"]
GAIN_VERBS = [("buys", "bought"), ("finds", "found"), ("gets", "got"), ("picks", "picked"),
              ("collects", "collected"), ("wins", "won"), ("makes", "made"), ("bakes", "baked")]
LOSS_VERBS = [("gives away", "gave away"), ("loses", "lost"), ("sells", "sold"), ("uses", "used"),
              ("donates", "donated"), ("trades away", "traded away")]
RATES = [("reads", "pages", "day", "days"), ("walks", "miles", "day", "days"), ("saves", "dollars", "week", "weeks"),
         ("earns", "dollars", "hour", "hours"), ("plants", "trees", "day", "days"), ("writes", "pages", "day", "days"),
         ("bakes", "cookies", "hour", "hours"), ("packs", "boxes", "hour", "hours")]

Tree = str | tuple  # a mask, or (op, left, right)


def _flatten(tree: Tree) -> tuple[str, ...]:
    if isinstance(tree, str):
        return (tree,)
    op, a, b = tree
    return (op, *_flatten(a), *_flatten(b))


class _Builder:
    """Collects numbers as masks while a story is written."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.numbers: list[float] = []

    def mask(self, value: int | float) -> str:
        self.numbers.append(float(value))
        return f"number{len(self.numbers) - 1}"


def _event(b: _Builder, pron: str, thing: str, past: bool) -> tuple[str, str, Tree]:
    """One event: (sentence, "+" or "-", the amount as a tree)."""
    r = b.rng
    kind = r.choice(["gain", "gain", "loss", "loss", "gain_groups", "loss_groups"])
    if kind == "gain":
        verb = r.choice(GAIN_VERBS)[past]
        m = b.mask(r.randint(2, 40))
        return f"{pron} {verb} {m} more {thing}.", "+", m
    if kind == "loss":
        verb = r.choice(LOSS_VERBS)[past]
        m = b.mask(r.randint(2, 30))
        return f"{pron} {verb} {m} {thing}.", "-", m
    if kind == "gain_groups":
        verb = r.choice(GAIN_VERBS[:3])[past]
        g, e = b.mask(r.randint(2, 9)), b.mask(r.randint(2, 12))
        container = r.choice(CONTAINERS)
        phrase = r.choice([f"{g} {container} with {e} {thing} each", f"{g} {container} of {e} {thing}"])
        return f"{pron} {verb} {phrase}.", "+", ("*", g, e)
    g, e = b.mask(r.randint(2, 6)), b.mask(r.randint(2, 8))
    return f"{pron} {'gave' if past else 'gives'} {g} friends {e} {thing} each.", "-", ("*", g, e)


def events_story(rng: random.Random) -> Story | None:
    """An owner's amount through one or two events, then one of several questions."""
    b = _Builder(rng)
    owner, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    past = rng.random() < 0.5
    pron = owner if rng.random() < 0.5 else rng.choice(["She", "He"])
    question_kind = rng.choice(["end", "end", "start", "compare", "share", "together"])
    start = b.mask(rng.randint(10, 120))
    sentences = []
    if question_kind != "start":
        sentences.append(f"{owner} {'had' if past else 'has'} {start} {thing}.")
    else:
        sentences.append(f"{owner} {'had' if past else 'has'} some {thing}.")
    tree: Tree = start
    steps = []
    for _ in range(rng.choice([1, 1, 2])):
        sentence, op, amount = _event(b, pron, thing, past)
        sentences.append(sentence)
        steps.append((op, amount))
        tree = (op, tree, amount)
    if rng.random() < 0.35:  # a number the answer does not need
        extra = b.mask(rng.randint(2, 50))
        sentences.insert(rng.randint(1, len(sentences)),
                         rng.choice([f"{other} has {extra} {thing}.",
                                     f"{owner} also has {extra} {rng.choice(OTHER_ITEMS)}."]))
    have = "had" if past else "has"
    does = "did" if past else "does"
    if question_kind == "end":
        sentences.append(f"How many {thing} {does} {owner} have {rng.choice(['now', 'left', 'in the end'])}?"
                         if not past else f"How many {thing} did {owner} have in the end?")
    elif question_kind == "start":
        end_value = evaluate(_flatten(tree), [*b.numbers])  # numbers so far, start included
        end = b.mask(end_value)
        inverse: Tree = end
        for op, amount in reversed(steps):
            inverse = ("-" if op == "+" else "+", inverse, amount)
        tree = inverse
        sentences.append(f"In the end {owner} {have} {end} {thing}.")
        sentences.append(f"How many {thing} did {owner} have at first?")
    elif question_kind == "compare":
        m = b.mask(rng.randint(2, 200))
        sentences.append(f"{other} {have} {m} {thing}.")
        more = rng.random() < 0.5
        sentences.append(f"How many {'more' if more else 'fewer'} {thing} {does} {other} have than {owner} "
                         f"{'had' if past else 'has'} {'in the end' if past else 'now'}?")
        tree = ("-", m, tree) if more else ("-", tree, m)
    elif question_kind == "share":
        k = b.mask(rng.randint(2, 6))
        sentences.append(f"{owner} then shares them equally among {k} friends.")
        sentences.append(f"How many {thing} does each friend get?")
        tree = ("/", tree, k)
    else:
        m = b.mask(rng.randint(2, 80))
        sentences.append(f"{other} {have} {m} {thing}.")
        sentences.append(f"How many {thing} {'did' if past else 'do'} {owner} and {other} have together "
                         f"{'in the end' if past else 'now'}?")
        tree = ("+", tree, m)
    return _checked(Story(" ".join(sentences), tuple(b.numbers), _flatten(tree), "generator-events"))


def rate_story(rng: random.Random) -> Story | None:
    """A rate over time, with a start amount or a spending step: two steps."""
    b = _Builder(rng)
    owner, other = rng.sample(NAMES, 2)
    verb, unit, per, span = rng.choice(RATES)
    rate, count = b.mask(rng.randint(2, 30)), b.mask(rng.randint(2, 9))
    sentences = [f"{owner} {verb} {rate} {unit} every {per} for {count} {span}."]
    tree: Tree = ("*", rate, count)
    kind = rng.choice(["total", "plus", "minus", "compare", "per"])
    if kind == "plus":
        start = b.mask(rng.randint(5, 90))
        sentences.insert(0, f"{owner} already had {start} {unit}.")
        tree = ("+", start, tree)
        sentences.append(f"How many {unit} does {owner} have now?")
    elif kind == "minus":
        goal = b.mask(rng.randint(60, 400))
        sentences.insert(0, f"{owner} needs {goal} {unit} in all.")
        tree = ("-", goal, tree)
        sentences.append(f"How many more {unit} does {owner} still need?")
    elif kind == "compare":
        m = b.mask(rng.randint(2, 300))
        sentences.append(f"{other} has {m} {unit}.")
        sentences.append(f"How many more {unit} than {other} does {owner} have at the end?")
        tree = ("-", tree, m)
    elif kind == "per":
        b.numbers.clear()
        n = rng.randint(2, 9)
        total, count = b.mask(rng.randint(2, 30) * n), b.mask(n)
        sentences = [f"{owner} {verb} {total} {unit} in {count} {span}, the same number every {per}.",
                     f"How many {unit} is that each {per}?"]
        tree = ("/", total, count)
    else:
        sentences.append(f"How many {unit} does {owner} have after {count} {span}?"
                         if unit in {"dollars"} else f"How many {unit} is that in all?")
    return _checked(Story(" ".join(sentences), tuple(b.numbers), _flatten(tree), "generator-rates"))


def _checked(story: Story) -> Story | None:
    try:
        value = story.value()
    except ValueError:
        return None
    return story if is_clean(value) and value == int(value) else None


GENERATORS = [events_story, events_story, events_story, rate_story]


def generated_story(rng: random.Random) -> Story | None:
    """One generated story (None when its numbers did not work out; draw again)."""
    return rng.choice(GENERATORS)(rng)
