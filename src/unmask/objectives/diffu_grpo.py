"""diffu-GRPO (d1): every completion token scored from the fully masked completion.

One view per rollout: the whole completion window is masked and each real prompt token is
masked with probability ``p_mask_prompt`` (padding never); every completion token (up to and
including the first EOS) is scored. Summed over tokens this is d1's one-step mean-field
estimate of ``log p(o | q)``; the prompt mask is the only randomness, so the same view batch
must serve old, current and reference log-probs within an inner iteration (the trainer draws
one per iteration from its seeded generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.objectives.base import Objective, ViewBatch, uniform
from unmask.objectives.replay import replay
from unmask.sampling.rollout import Rollout


@dataclass
class DiffuGRPO(Objective):
    """diffu-GRPO (module doc): d1's one-step estimate, the completion fully masked and each
    prompt token masked with probability ``p_mask_prompt``."""

    p_mask_prompt: float = 0.15

    name = "diffu_grpo"
    masks_prompt = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_mask_prompt < 1.0:
            raise ValueError(
                f"diffu_grpo.p_mask_prompt must be in [0, 1), got {self.p_mask_prompt}"
            )

    def views(self, rollout: Rollout, generator: torch.Generator | None = None) -> ViewBatch:
        """One view per rollout scoring its whole completion (the prompt mask is random)."""
        rp = replay(rollout)
        rows = rp.rows()
        canvas = rp.canvas
        prompt = canvas.real[rows] & ~canvas.completion[rows]
        draw = uniform(tuple(prompt.shape), generator).to(prompt.device)
        masked = canvas.completion[rows] | (prompt & (draw < self.p_mask_prompt))
        return rp.views(rows, masked, rp.scorable[rows])
