"""The Task contract: registry, options, score() that survives failing rewards, weighting."""

import logging
from dataclasses import dataclass

import pytest

from unmask.tasks import TASKS, SudokuTask, get_task, task_options
from unmask.tasks.sudoku import sudoku_cells, sudoku_solved

SOLUTION = "3142243142131324"
COLUMNS = {"puzzle": ["3102200002100320"], "solution": [SOLUTION]}


def broken(prompts, completions, **columns):
    raise KeyError("missing column")


def short(prompts, completions, **columns):
    return []


@dataclass(kw_only=True)
class FlakySudoku(SudokuTask):
    pass


def test_registry_names_and_errors() -> None:
    assert sorted(TASKS) == ["code", "countdown", "gsm8k", "math500", "sudoku"]
    for name in TASKS:
        task = get_task(name)
        assert task.name == name
        assert task.accuracy_reward in task.reward_names
        assert len(task.reward_funcs) == len(task.reward_weights)
    with pytest.raises(ValueError, match="unknown task 'sudok'; known tasks: sudoku, countdown"):
        get_task("sudok")
    with pytest.raises(TypeError, match=r"unknown option.* blank .*valid options: .*blanks"):
        get_task("sudoku", blank=4)
    with pytest.raises(TypeError, match="blanks"):
        get_task("gsm8k", blanks=4)
    assert {"source", "field_map", "template", "num_train", "seed"} <= set(
        task_options("countdown")
    )


def test_reward_names_are_the_logged_names() -> None:
    assert get_task("sudoku").reward_names == ["sudoku_cells", "sudoku_solved"]
    assert get_task("countdown").reward_names == ["countdown_correct", "countdown_format"]
    assert get_task("gsm8k").reward_names == ["gsm8k_correct", "boxed_format"]
    assert get_task("math500").reward_names == ["math_correct", "boxed_format"]


def test_score_survives_failing_rewards(caplog: pytest.LogCaptureFixture) -> None:
    task = FlakySudoku(
        reward_funcs=[sudoku_cells, broken, short, sudoku_solved],
        reward_weights=[1.0, 1.0, 1.0, 2.0],
    )
    with caplog.at_level(logging.WARNING):
        scores = task.score(["p"], [SOLUTION], COLUMNS)
    assert scores == {
        "sudoku_cells": [1.0],
        "broken": [None],
        "short": [None],
        "sudoku_solved": [1.0],
    }
    assert "reward broken failed" in caplog.text and "reward short failed" in caplog.text
    assert task.weighted_sum(scores) == [3.0]
    assert task.weighted_sum({name: [None] for name in task.reward_names}) == [None]


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="unknown template 'fancy'"):
        SudokuTask(template="fancy")
    with pytest.raises(ValueError, match="num_train"):
        SudokuTask(num_train=0)
    with pytest.raises(ValueError, match="2 reward functions but 1 reward weights"):
        SudokuTask(reward_weights=[1.0])
    with pytest.raises(ValueError, match="accuracy reward 'sudoku_solved'"):
        SudokuTask(reward_funcs=[sudoku_cells], reward_weights=[1.0])


def test_split_errors() -> None:
    with pytest.raises(ValueError, match="cannot generate split 'dev'"):
        SudokuTask().rows("dev")
    with pytest.raises(ValueError, match="generated splits: none"):
        get_task("gsm8k", source="generated").rows("test")
    with pytest.raises(ValueError, match="no source for split 'train'"):
        SudokuTask(source={"test": "generated"}).rows("train")


def test_reward_functions_keep_distinct_names():
    """Two lambdas, two functions of one name, or a partial each keep their own scores."""
    import functools

    from unmask.tasks.base import reward_names

    def scaled(prompts, completions, factor=1.0, **_):
        return [factor * len(c) for c in completions]

    def other_scaled(prompts, completions, **_):
        return [0.0 for _ in completions]

    other_scaled.__name__ = "scaled"
    funcs = [
        lambda prompts, completions, **_: [1.0] * len(completions),
        lambda prompts, completions, **_: [2.0] * len(completions),
        scaled,
        other_scaled,
        functools.partial(scaled, factor=3.0),
    ]
    assert reward_names(funcs) == ["reward", "reward_2", "scaled", "scaled_2", "scaled_3"]
    task = get_task("sudoku", num_train=2, num_test=2)
    task.reward_funcs = [task.reward_funcs[0], *funcs]
    task.reward_weights = [1.0] * len(task.reward_funcs)
    scores = task.score(["p", "p"], ["ab", "abc"], {k: [None, None] for k in ()})
    assert scores["reward"] == [1.0, 1.0] and scores["reward_2"] == [2.0, 2.0]
    assert scores["scaled"] == [2.0, 3.0] and scores["scaled_2"] == [0.0, 0.0]
    assert scores["scaled_3"] == [6.0, 9.0]
