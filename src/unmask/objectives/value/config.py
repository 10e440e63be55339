"""``value_model:`` of ``unmask rl``: the value model's settings and its per-token rewards.

The learner that trains the value model lives with the trainers
(:mod:`unmask.train.value_learner`): it takes its updates through their machinery.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from unmask.sampling.rollout import Rollout

logger = logging.getLogger(__name__)

OUTCOMES: tuple[str, ...] = ("group", "raw", "none")


@dataclass
class ValueConfig:
    """``value_model:`` of ``unmask rl`` (TraceRL's diffusion value model; docs/value.md).

    ``reward``: the outcome reward put on the last step's tokens: ``group`` (the trainer's
    group-normalised advantage, ``scale_rewards``), ``raw`` (the reward as scored) or ``none``
    (only ``token_reward``). ``token_reward``: ``"module:function"`` giving a reward per
    completion token (process reward), added to the outcome. ``shrink``: trace steps merged
    per value state; null is the objective's ``shrink`` (1 for objectives without one).
    ``epsilon``: clip range of the value around its pre-update value (null: unclipped).
    """

    enabled: bool = False
    init: str | None = None  # checkpoint to start from; null: the policy's starting weights
    lr: float = 5e-6
    epsilon: float | None = 0.2
    gamma: float = 1.0
    lam: float = 1.0
    train_every: int = 1
    iterations: int = 1
    whiten: bool = False
    reward: Literal["group", "raw", "none"] = "group"
    token_reward: str | None = None
    shrink: int | None = None

    def __post_init__(self) -> None:
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"value_model.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("train_every", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"value_model.{name} must be >= 1, got {getattr(self, name)}")
        if self.shrink is not None and self.shrink < 1:
            raise ValueError(f"value_model.shrink must be >= 1 or null, got {self.shrink}")
        if self.lr < 0:
            raise ValueError(f"value_model.lr must be >= 0, got {self.lr}")
        if self.epsilon is not None and self.epsilon <= 0:
            raise ValueError(f"value_model.epsilon must be > 0 or null, got {self.epsilon}")
        if self.reward not in OUTCOMES:
            raise ValueError(f"value_model.reward must be one of {OUTCOMES}, got {self.reward!r}")
        if self.token_reward is not None and ":" not in self.token_reward:
            raise ValueError(
                f"value_model.token_reward must look like 'module:function', "
                f"got {self.token_reward!r}"
            )


# -- per-token (process) rewards -------------------------------------------------------------
TokenReward = Callable[..., Sequence[Sequence[float] | None]]


def load_token_reward(spec: str) -> TokenReward:
    """The function ``"module:function"`` names (``value_model.token_reward``)."""
    module, _, name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"value_model.token_reward: cannot import {spec!r} ({err})") from err
    if not callable(func):
        raise ValueError(f"value_model.token_reward: {spec!r} is not callable")
    return func


def token_reward_vectors(
    func: TokenReward,
    prompts: Sequence[str],
    completions: Sequence[str],
    rollout: Rollout,
    columns: Mapping[str, list[Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``[B, G]`` and which rollouts got them ``[B]``.

    ``func(prompts, completions, completion_ids=..., **columns)`` returns, per completion, one
    number per completion token (``completion_ids[i]``: the scored ids, EOS included) or None.
    Like the task's rewards it never stops training: an exception, a wrong length or a
    non-finite number leaves the rollout unscored (out of the loss) with a warning.
    """
    masks = rollout.completion_mask.bool().cpu()
    ids = [row[m].tolist() for row, m in zip(rollout.completion_ids.cpu(), masks, strict=True)]
    name = getattr(func, "__name__", repr(func))
    try:
        values = list(func(list(prompts), list(completions), completion_ids=ids, **columns))
        if len(values) != len(ids):
            raise ValueError(f"{len(values)} vectors for {len(ids)} completions")
    except Exception:  # reward code never kills training
        logger.warning("token reward %s failed; its rollouts are left out", name, exc_info=True)
        values = [None] * len(ids)
    out = torch.zeros(masks.shape)
    ok = torch.zeros(len(ids), dtype=torch.bool)
    for i, (vector, mask) in enumerate(zip(values, masks, strict=True)):
        if vector is None:
            continue
        row = torch.as_tensor(list(vector), dtype=torch.float32)
        if row.shape != (int(mask.sum()),) or not torch.isfinite(row).all():
            logger.warning(
                "token reward %s: completion %d needs %d finite values, got %d; left out",
                name, i, int(mask.sum()), row.numel(),
            )  # fmt: skip
            continue
        out[i, mask] = row
        ok[i] = True
    return out, ok
