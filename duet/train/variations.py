"""Variations of a masked story that keep its gold computable from its own equation.

Each variation takes a :class:`~duet.train.story.Story` and a random generator and returns a new Story (or
None when the story does not lend itself to it). The challenge dev split applies them to dev rows, training
to training rows with fresh numbers, so the model meets every kind of change without meeting the dev
stories. The kinds:

- ``distractor``: a sentence with a number the answer does not need;
- ``inverse``: the same story asked for another unknown (the start, or the change), its answer stated;
- ``reorder``: two sentences swapped where neither refers back to the other;
- ``surface``: numbers written as words, with thousands separators, or money with ``$``;
- ``two_step``: one given number replaced by a product (``4 boxes with 12 apples each``);
- ``compare``: a second owner, and a question that compares (``how many more ... than``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import replace

from duet.train.story import OPS, Story, evaluate, is_clean, masks_used, sentences

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vera", "Wes", "Yuki", "Zoe"]
OTHER_ITEMS = ["pencils", "stamps", "postcards", "buttons", "ribbons", "magnets", "keychains", "puzzles",
               "candles", "erasers", "crayons", "feathers", "pebbles", "bookmarks", "badges"]
# things that come in bags, boxes and rows (a "basket of customers" would not do)
COUNTABLE = {"apples", "books", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "seashells",
             "stamps", "eggs", "flowers", "balloons", "cupcakes", "coins", "muffins", "beads", "rocks", "oranges",
             "crayons", "tickets", "seeds", "plants", "bottles", "candies", "blocks", "pens", "toys", "cans",
             "peaches", "pears", "bananas", "lemons", "tomatoes", "potatoes", "carrots", "roses", "tulips",
             "peanuts", "pies", "cakes", "brownies", "donuts", "bagels", "candles", "buttons", "erasers", "markers",
             "pennies", "dimes", "nickels", "quarters", "chairs", "plates", "cups", "glasses", "shirts", "socks",
             "games", "puzzles", "cars", "trucks", "dolls", "kites", "watermelons", "strawberries", "grapes",
             "chocolates", "lollipops", "magazines", "comics", "notebooks", "folders", "batteries", "bulbs"}
_PRONOUN_START = re.compile(r"^(he|she|they|it|his|her|their|its|this|these|those|that|then|after|later|now|"
                            r"next|finally|so|if|also|afterwards|later|each|every|the rest|of)\b", re.I)
_PRONOUN = re.compile(r"\b(he|she|they|it|his|her|hers|him|their|them|its|we|our|us|i|my|you|your)\b", re.I)
_REFERS_BACK = re.compile(r"\b(then|after|later|now|left|remaining|rest|again|another|more|fewer|them|it|"
                          r"those|these|that|each|every|same|total|altogether|in all|also|still|other)\b", re.I)
_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
          11: "eleven", 12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen", 16: "sixteen",
          17: "seventeen", 18: "eighteen", 19: "nineteen", 20: "twenty", 30: "thirty", 40: "forty", 50: "fifty",
          60: "sixty", 70: "seventy", 80: "eighty", 90: "ninety", 100: "one hundred"}
_TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty", 9: "ninety"}
_PAST = {"buy": "bought", "give": "gave", "find": "found", "eat": "ate", "sell": "sold", "lose": "lost",
         "get": "got", "spend": "spent", "take": "took", "make": "made", "put": "put", "read": "read",
         "grow": "grew", "catch": "caught", "cut": "cut", "have": "had", "win": "won", "bring": "brought",
         "build": "built", "draw": "drew", "drive": "drove", "fly": "flew", "throw": "threw", "write": "wrote",
         "swim": "swam", "run": "ran", "sing": "sang", "leave": "left", "send": "sent", "pay": "paid",
         "break": "broke", "see": "saw", "do": "did", "keep": "kept", "hold": "held", "sit": "sat", "feed": "fed"}
_LEMMA = {past: base for base, past in _PAST.items()}
_PARTICIPLE = {"gave": "given", "ate": "eaten", "grew": "grown", "took": "taken", "wrote": "written",
               "drew": "drawn", "threw": "thrown", "drove": "driven", "sang": "sung", "ran": "run", "flew": "flown",
               "swam": "swum", "saw": "seen", "broke": "broken", "did": "done"}


def number_words(n: int) -> str | None:
    """``27`` -> ``twenty-seven`` for 2..100; None otherwise."""
    if n in _WORDS:
        return _WORDS[n]
    if 21 <= n <= 99 and n // 10 in _TENS:
        return f"{_TENS[n // 10]}-{_WORDS.get(n % 10, '')}" if n % 10 >= 2 else (
            f"{_TENS[n // 10]}-one" if n % 10 == 1 else None)
    return None


def _next_mask(story: Story) -> str:
    return f"number{len(story.numbers)}"


def _question_split(story: Story) -> tuple[list[str], str] | None:
    """(body sentences, the question sentence) when the story ends with one question sentence."""
    parts = sentences(story.text)
    if len(parts) < 2 or not parts[-1].endswith("?") or any(p.endswith("?") for p in parts[:-1]):
        return None
    return parts[:-1], parts[-1]


def _subject(body: list[str]) -> str | None:
    """The story's main person: a capitalised first word of the first sentence that is a name."""
    m = re.match(r"^([A-Z][a-z]+)\b", body[0])
    if m and m.group(1) not in {"There", "The", "A", "An", "In", "On", "At", "If", "For", "Each", "Every",
                                 "Some", "This", "His", "Her", "Their", "It", "He", "She", "They", "We", "I",
                                 "After", "When", "While", "During", "Last", "Today", "Yesterday", "Mrs", "Mr"}:
        return m.group(1)
    return None


