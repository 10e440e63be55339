"""Token rewards, returns and GAE over trace steps, and the clipped value loss (TraceRL).

All per-token tensors are ``[B, G]`` over completion positions. A rollout's trace steps are the
(shrunk) steps of its TraceRL views: the tokens scored together in one state. ``ranks`` numbers
them ``0..T_b-1`` per rollout in decoding order (-1 for tokens that are not trained on: padding,
post-EOS, never decoded). ``V_j`` is token j's value in the state it is scored in; the step
value and step reward are the means over the step's tokens, ``V*_t`` and ``r*_t``. Then::

    R*_t = r*_t + gamma R*_{t+1}
    A*_t = r*_t - V*_t + gamma V*_{t+1} + gamma lam A*_{t+1}         (0 after the last step)
    R_j  = r_j + gamma R*_{t+1}
    A_j  = r_j - V_j + gamma V*_{t+1} + gamma lam A*_{t+1}           (token j in step t)

so each token has its own value as baseline and bootstraps from step means. With
``gamma = lam = 1`` and an outcome reward ``R``, every token's return is ``R`` and
``A_j = R - V_j``.
"""

from __future__ import annotations

import torch

from unmask.objectives.base import ViewBatch
from unmask.objectives.loss import LossOutput


def step_ranks(views: ViewBatch, steps: torch.Tensor) -> torch.Tensor:
    """Rank of each scored token's trace step within its rollout, ``[B, G]`` (-1 elsewhere).

    ``views`` are TraceRL views (each token scored once); ``steps`` the rollout's trace. Tokens
    scored in one view and block form one step; it is ordered by its first trace step, so
    shrunk steps keep the decoding order.
    """
    n, c = views.scored.nonzero(as_tuple=True)
    b = views.rollout_index[n]
    j = views.completion_index[n, c]
    sigma = steps[b, j]
    ranks = torch.full_like(steps, -1)
    if len(n) == 0:
        return ranks
    _, group = torch.unique(torch.stack([n, views.canvas.blocks[b, c]]), dim=1,
                            return_inverse=True)  # fmt: skip
    first = torch.full((int(group.max()) + 1,), int(sigma.max()), device=steps.device)
    first = first.scatter_reduce(0, group, sigma, "amin")[group]
    pairs, inverse = torch.unique(torch.stack([b, first]), dim=1, return_inverse=True)
    rollout = pairs[0].contiguous()  # sorted: unique orders the pairs lexicographically
    rank = torch.arange(len(rollout), device=steps.device) - torch.searchsorted(rollout, rollout)
    ranks[b, j] = rank[inverse]
    return ranks


def token_rewards(
    ranks: torch.Tensor, outcome: torch.Tensor | None, process: torch.Tensor | None = None
) -> torch.Tensor:
    """``r_j``: the outcome ``[B]`` on the tokens of each rollout's last step, plus a per-token
    (process) reward ``[B, G]`` on every trained token."""
    trained = ranks >= 0
    rewards = torch.zeros(ranks.shape, device=ranks.device)
    if outcome is not None:
        last = ranks == ranks.max(dim=1, keepdim=True).values
        rewards = torch.where(trained & last, outcome.to(rewards)[:, None], rewards)
    if process is not None:
        rewards = rewards + torch.where(trained, process.to(rewards), 0.0)
    return rewards


def _step_means(x: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over each step's tokens, ``[B, T + 1]`` (column T, after the last step,
    and steps a rollout does not have are 0)."""
    trained = ranks >= 0
    steps = int(ranks.max()) + 1 if trained.any() else 0
    zeros = torch.zeros(ranks.shape[0], steps + 1, device=x.device)
    index = ranks.clamp(min=0)
    count = zeros.scatter_add(1, index, trained.float()).clamp(min=1)
    return zeros.scatter_add(1, index, torch.where(trained, x.float(), 0.0)) / count


def token_returns(rewards: torch.Tensor, ranks: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_j = r_j + gamma R*_{t+1}`` ``[B, G]`` (0 where ``ranks`` is -1). Returns do not
    depend on the values, so the value loss can be formed before any value is computed."""
    r_step = _step_means(rewards, ranks)
    ret = torch.zeros_like(r_step)  # column T stays 0: after the last step
    for t in reversed(range(r_step.shape[1] - 1)):
        ret[:, t] = r_step[:, t] + gamma * ret[:, t + 1]
    returns = rewards + gamma * ret.gather(1, ranks.clamp(min=0) + 1)
    return torch.where(ranks >= 0, returns, 0.0)


def gae(
    values: torch.Tensor, rewards: torch.Tensor, ranks: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """Token advantages ``A_j`` ``[B, G]`` (see the module doc); 0 where ``ranks`` is -1."""
    v_step, r_step = _step_means(values, ranks), _step_means(rewards, ranks)
    adv = torch.zeros_like(v_step)
    for t in reversed(range(v_step.shape[1] - 1)):
        adv[:, t] = (r_step[:, t] - v_step[:, t] + gamma * v_step[:, t + 1]
                     + gamma * lam * adv[:, t + 1])  # fmt: skip
    after = ranks.clamp(min=0) + 1
    advantages = (rewards - values + gamma * v_step.gather(1, after)
                  + gamma * lam * adv.gather(1, after))  # fmt: skip
    return torch.where(ranks >= 0, advantages, 0.0)


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over the ``mask`` entries (0 elsewhere)."""
    picked = values[mask]
    if picked.numel() < 2:
        return torch.where(mask, values, 0.0)
    return torch.where(mask, (values - picked.mean()) / (picked.std() + 1e-8), 0.0)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(target - predicted) / Var(target)`` over ``mask``: 1 is perfect, 0 no better
    than a constant (nan when the target is constant)."""
    target, predicted = target[mask].double(), predicted[mask].double()
    if target.numel() < 2:
        return float("nan")
    return float(1 - (target - predicted).var() / target.var())


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    rollout_index: torch.Tensor,
    divisors: torch.Tensor,
    epsilon: float | None = 0.2,
) -> LossOutput:
    """Clipped value loss ``1/2 max((V - R)^2, (V_clip - R)^2)`` of a micro-batch of views,
    ``V_clip = V_old + clip(V - V_old, -epsilon, epsilon)`` (``epsilon`` None: unclipped).

    Tensors are ``[N, W]`` view tensors; ``divisors`` ``[B]`` normalise each rollout's sum as
    in :func:`unmask.objectives.loss.policy_loss`, so micro-batch losses add up.
    """
    error = (values - returns) ** 2
    zero = torch.zeros((), device=values.device)
    clipped = torch.zeros_like(mask)
    if epsilon is not None:
        delta = values - old_values
        error = torch.maximum(error, (old_values + delta.clamp(-epsilon, epsilon) - returns) ** 2)
        clipped = mask & (delta.detach().abs() > epsilon)
    scale = torch.where(mask, 1.0 / divisors[rollout_index][:, None], zero)
    loss = (0.5 * error * scale).sum()
    count = mask.sum().clamp(min=1)
    metrics = {"value_clip_ratio": clipped.sum() / count}
    return LossOutput(loss, metrics)
