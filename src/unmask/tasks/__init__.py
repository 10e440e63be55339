"""Tasks: datasets, prompt templates and TRL-style reward functions (see ``docs/tasks.md``)."""

from unmask.tasks.base import RewardFunc, Task
from unmask.tasks.countdown import CountdownTask
from unmask.tasks.gsm8k import GSM8KTask
from unmask.tasks.math500 import Math500Task
from unmask.tasks.registry import TASKS, get_task, task_options
from unmask.tasks.sudoku import SudokuTask

__all__ = [
    "TASKS",
    "CountdownTask",
    "GSM8KTask",
    "Math500Task",
    "RewardFunc",
    "SudokuTask",
    "Task",
    "get_task",
    "task_options",
]
