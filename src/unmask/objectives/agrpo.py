"""AGRPO: a Monte-Carlo estimate of TraceRL's sum over K sampled trace steps.

Per rollout, ``mc_samples`` steps are drawn (with replacement) from a proposal ``q`` over the
steps that unmask completion tokens; the tokens unmasked at a drawn step are scored from the
state before it with weight ``1 / (K q(t))``, so the weighted sum is unbiased for the sum over
all steps, and the ``steps`` normalisation (divide by the number of steps) makes it AGRPO's
per-step average. Repeated draws of a step become one view with the summed weight.

Proposals: ``uniform``; ``surprisal``, ``q(t)`` proportional to the summed ``-log p`` of the
tokens unmasked at ``t`` under the sampler. AGRPO's own ``entropy`` proposal needs the full
distribution's entropy at every sampled position, which the rollout does not store; the
sampled token's surprisal is its single-sample (unbiased) estimate. Any ``q > 0`` keeps the
estimate unbiased; the proposal only changes its variance.

``selection="exact"`` (the default) scores each drawn step's full probability, the choice of
its positions included, for rollouts sampled with a token-dependent rule; the old log-probs
and the surprisal proposal then include each token's share of it
(:mod:`unmask.objectives.selection`).

``low_discrepancy`` stratifies the uniforms over the whole batch, ``u = (perm + U) / (B K)``
(AGRPO, after arXiv 2409.02908). Old log-probs are the sampler's, so the rollout must be
sampled with ``return_logprobs=True`` and an exact cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from unmask.objectives.base import Objective, ViewBatch, uniform
from unmask.objectives.replay import Replay, replay
from unmask.objectives.selection import ExactSelection
from unmask.sampling.rollout import Rollout

STEP_SAMPLING: tuple[str, ...] = ("uniform", "surprisal")


@dataclass
class StepDraw:
    """AGRPO's Monte-Carlo step sampling options, shared by its masked and per-step forms:
    ``mc_samples`` steps per rollout from a ``uniform`` or ``surprisal`` proposal."""

    mc_samples: int = 8
    step_sampling: Literal["uniform", "surprisal"] = "uniform"
    low_discrepancy: bool = True

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the other options' checks (cooperative mixins)
            parent()
        if self.mc_samples < 1:
            raise ValueError(f"agrpo.mc_samples must be >= 1, got {self.mc_samples}")
        if self.step_sampling not in STEP_SAMPLING:
            raise ValueError(
                f"agrpo.step_sampling must be one of {STEP_SAMPLING}, got {self.step_sampling!r}"
                " (entropy sampling needs per-token entropies, which rollouts do not store)"
            )


@dataclass
class AGRPO(StepDraw, ExactSelection, Objective):
    """AGRPO (module doc): ``mc_samples`` trace steps per rollout, each scored from the state
    before it with weight ``1 / (K q)``, so the sum is unbiased for TraceRL's."""

    name = "agrpo"
    old_logprobs = "sampler"
    scores_sampling_distribution = True
    loss_type = "steps"
    scores_trace_states = True

    def views(self, rollout: Rollout, generator: torch.Generator | None = None) -> ViewBatch:
        """One view per distinct drawn step: the state before it, its tokens scored."""
        rp = replay(rollout)
        proposal = self._proposal(rp, self.sampler_logprobs(rollout))
        k, stratified = self.mc_samples, self.low_discrepancy
        view_rows, t, summed = draw_steps(proposal, k, stratified, generator)
        t = t[:, None]
        steps = rp.steps[view_rows]
        masked = rp.canvas.completion[view_rows] & ~((steps >= 0) & (steps < t))
        scored = rp.scorable[view_rows] & (steps == t)
        return self.with_choices(rp.views(view_rows, masked, scored, summed), rp, rollout)

    def _proposal(self, rp: Replay, logprobs: torch.Tensor) -> torch.Tensor:
        """Unnormalised ``q`` over steps, ``[B, S]`` (float64); 0 where no token is scored.
        ``logprobs`` are the old ones: with exact selection they sum, per step, to its full
        log-probability."""
        steps = rp.steps.clamp(min=0)
        width = int(rp.steps.max()) + 1
        scored = rp.scorable.double()
        count = torch.zeros(rp.num_rollouts, width, dtype=torch.float64, device=steps.device)
        count = count.scatter_add(1, steps, scored)
        if self.step_sampling == "uniform":
            return (count > 0).double()
        rows = torch.arange(rp.num_rollouts, device=steps.device)[:, None]
        surprisal = -logprobs.to(steps.device).double()[rows, rp.completion_index.clamp(min=0)]
        mass = torch.zeros_like(count).scatter_add(1, steps, surprisal * scored)
        return (mass.clamp(min=0) + 1e-8) * (count > 0)


def draw_steps(
    proposal: torch.Tensor, k: int, low_discrepancy: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` draws per row from the unnormalised proposal ``[B, S]`` (rows summing to 0 are
    skipped), with weights ``1 / (k q(t))``; repeated draws of a step are merged into one with
    the summed weight. Returns (row, step, weight), each ``[n]``, sorted by row then step."""
    device = proposal.device
    rows = torch.nonzero(proposal.sum(dim=1) > 0).flatten()
    if low_discrepancy:
        total = len(rows) * k
        u = (torch.randperm(total, generator=generator) + uniform((total,), generator)) / total
    else:
        u = uniform((len(rows) * k,), generator)
    u = u.view(len(rows), k).to(device, torch.float64)
    q = proposal[rows] / proposal[rows].sum(dim=1, keepdim=True)
    cdf = q.cumsum(dim=1)
    last = torch.where(q > 0, torch.arange(q.shape[1], device=device), 0).max(dim=1).values
    step = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).minimum(last[:, None])
    weight = 1.0 / (k * q.gather(1, step))
    width = q.shape[1]
    keys, inverse = torch.unique((rows[:, None] * width + step).flatten(), return_inverse=True)
    summed = torch.zeros(len(keys), dtype=torch.float64, device=device)
    summed = summed.scatter_add(0, inverse, weight.flatten())
    return torch.div(keys, width, rounding_mode="floor"), keys % width, summed
