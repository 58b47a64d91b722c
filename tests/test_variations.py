"""Stories, their variations, the story generator and the challenge dev split.

Golds are checked against independent references: every equation is re-evaluated by sympy from its
written-out form, every named-quantity solution is run in a separate Python process, and an inverse
question's answer is put back into the original story's equation.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sympy

from duet.answers import equivalent
from duet.train.challenge import challenge_rows
from duet.train.generator import generated_story
from duet.train.sources import Sources, normalised, story_problem
from duet.train.story import Story, evaluate, infix, number_text
from duet.train.variations import VARIATIONS, inverse, vary

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHALLENGE = REPO / "data" / "dev" / "challenge.jsonl"
needs_data = pytest.mark.skipif(not (SHARED_DATA / "mawps_asdiv_a" / "train.csv").is_file(), reason="no shared data")

SHELF = Story("A shelf holds number0 novels and number1 comics . number2 more comics are added . "
              "How many comics are on the shelf ?", (5.0, 7.0, 3.0), ("+", "number1", "number2"))


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout


def test_a_story_is_solved_by_its_equation_with_its_numbers_and_wrong_solutions_are_wrong():
    problem = story_problem(SHELF, random.Random(0))
    assert problem is not None and problem.cells[0][1] == "answer = 7 + 3\nprint(answer)"
    assert run_python(problem.cells[0][1]).strip() == "10" and problem.gold == "10"
    assert problem.wrong  # another operation, swapped operands, the unneeded 5
    for cells in problem.wrong:
        assert not equivalent(run_python(cells[0][1]).split()[-1], "10")


def test_infix_keeps_the_prefix_equations_order_of_operations():
    for equation, numbers in [(("-", "number0", "-", "number1", "number2"), (10, 4, 3)),
                              (("/", "number0", "*", "number1", "number2"), (24, 2, 3)),
                              (("*", "+", "number0", "number1", "number2"), (1, 2, 3))]:
        for minimal in (True, False):
            text = infix(equation, {f"number{i}": str(v) for i, v in enumerate(numbers)}, minimal=minimal)
            assert float(sympy.sympify(text)) == pytest.approx(evaluate(equation, [float(v) for v in numbers]))
    assert infix(("-", "*", "number0", "number1", "number2"), {"number0": "8", "number1": "8", "number2": "2"},
                 minimal=False) == "(8 * 8) - 2"


def test_inverse_asks_for_a_given_and_its_answer_solves_the_original_story():
    story = Story("Ana had number0 coins . She spent number1 coins on snacks . How many coins does she have left ?",
                  (26.0, 12.0), ("-", "number0", "number1"))
    for seed in range(10):
        varied = inverse(story, random.Random(seed))
        assert varied is not None
        assert "some" in varied.text and "14" in varied.question()
        # the given the question now asks for is the one "some" replaced; the answer is exactly that number
        asked = [v for v in story.numbers if not re.search(rf"\b{number_text(v)}\b", varied.question())]
        assert len(asked) == 1 and varied.value() == pytest.approx(asked[0])
        other = 26.0 if asked[0] == 12.0 else 12.0  # and it solves the original story with the stated 14
        assert evaluate(story.equation, [asked[0], other] if asked[0] == 26.0 else [other, asked[0]]) == 14.0


def test_every_variation_keeps_a_gold_that_sympy_agrees_with():
    rng = random.Random(3)
    stories = [SHELF, Story("Tom had number0 cards and gave number1 cards to Ann . How many cards does Tom have now ?",
                            (30.0, 8.0), ("-", "number0", "number1"))]
    made = 0
    for kind in VARIATIONS:
        for story in stories:
            varied = vary(story, kind, rng)
            if varied is None:
                continue
            made += 1
            written = infix(varied.equation, {f"number{i}": number_text(v) for i, v in enumerate(varied.numbers)})
            assert float(sympy.sympify(written)) == pytest.approx(varied.value())
            problem = story_problem(varied, rng)
            assert problem is not None
            assert equivalent(run_python(problem.cells[0][1]).split()[-1], number_text(varied.value()))
    assert made >= 8


def test_generated_stories_are_solved_right_and_vary_in_kind():
    rng = random.Random(0)
    texts, sources = set(), set()
    for _ in range(200):
        story = generated_story(rng)
        if story is None:
            continue
        problem = story_problem(story, rng, "stories")
        assert problem is not None
        written = infix(story.equation, {f"number{i}": number_text(v) for i, v in enumerate(story.numbers)})
        assert equivalent(problem.gold, number_text(float(sympy.sympify(written))))
        texts.add(normalised(story.text))
        sources.add(story.source)
    assert len(texts) > 100 and sources == {"generator-events", "generator-rates"}


@needs_data
def test_no_dev_story_is_in_any_training_source():
    """No dev row's text (numbers, case and punctuation aside) occurs in MAWPS train, GSM8K train, or the
    generator's output."""
    real = Sources.load(SHARED_DATA)
    dev = {normalised(r.question) for r in real.mawps_dev} | {normalised(r["question"]) for r in real.gsm8k_dev}
    assert not dev & {normalised(r.question) for r in real.mawps_train}
    assert not dev & {normalised(p.question) for p in real.gsm8k_train}
    rng = random.Random(1)
    generated = {normalised(s.text) for s in (generated_story(rng) for _ in range(3000)) if s}
    assert not dev & generated


@needs_data
def test_the_challenge_split_is_built_from_dev_rows_only_and_is_reproducible():
    real = Sources.load(SHARED_DATA)
    rows = challenge_rows(real)
    assert [json.loads(line) for line in CHALLENGE.read_text().splitlines()] == rows
    dev_ids = {f"mawps-{r.index}" for r in real.mawps_dev}
    assert {r["source"] for r in rows} <= dev_ids
    kinds = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        assert equivalent(r["answer"].removeprefix("#### "), number_text(float(sympy.sympify(r["equation"]))))
    assert set(kinds) == set(VARIATIONS) and min(kinds.values()) >= 60 and len(rows) >= 500
    train_texts = {normalised(r.question) for r in real.mawps_train}
    assert not any(normalised(r["question"]) in train_texts for r in rows)


@needs_data
def test_the_dev_file_marks_the_rows_whose_story_a_training_row_also_tells():
    from duet.train.sources import is_dev, load_mawps

    rows = load_mawps(SHARED_DATA / "mawps_asdiv_a" / "train.csv")
    told = {normalised(r.question) for r in rows if not is_dev("mawps", r.index)}
    by_id = {f"mawps-{r.index}": r for r in rows}
    dev = [json.loads(line) for line in (REPO / "data" / "dev" / "mawps_asdiv_a_dev.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in dev}
    assert kinds == {"held_out", "story_in_training"}
    for r in dev:
        assert (normalised(by_id[r["id"]].question) in told) == (r["kind"] == "story_in_training")


@needs_data
def test_make_demos_question_is_in_no_training_source():
    question = re.search(r'duet solve "([^"]+)"', (REPO / "Makefile").read_text()).group(1)
    real = Sources.load(SHARED_DATA)
    told = {normalised(r.question) for r in real.mawps_train + real.mawps_dev}
    told |= {normalised(p.question) for p in real.gsm8k_train}
    rng = random.Random(2)
    told |= {normalised(s.text) for s in (generated_story(rng) for _ in range(5000)) if s}
    assert normalised(question) not in told
