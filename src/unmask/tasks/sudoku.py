"""4x4 Sudoku: a seeded generator of unique-solution puzzles, the d1 CSV format, cell rewards.

Grids and puzzles are 16-character strings, row by row, ``0`` for a blank (d1's format). Only
288 valid 4x4 grids exist, so a model can memorise grids: train, validation and test are split
by solution grid, not by puzzle. The split is fixed (the same for every ``seed``), so a test or
validation grid is never a training grid across runs either.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar

from unmask.rewards.extract import answer_tag, completion_text, last_boxed
from unmask.tasks.base import GENERATED, RewardFunc, Task, answer_block, require

CELLS = 16
MAX_BLANKS = 12  # a 4x4 puzzle needs at least 4 clues for a unique solution
_GRID_SPLIT_SEED = 20250401
_BLANK = "0"
_UNITS = (
    [[r * 4 + c for c in range(4)] for r in range(4)]
    + [[r * 4 + c for r in range(4)] for c in range(4)]
    + [
        [(br + r) * 4 + bc + c for r in range(2) for c in range(2)]
        for br in (0, 2)
        for bc in (0, 2)
    ]
)
_PEERS = [sorted({p for unit in _UNITS if i in unit for p in unit} - {i}) for i in range(CELLS)]


@cache
def all_grids() -> tuple[str, ...]:
    """The 288 valid 4x4 grids, in lexicographic order."""
    grids: list[str] = []
    cells = [""] * CELLS

    def fill(i: int) -> None:
        if i == CELLS:
            grids.append("".join(cells))
            return
        for digit in "1234":
            if all(cells[p] != digit for p in _PEERS[i] if p < i):
                cells[i] = digit
                fill(i + 1)
        cells[i] = ""

    fill(0)
    return tuple(grids)


def is_valid_grid(grid: str) -> bool:
    """A complete grid: every row, column and 2x2 box holds 1, 2, 3 and 4."""
    return (
        len(grid) == CELLS
        and set(grid) <= set("1234")
        and all({grid[i] for i in unit} == set("1234") for unit in _UNITS)
    )


@cache
def _difference_masks(grid: str) -> tuple[int, ...]:
    """Bitmasks of the cells where each other grid differs from ``grid`` (minimal ones only).

    A clue set keeps ``grid`` the unique solution iff it hits every mask: otherwise some other
    grid agrees with all the clues.
    """
    masks = sorted(
        {sum(1 << i for i in range(CELLS) if g[i] != grid[i]) for g in all_grids() if g != grid},
        key=int.bit_count,
    )
    minimal: list[int] = []
    for mask in masks:
        if not any(m & mask == m for m in minimal):
            minimal.append(mask)
    return tuple(minimal)


def make_puzzle(grid: str, blanks: int, rng: random.Random) -> str | None:
    """Blank cells of ``grid`` in random order while the solution stays unique; None if this
    order got stuck before ``blanks`` blanks (the caller retries)."""
    masks = _difference_masks(grid)
    order = list(range(CELLS))
    rng.shuffle(order)
    clues, removed = (1 << CELLS) - 1, 0
    for cell in order:
        if removed == blanks:
            break
        trial = clues & ~(1 << cell)
        if all(trial & m for m in masks):
            clues, removed = trial, removed + 1
    if removed < blanks:
        return None
    return "".join(grid[i] if clues >> i & 1 else _BLANK for i in range(CELLS))


def split_grids(test_grids: int, validation_grids: int = 0) -> dict[str, tuple[str, ...]]:
    """The grids of each split (``train``, ``validation``, ``test``): a fixed shuffle of the 288
    grids, the first ``test_grids`` for test, the next ``validation_grids`` for validation and
    the rest for training. The test grids do not depend on ``validation_grids``."""
    grids = list(all_grids())
    random.Random(_GRID_SPLIT_SEED).shuffle(grids)
    held_out = test_grids + validation_grids
    return {
        "train": tuple(grids[held_out:]),
        "validation": tuple(grids[test_grids:held_out]),
        "test": tuple(grids[:test_grids]),
    }


def generate_puzzles(
    grids: tuple[str, ...], count: int, blanks: int | Sequence[int], rng: random.Random
) -> list[tuple[str, str]]:
    """``count`` distinct ``(puzzle, solution)`` pairs on ``grids`` with ``blanks`` blanks, or
    with a number drawn uniformly from ``[low, high]`` per puzzle."""
    low, high = (blanks, blanks) if isinstance(blanks, int) else blanks
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(pairs) < count:
        if attempts == 50 * count + 1000:
            raise ValueError(
                f"could only make {len(pairs)} distinct puzzles with {blanks} blanks on "
                f"{len(grids)} grids, not {count}: ask for fewer puzzles or blanks, or more grids"
            )
        attempts += 1
        grid = rng.choice(grids)
        puzzle = make_puzzle(grid, rng.randint(low, high) if low < high else low, rng)
        if puzzle is not None and puzzle not in seen:
            seen.add(puzzle)
            pairs.append((puzzle, grid))
    return pairs


def parse_grid(completion: Any) -> str:
    """The 16 digits a completion proposes (d1's treatment: the last ``<answer>`` block, else a
    ``\\boxed{}``, else the whole text; ASCII digits only, padded with 0 or cut to 16)."""
    text = completion_text(completion)
    span = answer_tag(text)
    if span is None:
        span = last_boxed(text)
    if span is None:
        span = text
    return "".join(re.findall("[0-9]", span))[:CELLS].ljust(CELLS, _BLANK)


def sudoku_cells(
    prompts: list[str], completions: list[Any], puzzle: list[str], solution: list[str], **_: Any
) -> list[float | None]:
    """Fraction of the puzzle's blank cells filled as in the stored solution (d1's reward);
    None if the row's puzzle or solution is malformed or has no blank."""
    values: list[float | None] = []
    for completion, p, s in zip(completions, puzzle, solution, strict=True):
        blanks = [i for i, ch in enumerate(p) if ch == _BLANK] if isinstance(p, str) else []
        if not (blanks and isinstance(s, str) and len(p) == len(s) == CELLS):
            values.append(None)
            continue
        grid = parse_grid(completion)
        values.append(sum(grid[i] == s[i] for i in blanks) / len(blanks))
    return values


