"""The masked-diffusion SFT losses: random masking (full attention) and block SFT (block-causal).

Both are the masked-token cross-entropy of the MDLM/LLaDA ELBO,

    loss = sum over masked completion tokens of w * CE(token) / N,   w = 1/t (or 1),

where ``t`` is the mask ratio the token was noised with and ``N`` is the number of completion
tokens in the batch (the completion plus its final EOS; padding excluded). With ``w = 1/t`` this
is an unbiased estimate of the negative ELBO per completion token; dLLM-RL trains with ``w = 1``
(and ``t ~ U(0.1, 0.9)``), so the weight can be switched off. The prompt is never masked.

* ``random_mask``: one ``t ~ U(t_min, t_max)`` per sequence; every completion token is masked
  with probability ``t``; one forward of the noised row (LLaDA, Dream, MDLM).
* ``block``: one ``t`` per (sequence, block), so one row trains every block at a different
  noise level, as the sampler meets them; one forward over ``[clean | noisy]``
  (:func:`unmask.objectives.views.two_stream_view`, BD3-LM / SDAR).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unmask.models.attention import Layout
from unmask.models.diffusion_lm import DiffusionSettings
from unmask.objectives.views import SequenceBatch, masked_view, noised_ids, two_stream_view

SFT_OBJECTIVES: tuple[str, ...] = ("random_mask", "block")
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_objective(objective: str, layout: Layout) -> str:
    """``auto`` is ``block`` for block-causal models and ``random_mask`` for full attention.

    Other pairings are refused: random masking of every block at once would train a
    block-causal model on states its sampler never shows it, and the two-stream view needs a
    block-causal model.
    """
    wanted = {"block": "block", "full": "random_mask"}[layout]
    if objective == "auto":
        return wanted
    if objective not in SFT_OBJECTIVES:
        raise ValueError(f"objective must be 'auto' or one of {SFT_OBJECTIVES}, got {objective!r}")
    if objective != wanted:
        raise ValueError(f"objective {objective!r} does not fit a {layout!r} model; use {wanted!r}")
    return objective


@dataclass
class Noise:
    """The forward process applied to a batch: mask ratio ``t`` and the mask, both ``[B, W]``."""

    t: torch.Tensor
    mask: torch.Tensor


@dataclass
class SFTLoss:
    """``loss`` (normalised, with graph), and detached sums for logging."""

    loss: torch.Tensor
    nll_sum: float  # unweighted cross-entropy summed over the masked tokens
    masked_tokens: int


def sample_noise(
    batch: SequenceBatch,
    objective: str,
    t_min: float,
    t_max: float,
    generators: torch.Generator | Sequence[torch.Generator],
) -> Noise:
    """Draw ``t ~ U(t_min, t_max)`` (per row, or per (row, block) for ``block``) and mask each
    completion token with probability ``t``.

    Row ``i`` draws from ``generators[i]`` (a single generator serves every row in turn), over
    its own completion only, so that with a generator per row its noise does not depend on the
    batch around it (SFT's global batch, docs/scale.md). Drawn on the CPU, so a seed gives the
    same noise on any device."""
    if not 0.0 < t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 < t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    rows = batch.ids.shape[0]
    if isinstance(generators, torch.Generator):
        generators = [generators] * rows
    completion, blocks = batch.completion.cpu(), batch.blocks.cpu()
    t = torch.empty(completion.shape)
    mask = torch.zeros_like(completion)
    for row, generator in zip(range(rows), generators, strict=True):
        cols = completion[row].nonzero()[:, 0]
        if objective == "block":  # one t per block of the completion; others share an end's
            lo, hi = int(blocks[row, cols].min()), int(blocks[row, cols].max())
            u = torch.rand(hi - lo + 1, generator=generator)
            t[row] = t_min + (t_max - t_min) * u[(blocks[row] - lo).clamp(0, hi - lo)]
        else:
            t[row] = t_min + (t_max - t_min) * torch.rand(1, generator=generator)
        mask[row, cols] = torch.rand(len(cols), generator=generator) < t[row, cols]
    device = batch.ids.device
    return Noise(t.to(device), mask.to(device))


def sft_loss(
    model: Forward,
    settings: DiffusionSettings,
    batch: SequenceBatch,
    noise: Noise,
    objective: str,
    elbo_weight: bool = True,
    normalizer: float | None = None,
) -> SFTLoss:
    """One forward and the masked-token loss of ``objective`` (see the module docstring).

    ``model`` is a :class:`~unmask.models.DiffusionLM` or its distributed wrapper, described by
    ``settings``. ``normalizer`` is ``N``, by default this batch's completion tokens; a trainer
    that accumulates gradients passes the count of the whole optimizer batch.
    """
    if (noise.mask & ~batch.completion).any():
        raise ValueError("the noise masks tokens outside the completion")
    noisy = noised_ids(batch, noise.mask, settings.mask_token_id)
    if objective == "block":
        view = two_stream_view(batch, noisy, settings.shift_logits, torch.float32)
    elif objective == "random_mask":
        view = masked_view(batch, noisy, settings.layout, torch.float32)
    else:
        raise ValueError(f"objective must be one of {SFT_OBJECTIVES}, got {objective!r}")
    rows, cols = noise.mask.nonzero(as_tuple=True)
    read = view.cells(rows, cols)  # the LM head runs on the noised columns only
    scored = model(view.input_ids, view.position_ids, view.bias, None, read).float()
    nll = F.cross_entropy(scored, batch.ids[rows, cols], reduction="none")
    weight = 1.0 / noise.t[rows, cols] if elbo_weight else torch.ones_like(nll)
    denominator = normalizer if normalizer is not None else max(batch.num_completion_tokens, 1)
    loss = (weight * nll).sum() / denominator
    if len(rows) == 0:  # keep every parameter in the graph (DDP expects gradients)
        loss = scored.sum() * 0.0
    return SFTLoss(loss, float(nll.detach().sum()), len(rows))
