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
  the sampler denoises it. :func:`packed_two_stream_view` puts several views of one row into
  one forward (one clean stream, each view's noisy blocks after it).
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
        """Completion tokens in the batch (those noised and scored)."""
        return int(self.completion.sum())

    def to(self, device: torch.device | str) -> SequenceBatch:
        """The same rows on ``device``."""
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
    """One forward's inputs: ``input_ids`` and ``position_ids`` ``[R, N]``, additive ``bias``
    ``[R, 1, N, N]``, and, per view (``V`` of them), ``logit_index`` ``[V, W]``: the output
    column whose logits predict each column of the view's clean row (meaningful only where a
    token is scored). ``forward_rows`` ``[V]``: the forward row holding each view (None: view
    i is row i; packed views share a row)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    bias: torch.Tensor
    logit_index: torch.Tensor
    forward_rows: torch.Tensor | None = None

    def cells(self, views: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward cells (rows, columns) whose logits predict view cells ``(views, cols)``."""
        rows = views if self.forward_rows is None else self.forward_rows[views]
        return rows, self.logit_index[views, cols]


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
    """``[clean row | noisy copy of columns start..W]`` with the block-diffusion mask: each
    row is one view (:func:`packed_two_stream_view` with every block computed)."""
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)
    return packed_two_stream_view(batch, rows, noisy_ids, None, shift_logits, dtype)


def packed_two_stream_view(
    batch: SequenceBatch,
    rows: torch.Tensor,
    noisy_ids: torch.Tensor,
    scored: torch.Tensor | None,
    shift_logits: bool,
    dtype: torch.dtype,
) -> View:
    """The views of a row packed into one forward: ``[clean row | noisy blocks ...]``.

    View ``v`` is row ``rows[v]`` of ``batch`` with ``noisy_ids[v]`` as its noisy copy. A
    noisy block sees itself (the same view's copy of that block) and the clean blocks before
    it, exactly the context the sampler denoised it in, so several views of one row share one
    clean stream and each keeps only the noisy blocks where it scores something
    (``scored`` ``[V, W]``); the clean stream stops where no kept block reads it. Attention
    and log-probs equal one ``[clean | noisy]`` row per view; a rollout's trace steps cost one
    clean stream instead of one per step. ``scored=None`` keeps every block and the whole
    clean row (one view per row: the SFT layout).

    The noisy copy repeats the clean copy's position ids. With shifted logits the first token
    of a block is predicted from the last column of the previous block, which the sampler has
    committed by then: that is the clean copy, whose shifted output sits at the same column.
    """
    s, width, b = batch.start, batch.ids.shape[1], batch.block_size
    if (width - s) % b:
        raise ValueError("two_stream_view needs a batch collated with whole_blocks=True")
    device = batch.ids.device
    n_blocks = (width - s) // b
    if scored is None:
        needed = torch.ones(len(rows), n_blocks, dtype=torch.bool, device=device)
    else:
        needed = scored[:, s:].reshape(len(rows), n_blocks, b).any(dim=-1)
    canvas_rows, forward_rows = torch.unique(rows, return_inverse=True)
    count = len(canvas_rows)
    # The clean stream: every column before the last kept block (noisy block k reads clean
    # blocks < k), or the whole row.
    if scored is None:
        clean_len = torch.full((count,), width, device=device)
    else:
        last = torch.where(needed, torch.arange(n_blocks, device=device), -1).max(dim=1).values
        last_kept = torch.full((count,), -1, device=device).scatter_reduce(
            0, forward_rows, last, "amax"
        )
        clean_len = s + last_kept.clamp(min=0) * b
    # Noisy segments (view, block), grouped by forward row, in view then block order.
    seg_view, seg_block = needed.nonzero(as_tuple=True)
    order = torch.argsort(forward_rows[seg_view], stable=True)
    seg_view, seg_block = seg_view[order], seg_block[order]
    seg_row = forward_rows[seg_view]
    per_row = torch.bincount(seg_row, minlength=count)
    rank = torch.arange(len(seg_row), device=device) - (torch.cumsum(per_row, 0) - per_row)[seg_row]
    seg_start = clean_len[seg_row] + rank * b
    length = int((clean_len + per_row * b).max())

    cols = torch.arange(length, device=device)
    clean = cols[None, :] < clean_len[:, None]
    source = cols.clamp(max=width - 1).expand(count, -1)
    ids = torch.where(clean, batch.ids[canvas_rows].gather(1, source), 0)
    positions = torch.where(clean, batch.positions[canvas_rows].gather(1, source), 0)
    blocks = torch.where(clean, batch.blocks[canvas_rows].gather(1, source), 0)
    valid = clean & batch.real[canvas_rows].gather(1, source)
    segment = torch.full((count, length), -1, device=device)  # -1: the clean stream
    offset = torch.arange(b, device=device)
    at = (seg_row.repeat_interleave(b), (seg_start[:, None] + offset).flatten())
    view = seg_view.repeat_interleave(b)
    column = (s + seg_block[:, None] * b + offset).flatten()
    ids[at] = noisy_ids[view, column]
    positions[at] = batch.positions[rows[view], column]
    blocks[at] = batch.blocks[rows[view], column]
    valid[at] = batch.real[rows[view], column]
    segment[at] = torch.arange(len(seg_view), device=device).repeat_interleave(b)

    noisy = segment >= 0
    q_noisy, k_noisy = noisy[:, :, None], noisy[:, None, :]
    qb, kb = blocks[:, :, None], blocks[:, None, :]
    allowed = torch.where(
        q_noisy,
        # noisy query: its own noisy block, earlier clean blocks
        torch.where(k_noisy, segment[:, :, None] == segment[:, None, :], kb < qb),
        ~k_noisy & (kb <= qb),  # clean query: clean tokens, block-causally
    )
    allowed = (allowed & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)

    starts = torch.zeros(len(rows), n_blocks, dtype=torch.long, device=device)
    starts[seg_view, seg_block] = seg_start
    canvas_cols = torch.arange(width, device=device)
    inside = (canvas_cols - s).clamp(min=0)
    logit_index = starts[:, torch.div(inside, b, rounding_mode="floor")] + inside % b
    logit_index = torch.where(canvas_cols >= s, logit_index, canvas_cols)
    if shift_logits:
        first = (canvas_cols >= s) & (inside % b == 0)
        logit_index = torch.where(first, canvas_cols, logit_index)
    return View(ids, positions, bias[:, None], logit_index, forward_rows)
