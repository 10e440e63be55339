"""Length (and difficulty) curriculum: which completion length and which rows each RL step uses.

TraDo's long-chain-of-thought model was trained with the completion length raised in stages.
``curriculum:`` is a list of stages; stage i covers the steps after stage i-1's ``until_step``
up to and including its own, and the last stage (no ``until_step``) runs to the end. A stage
sets the sampler's ``gen_length`` and, for data with a difficulty column, the range of
difficulties its prompts are drawn from. The stage is a pure function of the step number, so a
resumed run follows the schedule exactly as an uninterrupted one. :class:`Curriculum` is the
schedule checked, once at trainer start, against the rollout sampler and the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from unmask.sampling.sampler import Sampler
from unmask.train.common import BatchStream


@dataclass
class CurriculumStage:
    """One stage: up to ``until_step`` (inclusive; null on the last stage), sample
    ``gen_length`` tokens (null: ``sampler.gen_length``) for prompts whose difficulty lies in
    ``[low, high]`` (``difficulty``; null: every row)."""

    until_step: int | None = None
    gen_length: int | None = None
    difficulty: list[float] | None = None


def check_curriculum(stages: Sequence[CurriculumStage]) -> None:
    """Raise a ValueError naming the field of the first stage that does not fit."""
    previous = 0
    for i, stage in enumerate(stages):
        where = f"curriculum[{i}]"
        last = i == len(stages) - 1
        if last and stage.until_step is not None:
            raise ValueError(f"{where}.until_step must be null: the last stage runs to the end")
        if not last:
            if stage.until_step is None:
                raise ValueError(f"{where}.until_step is needed (only the last stage has none)")
            if stage.until_step <= previous:
                raise ValueError(
                    f"{where}.until_step must be greater than {previous} (stages are in order)"
                )
            previous = stage.until_step
        if stage.gen_length is not None and stage.gen_length < 1:
            raise ValueError(f"{where}.gen_length must be >= 1, got {stage.gen_length}")
        bounds = stage.difficulty
        if bounds is not None and (len(bounds) != 2 or bounds[0] > bounds[1]):
            raise ValueError(f"{where}.difficulty must be [low, high], low <= high; got {bounds}")


def stage_at(stages: Sequence[CurriculumStage], step: int) -> int:
    """Index of the stage that step ``step`` (counted from 1) belongs to; -1 without stages."""
    for i, stage in enumerate(stages):
        if stage.until_step is None or step <= stage.until_step:
            return i
    return len(stages) - 1


def difficulty_rows(
    values: Sequence[Any], stages: Sequence[CurriculumStage], column: str
) -> list[set[int] | None]:
    """Per stage, the rows whose ``column`` value is within its range (None: every row).

    Refuses a missing or non-numeric column, and a stage that no row fits, naming them."""
    numbers: list[float] = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"data.difficulty_field {column!r}: row {i} has {value!r}, not a number"
            )
        numbers.append(float(value))
    allowed: list[set[int] | None] = []
    for i, stage in enumerate(stages):
        if stage.difficulty is None:
            allowed.append(None)
            continue
        low, high = stage.difficulty
        rows = {r for r, v in enumerate(numbers) if low <= v <= high}
        if not rows:
            raise ValueError(
                f"curriculum[{i}].difficulty {stage.difficulty}: no row's {column!r} is in range"
            )
        allowed.append(rows)
    return allowed


class Curriculum:
    """``stages`` checked against the rollout ``sampler`` (whose config has the run's block
    length) and the ``prompts`` data: each step's stage, its completion length and its rows.
    A stage's length gets its own sampler, built once here."""

    def __init__(
        self, stages: Sequence[CurriculumStage], sampler: Sampler, prompts: Any, column: str
    ) -> None:
        self.stages = stages
        self.rows: list[set[int] | None] = [None] * len(stages)
        self.samplers: dict[int, Sampler] = {}
        if not stages:
            return
        base = sampler.config
        block = base.block_length
        assert block is not None, "the trainer settles the block length first"
        for i, stage in enumerate(stages):
            length = stage.gen_length
            if length is not None and length % block:
                raise ValueError(
                    f"curriculum[{i}].gen_length ({length}) must be a multiple of the block "
                    f"length ({block})"
                )
            if length is not None and length != base.gen_length:
                self.samplers[length] = Sampler(replace(base, gen_length=length))
        if any(stage.difficulty is not None for stage in stages):
            if column not in prompts.column_names:
                raise ValueError(
                    f"curriculum filters on difficulty but data.difficulty_field {column!r} is "
                    f"not a column of the data (columns: {', '.join(prompts.column_names)})"
                )
            self.rows = difficulty_rows(prompts[column], stages, column)

    def stage(self, step: int) -> int:
        """The stage of step ``step`` (from 1); -1 without stages."""
        return stage_at(self.stages, step)

    def gen_length(self, stage: int, default: int) -> int:
        """The completion length of ``stage`` (``default``: the sampler's)."""
        return (self.stages[stage].gen_length or default) if stage >= 0 else default

    def take(self, stream: BatchStream, count: int, stage: int) -> list[int]:
        """The next ``count`` rows of the data order; a stage with a difficulty range skips the
        rows outside it (deterministic, and resumed with the data position)."""
        allowed = self.rows[stage] if stage >= 0 else None
        if allowed is None:
            return stream.take(count)
        rows: list[int] = []
        while len(rows) < count:
            rows.extend(i for i in stream.take(1) if i in allowed)
        return rows
