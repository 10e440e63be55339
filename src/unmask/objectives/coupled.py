"""Coupled-GRPO (DiffuCoder; dLLM-RL's ``coupled``): a random mask and its complement.

Each draw takes ``t ~ U(t_min, t_max)``, hides ``round(t n)`` of the completion's ``n`` tokens
(at least one) in one view and the other tokens in a second view; the hidden tokens are
scored. Across the pair every completion token is scored exactly once, each with the other
part of the completion visible, so with weight ``1 / mc_samples`` the views give an unbiased
estimate of the completion's token sum with lower variance than independent masks.
DiffuCoder's extra fully-masked view and its ``1/t`` weights are not part of this estimator
(``elbo`` has the ``1/t`` weighting).

Tokens after the first EOS and never-decoded positions are hidden and never scored.
``two_stream`` (block-causal models): each block is predicted with the clean blocks before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.objectives.base import Objective, ViewBatch, uniform
from unmask.objectives.random_mask import check_ratio_range, random_subset
from unmask.objectives.replay import replay
from unmask.sampling.rollout import Rollout


@dataclass
class Coupled(Objective):
    """Coupled-GRPO (module doc): pairs of complementary random masks, so every completion
    token is scored once per pair with the rest of the completion visible."""

    t_min: float = 0.2
    t_max: float = 0.8
    mc_samples: int = 1
    two_stream: bool = False

    name = "coupled"
    supports_two_stream = True

    def __post_init__(self) -> None:
        check_ratio_range("coupled", self.t_min, self.t_max)
        if self.mc_samples < 1:
            raise ValueError(f"coupled.mc_samples must be >= 1, got {self.mc_samples}")

    def views(self, rollout: Rollout, generator: torch.Generator | None = None) -> ViewBatch:
        """``mc_samples`` mask pairs per rollout, as adjacent views, weight ``1 / mc_samples``."""
        rp = replay(rollout)
        draws = rp.rows(self.mc_samples)
        scorable = rp.scorable[draws]
        t = self.t_min + (self.t_max - self.t_min) * uniform((len(draws),), generator)
        hidden = random_subset(scorable, t, generator)
        pair = torch.stack([hidden, scorable & ~hidden], dim=1).flatten(0, 1)  # adjacent rows
        rows = draws.repeat_interleave(2)
        masked = pair | (rp.canvas.completion[rows] & ~rp.scorable[rows])
        return rp.views(rows, masked, pair, 1.0 / self.mc_samples, self.two_stream)