# ----------------------------------------------------------------------------- the kinds


def distractor(story: Story, rng: random.Random) -> Story | None:
    """A sentence, before the question, with a number the answer does not need."""
    split = _question_split(story)
    if split is None:
        return None
    body, question = split
    text_words = set(re.findall(r"[a-z]+", story.text.lower()))
    items = [i for i in OTHER_ITEMS if i not in text_words]
    item = rng.choice(items)
    mask = _next_mask(story)
    who = _subject(body)
    options = [f"There are also {mask} {item} on the table.", f"The room also holds {mask} {item}."]
    if who:
        options += [f"{who} also has {mask} {item}.", f"{who} keeps {mask} {item} in a drawer."]
    text = " ".join([*body, rng.choice(options), question])
    value = float(rng.randint(2, 60))
    return Story(text, (*story.numbers, value), story.equation, story.source)


_STATE_VERB = re.compile(r"\b(has|have|had|is|are|was|were|weighs|weighed|holds|costs|contains)\b", re.I)


def _states_a_fact(sentence: str) -> bool:
    """A sentence that says how much there is, with no action, pronoun or time word: its place in the story
    does not matter (an action would: "Jason has 743 cards" before or after "Alyssa bought 625 of them")."""
    words = re.findall(r"[a-z]+", sentence.lower())
    acted = any(w.endswith("ed") and w not in {"need", "weighed"} or w in _LEMMA for w in words)
    return ("number" in sentence and bool(_STATE_VERB.search(sentence)) and not acted
            and not _PRONOUN_START.match(sentence) and not _REFERS_BACK.search(sentence)
            and not _PRONOUN.search(sentence))


def _independent(a: str, b: str) -> bool:
    """Two sentences about different people, neither mentioning the other's, with no pronoun or time word
    ("Joan picked 36 oranges. Sara picked 10 oranges.")."""
    first = [re.match(r"^([A-Z][a-z]+) [a-z]+ number\d+", s) for s in (a, b)]
    if not all(first) or first[0].group(1) == first[1].group(1) or first[0].group(1) in {"There", "The"}:
        return False
    return all(m.group(1) not in other and not _REFERS_BACK.search(s) and not _PRONOUN.search(s)
               for m, s, other in ((first[0], a, b), (first[1], b, a)))


_PAIR = re.compile(r"\b(number\d+ (?:[a-z]+ )?[a-z]+s) and (number\d+ (?:[a-z]+ )?[a-z]+s)\b")


