"""An allow-listed parser for maths answers that builds sympy objects, and bounded numeric evaluation."""

from __future__ import annotations

import math
import re
from typing import Any

from duet.answers.limits import MAX_BITS, MAX_FACTORIAL, MAX_NEST, MAX_PARSE_LEN, MAX_POW_EXP, MAX_POW_NEST, MAX_TOKENS
from duet.answers.numbers import fraction_of

# --------------------------------------------------------------------------------------------------------
# Expressions: an allow-listed tokenizer and recursive-descent parser that builds sympy objects directly
# --------------------------------------------------------------------------------------------------------


class _Reject(Exception):
    """The text is not an expression this parser accepts (or it is too large to evaluate safely)."""


_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)|(?P<cmd>\\[a-zA-Z]+|\\[{}|])"
    r"|(?P<word>[a-zA-Z]+)|(?P<op>\*\*|[-+*/^()\[\]{}!|_,]))"
)
_FUNCS = frozenset(
    "sqrt sin cos tan cot sec csc arcsin arccos arctan asin acos atan sinh cosh tanh ln log exp abs".split()
)
_CONSTS = frozenset("pi oo inf infty infinity".split())
_WORD_NAMES = sorted(_FUNCS | _CONSTS, key=len, reverse=True)
_GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma "
    "tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split()
)
_MUL_OPS = frozenset({"*", "\\cdot", "\\times", "\\ast"})
_DIV_OPS = frozenset({"/", "\\div"})
_OPENERS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}
_CLOSING_CMDS = frozenset({"\\}", "\\|", "\\rfloor", "\\rceil", "\\rvert"})

Token = tuple[str, str]  # (type, text): types num, sym, name, cmd, op


def _split_word(word: str) -> list[Token]:
    """A run of letters: a known name (``sqrt``, ``pi``), or single-letter symbols (``xy`` -> x*y).

    More than two unknown letters in a row (``apples``, ``Monday``) is a word, not maths: rejected.
    """
    if word in _FUNCS or word in _CONSTS:
        return [("name", word)]
    out: list[Token] = []
    i, run = 0, 0
    while i < len(word):
        for name in _WORD_NAMES:
            if len(name) > 1 and word.startswith(name, i):
                out.append(("name", name))
                i += len(name)
                run = 0
                break
        else:
            run += 1
            if run > 2:
                raise _Reject(word)
            out.append(("sym", word[i]))
            i += 1
    return out


def _tokenize(s: str) -> list[Token]:
    """Tokens of an expression, or :class:`_Reject` on any character outside the allow-list."""
    tokens: list[Token] = []
    pos = 0
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            raise _Reject(s[pos:])
        pos = m.end()
        kind = m.lastgroup
        text = m.group(kind)  # type: ignore[arg-type]
        if kind == "word":
            tokens.extend(_split_word(text))
        elif kind == "op":
            tokens.append(("op", "^" if text == "**" else text))
        else:
            tokens.append((kind, text))  # type: ignore[arg-type]
        if len(tokens) > MAX_TOKENS:
            raise _Reject("too long")
    return tokens


def lazy_sympy() -> Any:
    """The sympy module, imported on first use (the number fast path never needs it)."""
    import sympy

    return sympy


class _TooBig(_Reject):
    """A value whose magnitude is beyond what is safe to evaluate further."""


_MP_PREC = 120  # bits of working precision for numeric comparison
_MAX_MAG_BITS = 4096  # |log2 |x|| of any value evaluated numerically
_MP_FUNCS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
    "asin": "asin", "acos": "acos", "atan": "atan", "acot": "acot",
    "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "exp": "exp", "log": "log",
    "Abs": "fabs", "floor": "floor", "ceiling": "ceil", "factorial": "factorial", "gamma": "gamma",
}  # fmt: skip


