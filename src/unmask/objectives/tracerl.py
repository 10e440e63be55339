"""TraceRL: score every token at the state the sampler unmasked it from.

One view per (shrunk) trace step: the prompt, the completion tokens unmasked before the step,
masks elsewhere; scored are the tokens unmasked at the step (within the completion, so the final
EOS is scored and post-EOS tokens are not). The per-trace sum of the scored log-probs is the
exact log-likelihood of the trace given its unmasking order. ``shrink`` merges ``s``
consecutive steps of a block, scored from the state before the first of them.

``two_stream`` (block-causal models) packs one step of every block into each row: the forward
is ``[clean canvas | noisy copy]`` and noisy block k sees the clean blocks before it, which is
exactly what the sampler's forward saw. Rows per rollout drop from the number of steps to the
number of steps of its longest block, with the same log-probs.

``selection="exact"`` (the default) adds, for rollouts sampled with a token-dependent rule
(``low_confidence``, ``threshold``), the probability that the rule chose each step's positions
(:mod:`unmask.objectives.selection`); with ``shrink > 1`` each merged step's factor is scored
from the merged state, as its tokens are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.objectives.base import Objective, ViewBatch
from unmask.objectives.replay import replay, trace_groups
from unmask.objectives.selection import ExactSelection
from unmask.sampling.rollout import Rollout


@dataclass
class TraceRL(ExactSelection, Objective):
    """TraceRL (module doc): every (shrunk) trace step scored from the state the sampler
    unmasked it from, the trace's exact log-likelihood."""

    shrink: int = 1
    two_stream: bool = False

    name = "tracerl"
    scores_sampling_distribution = True
    loss_type = "dr_grpo"
    scores_trace_states = True
    supports_two_stream = True

    def __post_init__(self) -> None:
        if self.shrink < 1:
            raise ValueError(f"tracerl.shrink must be >= 1, got {self.shrink}")
        super().__post_init__()

    def views(self, rollout: Rollout, generator: torch.Generator | None = None) -> ViewBatch:
        """One view per (shrunk) step and block, or per step of every block (two-stream)."""
        rp = replay(rollout)
        group = trace_groups(rp, self.shrink)
        decoded, steps, completion = rp.decoded, rp.steps, rp.canvas.completion
        if self.two_stream:
            per_rollout = group.max(dim=1).values + 1
            rows = torch.repeat_interleave(torch.arange(rp.num_rollouts), per_rollout.cpu())
            rows = rows.to(steps.device)
            first = torch.cumsum(per_rollout, 0) - per_rollout
            g = (torch.arange(len(rows), device=steps.device) - first[rows])[:, None]
            masked = completion[rows] & ~(decoded[rows] & (group[rows] < g))
            scored = rp.scorable[rows] & (group[rows] == g)
            return self.with_choices(rp.views(rows, masked, scored, two_stream=True), rp, rollout)
        b, c = decoded.nonzero(as_tuple=True)
        keys = torch.stack([b, rp.canvas.blocks[b, c], group[b, c]])
        unique, inverse = torch.unique(keys, dim=1, return_inverse=True)
        first_step = torch.full((unique.shape[1],), steps.max() + 1, device=steps.device)
        first_step = first_step.scatter_reduce(0, inverse, steps[b, c], "amin")
        member = torch.full_like(steps, -1)
        member[b, c] = inverse
        rows = unique[0]
        view = torch.arange(len(rows), device=steps.device)[:, None]
        masked = completion[rows] & ~(decoded[rows] & (steps[rows] < first_step[:, None]))
        scored = rp.scorable[rows] & (member[rows] == view)
        return self.with_choices(rp.views(rows, masked, scored), rp, rollout)
