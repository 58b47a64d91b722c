"""The critic's number check: which numbers a solution's code uses that the problem does not give."""

from __future__ import annotations

from fractions import Fraction

from duet.agents.number_check import (
    cardinal_words,
    check_numbers,
    code_numbers,
    number_check_reason,
    question_numbers,
    reused_numbers,
    ungrounded_numbers,
    unused_numbers,
)


def solution(code: str) -> str:
    return f"Compute.\n```python\n{code}\n```\n```output\n1\n```\nThe answer is \\boxed{{1}}."


def test_question_numbers_read_digits_commas_percents_and_words():
    given = question_numbers("A farm sold 1,200 eggs at $3.50 a dozen, 25% of them brown, and five more on Monday.")
    assert {Fraction(1200), Fraction("3.50"), Fraction(12), Fraction(25), Fraction(1, 4), Fraction(5)} <= set(given)
    assert given[Fraction(1200)] == "1200" and given[Fraction(5)] == "five"
    assert {Fraction("1.05"), Fraction("0.95")} <= set(question_numbers("It grows 5% a year."))
    assert Fraction(1, 2) in question_numbers("He ate half of the pie.")
    assert Fraction("0.5") in question_numbers("Each costs .5 dollars.")


def test_code_numbers_are_literals_only():
    code = 'x = 809 + 3_000  # not 77\nprint("total 55", x * 2.5)\ny = -4'
    assert [(v, t) for v, t in code_numbers(code)] == [
        (Fraction(809), "809"), (Fraction(3000), "3000"), (Fraction(5, 2), "2.5"), (Fraction(4), "4")]
    assert code_numbers("answer = (") == []  # a syntax error: nothing to check


def test_a_miscopied_number_is_found_with_the_problems_closest_number():
    question = ("Milford Lake was originally blue because it only had 809 algae plants. Now there are 3263 "
                "algae plants. How many more algae plants are in Milford Lake now?")
    found = check_numbers(question, solution("answer = 8093 - 809\nprint(answer)"))
    assert [f.key for f in found] == ["8093"]
    assert number_check_reason(found) == ("the code uses 8093 (did you mean 809?), not a number of the problem; "
                                          "use the problem's numbers exactly as given.")
    assert check_numbers(question, solution("answer = 3263 - 809\nprint(answer)")) == []


def test_constants_percentages_words_and_outputs_are_not_flagged():
    q = "Ana works 3 hours a day for two weeks at $12.50 an hour and saves 20% of it. How much does she save?"
    code = "days = 2 * 7\nhours = 3 * days\npay = hours * 12.50\nanswer = pay * 0.2\nprint(answer, 60 * hours)"
    assert ungrounded_numbers(q, solution(code)) == []
    # numbers in the output block and the prose are not code
    text = solution("print(3 * 12.5)") + "\nThat is 37.5, about 40."
    assert ungrounded_numbers(q, text) == []


def test_each_number_is_reported_once_in_order_and_decimals_are_exact():
    q = "A rope is 34.26 m long and another is 11.42 m. How long are both?"
    found = ungrounded_numbers(q, solution("a = 34.2\nb = 11.42\nprint(a + b + 34.2 + 77)"))
    assert [f.key for f in found] == ["34.2", "77"] and "34.2 (did you mean 34.26?)" in found[0].message
    [alone] = ungrounded_numbers("No numbers here.", solution("print(77)"))
    assert alone.message == "the code uses 77, not a number of the problem"


def test_a_number_the_problem_gives_once_on_both_sides_of_minus_or_divide():
    q = "532 people are watching a movie. The theater has 750 seats. How many seats are empty?"
    [found] = reused_numbers(q, solution("answer = 532 - 532\nprint(answer)"))
    assert found.key == "532 - 532"
    assert found.message == "the code computes 532 - 532, but the problem gives 532 only once"
    assert check_numbers(q, solution("print(750 / 750, 532 - 532, 532 - 532)")) == [
        reused_numbers(q, solution("print(750 / 750)"))[0], found]
    # given twice: fine
    assert reused_numbers("Jack has 4 friends and 4 cookies. How many each?", solution("print(4 / 4)")) == []
    assert reused_numbers(q, solution("a = 532\nprint(a - a)")) == []  # names, not literals