def _mp_eval(e: Any, subs: dict[Any, Any], memo: dict[Any, Any]) -> Any | None:
    """Evaluate a sympy tree with mpmath at fixed precision, guarding magnitudes at every node.

    Returns an mpmath number, or None when the tree has an unbound symbol, an infinity, or an unsupported
    function.  Raises :class:`_TooBig` when any intermediate value is beyond ``2**±_MAX_MAG_BITS``: such a
    value (or the sine of it) would need unbounded precision.  This, not sympy's ``evalf``, is used for all
    numeric work, because ``evalf`` raises its precision to whatever an argument demands.
    """
    if e in memo:
        return memo[e]
    import mpmath

    sp = lazy_sympy()
    v: Any
    if e.is_Rational:
        v = mpmath.mpf(int(e.p)) / int(e.q)
    elif e.is_Symbol:
        v = subs.get(e)
        v = None if v is None else mpmath.mpf(v)
    elif e is sp.pi:
        v = +mpmath.pi
    elif e is sp.E:
        v = +mpmath.e
    elif e is sp.I:
        v = mpmath.mpc(0, 1)
    elif e.is_Float:
        v = mpmath.mpf(e)
    else:
        args = [_mp_eval(a, subs, memo) for a in e.args]
        if any(a is None for a in args):
            v = None
        elif e.is_Add:
            v = mpmath.fsum(args)
        elif e.is_Mul:
            v = mpmath.fprod(args)
        elif e.is_Pow:
            base, exp = args
            if base == 0:
                v = None if mpmath.re(exp) <= 0 else mpmath.mpf(0)
            else:  # |log2 result| <= |exp| * (|ln |base|| + pi) / ln 2: refuse before computing a giant
                bound = abs(exp) * (abs(mpmath.log(abs(base))) + 4)
                if bound > _MAX_MAG_BITS:
                    raise _TooBig("power too large")
                v = mpmath.power(base, exp)
        elif type(e).__name__ == "binomial":
            v = mpmath.binomial(*args)
        elif type(e).__name__ in _MP_FUNCS and len(args) == 1:
            fn = getattr(mpmath, _MP_FUNCS[type(e).__name__])
            arg = args[0]
            real_only = fn in (mpmath.floor, mpmath.ceil, mpmath.factorial, mpmath.gamma)
            if real_only and isinstance(arg, mpmath.mpc) and arg.imag == 0:
                arg = arg.real
            if fn in (mpmath.exp, mpmath.sinh, mpmath.cosh) and abs(arg) > _MAX_MAG_BITS:
                raise _TooBig("exponential too large")
            v = abs(arg) if fn is mpmath.fabs else fn(arg)
        else:
            v = None
    if v is not None:
        if not mpmath.isfinite(v):
            v = None
        elif v != 0 and abs(mpmath.mag(v)) > _MAX_MAG_BITS:
            raise _TooBig("value too large")
    memo[e] = v
    return v


def numeric_value(e: Any, subs: dict[Any, Any] | None = None) -> Any | None:
    """e as an mpmath number, or None if it is not a finite number of moderate size."""
    import mpmath

    try:
        with mpmath.workprec(_MP_PREC):
            v = _mp_eval(e, subs or {}, {})
            return None if v is None else mpmath.mpc(v)
    except Exception:  # _TooBig, mpmath domain errors, RecursionError: not a usable number
        return None


_CHECK_MEMO: dict[Any, Any] = {}


def _check(v: Any) -> Any:
    """Reject values too large to keep computing with: exact rationals beyond ``MAX_BITS`` bits, and numeric
    (symbol-free) values whose magnitude is beyond ``2**±_MAX_MAG_BITS``."""
    import mpmath

    if getattr(v, "is_Rational", False):
        if int(v.p).bit_length() > MAX_BITS or int(v.q).bit_length() > MAX_BITS:
            raise _Reject("number too large")
        return v
    if len(_CHECK_MEMO) > 4096:
        _CHECK_MEMO.clear()
    try:
        with mpmath.workprec(_MP_PREC):
            _mp_eval(v, {}, _CHECK_MEMO)  # raises _TooBig; unbound symbols just give None
    except _Reject:
        raise
    except Exception:  # mpmath domain errors and the like: the value is simply not checked further
        pass
    return v