def reorder(story: Story, rng: random.Random) -> Story | None:
    """The order of the givens changed where the meaning allows: two adjacent sentences that each state a
    fact or tell of different people swapped, or two amounts joined by "and" swapped."""
    split = _question_split(story)
    if split is None:
        return None
    body, question = split
    spots: list[tuple[str, int]] = [("sentences", i) for i in range(len(body) - 1)
                                    if all(_states_a_fact(s) for s in body[i:i + 2]) or _independent(*body[i:i + 2])]
    spots += [("pair", i) for i, s in enumerate(body) if _PAIR.search(s)]
    if not spots:
        return None
    how, i = rng.choice(spots)
    if how == "sentences":
        body = body[:i] + [body[i + 1], body[i]] + body[i + 2:]
    else:
        body = [*body[:i], _PAIR.sub(lambda m: f"{m.group(2)} and {m.group(1)}", body[i], count=1), *body[i + 1:]]
    return Story(" ".join([*body, question]), story.numbers, story.equation, story.source)


def surface(story: Story, rng: random.Random) -> Story | None:
    """Numbers as words (2..100), thousands separators (>= 1000), or ``$N`` for ``N dollars``."""
    text, spelled = story.text, dict(story.spelled)
    for m in dict.fromkeys(re.findall(r"\bnumber\d+\b", text)):
        v = story.numbers[int(m[6:])]
        if v != int(v):
            continue
        n, choice = int(v), rng.random()
        money = re.search(rf"\${m}\b", text) is not None  # "$5": money keeps its digits
        if re.search(rf"\b{m} dollars\b", text) and not money and choice < 0.5:
            text = re.sub(rf"\b{m} dollars\b", f"${m}", text)
            spelled[m] = f"{n:,}"
        elif n >= 1000:
            spelled[m] = f"{n:,}"
        elif number_words(n) and not money and choice < 0.7:
            spelled[m] = number_words(n) or ""
    if not spelled:
        return None
    return replace(story, text=text, spelled=tuple(spelled.items()))


def two_step(story: Story, rng: random.Random) -> Story | None:
    """A given number of things becomes groups of things: ``number1 apples`` -> ``4 bags with 6 apples each``."""
    used = sorted(masks_used(story.equation))
    spots = []
    for m in used:
        for hit in re.finditer(rf"\b{m} ([a-z]+)\b", story.text):
            if hit.group(1) in COUNTABLE:
                spots.append((m, hit))
    if not spots:
        return None
    m, hit = rng.choice(spots)
    groups, each = _next_mask(story), f"number{len(story.numbers) + 1}"
    container = rng.choice(["bags", "boxes", "packs", "rows", "baskets", "crates", "stacks", "jars"])
    phrase = rng.choice([f"{groups} {container} with {each} {hit.group(1)} each",
                         f"{groups} {container} of {each} {hit.group(1)}"])
    text = story.text[:hit.start()] + phrase + story.text[hit.end():]
    equation = []
    for tok in story.equation:
        equation += ["*", groups, each] if tok == m else [tok]
    k = float(rng.randint(2, 9))
    per = story.numbers[int(m[6:])]
    return Story(text, (*story.numbers, k, per), tuple(equation), story.source)


def compare(story: Story, rng: random.Random) -> Story | None:
    """A second amount stated, and a question that compares it with the story's answer."""
    split = _question_split(story)
    if split is None:
        return None
    body, question = split
    m = _DO_Q.match(question)
    if not m or m.group("v") != "have" or m.group("s") in {"you", "we", "I"}:
        return None
    x, s, aux, rest = m.group("x"), m.group("s"), m.group("aux"), m.group("rest").strip()
    if s in {"he", "she"}:
        s = _subject(body) or ""
        if not s:
            return None
    other = rng.choice([n for n in NAMES if n not in story.text])
    mask = _next_mask(story)
    past = aux == "did"
    has = "had" if past else "has"
    verb = {"did": "had", "will": "will have", "do": "have", "does": "has"}[aux]
    than = f"{s} {verb}{(' ' + rest) if rest else ''}"
    more = rng.random() < 0.6
    q = f"How many {'more' if more else 'fewer'} {x} {'did' if past else 'does'} {other} have than {than}?"
    text = " ".join([*body, f"{other} {has} {mask} {x}.", q])
    try:
        base = story.value()
    except ValueError:
        return None
    if not is_clean(base) or base != int(base):
        return None
    delta = rng.randint(1, max(2, int(base)))
    value = base + delta if more else base - delta
    if value <= 0:
        return None
    equation = ("-", mask, *story.equation) if more else ("-", *story.equation, mask)
    return Story(text, (*story.numbers, float(value)), equation, story.source)


