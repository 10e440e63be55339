"""Task names to task classes; ``get_task`` checks options so a typo is an error, not a no-op."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from unmask.errors import UserError
from unmask.tasks.base import Task
from unmask.tasks.code import CodeTask
from unmask.tasks.countdown import CountdownTask
from unmask.tasks.gsm8k import GSM8KTask
from unmask.tasks.math500 import Math500Task
from unmask.tasks.sudoku import SudokuTask

# A new task is one file (a Task subclass with its ``name``) plus one entry here.
TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (SudokuTask, CountdownTask, GSM8KTask, Math500Task, CodeTask)
}


class TaskOptionError(UserError, TypeError):
    """An option the task does not have (a TypeError, as a wrong keyword argument is)."""


def task_options(name: str) -> list[str]:
    """The options ``get_task(name, ...)`` accepts."""
    return sorted(f.name for f in fields(_task_class(name)) if f.init)


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name`` configured by ``options`` (see each task class)."""
    valid = task_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TaskOptionError(
            f"unknown option(s) {', '.join(unknown)} for task {name!r}; "
            f"valid options: {', '.join(valid)}"
        )
    return _task_class(name)(**options)


def _task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def build_task(name: str, options: dict[str, Any], tokenizer: Any) -> Task:
    """The task named in a config; a chat template needs the model's tokenizer."""
    options = dict(options)
    if options.get("template") == "chat":
        options.setdefault("tokenizer", tokenizer)
    return get_task(name, **options)
