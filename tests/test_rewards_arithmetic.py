"""The bounded arithmetic evaluator: exact values, and fast clean rejection of hostile input."""

import time
from fractions import Fraction

import pytest

from unmask.rewards.arithmetic import ExpressionError, Limits, evaluate


@pytest.mark.parametrize(
    ("expr", "value", "numbers"),
    [
        ("12+3*4", 24, (12, 3, 4)),
        ("(1+2)*3", 9, (1, 2, 3)),
        ("100 - (93 - 30)", 37, (100, 93, 30)),
        ("-3+5", 2, (3, 5)),
        ("--4", 4, (4,)),
        ("1/3*3", 1, (1, 3, 3)),
        ("10/4", Fraction(5, 2), (10, 4)),
        ("8/2/2", 2, (8, 2, 2)),
        ("8-2-2", 4, (8, 2, 2)),
        ("3 \\times 4", 12, (3, 4)),
        ("3 × 4 ÷ 2", 6, (3, 4, 2)),
        ("007+1", 8, (7, 1)),
    ],
)
def test_values_are_exact(expr: str, value: Fraction, numbers: tuple[int, ...]) -> None:
    result = evaluate(expr)
    assert result.value == value
    assert result.numbers == numbers


HOSTILE = [
    "",
    "   ",
    "1+",
    "(1+2",
    "1+2)",
    "()",
    "2(3)",
    "2 3",
    "9**9**9",
    "2^3",
    "1/0",
    "5/(2-2)",
    "a+1",
    "__import__('os')",
    "1.5+1",
    "١+٢",  # Arabic-Indic digits: str.isdigit() accepts them, int() parses them
    "３+４",  # full-width digits
    "1" * 10_000,
    "1+" * 5_000 + "1",
    "(" * 100 + "1" + ")" * 100,
    "-" * 100 + "1",
    "999999999999*999999999999*999999999999",
]


@pytest.mark.parametrize("expr", HOSTILE)
def test_hostile_input_is_rejected(expr: str) -> None:
    with pytest.raises(ExpressionError):
        evaluate(expr)


def test_hostile_input_is_rejected_fast() -> None:
    start = time.perf_counter()
    for expr in HOSTILE * 10:
        with pytest.raises(ExpressionError):
            evaluate(expr)
    assert time.perf_counter() - start < 0.5


def test_limits_are_configurable() -> None:
    with pytest.raises(ExpressionError, match="longer than 4 characters"):
        evaluate("1+2+3", Limits(max_length=4))
    with pytest.raises(ExpressionError, match="longer than 2 digits"):
        evaluate("123", Limits(max_literal_digits=2))
    with pytest.raises(ExpressionError, match="beyond 100"):
        evaluate("11*11", Limits(max_magnitude=100))
    with pytest.raises(ExpressionError, match="nesting"):
        evaluate("((1))", Limits(max_depth=1))
    assert evaluate("((1))", Limits(max_depth=2)).value == 1


def test_error_is_a_value_error() -> None:
    assert issubclass(ExpressionError, ValueError)
