"""The canvas a batch decodes on: left-padded rows whose blocks share canvas columns.

The canvas is ``[padding | prompt | gen_length masks]``, one row per prompt. Rows are
left-padded so that block 0 (see :func:`unmask.models.attention.block_origin`) starts at the
same column ``start`` in every row; block ``k`` then occupies the same columns of all rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unmask.models.attention import block_index, block_origin


@dataclass
class Canvas:
    """The batch being decoded, with per-column positions and blocks (``[B, T]`` each)."""

    ids: torch.Tensor
    positions: torch.Tensor
    blocks: torch.Tensor
    real: torch.Tensor  # prompt and completion columns; padding is never attended to
    completion: torch.Tensor
    start: int  # column S where block 0 starts
    completion_start: torch.Tensor  # [B]

    @classmethod
    def build(
        cls,
        prompts: Sequence[Sequence[int]],
        gen_length: int,
        block_length: int,
        align: str,
        mask_token_id: int,
        pad_token_id: int,
        device: torch.device,
    ) -> Canvas:
        """Left-padded canvas of ``prompts`` followed by ``gen_length`` masked columns per row."""
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        origin = block_origin(lengths, block_length, align)  # type: ignore[arg-type]
        lead = lengths - origin  # prompt tokens sharing block 0
        start = int(origin.max())
        pad = start - origin
        n_blocks = int(torch.div(lead + gen_length + block_length - 1, block_length).max())
        width = start + n_blocks * block_length
        cols = torch.arange(width, device=device)[None, :]
        completion_start = start + lead
        completion_end = completion_start + gen_length
        real = (cols >= pad[:, None]) & (cols < completion_end[:, None])
        completion = (cols >= completion_start[:, None]) & (cols < completion_end[:, None])
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
        ids[completion] = mask_token_id
        for row, prompt in enumerate(prompts):
            p0 = int(pad[row])
            ids[row, p0 : p0 + len(prompt)] = torch.tensor(prompt, device=device)
        positions = (cols - pad[:, None]).clamp(min=0)
        blocks = block_index(positions, origin, block_length)
        return cls(ids, positions, blocks, real, completion, start, completion_start)
