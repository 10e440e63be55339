"""Group-relative advantages, as TRL's GRPO computes them.

Rewards come in consecutive groups of ``num_generations`` completions of one prompt.
``A = R - mean_group(R)``, then divided by a std according to ``scale_rewards``:

* ``group`` (TRL default): the group's std;
* ``batch``: the std over the whole batch (the mean stays per group);
* ``none`` (Dr. GRPO; d1 and AGRPO): no division.

Stds are Bessel-corrected and ``1e-4`` is added before dividing, as TRL does. A group whose
rewards all agree has zero advantages and no learning signal; ``drop_zero_std`` leaves it out
of ``kept`` so its rollouts can be skipped and left out of the loss normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")


@dataclass
class GroupAdvantages:
    """``advantages`` and ``kept`` ``[B]``, and metrics named as TRL logs them."""

    advantages: torch.Tensor
    kept: torch.Tensor
    metrics: dict[str, float]


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str | bool = "group",
    drop_zero_std: bool = False,
) -> GroupAdvantages:
    """Advantages of ``rewards`` ``[B]`` (``B`` a multiple of ``num_generations``)."""
    if scale_rewards is True or scale_rewards is False:
        scale_rewards = "group" if scale_rewards else "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if num_generations < 2:
        raise ValueError(
            f"num_generations must be >= 2 for group advantages, got {num_generations}"
        )
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1 or len(rewards) % num_generations:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by num_generations ({num_generations}); "
            f"got shape {tuple(rewards.shape)}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite (map failed rewards to a number first)")
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)
    group_std = grouped.std(dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std))
    kept = ~zero_std if drop_zero_std else torch.ones_like(zero_std)
    metrics = {
        "reward": float(rewards.mean()),
        "reward_std": float(group_std.mean()),
        "frac_reward_zero_std": float(zero_std.float().mean()),
    }
    return GroupAdvantages(advantages, kept, metrics)
