"""Countdown with 3 numbers: reach the target with + - * / using each number exactly once.

Instances follow d1 / Countdown-Tasks-3to4 (numbers 1-100, targets 1-100). The generator only
makes solvable instances, and an exhaustive solver gives the shortest equation as the SFT
target. Train, validation and test are split by the multiset of numbers (a fixed hash, the same
for every seed), so no test or validation instance's numbers appear in training. Equations are
checked with the bounded parser of :mod:`unmask.rewards.arithmetic`, never ``eval``.
"""

from __future__ import annotations

import logging
import random
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unmask.rewards.arithmetic import ExpressionError, evaluate
from unmask.rewards.extract import answer_tag, completion_text, last_boxed
from unmask.tasks.base import GENERATED, RewardFunc, Task, answer_block, require, to_int

logger = logging.getLogger(__name__)

NUM_NUMBERS = 3
MAX_NUMBER = 100
MAX_TARGET = 100
TEST_BUCKETS = 10  # one number multiset in ten is a test multiset, one in ten a validation one
_SPLIT_OF_BUCKET = {0: "test", 1: "validation"}  # the other buckets are training's
_INTEGER = re.compile(r"[0-9]+")
_TOLERANCE = 1e-6  # float search; candidates are then checked exactly


# An expression tree: an int literal or (op, left, right).
Tree = int | tuple[str, "Tree", "Tree"]


def _leaves(numbers: Sequence[int]) -> Iterator[tuple[float, Tree]]:
    """Every expression using each number exactly once, with its float value (fast to search;
    exact checks come after)."""

    def search(items: list[tuple[float, Tree]]) -> Iterator[tuple[float, Tree]]:
        if len(items) == 1:
            yield items[0]
            return
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                rest = items[:i] + items[i + 1 : j] + items[j + 1 :]
                (a, ta), (b, tb) = items[i], items[j]
                combined = [(a + b, ("+", ta, tb)), (a * b, ("*", ta, tb))]
                combined += [(a - b, ("-", ta, tb)), (b - a, ("-", tb, ta))]
                if b != 0:
                    combined.append((a / b, ("/", ta, tb)))
                if a != 0:
                    combined.append((b / a, ("/", tb, ta)))
                for item in combined:
                    yield from search([*rest, item])

    return search([(float(n), n) for n in numbers])


def render(tree: Tree) -> str:
    """The text of ``tree`` with only the parentheses precedence and associativity need."""
    return _render(tree)[0]


def _render(tree: Tree) -> tuple[str, int]:
    """(text, precedence): 3 literal, 2 product or quotient, 1 sum or difference."""
    if isinstance(tree, int):
        return str(tree), 3
    op, left, right = tree
    precedence = 1 if op in "+-" else 2
    (lhs, lp), (rhs, rp) = _render(left), _render(right)
    if lp < precedence:
        lhs = f"({lhs})"
    if rp < precedence + (op in "-/"):  # a-(b+c) and a/(b*c) keep their parentheses
        rhs = f"({rhs})"
    return f"{lhs}{op}{rhs}", precedence


def _shortest_exact(trees: Sequence[Tree], target: int) -> str | None:
    """The shortest rendering among ``trees`` whose exact value is ``target``."""
    for text in sorted({render(t) for t in trees}, key=lambda t: (len(t), t)):
        if evaluate(text).value == target:
            return text
    return None


def solve(numbers: Sequence[int], target: int) -> str | None:
    """The shortest equation reaching ``target`` exactly, or None if there is none."""
    trees = [t for v, t in _leaves(numbers) if abs(v - target) < _TOLERANCE]
    return _shortest_exact(trees, target)


def numbers_split(numbers: Sequence[int]) -> str:
    """The split (``train``, ``validation`` or ``test``) this number multiset belongs to
    (fixed, seed-independent)."""
    key = ",".join(str(n) for n in sorted(numbers)).encode()
    return _SPLIT_OF_BUCKET.get(zlib.crc32(key) % TEST_BUCKETS, "train")


