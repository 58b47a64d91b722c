"""Extract final answers from model output and decide whether two answers mean the same thing.

The solver and the critic both end their responses with ``\\boxed{...}``; the evaluation code compares those
answers with dataset gold answers (GSM8K's ``#### 72``, MATH's LaTeX) and with each other.  This module is
the single place that knows how to do that.

Public API
----------
``extract_boxed(text)``    content of the last ``\\boxed{}`` / ``\\fbox{}`` (balanced braces) or ``None``.
``extract_answer(text)``   last box, else GSM8K ``#### X``, else a trailing "The answer is X" phrase.
``gold_answer(text)``      a dataset's gold field reduced to the bare answer.
``normalize(answer)``      canonical display form; equal forms imply ``equivalent`` (a fast equality key).
``parse(answer)``          a :class:`Parsed` value (number, expression, tuple, set, ratio, yes/no, text).
``equivalent(a, b)``       do two answers mean the same?  Symmetric, never raises, ``None`` equals nothing.

Semantics decisions (documented here once, tested in ``tests/test_answers.py``)
--------------------------------------------------------------------------------
* **Numbers** are exact :class:`fractions.Fraction` values: ``1,234.5``, ``-3``, ``+3``, ``.5``, ``3.``,
  ``1e3``, ``1/2``, ``\\frac{1}{2}``.  Two integers compare exactly; otherwise two numbers are equal within
  ``rel_tol`` (relative) or ``abs_tol`` (absolute), so ``1/3 == 0.3333333`` but ``1/3 != 0.33`` and
  ``1000000 != 1000001``.  Pass ``rel_tol=0`` for exact comparison.
* **Thousands separators**: ``1,234`` (and ``1{,}234``, ``1\\,234``) is one number at the top level of an
  answer.  Inside brackets commas separate elements (``(1,250)`` is a pair) unless the elements are
  separated by comma-space, in which case ``(1,000, 2,000)`` is a pair of thousands.
* **Units and currency are ignored**: ``$18 == 18 dollars == 18.00 == \\$18``, ``10\\text{ cm} == 10``,
  ``5 km/h == 5``, ``30^\\circ == 30``.  A word after a number is a unit unless it is a maths name
  (``2 pi``, ``3 i``); glued to the number (``5cm``) only known unit abbreviations count, so ``2x`` stays
  an expression.  ``12 apples == 12 oranges`` is therefore true: the unit carries no weight.
* **Percent**: ``50%``, ``50\\%`` and ``50 percent`` are the same percentage.  A percentage compared with a
  bare number is equal when the number equals *either* the figure (``50%`` == ``50``: GSM8K writes the gold
  of a percent question without the sign, as with any unit) *or* the value (``50%`` == ``0.5``).  This
  relation is symmetric but, across kinds, not transitive (``50 != 0.5``).
* **Mixed numbers**: ``2 1/2`` and ``2\\frac{1}{2}`` mean 5/2 when the fraction is proper (numerator <
  denominator); ``2\\frac{3}{2}`` is the product 3.  Two bare numbers side by side (``2 3``) are not a
  product: such text is not a number.
* **Ratios**: ``3:2`` is a ratio.  Two ratios are equal when proportional (``3:2 == 6:4``, also for three or
  more parts); a two-part ratio equals the number ``a/b`` (``3:2 == 1.5 == \\frac{3}{2}``).  Clock times are
  read as ratios too, which is harmless when both sides write a time.
* **Yes/no**: ``yes``/``true`` and ``no``/``false``, case-insensitive, compare as booleans; a boolean never
  equals a number (``yes != 1``).
* **Expressions** are built by a small, allow-listed recursive-descent parser that understands plain
  maths (``sqrt(18)``, ``3*sqrt(2)``, ``2x^2``, ``x**2``) and the usual LaTeX (``\\frac``, ``\\dfrac``,
  ``\\frac12``, ``\\sqrt[3]{x}``, ``\\pi``, ``\\cdot``, ``\\times``, ``\\left( \\right)``, ``^{...}``,
  ``\\sin``, ``\\log_2``, ``\\binom``, ``|x|``) and constructs sympy objects directly -- no ``eval``, no
  ``parse_expr`` and no antlr.  ``e`` is Euler's number and ``i`` the imaginary unit.  Rational arithmetic
  is folded exactly (``2^{10}`` is the number 1024, ``\\sqrt{18}`` becomes ``3*sqrt(2)``); everything else
  stays an unevaluated sympy tree, because sympy's automatic simplification can call ``evalf`` with unbounded
  precision.  Expressions are compared structurally, then numerically with mpmath at fixed precision --
  at six fixed pseudo-random points (|values| in [0.3, 2.1], some negative) when they contain variables, a
  probabilistic identity test: ``(x+1)^2 == x^2+2x+1``, ``|x| != x``.  Every value is magnitude-checked
  (about ``2**±4096``), and huge powers, factorials and literals are rejected (the answer is then compared
  as text), so ``9**9**9**9`` cannot hang.
* **Collections**: ``(1, 2)`` and ``[1, 2)`` are ordered tuples/intervals whose brackets must match; ``\\{1,
  2\\}`` is a set (order and repeats ignored); a bare ``1, 2`` list compares unordered with lists and sets,
  and in order with a tuple.  ``x = 5`` is read as ``5``; ``1 \\pm \\sqrt{2}`` as the list of both roots;
  ``\\begin{pmatrix}`` as a tuple.
* **Text** compares case- and whitespace-insensitively after normalisation (``\\text{}`` unwrapped).
* **Wrappers**: an answer that still contains ``\\boxed{}`` is reduced to its box; ``$...$``, ``\\(...\\)``,
  markdown bold and a trailing period are dropped.  Two empty answers are *not* equivalent (no answer
  is not agreement), and ``None`` equals nothing.
"""

from duet.answers.equivalence import equivalent, majority
from duet.answers.extraction import extract_answer, extract_boxed, gold_answer
from duet.answers.parsing import Parsed, normalize, parse

__all__ = ["Parsed", "equivalent", "extract_answer", "extract_boxed", "gold_answer", "majority", "normalize", "parse"]
