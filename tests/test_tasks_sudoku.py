"""4x4 Sudoku: grids, generator (unique, exact blanks, split by grid, seeded), rewards, d1 CSV."""

from pathlib import Path

import pytest

from unmask.tasks import SudokuTask, get_task
from unmask.tasks.sudoku import (
    all_grids,
    is_valid_grid,
    parse_grid,
    split_grids,
    sudoku_cells,
    sudoku_solved,
)

D1_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "d1" / "sudoku_4x4_test.csv"
PUZZLE = "3102200002100320"
SOLUTION = "3142243142131324"


def count_solutions(puzzle: str, limit: int = 10) -> int:
    """An independent backtracking solver (row, column and box checks written out)."""
    cells = [int(c) for c in puzzle]

    def ok(i: int, d: int) -> bool:
        r, c = divmod(i, 4)
        box = [(r // 2 * 2 + a) * 4 + c // 2 * 2 + b for a in range(2) for b in range(2)]
        peers = [r * 4 + k for k in range(4)] + [k * 4 + c for k in range(4)] + box
        return all(cells[p] != d for p in peers if p != i)

    def search(i: int) -> int:
        if i == 16:
            return 1
        if cells[i]:
            return search(i + 1) if ok(i, cells[i]) else 0
        total = 0
        for d in range(1, 5):
            if ok(i, d):
                cells[i] = d
                total += search(i + 1)
                cells[i] = 0
                if total >= limit:
                    break
        return total

    return search(0)


def test_there_are_288_distinct_valid_grids() -> None:
    grids = all_grids()
    assert len(grids) == len(set(grids)) == 288
    assert all(is_valid_grid(g) and count_solutions(g) == 1 for g in grids)
    assert count_solutions("0" * 16, limit=1000) == 288


@pytest.mark.parametrize("blanks", [1, 4, 8, 10, 12])
def test_generated_puzzles_are_unique_with_exact_blanks(blanks: int) -> None:
    rows = SudokuTask(blanks=blanks, num_test=40).rows("test")
    assert len({r["puzzle"] for r in rows}) == 40
    for row in rows:
        puzzle, solution = row["puzzle"], row["solution"]
        assert puzzle.count("0") == blanks
        assert is_valid_grid(solution)
        assert all(p in ("0", s) for p, s in zip(puzzle, solution, strict=True))
        assert count_solutions(puzzle) == 1


def test_a_blanks_range_draws_each_count_in_it() -> None:
    rows = SudokuTask(blanks=[2, 5], num_test=200).rows("test")
    counts = {r["puzzle"].count("0") for r in rows}
    assert counts == {2, 3, 4, 5}
    assert all(count_solutions(r["puzzle"]) == 1 for r in rows)


def test_train_and_test_share_no_solution_grid() -> None:
    task = SudokuTask(num_train=2000, num_test=300)
    train = {r["solution"] for r in task.rows("train")}
    test = {r["solution"] for r in task.rows("test")}
    assert train.isdisjoint(test)
    grids = split_grids(88)
    assert train <= set(grids["train"]) and test <= set(grids["test"])
    assert len(grids["train"]) == 200 and len(grids["test"]) == 88
    # The grid split does not move with the seed: no leak between runs with other seeds.
    other = {r["solution"] for r in SudokuTask(seed=7, num_test=300).rows("test")}
    assert other <= set(grids["test"])


def test_train_validation_and_test_are_disjoint_by_grid() -> None:
    """Validation puzzles come from grids neither training nor test ever sees, for any seed."""
    grids = split_grids(88, 20)
    assert [len(grids[s]) for s in ("train", "validation", "test")] == [180, 20, 88]
    assert set().union(*grids.values()) == set(all_grids())
    assert split_grids(88, 0)["test"] == grids["test"]  # validation leaves test as it was
    for seed in (0, 5):
        task = SudokuTask(seed=seed, blanks=6, num_train=3000, validation_grids=20)
        rows = {split: task.rows(split) for split in ("train", "validation", "test")}
        assert len(rows["validation"]) == 256 and len(rows["test"]) == 256  # the defaults
        solutions = {split: {r["solution"] for r in found} for split, found in rows.items()}
        assert solutions["validation"] <= set(grids["validation"])
        assert solutions["train"] <= set(grids["train"])
        assert solutions["test"] <= set(grids["test"])
        puzzles = {split: {r["puzzle"] for r in found} for split, found in rows.items()}
        assert not puzzles["train"] & puzzles["validation"]
        assert not puzzles["train"] & puzzles["test"]
        assert not puzzles["validation"] & puzzles["test"]


def test_validation_split_is_deterministic_and_sized() -> None:
    first = SudokuTask(num_validation=40, validation_grids=20).rows("validation")
    assert first == SudokuTask(num_validation=40, validation_grids=20).rows("validation")
    assert len(first) == 40 and len({r["puzzle"] for r in first}) == 40
    assert first != SudokuTask(seed=1, num_validation=40, validation_grids=20).rows("validation")
    assert len(get_task("sudoku", validation_grids=20).rows("validation")) == 256
    with pytest.raises(ValueError, match="validation_grids >= 1"):
        SudokuTask().rows("validation")  # opt-in: no validation grids by default
    # By default training keeps the 200 grids of SPG's split.
    train = {r["solution"] for r in SudokuTask(num_train=3000).rows("train")}
    assert train <= set(split_grids(88, 0)["train"]) and len(split_grids(88, 0)["train"]) == 200


def test_generation_is_seeded() -> None:
    first = SudokuTask(seed=3, num_train=50).dataset("train")
    again = SudokuTask(seed=3, num_train=50).dataset("train")
    other = SudokuTask(seed=4, num_train=50).dataset("train")
    assert first.to_list() == again.to_list()
    assert first["puzzle"] != other["puzzle"]


def test_too_many_puzzles_for_the_grids_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="distinct puzzles"):
        SudokuTask(blanks=1, test_grids=1, num_test=17).rows("test")


@pytest.mark.parametrize(
    "options",
    [
        {"blanks": 0},
        {"blanks": 13},
        {"blanks": [5, 2]},
        {"blanks": [1, 13]},
        {"test_grids": 288},
        {"validation_grids": -1},
        {"test_grids": 88, "validation_grids": 200},
        {"num_validation": 0},
    ],
)
def test_bad_options(options: dict) -> None:
    with pytest.raises(ValueError):
        SudokuTask(**options)


def test_plain_prompt_and_target_are_short() -> None:
    row = SudokuTask(num_test=1).dataset("test")[0]
    assert row["prompt"] == row["puzzle"] + "\n"
    assert row["target"] == row["solution"]


def test_chat_template_asks_for_an_answer_block() -> None:
    row = SudokuTask(num_test=1, template="chat").dataset("test")[0]
    assert row["puzzle"] in row["prompt"] and "<answer>" in row["prompt"]
    assert row["target"] == f"<answer>\n{row['solution']}\n</answer>"


def score(completions: list, puzzle: str = PUZZLE, solution: str = SOLUTION) -> list[tuple]:
    n = len(completions)
    cells = sudoku_cells([""] * n, completions, puzzle=[puzzle] * n, solution=[solution] * n)
    solved = sudoku_solved([""] * n, completions, puzzle=[puzzle] * n, solution=[solution] * n)
    return list(zip(cells, solved, strict=True))


@pytest.mark.parametrize(
    ("completion", "cells", "solved"),
    [
        (SOLUTION, 1.0, 1.0),
        (f"<reasoning>think</reasoning>\n<answer>\n{SOLUTION}\n</answer>", 1.0, 1.0),
        ("<answer>\n3 1 4 2\n2 4 3 1\n4 2 1 3\n1 3 2 4\n</answer>", 1.0, 1.0),
        (f"\\boxed{{{SOLUTION}}}", 1.0, 1.0),
        ("3142243142131323", 7 / 8, 0.0),  # last blank wrong
        (SOLUTION[:10], 5 / 8, 0.0),  # short: padded with 0
        (SOLUTION + "1234", 1.0, 1.0),  # long: cut to 16
        ("0" * 16, 0.0, 0.0),
        ("", 0.0, 0.0),
        ("I cannot solve this", 0.0, 0.0),
        ("٣١٤٢٢٤٣١٤٢١٣١٣٢٤", 0.0, 0.0),  # Arabic-Indic digits are not digits here
        (f"<answer>oops</answer> {SOLUTION}", 0.0, 0.0),  # an answer block wins
        ("1142243142131324", 1.0, 0.0),  # a clue changed: blanks right, grid invalid
        ([{"role": "assistant", "content": SOLUTION}], 1.0, 1.0),
    ],
)
def test_rewards(completion: object, cells: float, solved: float) -> None:
    assert score([completion]) == [(cells, solved)]


def test_solved_accepts_any_valid_solution_of_an_ambiguous_puzzle() -> None:
    a = all_grids()[0]
    b = a.translate(str.maketrans("12", "21"))  # swapping two digits keeps a grid valid
    puzzle = "".join("0" if x != y else x for x, y in zip(a, b, strict=True))
    assert is_valid_grid(b) and count_solutions(puzzle) > 1
    assert score([a, b], puzzle=puzzle, solution=a) == [(1.0, 1.0), (0.0, 1.0)]


def test_malformed_rows_score_none() -> None:
    assert score([SOLUTION], puzzle="123", solution=SOLUTION) == [(None, None)]
    assert score([SOLUTION], puzzle=SOLUTION, solution=SOLUTION)[0][0] is None  # no blanks


def test_parse_grid_pads_and_truncates() -> None:
    assert parse_grid("12") == "12" + "0" * 14
    assert parse_grid("9" * 20) == "9" * 16


@pytest.mark.skipif(not D1_TEST.exists(), reason="shared d1 data not present")
def test_reads_the_d1_csv() -> None:
    task = get_task("sudoku", source=str(D1_TEST))
    data = task.dataset("test")
    assert len(data) == 500
    assert data[0]["puzzle"] == PUZZLE and data[0]["solution"] == SOLUTION
    assert all(p.count("0") == 8 for p in data["puzzle"])
    columns = {k: data[k] for k in ("puzzle", "solution")}
    scores = task.score(data["prompt"], data["target"], columns)
    assert all(v == 1.0 for v in scores["sudoku_cells"] + scores["sudoku_solved"])
    assert len(get_task("sudoku", source=str(D1_TEST), num_test=256).dataset("test")) == 256


def test_bad_csv_rows_name_file_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(f"Puzzle,Solution\n{PUZZLE},{SOLUTION}\n{PUZZLE},\n")
    with pytest.raises(ValueError, match=r"bad\.csv row 1: missing field 'solution'"):
        SudokuTask(source=str(path)).rows("test")
    path.write_text(f"Puzzle,Solution\n{PUZZLE},1111222233334444\n")
    with pytest.raises(ValueError, match=r"row 0: field 'solution' is not a valid grid"):
        SudokuTask(source=str(path)).rows("test")
    path.write_text(f"Puzzle,Solution\n4102200002100320,{SOLUTION}\n")
    with pytest.raises(ValueError, match=r"row 0: field 'puzzle' contradicts"):
        SudokuTask(source=str(path)).rows("test")
