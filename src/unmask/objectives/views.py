"""Partially-masked views of (prompt, completion) rows: the inputs of every masked-token loss.

A view is what one model forward sees: token ids, position ids, a 4-D additive attention mask,
and, for each column of the clean sequence, the column of the forward's output whose logits
predict it. SFT and the random-mask RL objectives build their views here.

Rows use the sampler's canvas layout: prompts are left-padded so that block 0 (see
:func:`unmask.models.attention.block_origin`) starts at the same column ``start`` in every row,
and completions are right-padded. Block ids come from the same
:func:`~unmask.models.attention.block_index` the sampler uses, so training sees the block
boundaries decoding used.

Two kinds of view:

* :func:`masked_view` (full-attention models): one copy of the row with some completion tokens
  replaced by the mask token.
* :func:`two_stream_view` (block-causal models, BD3-LM style): ``[clean row | noisy copy]``.
  Noisy block k sees the clean blocks before k and itself; clean tokens see clean tokens
  block-causally. Every block is trained in one forward, with exactly the context it has when
  the sampler denoises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unmask.models.attention import BlockAlign, Layout, attention_bias, block_index, block_origin


@dataclass
class SequenceBatch:
    """Clean (prompt, completion) rows in canvas layout; every tensor is ``[B, W]``.

    ``completion`` marks the tokens that are noised and scored (the completion with its final
    EOS); padding is neither attended to nor scored.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    blocks: torch.Tensor
    real: torch.Tensor
    completion: torch.Tensor
    start: int
    block_size: int

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion.sum())

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            self.ids.to(device),
            self.positions.to(device),
            self.blocks.to(device),
            self.real.to(device),
            self.completion.to(device),
            self.start,
            self.block_size,
        )


@dataclass
class View:
    """One forward's inputs: ``input_ids`` and ``position_ids`` ``[B, N]``, additive ``bias``
    ``[B, 1, N, N]``, and ``logit_index`` ``[B, W]``: the output column whose logits predict
    each column of the clean row (meaningful only where a token is scored)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    bias: torch.Tensor
    logit_index: torch.Tensor


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    block_size: int,
    block_align: BlockAlign,
    whole_blocks: bool,
) -> SequenceBatch:
    """Lay out ``(prompt_ids, completion_ids)`` pairs like the sampler's canvas.

    ``whole_blocks`` right-pads the batch to a whole number of blocks after ``start`` (needed by
    :func:`two_stream_view`). Prompts must not be empty: the first completion token needs a
    column before it (shifted models predict column i from column i-1).
    """
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    for i, (prompt, completion) in enumerate(pairs):
        if not prompt:
            raise ValueError(f"row {i} has an empty prompt: every row needs at least one token")
        if not completion:
            raise ValueError(f"row {i} has an empty completion: nothing to train on")
    prompt_len = torch.tensor([len(p) for p, _ in pairs])
    comp_len = torch.tensor([len(c) for _, c in pairs])
    origin = block_origin(prompt_len, block_size, block_align)
    start = int(origin.max())
    pad = start - origin
    end = pad + prompt_len + comp_len
    width = int(end.max())
    if whole_blocks:
        width = start + -(-(width - start) // block_size) * block_size
    cols = torch.arange(width)[None, :]
    real = (cols >= pad[:, None]) & (cols < end[:, None])
    completion = (cols >= (pad + prompt_len)[:, None]) & real
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    for row, (prompt, comp) in enumerate(pairs):
        p0 = int(pad[row])
        ids[row, p0 : int(end[row])] = torch.tensor([*prompt, *comp], dtype=torch.long)
    positions = (cols - pad[:, None]).clamp(min=0)
    blocks = block_index(positions, origin, block_size)
    return SequenceBatch(ids, positions, blocks, real, completion, start, block_size)


def sample_t(
    batch: SequenceBatch, t_min: float, t_max: float, per_block: bool, generator: torch.Generator
) -> torch.Tensor:
    """Mask ratio ``t ~ U(t_min, t_max)`` for every column ``[B, W]``: one per row, or one per
    (row, block) with ``per_block``. Drawn on the CPU so a seed gives the same noise anywhere."""
    rows, width = batch.ids.shape
    if not per_block:
        u = torch.rand(rows, 1, generator=generator)
        return (t_min + (t_max - t_min) * u).expand(rows, width).to(batch.ids.device)
    blocks = batch.blocks.cpu()
    lowest = int(blocks.min())
    u = torch.rand(rows, int(blocks.max()) - lowest + 1, generator=generator)
    t = t_min + (t_max - t_min) * u.gather(1, blocks - lowest)
    return t.to(batch.ids.device)


def random_mask(
    eligible: torch.Tensor, t: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Mask each ``eligible`` position independently with probability ``t`` (same shape)."""
    u = torch.rand(eligible.shape, generator=generator).to(eligible.device)
    return eligible & (u < t)


def noised_ids(batch: SequenceBatch, mask: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The clean ids with the ``mask`` positions replaced by the mask token."""
    return batch.ids.masked_fill(mask, mask_token_id)


def masked_view(
    batch: SequenceBatch, noisy_ids: torch.Tensor, layout: Layout, dtype: torch.dtype
) -> View:
    """The noised row itself under the model's own layout; column i predicts column i."""
    width = batch.ids.shape[1]
    cols = torch.arange(width, device=batch.ids.device)
    bias = attention_bias(batch.blocks, batch.blocks, batch.real, layout, dtype, self_keys=cols)
    logit_index = cols.expand(batch.ids.shape[0], -1)
    return View(noisy_ids, batch.positions, bias, logit_index)


def two_stream_view(
    batch: SequenceBatch, noisy_ids: torch.Tensor, shift_logits: bool, dtype: torch.dtype
) -> View:
    """``[clean row | noisy copy of columns start..W]`` with the block-diffusion mask.

    The noisy copy repeats the clean copy's position ids. With shifted logits the first token
    of a block is predicted from the last column of the previous block, which the sampler has
    committed by then: that is the clean copy, whose shifted output sits at the same column.
    """
    s, width, b = batch.start, batch.ids.shape[1], batch.block_size
    if (width - s) % b:
        raise ValueError("two_stream_view needs a batch collated with whole_blocks=True")
    device = batch.ids.device
    stream = torch.cat(
        [torch.zeros(width, dtype=torch.bool), torch.ones(width - s, dtype=torch.bool)]
    ).to(device)
    blocks = torch.cat([batch.blocks, batch.blocks[:, s:]], dim=1)
    valid = torch.cat([batch.real, batch.real[:, s:]], dim=1)
    q_noisy, k_noisy = stream[None, :, None], stream[None, None, :]
    qb, kb = blocks[:, :, None], blocks[:, None, :]
    allowed = torch.where(
        q_noisy,
        torch.where(k_noisy, kb == qb, kb < qb),  # noisy query: its own noisy block, earlier clean
        ~k_noisy & (kb <= qb),  # clean query: clean tokens, block-causally
    )
    allowed = (allowed & valid[:, None, :]) | torch.eye(
        len(stream), dtype=torch.bool, device=device
    )
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    cols = torch.arange(width, device=device)
    logit_index = torch.where(cols >= s, cols + width - s, cols)
    if shift_logits:
        logit_index = torch.where((cols >= s) & ((cols - s) % b == 0), cols, logit_index)
    return View(
        input_ids=torch.cat([batch.ids, noisy_ids[:, s:]], dim=1),
        position_ids=torch.cat([batch.positions, batch.positions[:, s:]], dim=1),
        bias=bias[:, None],
        logit_index=logit_index.expand(batch.ids.shape[0], -1),
    )
