"""Countdown: solvable seeded instances, the solver, the reward on hostile input, d1 jsonl."""

import json
import random
import time
from pathlib import Path

import pytest

from unmask.rewards.arithmetic import evaluate
from unmask.tasks import CountdownTask, get_task
from unmask.tasks.countdown import (
    MAX_NUMBER,
    MAX_TARGET,
    _leaves,
    countdown_correct,
    countdown_format,
    extract_equation,
    numbers_split,
    render,
    solve,
)

D1_TEST = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "d1" / "countdown_cd3_test.jsonl"
)


def assert_valid(equation: str, numbers: list[int], target: int) -> None:
    result = evaluate(equation)
    assert result.value == target, equation
    assert sorted(result.numbers) == sorted(numbers), equation


def test_generated_instances_are_solvable_and_in_range() -> None:
    rows = CountdownTask(num_train=300).rows("train")
    assert len({(tuple(sorted(r["numbers"])), r["target_number"]) for r in rows}) == 300
    for row in rows:
        numbers, target = row["numbers"], row["target_number"]
        assert len(numbers) == 3 and all(1 <= n <= MAX_NUMBER for n in numbers)
        assert 1 <= target <= MAX_TARGET
        assert_valid(row["equation"], numbers, target)
        assert row["equation"] == solve(numbers, target)


def test_splits_are_disjoint_by_numbers_and_seeded() -> None:
    train = CountdownTask(num_train=400).rows("train")
    test = CountdownTask(num_test=100).rows("test")
    assert not {tuple(sorted(r["numbers"])) for r in train} & {
        tuple(sorted(r["numbers"])) for r in test
    }
    assert all(numbers_split(r["numbers"]) == "test" for r in test)
    assert CountdownTask(seed=1, num_test=20).rows("test") == CountdownTask(
        seed=1, num_test=20
    ).rows("test")
    assert CountdownTask(seed=2, num_test=20).rows("test") != test[:20]


def test_train_validation_and_test_are_disjoint_by_numbers() -> None:
    """Each split draws its number multisets from its own hash buckets, for any seed, and is
    the same every time it is made."""
    for seed in (0, 3):
        task = CountdownTask(seed=seed, num_train=1000)
        rows = {split: task.rows(split) for split in ("train", "validation", "test")}
        assert len(rows["validation"]) == 256 and len(rows["test"]) == 256  # the defaults
        multisets = {s: {tuple(sorted(r["numbers"])) for r in found} for s, found in rows.items()}
        assert not multisets["train"] & multisets["validation"]
        assert not multisets["train"] & multisets["test"]
        assert not multisets["validation"] & multisets["test"]
        for split, found in rows.items():
            assert all(numbers_split(r["numbers"]) == split for r in found)
        assert rows["validation"] == CountdownTask(seed=seed).rows("validation")
    assert len(CountdownTask(num_validation=30).rows("validation")) == 30
    # About one multiset in ten goes to each held-out split.
    drawn = [numbers_split(n) for n in [[a, b, 7] for a in range(1, 101) for b in range(a, 101)]]
    assert 0.07 < drawn.count("validation") / len(drawn) < 0.13
    assert 0.07 < drawn.count("test") / len(drawn) < 0.13


def test_solver() -> None:
    assert solve([30, 100, 93], 23) == "30+93-100"
    assert solve([2, 3, 4], 24) == "2*3*4"
    assert solve([1, 1, 1], 100) is None
    assert_valid(solve([4, 6, 3], 8), [4, 6, 3], 8)  # needs a division: 4*6/3


def test_rendering_keeps_the_value() -> None:
    rng = random.Random(0)
    for _ in range(50):
        numbers = [rng.randint(1, 100) for _ in range(3)]
        for value, tree in _leaves(numbers):
            result = evaluate(render(tree))
            assert abs(float(result.value) - value) < 1e-9
            assert sorted(result.numbers) == sorted(numbers)


def test_plain_and_chat_formats() -> None:
    row = CountdownTask(num_test=1).dataset("test")[0]
    numbers = ",".join(str(n) for n in row["numbers"])
    assert row["prompt"] == f"{numbers}->{row['target_number']}\n"
    assert row["target"] == row["equation"]
    chat = CountdownTask(num_test=1, template="chat").dataset("test")[0]
    assert chat["target"] == f"<answer>\n{row['equation']}\n</answer>"
    assert str(row["target_number"]) in chat["prompt"]


NUMBERS, TARGET = [30, 100, 93], 23