_OWNER = r"(?P<s>[A-Z][a-z]+|[Hh]e|[Ss]he|[Tt]hey|I|[Ww]e)"
_HAVE_SENTENCE = re.compile(rf"\b{_OWNER} (?P<v>has|had|have) (?P<m>number\d+) (?P<x>[a-z]+)")
_THERE_SENTENCE = re.compile(r"\b[Tt]here (?P<v>are|were) (?P<m>number\d+) (?P<x>[a-z]+)")
_ACTION_SENTENCE = re.compile(rf"\b{_OWNER} (?P<v>[a-z]+) (?P<m>number\d+) (?P<more>more )?(?P<x>[a-z]+)")
_DO_Q = re.compile(r"^How many (?P<x>[a-z]+(?: [a-z]+)?) (?P<aux>do|does|did|will) (?P<s>[A-Z][a-z]+|he|she|they|"
                   r"you|we|I) (?P<v>[a-z]+)(?P<rest>(?: [a-z]+)*)\s*\?$")
_BE_Q = re.compile(r"^How many (?P<x>[a-z]+(?: [a-z]+)?) (?P<be>are|were|is|was)(?P<there> there)?"
                   r"(?P<rest>(?: [a-z]+)*)\s*\?$")
_STOP_NOUNS = {"to", "of", "in", "on", "at", "for", "from", "with", "times", "more", "less", "and", "each", "away",
               "a", "the", "per", "percent"}
_NOT_VERBS = {"more", "less", "many", "much", "the", "a", "an", "of", "in", "to", "all"}


def _present_s(verb: str) -> str:
    if verb == "have":
        return "has"
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _past(verb: str) -> str:
    if verb in _PAST:
        return _PAST[verb]
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


def _answer_statement(question: str) -> str | None:
    """The story's question turned into a statement of its answer (with a mask ``ANSWER``)."""
    m = _DO_Q.match(question)
    if m and m.group("v") not in _NOT_VERBS:
        s, v, aux = m.group("s"), m.group("v"), m.group("aux")
        verb = {"do": v, "does": _present_s(v), "did": _past(v), "will": f"will {v}"}[aux]
        lead = "Now " if aux in {"do", "does"} else "In the end, " if aux == "did" else "Then "
        rest = re.sub(r"\bnow\b", "", m.group("rest")).rstrip() if lead == "Now " else m.group("rest")
        return f"{lead}{s} {verb} ANSWER {m.group('x')}{rest}."
    m = _BE_Q.match(question)
    if m:
        if m.group("there"):
            return f"There {m.group('be')} ANSWER {m.group('x')}{m.group('rest')}."
        if m.group("rest"):
            return f"In the end, ANSWER {m.group('x')} {m.group('be')}{m.group('rest')}."
    return None


