"""What every registered task promises, read from the registry: a new task is one file plus
one line in ``TASKS``, and these tests pick it up unchanged."""

from __future__ import annotations

import inspect

import pytest

from unmask.tasks.registry import TASKS, get_task, task_options


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_task_declares_itself(name):
    cls = TASKS[name]
    assert cls.name == name and inspect.getdoc(cls)
    task = cls()
    assert task.accuracy_reward in task.reward_names
    assert len(set(task.reward_names)) == len(task.reward_names)
    assert set(task_options(name)) >= {"template", "source", "num_train", "num_test"}
    with pytest.raises(TypeError, match="no_such_option"):
        get_task(name, no_such_option=1)


GENERATED = sorted(name for name, cls in TASKS.items() if cls.default_sizes)


@pytest.mark.parametrize("name", GENERATED)
def test_a_generated_task_scores_its_own_targets_as_correct(name):
    """The reference completion of every generated row earns the accuracy reward, under both
    templates: targets, prompts and the reward agree on one answer format."""
    for template in ("plain", "chat"):
        task = get_task(name, template=template, num_test=6)
        data = task.dataset("test")
        assert len(data) == 6 and all(data["prompt"]) and all(data["target"])
        columns = {c: data[c] for c in data.column_names if c not in ("prompt", "target")}
        scores = task.score(data["prompt"], data["target"], columns)
        assert scores[task.accuracy_reward] == [1.0] * 6, (template, scores)
        assert all(v is not None for v in task.weighted_sum(scores))
