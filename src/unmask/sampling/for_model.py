"""The sampler a model's noise calls for, so commands pick it by capability, not by name."""

from __future__ import annotations

from typing import Any

from unmask.sampling.sampler import Sampler, SamplerConfig
from unmask.sampling.step_sampler import StepSampler, StepSamplerConfig


def sampler_for(
    model: Any, config: SamplerConfig, step_config: StepSamplerConfig | None = None
) -> Sampler | StepSampler:
    """:class:`StepSampler` (``step_config``, default settings when None) for a uniform-noise
    model (DiffusionGemma), :class:`Sampler` (``config``) for a mask predictor. Both
    ``generate(model, prompts, seed=...)`` a :class:`~unmask.sampling.rollout.Rollout`."""
    if getattr(model, "noise", "mask") == "uniform":
        return StepSampler(step_config or StepSamplerConfig())
    return Sampler(config)