def sudoku_solved(
    prompts: list[str], completions: list[Any], puzzle: list[str], **_: Any
) -> list[float | None]:
    """1.0 if the completion is a valid grid that keeps every clue (the accuracy reward), else
    0.0. Judged by the rules, not against the stored solution: a quarter of d1's test puzzles
    have more than one solution, and any of them solves the puzzle."""
    values: list[float | None] = []
    for completion, p in zip(completions, puzzle, strict=True):
        if not (isinstance(p, str) and len(p) == CELLS):
            values.append(None)
            continue
        grid = parse_grid(completion)
        keeps_clues = all(c in (_BLANK, g) for c, g in zip(p, grid, strict=True))
        values.append(1.0 if keeps_clues and is_valid_grid(grid) else 0.0)
    return values


def _grid_field(row: Mapping[str, Any], name: str, where: str) -> str:
    value = require(row, name, where)
    # A numeric column (parquet, JSON) loses leading zeros: restore them.
    text = str(value).zfill(CELLS) if isinstance(value, int) else str(value).strip()
    if len(text) != CELLS or not set(text) <= set("01234"):
        raise ValueError(f"{where}: field {name!r} is not 16 digits 0-4: {value!r}")
    return text


@dataclass(kw_only=True)
class SudokuTask(Task):
    """4x4 Sudoku. ``blanks`` (1-12) blank cells per generated puzzle, or ``[low, high]`` for a
    number drawn per puzzle (easier puzzles among the hard ones: a tiny model learns the rules
    from them reliably instead of by a seed-dependent jump); ``test_grids`` of the
    288 grids are reserved for test (88 leaves 200 for training, as SPG's split) and, when asked
    for, ``validation_grids`` for the ``validation`` split (choosing hyperparameters; e.g. 20,
    and training sees the other 180). Files use
    d1's ``Puzzle,Solution`` columns (or ``puzzle``/``solution``)."""

    name: ClassVar[str] = "sudoku"
    accuracy_reward: ClassVar[str] = "sudoku_solved"
    default_field_map: ClassVar[Mapping[str, str]] = {"Puzzle": "puzzle", "Solution": "solution"}
    default_sizes: ClassVar[Mapping[str, int]] = {"train": 5000, "validation": 256, "test": 256}

    source: str | Mapping[str, str] = GENERATED
    seed: int = 0
    blanks: int | list[int] = 8
    test_grids: int = 88
    validation_grids: int = 0  # opt-in: every recipe's training grids stay as they were
    reward_funcs: list[RewardFunc] = field(default_factory=lambda: [sudoku_cells, sudoku_solved])
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])

    def __post_init__(self) -> None:
        super().__post_init__()
        span = [self.blanks] * 2 if isinstance(self.blanks, int) else list(self.blanks)
        if len(span) != 2 or not 1 <= span[0] <= span[1] <= MAX_BLANKS:
            raise ValueError(
                f"blanks must be a number or a [low, high] range within 1-{MAX_BLANKS}, "
                f"got {self.blanks}"
            )
        if not 1 <= self.test_grids < len(all_grids()):
            raise ValueError(f"test_grids must be between 1 and 287, got {self.test_grids}")
        if self.validation_grids < 0 or self.test_grids + self.validation_grids >= len(all_grids()):
            raise ValueError(
                f"validation_grids must be >= 0 and leave training at least one of the 288 "
                f"grids besides the {self.test_grids} test grids, got {self.validation_grids}"
            )

    def generate(self, split: str, count: int) -> list[dict[str, Any]]:
        grids = split_grids(self.test_grids, self.validation_grids)[split]
        if not grids:
            raise ValueError("the validation split needs validation_grids >= 1 (task option)")
        rng = random.Random(f"sudoku:{self.seed}:{split}")
        pairs = generate_puzzles(grids, count, self.blanks, rng)
        return [{"puzzle": p, "solution": s} for p, s in pairs]

    def convert(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        puzzle = _grid_field(row, "puzzle", where)
        solution = _grid_field(row, "solution", where)
        if not is_valid_grid(solution):
            raise ValueError(f"{where}: field 'solution' is not a valid grid: {solution}")
        if any(p not in (_BLANK, s) for p, s in zip(puzzle, solution, strict=True)):
            raise ValueError(f"{where}: field 'puzzle' contradicts the solution: {puzzle}")
        return {"puzzle": puzzle, "solution": solution}

    def plain_prompt(self, row: Mapping[str, Any]) -> str:
        return f"{row['puzzle']}\n"

    def plain_target(self, row: Mapping[str, Any]) -> str:
        return row["solution"]

    def instruction(self, row: Mapping[str, Any]) -> str:
        return (
            "Solve this 4x4 Sudoku. Replace every 0 with a digit from 1 to 4 so that each row, "
            "each column and each 2x2 box contains 1, 2, 3 and 4 exactly once. The puzzle, row "
            f"by row:\n{row['puzzle']}\n\n"
            "You may think inside <reasoning> </reasoning> first. Then write the whole solved "
            "grid as 16 digits inside <answer> </answer>."
        )

    def chat_target(self, row: Mapping[str, Any]) -> str:
        return answer_block(row["solution"])
