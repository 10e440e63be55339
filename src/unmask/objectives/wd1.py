"""wd1 (weighted policy optimisation for dLLMs, arXiv 2507.08838): a weighted log-likelihood
with no importance ratio.

The paper's loss (Eq. 8) is ``L = E[1/G sum_i (-w+_i + w-_i) log pi(o_i | q)]`` with group-softmax
weights (Eq. 9) ``w+_i = softmax_j(psi A_j)_i`` and ``w-_i = softmax_j(-psi A_j)_i`` over the
``G`` completions of a prompt, ``A = R - mean_group(R)`` (recipe: ``scale_rewards: none``). It is
the weighted-likelihood form of reverse-KL regularised policy optimisation (Eqs. 4-7: the
optimal policy is ``pi_old exp(psi A)``, fitted by maximising ``exp(psi A) log pi``) plus the
``w-`` term that pushes down low-advantage completions; when a group's rewards all agree,
``w+ = w-`` and it contributes nothing. ``log pi(o | q)`` is d1's one-step estimate (the
``diffu_grpo`` views: completion fully masked, prompt tokens masked with probability
``p_mask_prompt``, every completion token scored), so wd1 is d1's estimator without d1's ratios.

No old or reference log-probs are needed (``ratio_free``): each inner iteration scores the
current policy once. ``reweight`` turns advantages into the coefficients ``w+ - w-``, so the
shared loss at ratio 1 has exactly wd1's gradient; with the ``dr_grpo`` normalisation
(``B G_max``) the loss is Eq. 8 averaged over prompts, divided by the completion window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from unmask.objectives.base import ViewBatch
from unmask.objectives.diffu_grpo import DiffuGRPO


@dataclass
class WD1(DiffuGRPO):
    """wd1 (module doc): d1's views, scored as a likelihood weighted by group-softmax
    coefficients ``w+ - w-`` instead of a clipped ratio."""

    psi: float = 1.0

    name = "wd1"
    loss_type = "dr_grpo"
    ratio_free: ClassVar[bool] = True
    num_iterations = 8  # the paper's passes per batch (Sudoku)
    scale_rewards = "none"  # the paper's A = R - mean

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.psi <= 0:
            raise ValueError(f"wd1.psi must be > 0, got {self.psi}")

    def reweight(
        self,
        views: ViewBatch,
        logprobs: torch.Tensor,
        advantages: torch.Tensor,
        lengths: torch.Tensor,
        num_generations: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients ``w+ - w-`` ``[B]`` in place of the advantages, and the view weights."""
        return wd1_coefficients(advantages, num_generations, self.psi), views.weights


def wd1_coefficients(advantages: torch.Tensor, num_generations: int, psi: float) -> torch.Tensor:
    """``w+ - w-`` of every rollout (Eq. 9), from advantages ``[B]`` in groups of
    ``num_generations`` consecutive rollouts."""
    if advantages.dim() != 1 or len(advantages) % num_generations:
        raise ValueError("wd1 needs one advantage per rollout, in whole groups (no value model)")
    grouped = psi * advantages.view(-1, num_generations)
    return (grouped.softmax(dim=1) - (-grouped).softmax(dim=1)).reshape(-1)
