"""RL objectives on per-step traces (uniform-noise models: DiffusionGemma).

Each is a choice of replayed steps and their weights (:class:`StepViews`) over the shared
clipped loss, advantages and KL; old log-probs are the sampler's (the replay is exact).

* ``tracerl``: every active step that accepted tokens, weight 1: the full trajectory
  log-likelihood, every step's accepted tokens scored from that step's canvas and
  self-conditioning input (TraceRL's per-step objective).
* ``agrpo``: ``mc_samples`` steps per rollout drawn from a proposal ``q`` (``uniform``, or
  ``surprisal``: the summed ``-log p`` of the step's accepted tokens), weight ``1 / (K q)``,
  so the weighted sum is unbiased for ``tracerl``'s; the ``steps`` normalisation divides by
  the number of steps, AGRPO's per-step average (:func:`unmask.objectives.agrpo.draw_steps`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unmask.objectives.agrpo import StepDraw, draw_steps
from unmask.objectives.base import Capabilities, build
from unmask.objectives.step_replay import StepViews
from unmask.sampling.step_trace import StepRollout, StepTrace


class StepObjective(Capabilities, ABC):
    """Views of a per-step trace, declaring the same
    :class:`~unmask.objectives.base.Capabilities` as the masked objectives. Old log-probs are
    always the sampler's; there is no two-stream form (the trace replays each step's canvas)."""

    loss_type: ClassVar[str] = "dr_grpo"

    @abstractmethod
    def views(self, rollout: StepRollout, generator: torch.Generator | None = None) -> StepViews:
        """Replayed steps of every rollout; deterministic given a (CPU) ``generator``."""


@dataclass
class StepTraceRL(StepObjective):
    """TraceRL on a per-step trace: every step that accepted tokens, weight 1 (the trace's
    exact log-likelihood)."""

    name = "tracerl"
    loss_type = "dr_grpo"
    scores_trace_states = True

    def views(self, rollout: StepRollout, generator: torch.Generator | None = None) -> StepViews:
        """Every step of every rollout that accepted a token, weight 1."""
        step, row = _trace(rollout).scored.any(dim=-1).nonzero(as_tuple=True)
        return StepViews(step, row, torch.ones(len(step), dtype=torch.float64))


@dataclass
class StepAGRPO(StepDraw, StepObjective):
    """AGRPO on a per-step trace: ``mc_samples`` steps per rollout from the proposal, weight
    ``1 / (K q)`` (unbiased for :class:`StepTraceRL`'s sum)."""

    name = "agrpo"
    loss_type = "steps"
    scores_trace_states = True

    def views(self, rollout: StepRollout, generator: torch.Generator | None = None) -> StepViews:
        """``mc_samples`` drawn steps per rollout, weight ``1 / (K q)``."""
        trace = _trace(rollout)
        has_tokens = trace.scored.any(dim=-1).T.double()  # [B, S]
        proposal = has_tokens
        if self.step_sampling == "surprisal":
            mass = -torch.where(trace.scored, trace.logprobs.double(), 0.0).sum(dim=-1).T
            proposal = (mass.clamp(min=0) + 1e-8) * has_tokens
        row, step, weight = draw_steps(proposal, self.mc_samples, self.low_discrepancy, generator)
        return StepViews(step, row, weight)


STEP_OBJECTIVES: dict[str, type[StepObjective]] = {
    cls.name: cls for cls in (StepTraceRL, StepAGRPO)
}


def get_step_objective(name: str, **options: Any) -> StepObjective:
    """The per-step objective called ``name`` (clear errors for unknown names or options)."""
    return build(STEP_OBJECTIVES, name, options, "objective with a per-step form (uniform noise)")


def _trace(rollout: StepRollout) -> StepTrace:
    """The rollout's per-step trace, or a clear error when it was not recorded."""
    if getattr(rollout, "trace", None) is None:
        raise ValueError("per-step objectives need a StepRollout with its trace (StepSampler)")
    return rollout.trace