# Arithmetic on sympy values.  Exact rationals are folded exactly (bit-limited); everything else becomes an
# UNEVALUATED node (evaluate=False): sympy's automatic simplification queries assumptions, which can call
# evalf with unbounded precision on adversarial input.  All numeric work goes through _mp_eval instead.


def _add(a: Any, b: Any) -> Any:
    if a.is_Rational and b.is_Rational:
        return _check(a + b)
    return _check(lazy_sympy().Add(a, b, evaluate=False))


def _neg(a: Any) -> Any:
    if a.is_Number:  # rationals and infinities
        return -a
    return _check(lazy_sympy().Mul(lazy_sympy().S.NegativeOne, a, evaluate=False))


def exact_mul(a: Any, b: Any) -> Any:
    if a.is_Rational and b.is_Rational:
        return _check(a * b)
    return _check(lazy_sympy().Mul(a, b, evaluate=False))


def exact_div(a: Any, b: Any) -> Any:
    if a.is_Rational and b.is_Rational and b != 0:
        return _check(a / b)
    return exact_mul(a, lazy_sympy().Pow(b, lazy_sympy().S.NegativeOne, evaluate=False))


def _exact_root(x: Any, n: int) -> Any | None:
    """The exact n-th root of a non-negative rational, or None if it is irrational."""
    from sympy import integer_nthroot

    p, exact_p = integer_nthroot(int(x.p), n)
    q, exact_q = integer_nthroot(int(x.q), n)
    return lazy_sympy().Rational(p, q) if exact_p and exact_q else None


def _pow(base: Any, exp: Any) -> Any:
    """``base ** exp`` with guards against results too large to represent or evaluate; exact when rational."""
    sp = lazy_sympy()
    if exp.is_Rational:
        if abs(exp) > MAX_POW_EXP:
            raise _Reject("exponent too large")
        if base.is_Rational and base not in (0, 1, -1):
            size = max(int(base.p).bit_length(), int(base.q).bit_length())
            if float(abs(exp)) * size > MAX_BITS:
                raise _Reject("power too large")
        if base.is_Rational and not (base == 0 and exp < 0):
            if exp.is_Integer:
                return _check(base**exp)
            if max(int(base.p).bit_length(), int(base.q).bit_length()) <= 64 and exp.q <= 64:
                # small radicals: sympy's number theory (bounded trial division): sqrt(18) = 3*sqrt(2)
                return _check(sp.Pow(base, exp))
            if base > 0 and exp.q <= 64:
                root = _exact_root(base, int(exp.q))
                if root is not None:
                    return _check(root ** int(exp.p))
    return _check(sp.Pow(base, exp, evaluate=False))


def _root(x: Any, n: Any) -> Any:
    """``\\sqrt[n]{x}``; the real root for a negative rational under an odd index (``\\sqrt[3]{-8} = -2``)."""
    sp = lazy_sympy()
    if n.is_Integer and n > 0 and n % 2 == 1 and x.is_Rational and x < 0:
        return _neg(_pow(-x, sp.Rational(1, int(n))))
    return _pow(x, exact_div(sp.S.One, n))


