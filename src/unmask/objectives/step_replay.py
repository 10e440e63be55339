"""Replaying a uniform-noise sampler's steps: the log-probs of the accepted tokens.

A view is one denoising step of one rollout (``StepViews``): the decoder is run on the canvas
that step read, with the stored self-conditioning embedding held fixed, over the encoder cache
of the prompt and the canvases before it (built block by block, exactly as the sampler built
it); the accepted tokens are scored under the step's temperature. At the sampling parameters
this is the sampler's own log-prob (tested), so the rollout's stored log-probs serve as old
log-probs. Summed over the steps of a trace, it is the trajectory log-likelihood
(docs/objectives.md, "DiffusionGemma").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from unmask.models.diffusion_gemma import DiffusionGemma, select_rows
from unmask.objectives.loss import normalizers
from unmask.sampling.step_trace import StepRollout, StepTrace


@dataclass
class StepViews:
    """``N`` replayed steps: trace step ``step`` ``[N]`` of rollout ``row`` ``[N]``, with a
    view weight ``weight`` ``[N]`` (1 for a full trace, ``1 / (K q)`` for sampled steps)."""

    step: torch.Tensor
    row: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return len(self.step)

    def select(self, index: torch.Tensor) -> StepViews:
        """The replayed steps ``index`` (a micro-batch)."""
        return replace(self, step=self.step[index], row=self.row[index], weight=self.weight[index])

    def scored(self, trace: StepTrace) -> torch.Tensor:
        """``[N, L]``: the step's accepted positions (the ``scored`` of the shared loss)."""
        return trace.scored[self.step, self.row]

    def weights(self, trace: StepTrace) -> torch.Tensor:
        """``[N, L]`` per-token weights: the view weight on scored positions, 0 elsewhere."""
        return torch.where(self.scored(trace), self.weight[:, None].float(), 0.0)

    def sampler_logprobs(self, trace: StepTrace) -> torch.Tensor:
        """``[N, L]`` log-probs the sampler recorded (the old log-probs)."""
        return torch.where(self.scored(trace), trace.logprobs[self.step, self.row], 0.0)

    def micro_batches(self, rollouts: int) -> Iterator[StepViews]:
        """Views of ``rollouts`` rollouts at a time (one encoder pass serves all their steps;
        a ``sequence``-level loss needs all views of a rollout together)."""
        ids = self.row.unique()
        for start in range(0, len(ids), rollouts):
            keep = torch.isin(self.row, ids[start : start + rollouts])
            yield self.select(keep.nonzero().flatten())


def step_logprobs(model: DiffusionGemma, rollout: StepRollout, views: StepViews) -> torch.Tensor:
    """fp32 log-probs ``[N, L]`` of the accepted tokens of each view (0 elsewhere).

    Gradients flow when enabled (through the encoder cache and the decoder; the stored
    self-conditioning input is a constant). One encoder pass per canvas serves every view of
    the rollouts involved; decoder forwards are batched per canvas.
    """
    trace = rollout.trace
    if trace is None:
        raise ValueError("step log-probs need a rollout sampled with its step trace")
    device = model.device
    trace, views = trace.to(device), _to(views, device)
    rows, local = views.row.unique(return_inverse=True)
    new = rollout.prompt_ids[rows].to(device)
    attention = rollout.prompt_mask[rows].to(device).bool()
    length = model.canvas_length
    positions = torch.arange(new.shape[1], dtype=torch.int32, device=device)[None]
    block = trace.block[views.step]
    out = torch.zeros(len(views), length, device=device)
    cache = model.new_cache()
    for k in range(int(block.max()) + 1 if len(views) else 0):
        cache = model.encode(new, attention, positions, cache)
        positions = positions[:, -1:] + 1 + torch.arange(length, device=device, dtype=torch.int32)
        canvas_mask = torch.nn.functional.pad(attention, (0, length), value=True)
        here = (block == k).nonzero().flatten()
        if len(here):
            s, b = views.step[here], views.row[here]
            logits = model.decode(
                trace.canvas[s, b], select_rows(cache, local[here]), positions,
                canvas_mask[local[here]], trace.self_conditioning[s, b],
            )  # fmt: skip
            logits = logits / trace.temperature[s][:, None, None]
            logp = logits.log_softmax(dim=-1).gather(-1, trace.tokens[s, b][..., None])[..., 0]
            logp = torch.where(trace.scored[s, b], logp, 0.0)
            out = out.index_put((here,), logp)
        new = rollout.completion_ids[rows, k * length : (k + 1) * length].to(device)
        attention = canvas_mask
    return out


def step_normalizers(
    rollout: StepRollout,
    loss_type: str,
    kept: torch.Tensor | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """The shared divisors ``D_b`` (:func:`unmask.objectives.loss.normalizers`), with
    ``steps`` counting a row's denoising steps that accepted tokens (its ``n_b``)."""
    if loss_type != "steps":
        return normalizers(rollout, loss_type, kept, num_tokens)
    trace = rollout.trace
    if trace is None:
        raise ValueError("loss_type 'steps' needs a rollout sampled with its step trace")
    steps = trace.scored.any(dim=-1).sum(dim=0).double()
    kept = torch.ones(len(steps), dtype=torch.bool) if kept is None else kept.bool()
    kept = kept.to(steps.device)
    divisor = (kept.sum() * steps).clamp(min=1).float()
    return torch.where(kept, divisor, torch.full_like(divisor, float("inf")))


def _to(views: StepViews, device: torch.device) -> StepViews:
    return StepViews(views.step.to(device), views.row.to(device), views.weight.to(device))
