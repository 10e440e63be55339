"""Rebuilding the sampler's states from a :class:`~unmask.sampling.Rollout`.

The rollouts are laid out exactly like the sampler's canvas (``collate`` of
:mod:`unmask.objectives.views`: left padding so block 0 starts at one column in every row, block
ids from :func:`~unmask.models.attention.block_index` with the rollout's ``block_length`` and
``block_align``), so a replayed state has the positions, block boundaries and attended columns
the sampler used. The whole completion window is attended, as in the sampler, and positions
that were never decoded (``steps == -1``) stay masks in every state.

A state of a rollout is the canvas with some completion columns (and, for diffu-GRPO, some
prompt columns) replaced by the mask token. :meth:`Replay.views` turns per-row masks, scored
columns and weights into a :class:`~unmask.objectives.base.ViewBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.objectives.base import ViewBatch
from unmask.objectives.views import SequenceBatch, collate
from unmask.sampling.rollout import Rollout


@dataclass
class Replay:
    """A rollout batch on the sampler's canvas; every tensor is ``[B, W]`` canvas columns.

    ``canvas.ids`` is the final canvas (mask ids where never decoded) and ``canvas.completion``
    the completion window. ``steps`` is the trace (-1 outside the completion and where never
    decoded); ``scorable`` the completion up to and including its first EOS;
    ``completion_index`` the completion position ``j`` of each completion column, else -1.
    """

    canvas: SequenceBatch
    steps: torch.Tensor
    scorable: torch.Tensor
    completion_index: torch.Tensor
    mask_token_id: int

    @property
    def decoded(self) -> torch.Tensor:
        """``[B, W]``: columns the sampler decoded (at any step)."""
        return self.steps >= 0

    @property
    def num_rollouts(self) -> int:
        """``B``, the rollouts replayed."""
        return self.steps.shape[0]

    def views(
        self,
        rows: torch.Tensor,
        masked: torch.Tensor,
        scored: torch.Tensor,
        weights: torch.Tensor | float = 1.0,
        two_stream: bool = False,
    ) -> ViewBatch:
        """Views of rollouts ``rows`` ``[N]``: ``masked`` columns hidden, ``scored`` ones scored
        with ``weights`` (a scalar, per view ``[N]``, or per column ``[N, W]``).

        Rows that score nothing are dropped. Scored columns must be hidden completion tokens;
        padding is never hidden. With ``two_stream`` only completion columns may be hidden:
        the forward is ``[clean canvas | noisy copy]`` (block-causal models).
        """
        canvas = self.canvas
        masked = masked | (canvas.completion[rows] & ~self.decoded[rows])
        if (masked & ~canvas.real[rows]).any():
            raise ValueError("a view masks padding")
        if (scored & ~(masked & self.scorable[rows])).any():
            raise ValueError("a view scores a column that is visible or not in the completion")
        if two_stream and (masked & ~canvas.completion[rows]).any():
            raise ValueError("two-stream views can only mask completion tokens")
        weights = torch.as_tensor(weights, dtype=torch.float32, device=scored.device)
        weights = (weights[:, None] if weights.dim() == 1 else weights) * scored
        keep = scored.any(dim=1)
        rows, masked, scored = rows[keep], masked[keep], scored[keep]
        return ViewBatch(
            canvas=canvas,
            input_ids=canvas.ids[rows].masked_fill(masked, self.mask_token_id),
            scored=scored,
            weights=weights[keep],
            rollout_index=rows,
            completion_index=self.completion_index[rows].masked_fill(~scored, -1),
            two_stream=two_stream,
        )

    def rows(self, repeats: int = 1) -> torch.Tensor:
        """Each rollout that has something to score, ``repeats`` times in a row."""
        useful = torch.nonzero(self.scorable.any(dim=1)).flatten()
        return useful.repeat_interleave(repeats)


def replay(rollout: Rollout) -> Replay:
    """Lay a rollout batch out on the sampler's canvas."""
    _check(rollout)
    device = rollout.completion_ids.device
    decoded = rollout.steps >= 0
    completion = rollout.completion_ids.masked_fill(~decoded, rollout.mask_token_id)
    pairs = [
        (ids[keep].tolist(), comp.tolist())
        for ids, keep, comp in zip(
            rollout.prompt_ids.cpu(), rollout.prompt_mask.cpu(), completion.cpu(), strict=True
        )
    ]
    pad_id = int(rollout.mask_token_id == 0)  # padding is never attended: any id but the mask's
    canvas = collate(
        pairs, pad_id, rollout.block_length, rollout.block_align, whole_blocks=True
    ).to(device)
    window = canvas.completion
    width = window.shape[1]
    steps = torch.full((rollout.batch_size, width), -1, dtype=torch.long, device=device)
    steps[window] = rollout.steps.flatten()
    scorable = torch.zeros_like(window)
    scorable[window] = rollout.completion_mask.flatten().bool()
    index = torch.full_like(steps, -1)
    index[window] = torch.arange(rollout.completion_ids.shape[1], device=device).repeat(
        rollout.batch_size
    )
    return Replay(canvas, steps, scorable, index, rollout.mask_token_id)


def _check(rollout: Rollout) -> None:
    shape = tuple(rollout.completion_ids.shape)
    for name in ("steps", "completion_mask", "logprobs", "selection_logprobs"):
        value = getattr(rollout, name)
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(
                f"rollout.{name} has shape {tuple(value.shape)}, completion_ids has {shape}"
            )
    if rollout.prompt_ids.shape != rollout.prompt_mask.shape:
        raise ValueError("rollout.prompt_ids and rollout.prompt_mask differ in shape")
    if (rollout.completion_mask.bool() & (rollout.steps < 0)).any():
        raise ValueError("rollout.completion_mask marks positions that were never decoded")


def trace_groups(replay: Replay, shrink: int) -> torch.Tensor:
    """Group index of every decoded column within its block, ``[B, W]`` (-1 if not decoded).

    The distinct trace steps of each block, in order, are merged ``shrink`` at a time (TraceRL's
    shrinkage); merged steps never straddle a block boundary.
    """
    if shrink < 1:
        raise ValueError(f"shrink must be >= 1, got {shrink}")
    rows, cols = replay.decoded.nonzero(as_tuple=True)
    keys = torch.stack([rows, replay.canvas.blocks[rows, cols], replay.steps[rows, cols]])
    unique, inverse = torch.unique(keys, dim=1, return_inverse=True)
    count = unique.shape[1]
    new_segment = torch.ones(count, dtype=torch.bool, device=keys.device)
    new_segment[1:] = (unique[:2, 1:] != unique[:2, :-1]).any(dim=0)
    order = torch.arange(count, device=keys.device)
    segment_start = torch.where(new_segment, order, 0).cummax(dim=0).values
    group = torch.div(order - segment_start, shrink, rounding_mode="floor")
    out = torch.full_like(replay.steps, -1)
    out[rows, cols] = group[inverse]
    return out