def inverse(story: Story, rng: random.Random) -> Story | None:
    """The story asked for one of its givens (the start, or the change), its original answer stated."""
    split = _question_split(story)
    if split is None or len(story.equation) != 3 or story.equation[0] not in OPS:
        return None
    body, question = split
    statement = _answer_statement(question)
    if statement is None:
        return None
    op, a, b = story.equation
    if a == b:
        return None
    options = []
    for i, sentence in enumerate(body):
        for pattern in (_HAVE_SENTENCE, _THERE_SENTENCE, _ACTION_SENTENCE):
            hit = pattern.search(sentence)
            if (hit and hit.group("m") in (a, b) and sentence.count("number") == 1
                    and hit.group("x") not in _STOP_NOUNS and hit.group("x").endswith("s")
                    and not re.search(r"\b(each|every|per|a|an)\b", sentence[hit.end():])):
                options.append((i, pattern, hit))
                break
    if not options:
        return None
    i, pattern, hit = rng.choice(options)
    target, x = hit.group("m"), hit.group("x")
    if pattern is _HAVE_SENTENCE:
        s = hit.group("s")
        s = s if s not in {"He", "She", "They", "We"} else s.lower()
        new_q = f"How many {x} did {s} have at first?"
    elif pattern is _THERE_SENTENCE:
        new_q = f"How many {x} {hit.group('v')} there?"
    else:
        verb = hit.group("v")
        if verb in {"has", "had", "have", "is", "was", "are", "were", "needs", "wants", "can", "will"}:
            return None
        participle = _PARTICIPLE.get(verb) or (verb if verb.endswith("ed") or verb in _LEMMA else None)
        if participle is None:
            return None  # a present-tense verb: no past participle to ask with
        new_q = f"How many {x} were {participle}?"
    sentence = body[i]
    body = [*body[:i], sentence[:hit.start("m")] + "some" + sentence[hit.end("m"):], *body[i + 1:]]
    answer_mask = f"number{len(story.numbers)}"
    text = " ".join([*body, statement.replace("ANSWER", answer_mask), new_q])
    try:
        c = story.value()
    except ValueError:
        return None
    if not is_clean(c):
        return None
    other = b if target == a else a
    if op == "+":
        equation = ("-", answer_mask, other)
    elif op == "-":
        equation = ("+", answer_mask, b) if target == a else ("-", a, answer_mask)
    elif op == "*":
        equation = ("/", answer_mask, other)
    else:
        equation = ("*", answer_mask, b) if target == a else ("/", a, answer_mask)
    new = Story(text, (*story.numbers, c), equation, story.source)
    try:
        v = new.value()
    except ValueError:
        return None
    return new if is_clean(v) and abs(v - story.numbers[int(target[6:])]) < 1e-6 else None


VARIATIONS: dict[str, Callable[[Story, random.Random], Story | None]] = {
    "distractor": distractor, "inverse": inverse, "reorder": reorder, "surface": surface,
    "two_step": two_step, "compare": compare,
}


def fresh_numbers(story: Story, rng: random.Random, tries: int = 30) -> Story | None:
    """The story with fresh numbers of the same kind and size whose answer is clean (a whole number when
    every given number is whole), or None."""
    whole = all(v == int(v) for v in story.numbers)
    # numbers the equation does not use keep their values: they are often counts the story relies on
    # ("the first watermelon ..., the second ..." with "2 watermelons"), which a fresh value would contradict
    used = {story.numbers[int(m[6:])] for m in masks_used(story.equation)}
    for _ in range(tries):
        fresh = {v: resample(v, rng) if v in used else v for v in dict.fromkeys(story.numbers)}
        candidate = story.with_numbers([fresh[v] for v in story.numbers])
        try:
            value = candidate.value()
        except ValueError:
            continue
        if is_clean(value) and (not whole or value == int(value)) and value < 1e7:
            return candidate
    return None


def resample(value: float, rng: random.Random) -> float:
    """A fresh number of the same kind and similar size (equal numbers stay equal: callers map by value)."""
    if value != int(value):
        return round(rng.uniform(0.5, 2) * value, 1 if abs(value) >= 1 else 2) or value
    v = int(value)
    if v <= 1:
        return value
    if v <= 12:
        return float(rng.randint(2, 12))
    return float(rng.randint(max(2, v // 3), v * 3))


def vary(story: Story, kind: str, rng: random.Random, tries: int = 5) -> Story | None:
    """``story`` changed by variation ``kind`` with clean numbers, or None when it does not apply."""
    for _ in range(tries):
        base = fresh_numbers(story, rng)
        if base is None:
            return None
        varied = VARIATIONS[kind](base, rng)
        if varied is None:
            continue
        try:
            value = evaluate(varied.equation, varied.numbers)
        except ValueError:
            continue
        whole = all(v == int(v) for v in varied.numbers)
        if is_clean(value) and (not whole or value == int(value)):
            return varied
    return None