def test_a_given_number_used_more_times_than_the_problem_gives_it():
    q = "2 students were sitting at each table in the lunchroom. There are 29 tables. How many students?"
    [found] = reused_numbers(q, solution("answer = 29 * 29\nprint(answer)"))
    assert found.key == "29 x2" and found.message == "the code uses 29 twice, but the problem gives it only once"
    assert reused_numbers(q, solution("answer = 29 * 2\nprint(answer)")) == []
    albums = "Isabel bought 6 pop albums and 5 country albums. Each album had 11 songs. How many songs?"
    assert [f.key for f in check_numbers(albums, solution("print(11 * (6 + 11))"))] == ["11 x2"]
    rows = "3 rows of 4 chairs and 4 more chairs. How many chairs?"  # given twice, used twice: fine
    assert reused_numbers(rows, solution("print(3 * 4 + 4)")) == []
    # a block that rewrites an earlier one (after an error) does not reuse the earlier block's numbers
    assert reused_numbers(q, solution("print(29 * 2") + solution("print(29 * 2)")) == []
    # the square's side times itself is questioned too: the rare right answer this check doubts
    assert [f.key for f in reused_numbers("A square has side 5. What is its area?", solution("print(5 * 5)"))] == [
        "5 x2"]


def test_numbers_the_problem_gives_but_the_code_never_uses():
    q = "A baker has 23 loaves and bakes 4 trays of 12 more. How many loaves does he have?"
    [found] = check_numbers(q, solution("answer = 23 + 4\nprint(answer)"))  # make demo's mistake
    assert (found.key, found.message) == ("unused 12", "the code never uses 12, which the problem gives")
    assert number_check_reason([found]) == ("the code never uses 12, which the problem gives; check whether the "
                                            "answer needs it.")  # a question: it may be a distractor
    assert check_numbers(q, solution("answer = 23 + 4 * 12\nprint(answer)")) == []
    # a percentage is used in any of its forms; words and numbers outside code do not count; no code, no finding
    grow = "A town of 1,200 grows 5% a year for two years. How many people live there then?"
    assert unused_numbers(grow, solution("print(1200 * 1.05 ** 2)")) == []
    assert [f.key for f in unused_numbers(grow, solution("print(1.05 ** 2)") + " 1200")] == ["unused 1200"]
    assert unused_numbers(q, "23 + 4 * 12 = 71, so \\boxed{71}.") == []
    assert unused_numbers("On the 3rd day she read 40 pages.", solution("print(40)")) == []  # an ordinal


def test_numbers_the_problem_writes_as_words_and_the_code_never_uses():
    """A cardinal word (two to ninety-nine) counts as given and as needing use; the critique says its value in
    digits. "one", "half" or "twice" are not amounts a solution must write."""
    assert cardinal_words("Twenty-one kids, forty children, thirty one cats, ten dogs, one hat") == [
        (21, "twenty-one"), (40, "forty"), (31, "thirty one"), (10, "ten")]
    q = "eleven students sit at each table. There are 87 tables. How many students are there?"
    [found] = check_numbers(q, solution("answer = 87 * 8\nprint(answer)"))  # the embedded model's slip
    assert (found.key, found.message) == ("unused eleven", "the code never uses eleven (11), which the problem gives")
    assert check_numbers(q, solution("answer = 87 * 11\nprint(answer)")) == []
    save = "It takes Mike 247 minutes to walk. A bicycle saves him forty-three minutes. How long does he ride?"
    assert Fraction(43) in question_numbers(save)
    assert [f.key for f in check_numbers(save, solution("print(247 - 24)"))] == ["unused forty-three"]
    assert check_numbers(save, solution("print(247 - 43)")) == []
    assert unused_numbers("One day she ate half of the 12 pies twice.", solution("print(12 / 2)")) == []


def test_unused_numbers_only_when_nothing_else_is_wrong():
    """The established findings (trained into the embedded model's revisions) keep their exact critique."""
    q = "Milford Lake had 809 algae plants. Now there are 3263. How many more are there now?"
    assert [f.key for f in check_numbers(q, solution("print(8093 - 809)"))] == ["8093"]
    assert [f.key for f in check_numbers(q, solution("print(809 * 2)"))] == ["unused 3263"]
