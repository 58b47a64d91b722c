"""Table-driven tests for duet.answers: extraction, normalisation, parsing and equivalence."""

from __future__ import annotations

import itertools
import json
import random
import time
from fractions import Fraction
from pathlib import Path

import pytest

from duet.answers import (
    Parsed,
    equivalent,
    extract_answer,
    extract_boxed,
    gold_answer,
    normalize,
    parse,
)

GSM8K_TRAIN = Path("/work/shared/data/gsm8k/train.jsonl")

# (a, b, expected): every row is checked in both directions (equivalent must be symmetric).
EQUIV_TABLE: list[tuple[str, str, bool]] = [
    # --- plain numbers, signs, decimals
    ("72", "72", True),
    ("72", "73", False),
    ("-3", "-3.0", True),
    ("+3", "3", True),
    ("-3", "3", False),
    (".5", "0.5", True),
    ("3.", "3", True),
    ("1e3", "1000", True),
    ("1.5E-2", "0.015", True),
    ("0", "-0", True),
    ("007", "7", True),
    # --- thousands separators
    ("1,000", "1000", True),
    ("1,234.5", "1234.50", True),
    ("1,234,567", "1234567", True),
    ("1{,}234", "1234", True),
    ("1\\,234", "1234", True),
    ("1,2", "12", False),
    # --- currency and units
    ("$18", "18", True),
    ("$18", "18 dollars", True),
    ("18 dollars", "18.00", True),
    ("\\$18", "$18.00", True),
    ("$1,200.50", "1200.5", True),
    ("-$5", "-5", True),
    ("€20", "20", True),
    ("12 apples", "12", True),
    ("5 km/h", "5", True),
    ("5cm", "5", True),
    ("10\\text{ cm}", "10", True),
    ("10 \\mbox{ cm}^2", "10", True),
    ("9.8 m/s^2", "9.8", True),
    ("20 sq. units", "20", True),
    ("60 miles per hour", "60", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("45°", "45", True),
    ("5 m", "5", True),
    ("2x", "2", False),
    ("12 apples", "13 apples", False),
    # --- percent
    ("50%", "50", True),
    ("50\\%", "50", True),
    ("50 percent", "50%", True),
    ("50%", "0.5", True),
    ("50%", "50\\%", True),
    ("12.5%", "0.125", True),
    ("12.5%", "1/8", True),
    ("50%", "5", False),
    ("50%", "0.05", False),
    ("\\frac{100}{3}\\%", "\\frac{1}{3}", True),
    # --- fractions vs decimals, tolerance
    ("0.5", "1/2", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac{3}{4}", "3/4", True),
    ("\\frac12", "0.5", True),
    ("\\frac{1}{3}", "0.3333333", True),
    ("\\frac{1}{3}", "0.33", False),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-1/2", True),
    ("2/4", "1/2", True),
    ("1000000", "1000001", False),
    ("0.1", "0.10000000001", True),
    # --- mixed numbers
    ("2 1/2", "2.5", True),
    ("2\\frac{1}{2}", "5/2", True),
    ("-2 1/2", "-2.5", True),
    ("2\\frac{3}{2}", "3", True),
    ("2 3", "6", False),
    # --- ratios
    ("3:2", "3:2", True),
    ("3:2", "6:4", True),
    ("3:2", "1.5", True),
    ("3:2", "\\frac{3}{2}", True),
    ("1:2:3", "2:4:6", True),
    ("3:2", "2:3", False),
    ("1:2:3", "1:2", False),
    # --- symbolic expressions and LaTeX
    ("sqrt(18)", "3*sqrt(2)", True),
    ("\\sqrt{18}", "3\\sqrt{2}", True),
    ("\\sqrt{18}", "4.242640687", True),
    ("\\sqrt{2}", "1.41", False),
    ("\\frac{\\pi}{2}", "pi/2", True),
    ("\\frac{\\pi}{2}", "1.5707963268", True),
    ("2\\pi", "2*pi", True),
    ("\\pi", "3.14", False),
    ("\\sqrt[3]{8}", "2", True),
    ("\\sqrt[3]{16}", "2\\sqrt[3]{2}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", True),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("2 \\cdot 3", "6", True),
    ("2 \\times 3", "6", True),
    ("\\left( \\frac{1}{2} \\right)^2", "1/4", True),
    ("2^{10}", "1024", True),
    ("x^2", "x**2", True),
    ("2x+1", "1+2x", True),
    ("2x + 1", "2y + 1", False),
    ("(x+1)^2", "x^2+2x+1", True),
    ("\\frac{x^2-1}{x-1}", "x+1", True),
    ("\\sin^2 x + \\cos^2 x", "1", True),
    ("\\log_2 8", "3", True),
    ("\\ln(e^2)", "2", True),
    ("e^{i\\pi}", "-1", True),
    ("i^2", "-1", True),
    ("3+4i", "4i+3", True),
    ("5!", "120", True),
    ("\\binom{5}{2}", "10", True),
    ("|{-3}|", "3", True),
    ("\\lfloor 7/2 \\rfloor", "3", True),
    ("\\infty", "oo", True),
    ("y = 2x + 3", "2x+3", True),
    ("x = 5", "5", True),
    ("a_1 + a_2", "a_2 + a_1", True),
    ("2\\alpha", "\\alpha+\\alpha", True),
    # --- tuples, intervals, sets, lists
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "(2,1)", False),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("(1, \\frac{1}{2})", "(1, 0.5)", True),
    ("(1,2)", "(1,2,3)", False),
    ("[0,1)", "[0, 1)", True),
    ("[0,1)", "[0,1]", False),
    ("(-\\infty, 3]", "(-oo, 3]", True),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("\\{1, 1, 2\\}", "\\{1, 2\\}", True),
    ("1, 2, 3", "3, 1, 2", True),
    ("1, 2", "\\{2, 1\\}", True),
    ("1, 1, 2", "1, 2, 2", False),
    ("1, 2", "(1, 2)", True),
    ("2, 1", "(1, 2)", False),
    ("x = 1, y = 2", "(1, 2)", True),
    ("1 \\pm \\sqrt{2}", "1+\\sqrt{2}, 1-\\sqrt{2}", True),
    ("(1,000, 2,000)", "(1000, 2000)", True),
    ("(1,250)", "(1, 250)", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1, 2)", True),
    ("\\{5\\}", "5", True),
    ("2 and 3", "3, 2", True),
    ("x = 1 or x = 2", "\\{1, 2\\}", True),
    # --- yes/no and text
    ("Yes", "yes", True),
    ("YES.", "yes", True),
    ("yes", "True", True),
    ("No", "false", True),
    ("yes", "no", False),
    ("yes", "1", False),
    ("\\text{Yes}", "yes", True),
    ("Monday", "monday", True),
    ("\\text{New York}", "new york", True),
    ("New  York", "NewYork", True),
    ("Monday", "Tuesday", False),
    ("\\text{(B)}", "(B)", True),
    ("\\emptyset", "\\varnothing", True),
    # --- wrappers: boxes, math delimiters, bold, trailing punctuation
    ("\\boxed{42}", "42", True),
    ("$42$", "42", True),
    ("\\(42\\)", "42", True),
    ("**42**", "42", True),
    ("42.", "42", True),
    ("2**10", "1024", True),
    ("\\displaystyle \\frac{1}{2}", "0.5", True),
    # --- scale words, repeating decimals, real odd roots, function assignments, absolute values
    ("$1.2 million", "1,200,000", True),
    ("2 dozen", "24", True),
    ("0.\\overline{3}", "1/3", True),
    ("0.1\\overline{6}", "\\frac{1}{6}", True),
    ("\\sqrt[3]{-8}", "-2", True),
    ("f(x) = 2x", "2x", True),
    ("|x|", "x", False),
    ("\\sqrt{x^2}", "|x|", True),
    ("10^{100}", "1e100", True),
    ("\\sin(\\pi/6)", "1/2", True),
]


@pytest.mark.parametrize(("a", "b", "expected"), EQUIV_TABLE, ids=[f"{a}|{b}" for a, b, _ in EQUIV_TABLE])
def test_equivalent_table(a: str, b: str, expected: bool) -> None:
    assert equivalent(a, b) is expected
    assert equivalent(b, a) is expected, "equivalent must be symmetric"


def test_table_is_large_and_reflexive() -> None:
    assert len(EQUIV_TABLE) >= 80
    for a, b, _ in EQUIV_TABLE:
        assert equivalent(a, a), a
        assert equivalent(b, b), b


def test_normalize_key_implies_equivalent() -> None:
    """normalize() is a fast equality key: equal keys must mean equivalent answers."""
    by_key: dict[str, list[str]] = {}
    for a, b, _ in EQUIV_TABLE:
        for s in (a, b):
            by_key.setdefault(normalize(s), []).append(s)
    for key, group in by_key.items():
        for s in group[1:]:
            assert equivalent(group[0], s), (key, group[0], s)


def test_percent_semantics() -> None:
    """A percentage matches a bare number by figure or by value; symmetric but not transitive."""
    assert equivalent("50%", "50") and equivalent("50%", "0.5")
    assert not equivalent("50", "0.5")
    assert equivalent("50%", "50 percent") and not equivalent("50%", "0.5%")


def test_none_and_empty_are_never_equal() -> None:
    assert not equivalent(None, None)
    assert not equivalent(None, "1")
    assert not equivalent("1", None)
    assert not equivalent("", "")
    assert not equivalent("", "0")


def test_tolerance_parameters() -> None:
    assert equivalent("0.5", "0.50001", rel_tol=1e-3)
    assert not equivalent("0.5", "0.50001")
    assert not equivalent("1/3", "0.3333333", rel_tol=0, abs_tol=0)
    assert equivalent("1e-12", "0")  # abs_tol
    assert not equivalent("1e-12", "0", abs_tol=0)


def test_non_string_inputs_are_accepted() -> None:
    assert equivalent(72, "72")  # type: ignore[arg-type]
    assert equivalent("0.5", 0.5)  # type: ignore[arg-type]
    assert parse(None).kind == "text"  # type: ignore[arg-type]


# --- normalize ------------------------------------------------------------------------------------

NORMALIZE_TABLE = [
    ("$1,200.50", "1200.5"),
    ("18 dollars", "18"),
    ("18.00", "18"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{3}", "1/3"),
    ("50\\%", "50%"),
    ("50 percent", "50%"),
    ("10\\text{ cm}", "10"),
    ("x = 5", "5"),
    ("1{,}234", "1234"),
    ("42.", "42"),
    ("-0", "0"),
    ("\\sqrt{18}", "3*sqrt(2)"),
    ("\\frac{\\pi}{2}", "pi/2"),
    ("Yes", "yes"),
    ("FALSE", "no"),
    ("\\{3, 1, 2\\}", "\\{1, 2, 3\\}"),
    ("(1,2)", "(1, 2)"),
    ("3:2", "3:2"),
    ("\\text{New York}", "New York"),
    ("  spaced   out  ", "spaced out"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("3\\sqrt{2}", "3*sqrt(2)"),
    ("2^{10}", "1024"),
    ("$1.2 million", "1200000"),
    ("0.\\overline{3}", "1/3"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALIZE_TABLE)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


# --- parse -----------------------------------------------------------------------------------------

PARSE_KINDS = [
    ("72", "number"),
    ("1,234.5", "number"),
    ("\\frac{1}{2}", "number"),
    ("50%", "number"),
    ("\\sqrt{2}", "expr"),
    ("2x+1", "expr"),
    ("\\pi", "expr"),
    ("(1, 2)", "tuple"),
    ("[0, 1)", "tuple"),
    ("\\{1, 2\\}", "set"),
    ("1, 2", "list"),
    ("3:2", "ratio"),
    ("yes", "bool"),
    ("Monday", "text"),
    ("x > 3", "text"),
    ("", "text"),
]


@pytest.mark.parametrize(("raw", "kind"), PARSE_KINDS)
def test_parse_kind(raw: str, kind: str) -> None:
    assert parse(raw).kind == kind


def test_parse_values() -> None:
    assert parse("1,234.5").value == Fraction(2469, 2)
    assert parse("2 1/2").value == Fraction(5, 2)
    p = parse("50%")
    assert p.percent and p.value == 50
    t = parse("[0, 1)")
    assert t.brackets == "[)" and [e.value for e in t.value] == [0, 1]
    assert parse("yes").value is True and parse("no").value is False
    assert isinstance(parse("x"), Parsed) and parse("x").is_scalar


# --- extraction ------------------------------------------------------------------------------------

BOXED_TABLE = [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{a^{b^{c}}}", "a^{b^{c}}"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{ 3 }", "3"),
    ("\\boxed{1} and \\boxed{2", None),
    ("\\boxed{unterminated", None),
    ("no box here", None),
    ("", None),
    ("\\boxedx{1}", None),
]


@pytest.mark.parametrize(("text", "expected"), BOXED_TABLE)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


EXTRACT_TABLE = [
    ("So the total is \\boxed{18}.", "18"),
    ("Work...\n#### 1,234", "1,234"),
    ("#### 5\nmore\n#### 6", "6"),
    ("Thus the answer is 42.", "42"),
    ("The answer is $\\frac{1}{2}$. I hope it is correct.", "$\\frac{1}{2}$"),
    ("Final Answer: The final answer is 7. I hope it is correct.", "7"),
    ("Answer: **3.5**", "3.5"),
    ("**Answer:** 5", "5"),
    ("The answer is 3.5 apples.", "3.5 apples"),
    ("the answer: 12", "12"),
    ("answer = 9", "9"),
    ("\\boxed{4} ... #### 5", "4"),
    ("\\boxed{} #### 5", "5"),
    ("\\boxed{4 #### 5", "5"),
    ("I could not solve it.", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT_TABLE)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_then_compare() -> None:
    response = "Each box holds 12, so 6 boxes hold $6 \\times 12 = 72$.\n\nThe answer is $\\boxed{72}$."
    assert equivalent(extract_answer(response), gold_answer("... so 72 in all.\n#### 72"))
    assert not equivalent(extract_answer("I give up."), "72")


GOLD_TABLE = [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("#### 1,600", "1,600"),
    ("  \\frac{1}{2}  ", "\\frac{1}{2}"),
    ("So the area is $\\boxed{6}$.", "6"),
    ("42", "42"),
]


@pytest.mark.parametrize(("text", "expected"), GOLD_TABLE)
def test_gold_answer(text: str, expected: str) -> None:
    assert gold_answer(text) == expected


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason="GSM8K data not present")
def test_gsm8k_golds() -> None:
    with GSM8K_TRAIN.open() as f:
        rows = [json.loads(line) for line in itertools.islice(f, 200)]
    assert rows
    for row in rows:
        gold = gold_answer(row["answer"])
        p = parse(gold)
        assert p.kind == "number", gold
        assert equivalent(gold, gold), gold
        assert equivalent(gold, normalize(gold)), gold
        assert equivalent(extract_answer(f"The answer is \\boxed{{{gold}}}."), gold)
        assert equivalent(extract_answer(row["answer"]), gold)


# --- robustness ------------------------------------------------------------------------------------

ADVERSARIAL = [
    "9**9**9**9",
    "9^9^9^9",
    "2^2^2^2^2",
    "10^{10^{10^{10}}}",
    "x^{x^{x^{x^{x}}}}",
    "e^{e^{e^{e^{10}}}}",
    "\\exp(\\exp(\\exp(\\exp(10))))",
    "1e999999999",
    "1" * 5000,
    "100000!",
    "(10!)!",
    "\\binom{100000}{50000}",
    "((2^{100})^{100})^{100}",
    "99999999999999999999999999999^99999",
    "(" * 300 + ")" * 300,
    "{" * 500,
    "\\boxed{" * 100,
    "\\{" * 200,
    "1," * 1000,
    "\\sqrt" * 100 + "2",
    "\\left(" * 100 + "1" + "\\right)" * 100,
    "-" * 500 + "1",
    "\\frac{1}{0}",
    "0/0",
    "0^{-1}",
    "tan(pi/2)",
    "\\log_{0}(0)",
    "x" * 10000,
    "$" * 1000,
    "__import__('os').system('echo pwned')",
    "lambda: 1",
    # found by fuzzing: sympy's auto-evaluation / evalf raised precision without bound on these
    "\\sin(1e9^{(\\sqrt{99})!})+2",
    "\\sin((\\log_{\\sqrt{\\log_{(i)!}(\\sqrt{\\pi})}}((y*x)!^{(\\sin(0))^\\exp(9)}))!)",
    "\\frac{10}{2}^{(y)^7!}",
    "\\sin((2)^(10)^y*e)",
    "\\exp((0+99)!^{x^{7!}*(e)^10})^{\\sqrt{\\pi+2+99^{e}}}",
]


def test_adversarial_inputs_are_bounded() -> None:
    for s in ADVERSARIAL:
        start = time.perf_counter()
        assert isinstance(normalize(s), str)
        assert isinstance(equivalent(s, s), bool)
        assert isinstance(equivalent(s, "x^2 + 1"), bool)
        assert isinstance(equivalent(s, "3"), bool)
        assert time.perf_counter() - start < 2.0, s


def test_no_eval_of_python() -> None:
    assert parse("__import__('os').system('echo pwned')").kind == "text"
    assert parse("().__class__").kind == "text"


_FUZZ_PIECES = [
    "\\frac", "\\sqrt", "\\boxed", "\\text", "\\left", "\\right", "\\pi", "\\cdot", "\\%", "\\$",
    "\\{", "\\}",
    "{", "}", "(", ")", "[", "]", "^", "_", "*", "**", "/", "+", "-", ",", ".", ":", "!", "|", "=", "%", "$",
    "####", " ", "\\,", "{,}", "x", "y", "e", "i", "9", "1", "0", "12", "3.5", "1e9", "yes", "no", "cm",
    "dollars", "sqrt", "sin", "log", "\\log_", "\\infty", "\\pm", "&", "\\\\", "\\begin{pmatrix}", "\u2212",
    "\u00b0", "\u221a", "\u00bd", "\x00", "\\",
]


def test_fuzz_never_raises() -> None:
    rng = random.Random(20240607)
    start = time.perf_counter()
    previous = "0"
    for _ in range(600):
        s = "".join(rng.choice(_FUZZ_PIECES) for _ in range(rng.randint(0, 14)))
        if rng.random() < 0.2:
            s = "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 20)))
        assert isinstance(extract_boxed(s), (str, type(None)))
        assert isinstance(extract_answer(s), (str, type(None)))
        assert isinstance(gold_answer(s), str)
        assert isinstance(normalize(s), str)
        assert isinstance(parse(s), Parsed)
        r1, r2 = equivalent(s, previous), equivalent(previous, s)
        assert r1 is r2, (s, previous)
        assert isinstance(equivalent(s, s), bool)
        previous = s
    assert time.perf_counter() - start < 10.0


def test_plain_numbers_are_fast() -> None:
    rng = random.Random(7)
    pairs = [(str(n), f"{n:,}") for n in (rng.randint(0, 10**9) for _ in range(3000))]
    start = time.perf_counter()
    assert all(equivalent(a, b) for a, b in pairs)
    assert not any(equivalent(a, str(int(a) + 1)) for a, _ in pairs[:500])
    rate = 3500 / (time.perf_counter() - start)
    assert rate > 1000, f"{rate:.0f} comparisons/s"


def test_extract_boxed_balances_braces() -> None:
    assert extract_boxed(r"\boxed{1} then \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert extract_boxed(r"\boxed{unclosed") is None


def test_numbers_in_words_are_read_as_digits() -> None:
    from duet.answers.numbers import numbers_as_digits

    assert numbers_as_digits("eleven students sit at each of 87 tables; it saves him forty-three minutes") == (
        "11 students sit at each of 87 tables; it saves him 43 minutes")
    assert numbers_as_digits("Twenty one kids, two hundred and five people, a hundred birds, 1,200 dollars, "
                             "12,345,678 ants") == "21 kids, 205 people, 100 birds, 1200 dollars, 12345678 ants"
    # left alone: "one", ordinals, fractions, lists and decimals with commas, words that are not numbers
    unchanged = ("Tom is one of us. On the third day she ate two thirds of a pie and a quarter of a cake; "
                 "1,2,3 and 3.5 and $5; a dozen eggs, twice as many; the second time.")
    assert numbers_as_digits(unchanged) == unchanged
    assert numbers_as_digits("Nine.") == "9."
