"""The per-step trace of a uniform-noise sampler (DiffusionGemma), and its rollout.

A masked sampler commits each position once, so its trace is one step id per token. A
uniform-noise sampler does not: every step samples a whole canvas, *accepts* some positions
and renoises the rest, and a position can be accepted at several steps. Its trace is
therefore per step: the canvas the step read, its self-conditioning input, the positions
accepted and their tokens, and the temperature of the distribution they were drawn from.
With those, every decoder forward of the sampler can be replayed exactly, and the
trajectory's log-likelihood is the sum over steps of the accepted tokens' log-probs
(docs/objectives.md, "DiffusionGemma").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from unmask.sampling.rollout import Rollout


@dataclass
class StepTrace:
    """``S`` denoising steps of ``B`` rows over canvases of ``L`` tokens (all canvases of the
    rollout, in order; the batch runs its steps in lockstep).

    * ``canvas`` ``[S, B, L]``: the canvas each step read;
    * ``self_conditioning`` ``[S, B, L, H]``: the soft embedding the decoder read (zeros at a
      canvas's first step), stored so the replay holds it fixed;
    * ``accepted`` ``[S, B, L]``: positions accepted at the step (entropy bound);
    * ``tokens`` ``[S, B, L]``: the accepted canvas (the sampled token where accepted);
    * ``logprobs`` ``[S, B, L]``: fp32 log-prob of each accepted token under the step's
      distribution (0 elsewhere);
    * ``temperature`` ``[S]``: the step's temperature (logits are divided by it);
    * ``block`` ``[S]``: which canvas the step belongs to;
    * ``active`` ``[S, B]``: the row was still denoising (not stopped by the adaptive rule,
      its sequence not finished at an earlier canvas); inactive rows ran in the batch, but
      their results were discarded, so those steps are not part of their trajectory.
    """

    canvas: torch.Tensor
    self_conditioning: torch.Tensor
    accepted: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    temperature: torch.Tensor
    block: torch.Tensor
    active: torch.Tensor

    @property
    def num_steps(self) -> int:
        """Denoising steps recorded."""
        return self.canvas.shape[0]

    @property
    def scored(self) -> torch.Tensor:
        """``[S, B, L]``: accepted positions of active steps: the trajectory's actions."""
        return self.accepted & self.active[..., None]

    def log_likelihood(self) -> torch.Tensor:
        """Sum of the accepted tokens' log-probs per row ``[B]`` (fp64): the trajectory's
        log-probability up to the parameter-free uniform-noise terms."""
        return torch.where(self.scored, self.logprobs.double(), 0.0).sum(dim=(0, 2))

    def to(self, device: torch.device | str) -> StepTrace:
        """Every tensor of the trace on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class StepRollout(Rollout):
    """A :class:`Rollout` (what rewards, eval and logs read) plus its :class:`StepTrace`.

    ``completion_ids`` are the canvases' outputs in order (the argmax of each canvas's last
    step, as the native ``generate`` returns them, tokens after the EOS replaced by padding);
    ``steps[b, j]`` is the row's step (counted per row from 0) whose output token j is, -1
    for canvases the row did not run; ``logprobs`` is None (per-step log-probs live in the
    trace); ``mask_token_id`` is -1: there is no mask token.
    """

    trace: StepTrace | None = None

    def to(self, device: torch.device | str) -> StepRollout:
        """The rollout and its trace on ``device``."""
        moved = super().to(device)
        return replace(moved, trace=None if self.trace is None else self.trace.to(device))