def generate_instances(split: str, count: int, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` distinct solvable instances whose numbers belong to ``split``; the target is
    drawn uniformly from the integers in 1..MAX_TARGET that the numbers reach."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[tuple[int, ...], int]] = set()
    attempts = 0
    while len(rows) < count:
        if attempts == 100 * count + 1000:
            raise ValueError(
                f"could only make {len(rows)} distinct countdown instances, not {count}"
            )
        attempts += 1
        numbers = [rng.randint(1, MAX_NUMBER) for _ in range(NUM_NUMBERS)]
        if numbers_split(numbers) != split:
            continue
        by_target: dict[int, list[Tree]] = {}
        for value, tree in _leaves(numbers):
            target = round(value)
            if 1 <= target <= MAX_TARGET and abs(value - target) < _TOLERANCE:
                by_target.setdefault(target, []).append(tree)
        if not by_target:
            continue
        target = rng.choice(sorted(by_target))
        key = (tuple(sorted(numbers)), target)
        equation = _shortest_exact(by_target[target], target)
        if key not in seen and equation is not None:
            seen.add(key)
            rows.append({"numbers": numbers, "target_number": target, "equation": equation})
    return rows


def extract_equation(completion: Any, target: int) -> str | None:
    """The expression a completion proposes: the last ``<answer>`` block (else the whole text),
    then its last ``\\boxed{}`` if any. ``expr = target`` (either side) is reduced to ``expr``;
    an equation to another number, or with several ``=``, gives None."""
    text = completion_text(completion)
    span = answer_tag(text)
    if span is None:
        span = text
    boxed = last_boxed(span)
    span = (span if boxed is None else boxed).strip().rstrip(".")
    sides = [s.strip() for s in span.split("=")]
    if len(sides) == 1:
        return sides[0]
    if len(sides) == 2:
        for expr, other in (sides, sides[::-1]):
            if _INTEGER.fullmatch(other) and int(other) == target:
                return expr
    return None


def _judge(completion: Any, numbers: Any, target: Any) -> tuple[bool, bool] | None:
    """(uses exactly the numbers, and also reaches the target); None for a malformed row."""
    if not isinstance(numbers, Sequence) or not all(isinstance(n, int) for n in numbers):
        return None
    if not isinstance(target, int):
        return None
    expr = extract_equation(completion, target)
    if expr is None:
        return False, False
    try:
        result = evaluate(expr)
    except ExpressionError:
        return False, False
    uses_numbers = sorted(result.numbers) == sorted(numbers)
    return uses_numbers, uses_numbers and result.value == target


def countdown_correct(
    prompts: list[str],
    completions: list[Any],
    numbers: list[list[int]],
    target_number: list[int],
    **_: Any,
) -> list[float | None]:
    """1.0 if the equation uses exactly the given numbers and equals the target (accuracy)."""
    verdicts = map(_judge, completions, numbers, target_number)
    return [None if v is None else float(v[1]) for v in verdicts]


def countdown_format(
    prompts: list[str],
    completions: list[Any],
    numbers: list[list[int]],
    target_number: list[int],
    **_: Any,
) -> list[float | None]:
    """1.0 if the answer is a valid expression using exactly the given numbers (shaping)."""
    verdicts = map(_judge, completions, numbers, target_number)
    return [None if v is None else float(v[0]) for v in verdicts]


def _numbers_field(row: Mapping[str, Any], where: str) -> list[int]:
    value = require(row, "numbers", where)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Sequence):
        raise ValueError(f"{where}: field 'numbers' is not a list of integers: {value!r}")
    return [to_int(item, "numbers", where) for item in items]


@dataclass(kw_only=True)
class CountdownTask(Task):
    """Countdown with 3 numbers. Generated splits are disjoint by number multiset: one in ten
    is test's, one in ten validation's (:func:`numbers_split`). Files: d1's jsonl (``input:
    "a,b,c"``, ``output``) or Countdown-Tasks-3to4 (``nums``, ``target``); rows without exactly
    3 numbers are skipped."""

    name: ClassVar[str] = "countdown"
    accuracy_reward: ClassVar[str] = "countdown_correct"
    default_field_map: ClassVar[Mapping[str, str]] = {
        "nums": "numbers",
        "input": "numbers",
        "target": "target_number",
        "output": "target_number",
    }
    default_sizes: ClassVar[Mapping[str, int]] = {"train": 10000, "validation": 256, "test": 256}

    source: str | Mapping[str, str] = GENERATED
    seed: int = 0
    reward_funcs: list[RewardFunc] = field(
        default_factory=lambda: [countdown_correct, countdown_format]
    )
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.1])

    def generate(self, split: str, count: int) -> list[dict[str, Any]]:
        rng = random.Random(f"countdown:{self.seed}:{split}")
        return generate_instances(split, count, rng)

    def convert(self, row: dict[str, Any], where: str) -> dict[str, Any] | None:
        numbers = _numbers_field(row, where)
        if len(numbers) != NUM_NUMBERS:
            return None
        target = to_int(require(row, "target_number", where), "target_number", where)
        equation = solve(numbers, target)
        if equation is None:
            logger.warning("%s: no equation reaches %d; its SFT target is empty", where, target)
        return {"numbers": numbers, "target_number": target, "equation": equation or ""}

    def plain_prompt(self, row: Mapping[str, Any]) -> str:
        return f"{','.join(str(n) for n in row['numbers'])}->{row['target_number']}\n"

    def plain_target(self, row: Mapping[str, Any]) -> str:
        return row["equation"]

    def instruction(self, row: Mapping[str, Any]) -> str:
        numbers = ", ".join(str(n) for n in row["numbers"])
        return (
            f"Using the numbers [{numbers}], write an arithmetic expression that equals "
            f"{row['target_number']}. Use each number exactly once and only +, -, *, / and "
            "parentheses.\n\nYou may think inside <reasoning> </reasoning> first. Then write only "
            "the expression inside <answer> </answer>, for example <answer>(1+2)*3</answer>."
        )

    def chat_target(self, row: Mapping[str, Any]) -> str:
        return answer_block(row["equation"])
