"""Synthetic problems: one- to three-step word problems from templates (totals, differences, rates, ratios,
percentages, unit conversions, sharing, money), each with its solution cells and wrong solutions."""

from __future__ import annotations

import random
from collections.abc import Callable

from duet.train.solutions import NUMBER_LITERAL, Cell, Problem, clean_result, wrong_variants

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vera", "Wes", "Yuki", "Zoe"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "stamps", "eggs",
         "flowers", "toy cars", "balloons", "cupcakes", "coins"]
GOODS = [("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("pen", "pens"),
         ("shirt", "shirts"), ("melon", "melons"), ("game", "games"), ("plant", "plants")]


def _synthetic_templates() -> list[Callable[[random.Random], tuple[str, list[Cell]]]]:
    def total(r):
        n, it, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 90), r.randint(2, 90)
        return (f"{n} has {a} {it} and gets {b} more. How many {it} does {n} have now?",
                [("Add the new ones to what there was.", f"answer = {a} + {b}\nprint(answer)")])

    def difference(r):
        n, m, it = *r.sample(NAMES, 2), r.choice(ITEMS)
        a, b = r.randint(20, 150), r.randint(2, 19)
        return (f"{n} has {a} {it}. {m} has {b} {it}. How many more {it} does {n} have than {m}?",
                [("Subtract the smaller amount from the larger.", f"answer = {a} - {b}\nprint(answer)")])

    def left_over(r):
        n, it, a, b, c = r.choice(NAMES), r.choice(ITEMS), r.randint(30, 200), r.randint(2, 15), r.randint(2, 15)
        return (f"{n} had {a} {it}, gave away {b} and lost {c}. How many {it} are left?",
                [("Subtract what was given away and lost.", f"answer = {a} - {b} - {c}\nprint(answer)")])

    def groups(r):
        n, it, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 15), r.randint(2, 25)
        return (f"{n} has {a} boxes with {b} {it} in each box. How many {it} are there in all?",
                [("Multiply the boxes by the number in each box.", f"answer = {a} * {b}\nprint(answer)")])

    def sharing(r):
        n, it, k, each = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 12), r.randint(2, 20)
        return (f"{n} shares {k * each} {it} equally among {k} friends. How many {it} does each friend get?",
                [("Divide the total by the number of friends.", f"answer = {k * each} / {k}\nprint(answer)")])

    def cost(r):
        _n, (one, many), q, p = r.choice(NAMES), r.choice(GOODS), r.randint(2, 12), r.randint(2, 40)
        return (f"One {one} costs ${p}. How much do {q} {many} cost?",
                [("Multiply the price by the quantity.", f"answer = {q} * {p}\nprint(answer)")])

    def change(r):
        n, (_one, many), q, p = r.choice(NAMES), r.choice(GOODS), r.randint(2, 6), r.randint(2, 15)
        pay = r.choice([50, 100]) if q * p < 50 else 100 if q * p < 100 else 200
        return (f"{n} buys {q} {many} at ${p} each and pays with ${pay}. How much change does {n} get?",
                [("Find the cost of the purchase.", f"cost = {q} * {p}\nprint(cost)"),
                 ("Subtract the cost from the money paid.", f"answer = {pay} - cost\nprint(answer)")])

    def speed(r):
        n, h, v = r.choice(NAMES), r.randint(2, 9), r.randint(10, 90)
        return (f"{n} drives {h * v} km in {h} hours. What is the average speed in km per hour?",
                [("Divide the distance by the time.", f"answer = {h * v} / {h}\nprint(answer)")])

    def distance(r):
        _n, h, v = r.choice(NAMES), r.randint(2, 9), r.randint(3, 80)
        return (f"A train travels at {v} km per hour for {h} hours. How far does it travel?",
                [("Multiply the speed by the time.", f"answer = {v} * {h}\nprint(answer)")])

    def unit_price(r):
        (one, many), q, p = r.choice(GOODS), r.randint(2, 12), r.randint(2, 30)
        return (f"{q} {many} cost ${q * p} in total. How much does one {one} cost?",
                [("Divide the total cost by the number bought.", f"answer = {q * p} / {q}\nprint(answer)")])

    def percent_of(r):
        n, pct, base = r.choice(NAMES), r.choice([10, 20, 25, 30, 40, 50, 60, 75, 80]), r.randint(1, 40) * 20
        return (f"{n} scored {pct}% of {base} points. How many points did {n} score?",
                [("Take the percentage of the total.", f"answer = {pct} / 100 * {base}\nprint(answer)")])

    def discount(r):
        (one, _many), pct, price = r.choice(GOODS), r.choice([10, 20, 25, 50]), r.randint(2, 30) * 4
        return (f"A {one} costs ${price}. It is on sale for {pct}% off. What is the sale price?",
                [("Find the discount.", f"discount = {pct} / 100 * {price}\nprint(discount)"),
                 ("Subtract the discount from the price.", f"answer = {price} - discount\nprint(answer)")])

    def minutes(r):
        n, h, m = r.choice(NAMES), r.randint(1, 9), r.choice([0, 15, 20, 30, 45])
        return (f"{n} practised for {h} hours and {m} minutes. How many minutes is that?",
                [("Convert the hours to minutes and add the minutes.", f"answer = {h} * 60 + {m}\nprint(answer)")])

    def cents(r):
        d, c = r.randint(1, 40), r.randint(1, 99)
        return (f"A toy costs {d} dollars and {c} cents. How many cents is that?",
                [("Convert dollars to cents and add the cents.", f"answer = {d} * 100 + {c}\nprint(answer)")])

    def meters(r):
        km = r.randint(1, 30)
        return (f"A trail is {km} km long. How many meters long is it?",
                [("Multiply the kilometres by 1000.", f"answer = {km} * 1000\nprint(answer)")])

    def dozens(r):
        n, d, extra = r.choice(NAMES), r.randint(2, 9), r.randint(1, 11)
        return (f"{n} bought {d} dozen eggs and {extra} more eggs. How many eggs did {n} buy?",
                [("A dozen is 12: multiply and add the extra eggs.", f"answer = {d} * 12 + {extra}\nprint(answer)")])

    def ratio(r):
        n, it = r.choice(NAMES), r.choice(ITEMS)
        a, b, k = r.randint(1, 5), r.randint(1, 5), r.randint(2, 12)
        return (f"{n} sorts {it} into red and blue in the ratio {a}:{b}. There are {a * k} red ones. "
                f"How many blue ones are there?",
                [("Find how many are in one part of the ratio.", f"part = {a * k} / {a}\nprint(part)"),
                 ("Multiply one part by the blue share.", f"answer = part * {b}\nprint(answer)")])

    def weekly(r):
        n, per_day, days, spent = r.choice(NAMES), r.randint(2, 20), r.randint(2, 7), r.randint(1, 20)
        return (f"{n} saves ${per_day} a day for {days} days, then spends ${spent}. How much money is left?",
                [("Find the total saved.", f"saved = {per_day} * {days}\nprint(saved)"),
                 ("Subtract what was spent.", f"answer = saved - {spent}\nprint(answer)")])

    def three_step(r):
        n, (_one, many), q1, p1, q2, p2 = r.choice(NAMES), r.choice(GOODS), r.randint(2, 6), r.randint(2, 12), \
            r.randint(2, 6), r.randint(2, 12)
        return (f"{n} buys {q1} {many} at ${p1} each and {q2} pens at ${p2} each. How much does {n} spend?",
                [("Find the cost of each kind.", f"first = {q1} * {p1}\nsecond = {q2} * {p2}\nprint(first, second)"),
                 ("Add the two costs.", "answer = first + second\nprint(answer)")])

    def average(r):
        vals = [r.randint(50, 100) for _ in range(r.choice([2, 4, 5]))]
        vals[-1] += -sum(vals) % len(vals)
        listed = ", ".join(map(str, vals[:-1])) + f" and {vals[-1]}"
        return (f"The test scores were {listed}. What was the average score?",
                [("Add the scores and divide by how many there are.",
                  f"scores = [{', '.join(map(str, vals))}]\nanswer = sum(scores) / len(scores)\nprint(answer)")])

    return [total, difference, left_over, groups, sharing, cost, change, speed, distance, unit_price, percent_of,
            discount, minutes, cents, meters, dozens, ratio, weekly, three_step, average]


_TEMPLATES = _synthetic_templates()


def synthetic_problem(rng: random.Random) -> Problem | None:
    template = rng.choice(_TEMPLATES)
    question, cells = template(rng)
    if clean_result(cells) is None:
        return None
    numbers = NUMBER_LITERAL.findall(question)
    wrong = wrong_variants(cells, numbers, numbers, rng)
    return Problem(question, cells, "synthetic", f"synthetic-{template.__name__}", wrong)
