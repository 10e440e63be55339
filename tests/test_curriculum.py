"""The length/difficulty curriculum: the schedule, its checks, and that RL follows and resumes
it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tiny_rl import read_metrics, rl_config
from unmask.sampling import SamplerConfig
from unmask.tasks.sudoku import SudokuTask
from unmask.train.checkpoint import latest_checkpoint
from unmask.train.curriculum import CurriculumStage, difficulty_rows, stage_at
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig, RLData

LENGTHS = [CurriculumStage(until_step=2, gen_length=4), CurriculumStage(gen_length=8)]


def _config(tmp_path, name="run", **kw):
    base = {"num_generations": 2, "sampler": SamplerConfig(gen_length=12, temperature=1.0),
            "plots": False, "curriculum": LENGTHS}  # fmt: skip
    return rl_config(tmp_path, name, **{**base, **kw})


def test_stage_at_follows_until_step():
    stages = [CurriculumStage(until_step=2), CurriculumStage(until_step=5), CurriculumStage()]
    assert [stage_at(stages, s) for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert stage_at([], 3) == -1


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"gen_length": 4}, {"gen_length": 8}], r"curriculum\[0\].until_step is needed"),
        ([{"until_step": 3}, {"until_step": 3}, {}], r"curriculum\[1\].until_step must be greater"),
        ([{"until_step": 3}, {"until_step": 9}], r"curriculum\[1\].until_step must be null"),
        ([{"difficulty": [2, 1]}], r"curriculum\[0\].difficulty must be \[low, high\]"),
        ([{"gen_length": 0}], r"curriculum\[0\].gen_length must be >= 1"),
    ],
)
def test_bad_stages_name_their_field(stages, message):
    from unmask.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=message):
        from_dict(RLConfig, {"curriculum": stages})


def test_difficulty_rows():
    stages = [CurriculumStage(until_step=1, difficulty=[0, 1]), CurriculumStage()]
    assert difficulty_rows([0, 2, 1, 3], stages, "level") == [{0, 2}, None]
    with pytest.raises(ValueError, match="row 1 has 'hard', not a number"):
        difficulty_rows([0, "hard"], stages, "level")
    with pytest.raises(ValueError, match=r"curriculum\[0\].difficulty \[0, 1\]: no row"):
        difficulty_rows([5, 6], stages, "level")


def test_rl_follows_the_lengths_and_resumes_mid_schedule(tmp_path):
    trainer = RLTrainer(_config(tmp_path, "straight"))
    samplers = dict(trainer.curriculum.samplers)  # one per stage length, built at start
    assert {n: s.config.gen_length for n, s in samplers.items()} == {4: 4, 8: 8}
    trainer.train()
    assert trainer.curriculum.samplers == samplers  # the same objects: none built per step
    straight = read_metrics(tmp_path / "straight")
    assert [m["gen_length"] for m in straight] == [4, 4, 8, 8]
    assert [m["curriculum_stage"] for m in straight] == [0, 0, 1, 1]
    assert all(m["completions/max_length"] <= m["gen_length"] for m in straight)
    first = RLTrainer(_config(tmp_path, "resumed", save_every=1))
    step = first.step

    def interrupted():  # stopped after stage 0's last step (2) was saved
        if first.steps_done == 2:
            raise KeyboardInterrupt
        return step()

    first.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert latest_checkpoint(tmp_path / "resumed").name.endswith("2")
    RLTrainer(_config(tmp_path, "resumed", resume="latest")).train()
    resumed = read_metrics(tmp_path / "resumed")
    assert [m["gen_length"] for m in resumed] == [4, 4, 8, 8]
    assert [m["reward"] for m in resumed] == [m["reward"] for m in straight]


@dataclass(kw_only=True)
class _Graded(SudokuTask):
    """Sudoku rows with a difficulty column (row index mod 3)."""

    def rows(self, split):
        return [{**r, "level": i % 3} for i, r in enumerate(super().rows(split))]


def test_difficulty_stages_draw_only_their_rows(tmp_path):
    task = _Graded(num_train=30)
    levels = {r["prompt"]: r["level"] for r in task.dataset("train")}
    stages = [CurriculumStage(until_step=2, difficulty=[0, 0]), CurriculumStage(difficulty=[1, 2])]
    cfg = _config(tmp_path, data=RLData(difficulty_field="level"), curriculum=stages)
    trainer = RLTrainer(cfg, task=task)
    seen = []
    rollouts = trainer._rollouts

    def spy(prompts, gen_length):
        seen.append({levels[p] for p in prompts})
        return rollouts(prompts, gen_length)

    trainer._rollouts = spy
    trainer.train()
    assert len(seen) == 4 and seen[:2] == [{0}, {0}]
    assert all(s and s <= {1, 2} for s in seen[2:])
    assert [m["gen_length"] for m in read_metrics(tmp_path / "run")] == [12] * 4  # no length set


def test_curriculum_errors_name_the_field(tmp_path):
    bad_length = [CurriculumStage(until_step=1, gen_length=6), CurriculumStage()]
    with pytest.raises(ValueError, match=r"curriculum\[0\].gen_length \(6\) must be a multiple"):
        RLTrainer(_config(tmp_path, curriculum=bad_length))
    graded = [CurriculumStage(difficulty=[0, 1])]
    with pytest.raises(ValueError, match=r"data.difficulty_field 'difficulty' is not a column"):
        RLTrainer(_config(tmp_path, curriculum=graded))
