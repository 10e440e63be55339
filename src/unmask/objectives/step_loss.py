"""The shared clipped loss over replayed steps, micro-batch by micro-batch.

What a trainer does with a per-step objective's views: per micro-batch of rollouts, replay the
steps with gradients (:func:`step_logprobs`), score them with the shared
:func:`~unmask.objectives.loss.policy_loss` against the sampler's log-probs (old) and a frozen
reference's (KL), and backpropagate; micro-batch losses add up, as for the masked objectives.
"""

from __future__ import annotations

import torch

from unmask.models.diffusion_gemma import DiffusionGemma
from unmask.objectives.loss import ClipConfig, LossInputs, policy_loss
from unmask.objectives.step_replay import StepViews, step_logprobs
from unmask.sampling.step_trace import StepRollout


def backward_step_loss(
    model: DiffusionGemma,
    rollout: StepRollout,
    views: StepViews,
    advantages: torch.Tensor,
    divisors: torch.Tensor,
    ref_model: DiffusionGemma | None = None,
    *,
    rollouts_per_batch: int = 4,
    clip: ClipConfig | None = None,
) -> dict[str, float]:
    """Backpropagate the loss of ``views`` (gradients accumulate in ``model``); returns the
    summed loss and the token-weighted mean of each metric."""
    trace = rollout.trace
    if trace is None:
        raise ValueError("a per-step loss needs a rollout sampled with its step trace")
    device = model.device
    advantages, divisors = advantages.to(device), divisors.to(device)
    lengths = rollout.completion_lengths.to(device)
    trace = trace.to(device)
    totals: dict[str, float] = {"loss": 0.0}
    counted = 0.0
    for mb in views.micro_batches(rollouts_per_batch):
        mb = StepViews(mb.step.to(device), mb.row.to(device), mb.weight.to(device))
        scored = mb.scored(trace)
        ref = None
        if clip is not None and clip.beta != 0.0 and ref_model is not None:
            with torch.no_grad():
                ref = step_logprobs(ref_model, rollout, mb)
        inputs = LossInputs(
            step_logprobs(model, rollout, mb), mb.sampler_logprobs(trace), advantages, scored,
            mb.weights(trace), mb.row, divisors, ref, lengths=lengths,
        )  # fmt: skip
        out = policy_loss(inputs, clip)
        out.loss.backward()
        n = float(scored.sum())
        totals["loss"] += float(out.loss.detach())
        for name, value in out.metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * n
        counted += n
    return {k: v if k == "loss" else v / max(counted, 1.0) for k, v in totals.items()}
