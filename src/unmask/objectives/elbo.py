"""Sequence-level ELBO RL: the masked-diffusion ELBO of the completion as its log-likelihood.

Each of ``mc_samples`` views per rollout draws ``t ~ U(eps, 1)`` and hides every completion token
independently with probability ``t``; hidden tokens are scored with weight ``1 / (t K)``. The
weighted sum of log-probs is then the Monte-Carlo ELBO,
``E_t E_mask [ (1/t) sum over hidden j of log p(o_j | x_t) ] <= log p(o | q)``. With
``t ~ U(0, 1)`` that expectation is the ELBO exactly; ``eps > 0`` (LLaDA's convention) keeps the
variance finite at the price of an ``O(eps)`` bias: the expectation becomes
``1/(1 - eps)`` times the ELBO integral over ``[eps, 1]``. Old, current and reference policies
score the same masks (common random numbers), so their ELBO differences have low variance.

The native ratio is sequence level (ESPO, GSPO): ``exp((ELBO_theta - ELBO_old) / |o|)``.
Tokens after the first EOS and never-decoded positions are hidden and never scored.
``two_stream`` (block-causal models): each block's ELBO term is conditioned on the clean blocks
before it, which is the block model's likelihood factorisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.objectives.base import Objective, ViewBatch, uniform
from unmask.objectives.replay import replay
from unmask.sampling.rollout import Rollout


@dataclass
class ELBO(Objective):
    """Sequence-level ELBO RL (module doc): independent masks at ``t ~ U(eps, 1)``, hidden
    tokens weighted ``1 / (t K)``, scored with a sequence-level ratio."""

    mc_samples: int = 2
    eps: float = 1e-3
    two_stream: bool = False

    name = "elbo"
    loss_type = "grpo"
    importance_sampling_level = "sequence"
    num_iterations = 2  # a sequence-level ratio needs more than one pass to clip
    supports_two_stream = True

    def __post_init__(self) -> None:
        if self.mc_samples < 1:
            raise ValueError(f"elbo.mc_samples must be >= 1, got {self.mc_samples}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"elbo.eps must be in (0, 1), got {self.eps}")

    def views(self, rollout: Rollout, generator: torch.Generator | None = None) -> ViewBatch:
        """``mc_samples`` masked copies per rollout: together a Monte-Carlo ELBO."""
        rp = replay(rollout)
        rows = rp.rows(self.mc_samples)
        scorable = rp.scorable[rows]
        t = self.eps + (1.0 - self.eps) * uniform((len(rows),), generator)
        draw = uniform(tuple(scorable.shape), generator)
        t, draw = t.to(scorable.device), draw.to(scorable.device)
        hidden = scorable & (draw < t[:, None])
        masked = hidden | (rp.canvas.completion[rows] & ~scorable)
        return rp.views(rows, masked, hidden, 1.0 / (t * self.mc_samples), self.two_stream)
