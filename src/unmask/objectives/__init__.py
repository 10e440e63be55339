"""RL objectives: each one a view builder plus its weighting over the shared clipped loss.

``get_objective(name, **options)`` builds one by name; see docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from unmask.objectives.advantages import SCALE_REWARDS, GroupAdvantages, group_advantages
from unmask.objectives.agrpo import AGRPO
from unmask.objectives.base import Objective, ViewBatch, token_logprobs
from unmask.objectives.coupled import Coupled
from unmask.objectives.diffu_grpo import DiffuGRPO
from unmask.objectives.elbo import ELBO
from unmask.objectives.loss import LOSS_TYPES, LossOutput, normalizers, policy_loss
from unmask.objectives.random_mask import RandomMask
from unmask.objectives.replay import Replay, replay
from unmask.objectives.tracerl import TraceRL

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (TraceRL, AGRPO, DiffuGRPO, Coupled, RandomMask, ELBO)
}


def get_objective(name: str, **options: Any) -> Objective:
    """The objective called ``name``, with its options (clear errors for unknown ones)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown options {unknown} for objective {name!r}; known: {known}")
    return cls(**options)


__all__ = [
    "AGRPO",
    "ELBO",
    "LOSS_TYPES",
    "OBJECTIVES",
    "SCALE_REWARDS",
    "Coupled",
    "DiffuGRPO",
    "GroupAdvantages",
    "LossOutput",
    "Objective",
    "RandomMask",
    "Replay",
    "TraceRL",
    "ViewBatch",
    "get_objective",
    "group_advantages",
    "normalizers",
    "policy_loss",
    "replay",
    "token_logprobs",
]
