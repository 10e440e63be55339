"""Rewards of an RL step's rollouts: the task's reward functions on the decoded completions.

Reward code never stops training: a completion that any reward function could not score (it
returned None, or raised) is left out of the loss, and its reward is replaced by the mean of
its group's scored ones, so it moves no other completion's baseline. Per-token rewards
(process rewards) count as their sum unless the value model takes them token by token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from unmask.rewards.process import check_vectors, split_rewards, trace_columns
from unmask.sampling.rollout import Rollout
from unmask.tasks.base import reward_total

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """A rollout batch's rewards: ``rewards`` ``[B]`` (weighted totals; an unscored one its
    group's scored mean), ``scored`` ``[B]`` (every reward function scored it), ``per_token``
    ``[B, G]`` (the per-token part, when split off for the value model), and metrics."""

    completions: list[str]
    rewards: torch.Tensor
    scored: torch.Tensor
    per_token: torch.Tensor | None
    metrics: dict[str, float]


def score_rollouts(
    task: Any,
    tokenizer: Any,
    prompts: list[str],
    columns: dict[str, list[Any]],
    rollout: Rollout,
    num_generations: int,
    split_tokens: bool,
    step: int,
) -> Scores:
    """Decode and score ``rollout`` (its prompts and data ``columns``, one entry per rollout);
    ``split_tokens`` keeps per-token rewards apart from the totals."""
    completions = rollout.completion_texts(tokenizer)
    trace = trace_columns(rollout)
    scores = task.score(prompts, completions, {**columns, **trace})
    scores = check_vectors(scores, [len(ids) for ids in trace["completion_ids"]])
    per_token = None
    if split_tokens:
        names, weights = task.reward_names, task.reward_weights
        totals, per_token = split_rewards(scores, names, weights, rollout.completion_mask)
    else:
        totals = task.weighted_sum(scores)
    scored = torch.tensor([all(v[i] is not None for v in scores.values())
                           for i in range(len(prompts))])  # fmt: skip
    if not scored.all():
        logger.warning(
            "step %d: %d completion(s) could not be scored and are left out of the loss "
            "(first prompt: %r)",
            step,
            int((~scored).sum()),
            prompts[int((~scored).nonzero()[0])],
        )
    metrics = reward_metrics(scores)
    metrics["reward_unscored"] = float((~scored).sum())
    rewards = fill_unscored(totals, scored, num_generations)
    return Scores(completions, rewards, scored, per_token, metrics)


def fill_unscored(
    totals: list[float | None], scored: torch.Tensor, num_generations: int
) -> torch.Tensor:
    """Rewards ``[B]`` with each unscored one replaced by the mean of its group's scored ones,
    so it gets no advantage and moves no other one's baseline."""
    rewards = torch.tensor([0.0 if t is None else float(t) for t in totals])
    rewards = torch.where(scored, rewards, torch.zeros(()))
    groups, ok = rewards.view(-1, num_generations), scored.view(-1, num_generations)
    means = (groups * ok).sum(1) / ok.sum(1).clamp(min=1)
    return torch.where(ok, groups, means[:, None].expand_as(groups)).reshape(-1)


def reward_metrics(scores: dict[str, list[Any]]) -> dict[str, float]:
    """Mean and std of each reward function's scores (a per-token reward counts as its sum)."""
    metrics: dict[str, float] = {}
    for name, values in scores.items():
        present = torch.tensor([reward_total(v) for v in values if v is not None])
        if len(present):
            metrics[f"reward/{name}/mean"] = float(present.mean())
            metrics[f"reward/{name}/std"] = float(present.std()) if len(present) > 1 else 0.0
    return metrics


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """What a step reports of its rollouts: lengths, forwards and tokens per step, block."""
    lengths = rollout.completion_lengths.float()
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "nfe": float(rollout.num_steps.float().mean()),
        "tokens_per_step": float(rollout.tokens_per_step().mean()),
        "block_size": float(rollout.block_length),
    }