class _Parser:
    """Recursive descent over tokens; precedence: ``+ -`` < ``* / implicit`` < unary sign < ``^`` < ``!``."""

    def __init__(self, tokens: list[Token]) -> None:
        self.toks = tokens
        self.i = 0
        self.nest = 0
        self.pow_nest = 0
        self.sp = lazy_sympy()

    # token helpers
    def peek(self) -> Token | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def peek_text(self) -> str | None:
        t = self.peek()
        return t[1] if t else None

    def take(self) -> Token:
        t = self.peek()
        if t is None:
            raise _Reject("unexpected end")
        self.i += 1
        return t

    def expect(self, text: str) -> None:
        if self.peek_text() != text:
            raise _Reject(f"expected {text}")
        self.i += 1

    # grammar
    def parse(self) -> Any:
        v = self.expr()
        if self.i != len(self.toks):
            raise _Reject("trailing tokens")
        return v

    def expr(self) -> Any:
        self.nest += 1
        if self.nest > MAX_NEST:
            raise _Reject("too deeply nested")
        v = self.term()
        while self.peek_text() in ("+", "-"):
            op = self.take()[1]
            r = self.term()
            v = _add(v, r) if op == "+" else _add(v, _neg(r))
        self.nest -= 1
        return v

    def starts_implicit(self) -> bool:
        """Can the next token begin an implicitly multiplied factor (``2x``, ``3\\sqrt{2}``, ``(a)(b)``)?"""
        t = self.peek()
        if t is None:
            return False
        kind, text = t
        if kind in ("sym", "name"):
            return True
        if kind == "cmd":
            return text not in _MUL_OPS and text not in _DIV_OPS and text not in _CLOSING_CMDS
        return text in ("(", "[", "{", "\\{")

    def term(self) -> Any:
        v = self.unary()
        while True:
            text = self.peek_text()
            if text in _MUL_OPS:
                self.take()
                v = exact_mul(v, self.unary())
            elif text in _DIV_OPS:
                self.take()
                v = exact_div(v, self.unary())
            elif self.starts_implicit():
                v = exact_mul(v, self.power())
            else:
                return v

    def unary(self) -> Any:
        text = self.peek_text()
        if text in ("+", "-"):
            self.take()
            v = self.unary()
            return _neg(v) if text == "-" else v
        return self.power()

    def power(self) -> Any:
        base = self.postfix()
        if self.peek_text() == "^":
            self.take()
            return _pow(base, self.exponent())
        return base

    def exponent(self) -> Any:
        self.pow_nest += 1
        if self.pow_nest > MAX_POW_NEST:
            raise _Reject("power tower too deep")
        v = self.latex_arg() if self.peek_text() == "{" else self.unary()
        self.pow_nest -= 1
        return v

    def postfix(self) -> Any:
        v = self.primary()
        while self.peek_text() == "!":
            self.take()
            if v.is_Number and (not v.is_Integer or v > MAX_FACTORIAL):
                raise _Reject("factorial too large")
            if v.is_Integer and v >= 0:
                v = _check(self.sp.Integer(math.factorial(int(v))))
            else:
                v = _check(self.sp.factorial(v, evaluate=False))
        return v

    def group(self, close: str) -> Any:
        v = self.expr()
        self.expect(close)
        return v

    def latex_arg(self) -> Any:
        """A LaTeX macro argument: ``{...}``, or a single character (``\\frac12``), or one primary."""
        t = self.peek()
        if t is None:
            raise _Reject("missing argument")
        if t[1] == "{":
            self.take()
            return self.group("}")
        if t[0] == "num":
            if len(t[1]) > 1:  # \frac12: the argument is the single digit "1"
                if not t[1][0].isdigit():
                    raise _Reject("bad argument")
                self.toks[self.i] = ("num", t[1][1:])
                return self.sp.Integer(int(t[1][0]))
            self.take()
            return self.sp.Integer(int(t[1]))
        return self.primary()

    def number(self, text: str) -> Any:
        v = fraction_of(text)
        if v is None:
            raise _Reject("bad number")
        return _check(self.sp.Rational(v.numerator, v.denominator))

    def symbol(self, name: str) -> Any:
        if self.peek_text() == "_":  # subscript: x_1, a_{12}
            self.take()
            t = self.take()
            if t[1] == "{":
                parts = []
                while self.peek_text() != "}":
                    tt = self.take()
                    if tt[0] not in ("num", "sym", "name"):
                        raise _Reject("bad subscript")
                    parts.append(tt[1])
                self.take()
                sub = "".join(parts)
            elif t[0] in ("num", "sym", "name"):
                sub = t[1]
            else:
                raise _Reject("bad subscript")
            return self.sp.Symbol(f"{name}_{sub}")
        if name == "e":
            return self.sp.E
        if name == "i":
            return self.sp.I
        return self.sp.Symbol(name)

    def function(self, name: str) -> Any:
        """``sqrt(x)``, ``\\sin^2 x``, ``\\log_2 8``, ``\\ln(x)``: name already consumed."""
        sp = self.sp
        if name == "sqrt":
            index = None
            if self.peek_text() == "[":
                self.take()
                index = self.group("]")
            arg = self.latex_arg() if self.peek_text() not in ("(", "[") else self.primary()
            if index is None:
                return _pow(arg, sp.Rational(1, 2))
            return _root(arg, index)
        fpow = None
        if self.peek_text() == "^":
            self.take()
            fpow = self.exponent()
        base = None
        if name == "log" and self.peek_text() == "_":
            self.take()
            base = self.latex_arg()
        t = self.peek()
        if t is None:
            raise _Reject("missing function argument")
        arg = self.primary() if t[1] in ("(", "[", "{", "\\{") else self.power()
        if name == "exp":
            self.pow_nest += 1
            if self.pow_nest > MAX_POW_NEST:
                raise _Reject("power tower too deep")
            self.pow_nest -= 1
            v = _pow(sp.E, arg)
        elif name in ("ln", "log"):
            v = sp.log(arg, evaluate=False)
            if base is not None:
                v = exact_div(v, sp.log(base, evaluate=False))
        elif name == "abs":
            v = sp.Abs(arg, evaluate=False)
        else:
            alias = {"arcsin": "asin", "arccos": "acos", "arctan": "atan"}.get(name, name)
            v = getattr(sp, alias)(arg, evaluate=False)
        return _check(v if fpow is None else _pow(v, fpow))

    def primary(self) -> Any:
        sp = self.sp
        kind, text = self.take()
        if kind == "num":
            return self.number(text)
        if kind == "sym":
            return self.symbol(text)
        if kind == "name":
            if text == "pi":
                return sp.pi
            if text in ("oo", "inf", "infty", "infinity"):
                return sp.oo
            return self.function(text)
        if kind == "op":
            if text in _OPENERS:
                self.nest += 1
                v = self.group(_OPENERS[text])
                self.nest -= 1
                return v
            if text == "|":
                v = self.expr()
                self.expect("|")
                return _check(sp.Abs(v, evaluate=False))
            raise _Reject(f"unexpected {text}")
        # LaTeX commands
        name = text[1:]
        if text == "\\{":
            return self.group("\\}")
        if name == "frac":
            num = self.latex_arg()
            den = self.latex_arg()
            return exact_div(num, den)
        if name == "binom":
            n, k = self.latex_arg(), self.latex_arg()
            if n.is_Number and (not n.is_Integer or abs(n) > 10000):
                raise _Reject("binomial too large")
            if n.is_Integer and k.is_Integer and n >= 0:
                return _check(sp.Integer(math.comb(int(n), int(k)) if k >= 0 else 0))
            return _check(sp.binomial(n, k, evaluate=False))
        if name == "pi":
            return sp.pi
        if name == "infty":
            return sp.oo
        if name in _GREEK:
            return self.symbol(name)
        if name in _FUNCS:
            return self.function(name)
        if name in ("lfloor", "lceil"):
            v = self.expr()
            self.expect("\\rfloor" if name == "lfloor" else "\\rceil")
            if v.is_Rational:
                return sp.Integer(math.floor(v) if name == "lfloor" else math.ceil(v))
            return _check(sp.floor(v, evaluate=False) if name == "lfloor" else sp.ceiling(v, evaluate=False))
        if name in ("lvert", "vert") or text == "\\|":
            v = self.expr()
            if self.peek_text() not in ("\\rvert", "\\vert", "|"):
                raise _Reject("unclosed |")
            self.take()
            return _check(sp.Abs(v, evaluate=False))
        raise _Reject(f"unsupported command {text}")


def parse_expression(s: str) -> Any | None:
    """A sympy expression for s, or None when s is not an expression the parser accepts."""
    if not s or len(s) > MAX_PARSE_LEN:
        return None
    try:
        return _Parser(_tokenize(s)).parse()
    except (_Reject, RecursionError, ValueError, TypeError, ArithmeticError, AttributeError):
        return None
