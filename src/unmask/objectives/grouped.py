"""Views drawn group by group, so a group's views do not depend on the rest of its batch.

An objective draws its views from one generator over the whole rollout batch, on a canvas as
wide as the batch's longest prompt needs: a rollout's views then change with the rollouts
beside it. RL's global batch (docs/scale.md) needs the completions of one prompt (a group) to
be viewed alike whichever process holds them, so :func:`grouped_views` builds each group's
views on its own rows from its own generator, then lays them on the batch's canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from unmask.objectives.base import Objective, ViewBatch
from unmask.objectives.replay import replay
from unmask.objectives.selection import StepChoices
from unmask.objectives.views import SequenceBatch
from unmask.sampling.rollout import Rollout


def grouped_views(
    objective: Objective, rollout: Rollout, generators: Sequence[torch.Generator]
) -> ViewBatch:
    """The views of ``rollout``, one equal group of consecutive rollouts per generator, each
    group's drawn from its generator on its own rows."""
    size = rollout.batch_size // len(generators)
    canvas = replay(rollout).canvas
    parts, views = [], 0
    for g, generator in enumerate(generators):
        part = objective.views(rollout.select(slice(g * size, (g + 1) * size)), generator)
        parts.append(_on_canvas(part, canvas, g * size, views))
        views += len(part)
    return _concat(parts)


def _on_canvas(
    part: ViewBatch, canvas: SequenceBatch, first_row: int, first_view: int
) -> ViewBatch:
    """``part`` (views of rollouts ``first_row...`` on their own canvas) on the batch's wider
    ``canvas``: every column moves right by the difference of the two starts, and the views'
    rollout (and step-choice view) indices count from ``first_row`` (``first_view``)."""
    shift, width = canvas.start - part.canvas.start, part.input_ids.shape[1]
    rows = part.rollout_index + first_row
    cols = slice(shift, shift + width)

    def placed(values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        fill[:, cols] = values
        return fill

    shape, device = (len(part), canvas.ids.shape[1]), part.input_ids.device
    choices = part.choices
    if choices is not None:
        choices = replace(choices, view=choices.view + first_view, columns=choices.columns + shift)
    return replace(
        part,
        canvas=canvas,
        input_ids=placed(part.input_ids, canvas.ids[rows]),
        scored=placed(part.scored, torch.zeros(shape, dtype=torch.bool, device=device)),
        weights=placed(part.weights, part.weights.new_zeros(shape)),
        rollout_index=rows,
        completion_index=placed(part.completion_index, torch.full(shape, -1, device=device)),
        choices=choices,
    )


def _concat(parts: list[ViewBatch]) -> ViewBatch:
    """One batch of the groups' views (all on one canvas)."""
    first = parts[0]
    choices = [p.choices for p in parts if p.choices is not None]
    return replace(
        first,
        input_ids=torch.cat([p.input_ids for p in parts]),
        scored=torch.cat([p.scored for p in parts]),
        weights=torch.cat([p.weights for p in parts]),
        rollout_index=torch.cat([p.rollout_index for p in parts]),
        completion_index=torch.cat([p.completion_index for p in parts]),
        choices=_concat_choices(choices) if choices else None,
    )


def _concat_choices(choices: list[StepChoices]) -> StepChoices:
    return replace(
        choices[0],
        view=torch.cat([c.view for c in choices]),
        columns=torch.cat([c.columns for c in choices]),
        candidates=torch.cat([c.candidates for c in choices]),
        chosen=torch.cat([c.chosen for c in choices]),
    )
