"""Random-masking RL (UniGRPO, dLLM-RL's ``random_masking``): score masked tokens of one random
mask per view.

Each view draws ``t ~ U(t_min, t_max)`` and hides ``round(t n)`` of the completion's ``n`` tokens
(at least one), chosen uniformly; the hidden ones are scored. Weights ``n / (m K)`` (``m``
hidden, ``K = mc_samples`` views per rollout) make each view the mean over its hidden tokens,
scaled to the completion's length: given ``m``, the hidden set is uniform, so this is unbiased
for the completion's token sum, and with the ``grpo`` normalisation it is dLLM-RL's per-row
mean over the masked tokens. No ``1/t`` weighting (see ``elbo`` for that).

Tokens after the first EOS and positions never decoded are hidden in every view and never
scored: the completion is scored with the rest of the window marginalised out.
``two_stream`` (block-causal models): each block is predicted with the clean blocks before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.objectives.base import Objective, ViewBatch, uniform
from unmask.objectives.replay import replay
from unmask.sampling.rollout import Rollout


def check_ratio_range(name: str, t_min: float, t_max: float) -> None:
    """Refuse a mask-ratio range outside ``0 < t_min <= t_max <= 1`` (named for ``name``)."""
    if not 0.0 < t_min <= t_max <= 1.0:
        raise ValueError(f"{name} needs 0 < t_min <= t_max <= 1, got {t_min}, {t_max}")


def random_subset(
    eligible: torch.Tensor, ratio: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``round(ratio * n)`` of each row's ``n`` eligible columns (at least one), uniformly."""
    n = eligible.sum(dim=1)
    m = torch.minimum((ratio.to(eligible.device) * n).round().long().clamp(min=1), n)
    keys = uniform(tuple(eligible.shape), generator).to(eligible.device)
    rank = keys.masked_fill(~eligible, 2.0).argsort(dim=1).argsort(dim=1)
    return eligible & (rank < m[:, None])


@dataclass
class RandomMask(Objective):
    """Random-masking RL (module doc): one uniform random mask per view, the hidden tokens
    scored as their mean scaled to the completion length."""

    t_min: float = 0.1
    t_max: float = 0.9
    mc_samples: int = 1
    two_stream: bool = False

    name = "random_mask"
    loss_type = "grpo"
    supports_two_stream = True

    def __post_init__(self) -> None:
        check_ratio_range("random_mask", self.t_min, self.t_max)
        if self.mc_samples < 1:
            raise ValueError(f"random_mask.mc_samples must be >= 1, got {self.mc_samples}")

    def views(self, rollout: Rollout, generator: torch.Generator | None = None) -> ViewBatch:
        """``mc_samples`` randomly masked copies per rollout, weights ``n / (m K)``."""
        rp = replay(rollout)
        rows = rp.rows(self.mc_samples)
        scorable = rp.scorable[rows]
        t = self.t_min + (self.t_max - self.t_min) * uniform((len(rows),), generator)
        hidden = random_subset(scorable, t, generator)
        weight = scorable.sum(dim=1) / (hidden.sum(dim=1) * self.mc_samples)
        masked = hidden | (rp.canvas.completion[rows] & ~scorable)
        return rp.views(rows, masked, hidden, weight, self.two_stream)
