"""A small, bounded arithmetic evaluator for model-written equations (Countdown).

Model output must never reach ``eval``: this recursive-descent parser accepts only ASCII integer
literals, ``+ - * /``, parentheses and unary minus, and computes with exact fractions (so
``1/3*3`` equals 1 without float noise). Length, literal size, nesting depth and the magnitude
of every intermediate value are bounded, so no input (``9**9**9``, a 10,000-digit number,
deep parentheses) can run long or use much memory. Anything else raises
:class:`ExpressionError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

# LaTeX and typographic operators that chat models write; mapped before tokenising.
OPERATOR_ALIASES = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "·": "*", "÷": "/"}
_OPERATORS = frozenset("+-*/()")
_DIGITS = frozenset("0123456789")
_SPACES = frozenset(" \t\n")


class ExpressionError(ValueError):
    """The text is not a bounded arithmetic expression over integers."""


@dataclass(frozen=True)
class Limits:
    """Bounds that keep evaluation fast whatever the input."""

    max_length: int = 256
    max_literal_digits: int = 12
    max_depth: int = 32
    max_magnitude: int = 10**15


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Evaluation:
    """The exact value of an expression and its integer literals in order of appearance."""

    value: Fraction
    numbers: tuple[int, ...]


def tokenize(expr: str, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """Split ``expr`` into integer literals and operator characters (ASCII only)."""
    if len(expr) > limits.max_length:
        raise ExpressionError(f"expression longer than {limits.max_length} characters")
    for alias, op in OPERATOR_ALIASES.items():
        expr = expr.replace(alias, op)
    tokens: list[str] = []
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch in _DIGITS:
            j = i
            while j < len(expr) and expr[j] in _DIGITS:
                j += 1
            if j - i > limits.max_literal_digits:
                raise ExpressionError(f"number longer than {limits.max_literal_digits} digits")
            tokens.append(expr[i:j])
            i = j
        elif ch in _OPERATORS:
            tokens.append(ch)
            i += 1
        elif ch in _SPACES:
            i += 1
        else:
            raise ExpressionError(f"unexpected character {ch!r} at position {i}")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := '-' factor | '(' expr ')' | integer."""

    def __init__(self, tokens: list[str], limits: Limits) -> None:
        self.tokens = tokens
        self.pos = 0
        self.limits = limits
        self.numbers: list[int] = []

    def parse(self) -> Fraction:
        if not self.tokens:
            raise ExpressionError("empty expression")
        value = self.expr(0)
        if self.pos != len(self.tokens):
            raise ExpressionError(f"unexpected {self.tokens[self.pos]!r} after the expression")
        return value

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("expression ends early")
        self.pos += 1
        return token

    def bounded(self, value: Fraction) -> Fraction:
        bound = self.limits.max_magnitude
        if abs(value.numerator) > bound or value.denominator > bound:
            raise ExpressionError(f"intermediate value beyond {bound}")
        return value

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = self.bounded(value + rhs if op == "+" else value - rhs)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor(depth)
            if op == "*":
                value = self.bounded(value * rhs)
            elif rhs == 0:
                raise ExpressionError("division by zero")
            else:
                value = self.bounded(value / rhs)
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > self.limits.max_depth:
            raise ExpressionError(f"nesting deeper than {self.limits.max_depth}")
        token = self.take()
        if token == "-":
            return -self.factor(depth + 1)
        if token == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("unbalanced parentheses")
            return value
        if token[0] in _DIGITS:
            self.numbers.append(int(token))
            return self.bounded(Fraction(int(token)))
        raise ExpressionError(f"unexpected {token!r}")


def evaluate(expr: str, limits: Limits = DEFAULT_LIMITS) -> Evaluation:
    """Evaluate ``expr`` exactly; raise :class:`ExpressionError` for anything else."""
    parser = _Parser(tokenize(expr, limits), limits)
    value = parser.parse()
    return Evaluation(value=value, numbers=tuple(parser.numbers))