@pytest.mark.parametrize(
    ("completion", "correct", "uses_numbers"),
    [
        ("30-(100-93)", 1.0, 1.0),
        ("93-100+30", 1.0, 1.0),
        ("<reasoning>try</reasoning>\n<answer>\n30 - (100 - 93)\n</answer>", 1.0, 1.0),
        ("<answer>\\boxed{30-(100-93)}</answer>", 1.0, 1.0),
        ("<answer>30-(100-93) = 23</answer>", 1.0, 1.0),
        ("<answer>23 = 30-(100-93)</answer>", 1.0, 1.0),
        ("30-(100-93).", 1.0, 1.0),
        ("30 \\times 1 - (100 - 93)", 0.0, 0.0),  # an extra number
        ("<answer>30-(100-93) = 24</answer>", 0.0, 0.0),  # claims another target
        ("<answer>30-100 = 93-23 = 1</answer>", 0.0, 0.0),
        ("30+100+93", 0.0, 1.0),  # right numbers, wrong value
        ("30-7", 0.0, 0.0),  # missing and foreign numbers, right value
        ("30+30-7", 0.0, 0.0),  # a number used twice
        ("100-93", 0.0, 0.0),  # a number missing
        ("30/(100-100)+93", 0.0, 0.0),  # division by zero
        ("9**9**9", 0.0, 0.0),
        ("1" * 10_000, 0.0, 0.0),
        ("３０-(１００-９３)", 0.0, 0.0),  # full-width digits
        ("__import__('os').system('true')", 0.0, 0.0),
        ("", 0.0, 0.0),
        ("<answer></answer>", 0.0, 0.0),
        ("I don't know", 0.0, 0.0),
    ],
)
def test_rewards(completion: str, correct: float, uses_numbers: float) -> None:
    columns = {"numbers": [NUMBERS], "target_number": [TARGET]}
    assert countdown_correct([""], [completion], **columns) == [correct]
    assert countdown_format([""], [completion], **columns) == [uses_numbers]


def test_rewards_are_fast_on_hostile_input() -> None:
    completions = ["9**9**9", "1" * 10_000, "(" * 5000 + "1" + ")" * 5000, "-" * 5000 + "1"] * 25
    start = time.perf_counter()
    scores = countdown_correct(
        [""] * 100, completions, numbers=[NUMBERS] * 100, target_number=[TARGET] * 100
    )
    assert scores == [0.0] * 100
    assert time.perf_counter() - start < 0.5


def test_malformed_rows_score_none() -> None:
    scores = countdown_correct(
        ["", ""], ["1+2+3", "1+2+3"], numbers=[None, [1, 2, 3]], target_number=[6, "six"]
    )
    assert scores == [None, None]


def test_extract_equation() -> None:
    assert extract_equation("<answer>1+2=3</answer>", 3) == "1+2"
    assert extract_equation("1+2=4", 3) is None
    assert extract_equation("no answer block", 3) == "no answer block"


@pytest.mark.skipif(not D1_TEST.exists(), reason="shared d1 data not present")
def test_reads_the_d1_jsonl() -> None:
    task = get_task("countdown", source=str(D1_TEST))
    data = task.dataset("test")
    first = json.loads(D1_TEST.read_text().splitlines()[0])
    assert len(data) == 256
    assert data[0]["numbers"] == [int(n) for n in first["input"].split(",")]
    assert data[0]["target_number"] == int(first["output"])
    for row in data:
        assert_valid(row["equation"], row["numbers"], row["target_number"])
    columns = {k: data[k] for k in ("numbers", "target_number")}
    scores = task.score(data["prompt"], data["target"], columns)
    assert scores["countdown_correct"] == [1.0] * 256


def test_rows_without_three_numbers_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "cd.jsonl"
    rows = [{"input": "1,2,3,4", "output": "10"}, {"input": "2, 3, 4", "output": "24"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert CountdownTask(source=str(path)).rows("test") == [
        {"numbers": [2, 3, 4], "target_number": 24, "equation": "2*3*4"}
    ]


def test_bad_rows_name_file_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "cd.jsonl"
    path.write_text('{"input": "1,2,3", "output": "6"}\n{"input": "1,x,3", "output": "6"}\n')
    with pytest.raises(ValueError, match=r"cd\.jsonl row 1: field 'numbers' is not an integer"):
        CountdownTask(source=str(path)).rows("test")
    path.write_text('{"input": "1,2,3"}\n')
    with pytest.raises(ValueError, match=r"row 0: missing field 'target_number'"):
        CountdownTask(source=str(path)).rows("test")
